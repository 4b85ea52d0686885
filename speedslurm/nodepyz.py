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
# The modules the job side imports, every one standard library only (tests/test_contract.py checks that
# the archive runs without the installed package).
NODE_MODULES = ("__init__", "binaries", "contract", "errors", "idle", "jobentry", "jobprocs", "jobside", "jobtemplate",
                "nodenet", "rundir")
_MAIN = '''"""speedslurm's job side: python3 speedslurm-node.pyz serve|template|record-job|probe ... (see --help)."""
import sys

from speedslurm.jobentry import node_main

sys.exit(node_main(sys.argv[1:]))
'''


def build(dest: Path) -> Path:
    """Write the archive to ``dest`` (a file path, or a folder to put :data:`NAME` in); returns its path."""
    dest = Path(dest)
    if dest.is_dir():
        dest = dest / NAME
    here = Path(__file__).resolve().parent
    with tempfile.TemporaryDirectory() as tmp:
        pkg = Path(tmp) / "speedslurm"
        pkg.mkdir()
        for name in NODE_MODULES:
            shutil.copyfile(here / f"{name}.py", pkg / f"{name}.py")
        (Path(tmp) / "__main__.py").write_text(_MAIN)
        part = dest.with_name(f".{dest.name}.tmp")
        zipapp.create_archive(tmp, part, interpreter="/usr/bin/env python3", compressed=True)
        part.replace(dest)
    return dest
