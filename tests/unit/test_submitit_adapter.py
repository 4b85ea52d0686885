"""speedslurm/cluster/submitit_adapter.py relies on submitit internals: each assumption holds for the installed submitit,
and a broken one fails with a message that names the submitit version, what changed and where the adapter is."""

from __future__ import annotations

import re
import types
from pathlib import Path

import pytest
from repo import REPO

from speedslurm.cluster import submitit_adapter

ASSUMPTIONS = submitit_adapter.assumptions()


def _explain(what: str) -> str:
    return (f"submitit {submitit_adapter.version()} changed what speedslurm relies on; the adapter in "
            f"speedslurm/cluster/submitit_adapter.py assumes: {what} (tested with submitit{submitit_adapter.TESTED}; "
            "adapt the adapter, or install a submitit in that range)")


@pytest.mark.parametrize("what,check", ASSUMPTIONS, ids=[str(i) for i in range(len(ASSUMPTIONS))])
def test_assumption_holds(what: str, check: types.FunctionType) -> None:
    try:
        ok = check()
    except Exception as exc:  # an attribute gone, a signature unreadable: the same message
        pytest.fail(f"{_explain(what)}: {type(exc).__name__}: {exc}")
    assert ok, _explain(what)


def test_a_changed_submitit_fails_with_the_message(monkeypatch: pytest.MonkeyPatch) -> None:
    """What a submitit release that renamed its sbatch renderer looks like to the test above."""
    from submitit.slurm import slurm as submitit_slurm

    monkeypatch.delattr(submitit_slurm, "_make_sbatch_string")
    what, check = submitit_adapter.assumptions()[0]
    assert not check()
    assert "submitit 1.5.4 changed what speedslurm relies on; the adapter in speedslurm/cluster/submitit_adapter.py " \
           "assumes: submitit.slurm.slurm._make_sbatch_string" in _explain(what)


def test_pinned_range_is_the_tested_one() -> None:
    """pyproject.toml pins submitit to the range the adapter was tested with, and the installed one is in it."""
    text = (REPO / "pyproject.toml").read_text()
    assert re.search(r'"submitit' + re.escape(submitit_adapter.TESTED) + '"', text), \
        f"pyproject.toml should pin submitit{submitit_adapter.TESTED}, the range submitit_adapter.TESTED names"
    major, minor, patch = (int(x) for x in submitit_adapter.version().split(".")[:3])
    assert (1, 5, 4) <= (major, minor, patch) < (1, 6, 0), _explain("a version in " + submitit_adapter.TESTED)


def test_only_the_adapter_uses_submitit_internals() -> None:
    """No other module of the package reaches into submitit's private names."""
    pkg = Path(submitit_adapter.__file__).parent.parent
    private = re.compile(r"_make_sbatch_string|_make_submission_file_text|_submitit_command_str|_num_tasks\b|"
                         r"_submit_command\b|_cancel_at_deletion")
    users = sorted(str(p.relative_to(pkg)) for p in pkg.rglob("*.py")
                   if p.name != "submitit_adapter.py" and private.search(p.read_text()))
    assert users == [], f"submitit internals used outside speedslurm/cluster/submitit_adapter.py: {users}"
