"""The wheel's package list: every Python package under speedslurm/ and the two data folders are in it."""

from __future__ import annotations

from pathlib import Path

import tomllib

REPO = Path(__file__).resolve().parent.parent


def test_every_subpackage_and_data_folder_is_listed_for_the_wheel() -> None:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "speedslurm").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    mapped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert mapped == {"speedslurm.configs": "configs", "speedslurm.sbatch_templates": "sbatch_templates"}
    assert {"speedslurm.configs", "speedslurm.sbatch_templates"} <= listed
