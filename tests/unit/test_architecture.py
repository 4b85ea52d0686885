"""docs/architecture.md stays true: the modules it names exist, it names every subpackage, and the CLI imports
nothing of the package but the API and the errors."""

from __future__ import annotations

import ast
import re
import typing as tp
from pathlib import Path

import pytest
from repo import REPO as ROOT

PACKAGE = ROOT / "speedslurm"
DOC = (ROOT / "docs" / "architecture.md").read_text()
SUBPACKAGES = sorted(p.parent.name for p in PACKAGE.glob("*/__init__.py"))


def test_every_module_path_named_exists() -> None:
    named = set(re.findall(r"speedslurm/[\w/]+\.py", DOC))
    # `folder/module.py` with folder one of the subpackages, as the tables write them
    folders = "|".join(SUBPACKAGES)
    named |= {f"speedslurm/{m}" for m in re.findall(rf"(?<![\w/.])((?:{folders})/\w+\.py)", DOC)}
    assert len(named) > 40
    assert sorted(n for n in named if not (ROOT / n).is_file()) == []


def test_every_module_of_the_tree_table_exists() -> None:
    """A row of the tree's table (`` `folder/` | ... ``) names the folder's modules by their bare file names."""
    rows = re.findall(r"^\| `(\w+)/` \|(.*)\|$", DOC, flags=re.M)
    assert sorted(folder for folder, _ in rows) == SUBPACKAGES
    missing = [f"{folder}/{name}" for folder, text in rows
               for name in re.findall(r"(?<![\w/.])(\w+\.py)", text) if not (PACKAGE / folder / name).is_file()]
    assert missing == []


def test_every_dotted_module_named_exists() -> None:
    missing = []
    for dotted in set(re.findall(r"\bspeedslurm(?:\.\w+)+", DOC)):
        parts = dotted.split(".")[1:]
        # a dotted name may end in an attribute (speedslurm.api.up): its longest module prefix must exist
        found = any((PACKAGE.joinpath(*parts[:n]).with_suffix(".py")).is_file()
                    or (PACKAGE.joinpath(*parts[:n]) / "__init__.py").is_file() for n in range(len(parts), 0, -1))
        # or a name the package's face defines (speedslurm.__version__)
        face = (PACKAGE / "__init__.py").read_text()
        found = found or (len(parts) == 1 and re.search(rf"^{parts[0]}\b", face, re.M) is not None)
        if not found:
            missing.append(dotted)
    assert missing == []


def test_every_subpackage_is_named() -> None:
    assert len(SUBPACKAGES) >= 10
    assert [p for p in SUBPACKAGES if f"`{p}/`" not in DOC] == []


def _internal_imports(path: Path) -> set[str]:
    """The speedslurm modules ``path`` imports (relative imports resolved), lazy ones included."""
    package = ["speedslurm", *path.parent.relative_to(PACKAGE).parts]
    out: set[str] = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            if node.level:
                base = ".".join(package[: len(package) - node.level + 1])
                if node.module:
                    out.add(f"{base}.{node.module}")
                else:
                    out.update(f"{base}.{a.name}" for a in node.names)
            elif node.module and node.module.split(".")[0] == "speedslurm":
                out.add(node.module)
        elif isinstance(node, ast.Import):
            out.update(a.name for a in node.names if a.name.split(".")[0] == "speedslurm")
    return out


def test_cli_imports_only_api_and_errors() -> None:
    allowed = ("speedslurm.api", "speedslurm.errors", "speedslurm.cli", "speedslurm.__version__")
    wrong = {f"{p.name}: {m}" for p in sorted((PACKAGE / "cli").glob("*.py")) for m in _internal_imports(p)
             if not (m in allowed or m.startswith(tuple(a + "." for a in allowed)))}
    assert sorted(wrong) == []


def test_the_diagram_draws_every_import_between_folders() -> None:
    """The Mermaid diagram's arrows are the imports between the subpackages (errors.py and polling.py, under
    everything, are left out of it), no more and no fewer."""
    block = re.search(r"```mermaid\n(.*?)```", DOC, flags=re.S)
    assert block is not None
    drawn = set(re.findall(r"^\s*(\w+) -?\.?-+>(?:\|[^|]*\|)? (\w+)\s*$", block.group(1), flags=re.M))
    imported = set()
    for path in PACKAGE.glob("*/*.py"):
        source = path.parent.name
        for module in _internal_imports(path):
            parts = module.split(".")
            if len(parts) > 1 and parts[1] in SUBPACKAGES and parts[1] != source:
                imported.add((source, parts[1]))
    assert sorted(imported - drawn) == [] and sorted(drawn - imported) == []


def test_a_new_executor_is_one_class_and_one_registry_line(monkeypatch: pytest.MonkeyPatch) -> None:
    """A do-nothing executor: its class (the interface and the capabilities) and its line in the registry are
    all it takes for the planner and ``--executor`` to know it."""
    from speedslurm.api import executor_names
    from speedslurm.cluster import registry
    from speedslurm.cluster.executor import Executor
    from speedslurm.model.registry import ModelSpec
    from speedslurm.planning.plan import make_plan
    from speedslurm.settings.settings import load_settings

    class Nothing(Executor):
        name = "nothing"
        alive_most_s = 1.0
        places_followers = sizes_devices = pins_model_host = writes_job_script = False

        def nodes_available(self, settings: tp.Any) -> None:
            return None

        def submit(self, plan: tp.Any, run_dir: tp.Any, fn: tp.Any) -> dict[str, tp.Any]:
            return {"job_ids": []}

        def live_job_ids(self, dep: tp.Any) -> list[str]:
            return []

        def job_states(self, job_ids: tp.Any) -> dict[str, tp.Any]:
            return {}

        def views(self, dep: tp.Any, states: tp.Any = None) -> list[tp.Any]:
            return []

        def cancel(self, dep: tp.Any) -> bool:
            return False

    monkeypatch.setitem(registry._EXECUTORS, "nothing", Nothing())  # the registry line
    monkeypatch.setattr(registry, "NAMES", tuple(registry._EXECUTORS))
    path = Path("/models/m.gguf")
    model = ModelSpec(name="m", path=path, files=(path,), weights_bytes=10**12, n_layer=80, n_head_kv=8,
                      head_dim=128, head_dim_v=128, ctx=8192, host="node1", local=False)
    plan = make_plan(load_settings(environ={}), model, runs_on=registry.get("nothing"))
    # sized as its capabilities say: one node however big the model, no leader pinned to the model's host
    assert (plan.executor, plan.nodes, plan.leader_host) == ("nothing", 1, None)
    assert "nothing" in executor_names()
