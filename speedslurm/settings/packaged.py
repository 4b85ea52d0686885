"""Files the program reads at run time that live outside the Python sources: ``configs/`` (the model registry
and the cluster profiles) and ``sbatch_templates/``.

One copy of each is kept in the source tree, at the top level where users read and edit them; the wheel
carries them as package data (``speedslurm/configs``, ``speedslurm/sbatch_templates``, mapped in
pyproject.toml). An installed package finds its own copy; a checkout finds the top-level folder.
"""

from __future__ import annotations

from pathlib import Path

CONFIGS = "configs"
TEMPLATES = "sbatch_templates"


def data_dir(name: str) -> Path | None:
    """The folder ``name`` as installed in the wheel, else beside the checkout's package, else None."""
    package = Path(__file__).resolve().parent.parent  # speedslurm/
    for candidate in (package / name, package.parent / name):
        if candidate.is_dir():
            return candidate
    return None
