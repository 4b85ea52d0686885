"""Executors behind one interface: Slurm and local processes answer the same questions (submit, states, cancel),
and the client's status never asks which one it has."""

from __future__ import annotations

import inspect
import os
import re
from pathlib import Path

import pytest
import records

from speedslurm.cluster import executor as executors
from speedslurm.cluster import slurm
from speedslurm.cluster.registry import NAMES, executor_for, get, live_job_ids
from speedslurm.deployments.lifecycle import down
from speedslurm.deployments.status import replica_statuses
from speedslurm.errors import UsageError
from speedslurm.rundir.layout import Deployment, RunDir, make_private_dir

PACKAGE = Path(executors.__file__).parent.parent


def _dep(tmp_path: Path, executor: str, job_ids: list[str], replicas: int = 1, **info: object) -> Deployment:
    rd = RunDir(make_private_dir(tmp_path / "dep-x"))
    rec = records.deployment(rd.root, replicas=replicas, job_ids=job_ids, nodes=2, executor=executor, **info)
    for r in range(replicas):
        rd.replica_dir(r).mkdir()
    return Deployment(rd, rec)


def test_both_executors_implement_the_whole_interface() -> None:
    abstract = {name for name, member in inspect.getmembers(executors.Executor)
                if getattr(member, "__isabstractmethod__", False)}
    assert abstract == {"nodes_available", "submit", "live_job_ids", "job_states", "views", "cancel"}
    for name in NAMES:
        ex = get(name)
        assert ex.name == name and not inspect.isabstract(type(ex))


def test_an_unknown_executor_is_refused_with_the_choices() -> None:
    with pytest.raises(UsageError) as err:
        get("kubernetes")
    assert err.value.message == "unknown executor 'kubernetes'"
    assert err.value.fix == "use --executor slurm or --executor local"


def test_no_client_module_branches_on_the_executors_name() -> None:
    """deploy, status, waiting and the API ask the executor; only executors.py knows the names."""
    for module in ("deployments/lifecycle.py", "deployments/record.py", "deployments/status.py",
                   "deployments/waiting.py", "api/deployments.py", "cli/deploy_cmds.py", "cli/submit_cmd.py",
                   "cli/batch_cmds.py"):
        text = (PACKAGE / module).read_text()
        found = re.findall(r"""executor\s*[!=]=\s*["'](?:local|slurm)["']""", text)
        assert found == [], f"{module} branches on the executor's name: {found}"


def test_local_replica_whose_processes_are_gone_has_ended_and_costs_slurm_nothing(tmp_path: Path,
                                                                                  monkeypatch) -> None:
    def no_slurm(*_a: object, **_k: object) -> None:
        raise AssertionError("a local deployment asked Slurm")

    monkeypatch.setattr(slurm, "job_states", no_slurm)
    dead = os.getpid() + 10_000_000  # no such process
    dep = _dep(tmp_path, "local", [str(dead)])
    view = executor_for(dep).views(dep)[0]
    assert (view.job_state, view.final, view.gone, view.nodes) == ("ENDED", True, "gone", "localhost")
    st = replica_statuses(dep)[0]
    assert (st.state, st.why, st.restarts) == ("ENDED", "its processes are gone", None)
    assert live_job_ids(dep) == []
    # Nothing ran: down cancels nothing and the deployment is not marked cancelled.
    assert down(dep) == [str(dead)] and "cancelled_at" not in dep.reload().info


def test_slurm_cancel_names_each_job_once_by_its_base_id(tmp_path: Path, monkeypatch) -> None:
    cancelled: list[list[str]] = []
    monkeypatch.setattr(slurm, "scancel", lambda ids: cancelled.append(list(ids)))
    monkeypatch.setattr(slurm, "job_states", lambda ids: {})
    dep = _dep(tmp_path, "slurm", ["41_0", "41_1"], replicas=2)
    assert down(dep) == ["41_0", "41_1"]
    assert cancelled == [["41", "41"]] and dep.reload().info["cancelled_at"]
    views = executor_for(dep).views(dep, {})
    assert [(v.job_id, v.unsubmitted) for v in views] == [("41_0", False), ("41_1", False)]
