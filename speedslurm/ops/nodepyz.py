"""``speedslurm-node.pyz``: the job side as one self-contained file, for the plain-sbatch templates.

A zipapp (``python3 speedslurm-node.pyz COMMAND ...``) built with the standard library's :mod:`zipapp` from the
installed package's node-side modules: the same code ``up`` and ``render`` run on the nodes, and nothing else
(standard library only, so the nodes need ``python3`` >= 3.10 and no installed package). ``speedslurm templates
DIR`` writes it next to the templates; the templates look for it there.
"""

from __future__ import annotations

import shutil
import tempfile
import zipapp
from pathlib import Path

NAME = "speedslurm-node.pyz"
# What the job side is made of, every module standard library only (tests/unit/test_render.py checks that the
# archive holds only these and runs without the installed package): the node/ folder whole, the run directory's contract (rundir/)
# and the errors, under the package's own __init__.py.
NODE_PACKAGES = ("node", "rundir")
NODE_MODULES = ("__init__.py", "errors.py")
_MAIN = '''"""speedslurm's job side: python3 speedslurm-node.pyz serve|template|record-job|probe ... (see --help)."""
import sys

from speedslurm.node.entry import node_main

sys.exit(node_main(sys.argv[1:]))
'''


def build(dest: Path) -> Path:
    """Write the archive to ``dest`` (a file path, or a folder to put :data:`NAME` in); returns its path."""
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / NAME
    package = Path(__file__).resolve().parent.parent  # speedslurm/
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "speedslurm"
        pkg.mkdir()
        for name in NODE_MODULES:
            shutil.copyfile(package / name, pkg / name)
        for folder in NODE_PACKAGES:
            for path in sorted((package / folder).rglob("*.py")):
                to = pkg / path.relative_to(package)
                to.parent.mkdir(parents=True, exist_ok=True)
                shutil.copyfile(path, to)
        (Path(tmp) / "__main__.py").write_text(_MAIN)
        part = dest.with_name(f".{dest.name}.tmp")
        zipapp.create_archive(tmp, part, interpreter="/usr/bin/env python3", compressed=True)
        part.replace(dest)
    return dest
