"""The wheel's package list: every Python package under speedslurm/ and the two data folders are in it, and
nothing that only the tests, the demo and the benchmarks use."""

from __future__ import annotations

import ast
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import tomllib
from repo import REPO


def test_every_subpackage_and_data_folder_is_listed_for_the_wheel() -> None:
    conf = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]
    listed = set(conf["packages"])
    found = {".".join(p.parent.relative_to(REPO).parts) for p in (REPO / "speedslurm").rglob("__init__.py")}
    assert found <= listed, f"add {sorted(found - listed)} to [tool.setuptools] packages in pyproject.toml"
    mapped = tomllib.loads((REPO / "pyproject.toml").read_text())["tool"]["setuptools"]["package-dir"]
    assert mapped == {"speedslurm.configs": "configs", "speedslurm.sbatch_templates": "sbatch_templates"}
    assert {"speedslurm.configs", "speedslurm.sbatch_templates"} <= listed


def test_the_wheel_carries_no_test_only_module(tmp_path: Path, offline_pip: dict[str, str]) -> None:
    """The stub server and the test models (devtools/) stay in the checkout: the built wheel holds only the
    product, and nothing in it imports devtools."""
    src = tmp_path / "src"
    files = subprocess.run(["git", "ls-files", "-co", "--exclude-standard", "-z"], cwd=REPO, capture_output=True,
                           check=True).stdout.split(b"\0")
    for rel in filter(None, files):
        if (REPO / rel.decode()).is_file():
            (src / rel.decode()).parent.mkdir(parents=True, exist_ok=True)
            shutil.copy2(REPO / rel.decode(), src / rel.decode())
    built = subprocess.run([sys.executable, "-m", "pip", "wheel", "-q", "--no-deps", "--wheel-dir",
                            str(tmp_path / "dist"), str(src)], capture_output=True, text=True, timeout=600,
                           env={**os.environ, **offline_pip})
    assert built.returncode == 0, f"pip wheel failed:\n{built.stderr[-3000:]}"
    (wheel,) = (tmp_path / "dist").glob("speedslurm-*.whl")
    with zipfile.ZipFile(wheel) as zf:
        modules = {n: zf.read(n).decode() for n in zf.namelist() if n.endswith(".py")}
    assert "speedslurm/batch/runner.py" in modules, sorted(modules)
    dev_only = {p.stem for p in (REPO / "devtools").glob("*.py")} - {"__init__"}
    assert dev_only >= {"stubserver", "testmodels"}
    shipped = sorted(n for n in modules if not n.startswith("speedslurm/") or Path(n).stem in dev_only)
    assert not shipped, f"test-only modules in the wheel: {shipped}"
    importers = sorted(n for n, text in modules.items() for node in ast.walk(ast.parse(text))
                       if isinstance(node, (ast.Import, ast.ImportFrom))
                       and any((name or "").split(".")[0] == "devtools" for name in
                               ([a.name for a in node.names] if isinstance(node, ast.Import) else [node.module])))
    assert not importers, f"modules of the wheel import devtools, which the wheel does not carry: {importers}"
