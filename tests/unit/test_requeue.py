"""Requeue and preemption without a cluster: a requeued job keeps its id, so every handshake file carries the
start it belongs to (its epoch, Slurm's restart count) and only the current start's files count."""

from __future__ import annotations

import dataclasses
import threading
import typing as tp
from pathlib import Path

import pytest
import records
from longbatch import wait_until
from test_batch_runner import KEY, assert_exactly_once_ok, endpoint, prompts_file, run
from test_deploy_unit import _dep, _endpoint

from devtools.stubserver import StubServer
from speedslurm.batch.sources import RunDirSource
from speedslurm.cluster import slurm
from speedslurm.cluster.slurm import JobState
from speedslurm.deployments.status import replica_statuses
from speedslurm.node import roles as jobside
from speedslurm.rundir.layout import RunDir
from speedslurm.rundir.records import Endpoint, Failed, current_epoch, write_json_atomic


def test_the_job_side_takes_only_files_of_its_own_start(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SLURM_JOB_ID", "7")
    monkeypatch.delenv("SPEEDSLURM_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_ARRAY_JOB_ID", raising=False)
    monkeypatch.delenv("SLURM_RESTART_COUNT", raising=False)
    assert current_epoch() == 0
    def f(**kw: tp.Any) -> Failed:
        return Failed.from_json(records.failed(**kw))

    assert jobside._ours(f(job_id="7")) and jobside._ours(f(job_id="7", epoch=0))
    monkeypatch.setenv("SLURM_RESTART_COUNT", "2")
    assert current_epoch() == 2
    assert not jobside._ours(f(job_id="7"))  # the first start's follower file: a dead port now
    assert not jobside._ours(f(job_id="7", epoch=1))
    assert jobside._ours(f(job_id="7", epoch=2))
    assert not jobside._ours(f(job_id="8", epoch=2))


def test_squeue_gives_the_restart_count(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(slurm, "call", lambda argv, **kw: "7+0|PENDING|BeginTime|(null)|1\n7+1|PENDING|BeginTime||1\n")
    states = slurm.job_states(["7"])
    assert states["7+0"].restarts == 1 and states["7+0"].state == "PENDING"


def test_status_of_a_requeued_job_follows_its_current_start(tmp_path: Path) -> None:
    dep = _dep(tmp_path, ["7"])
    rd = dep.run_dir
    write_json_atomic(rd.endpoint_path(0), _endpoint("7"))  # the first start's (no epoch: 0)
    write_json_atomic(rd.loading_path(0), records.loading(job_id="7"))
    write_json_atomic(rd.failed_path(0), records.failed(job_id="7", role="leader", reason="killed by the requeue"))

    def states(word: str, restarts: int | None) -> dict[str, JobState]:
        return {f"7+{c}": JobState(f"7+{c}", word, "BeginTime" if word == "PENDING" else "None", "", "",
                                   restarts) for c in (0, 1)}

    # Slurm kills the first start (COMPLETING) with the restart already counted: being requeued, not ended
    st = replica_statuses(dep, states("COMPLETING", 1))[0]
    assert (st.state, st.why) == ("PENDING", "requeued (start 2 waits)")
    assert replica_statuses(dep, states("COMPLETING", 0))[0].state == "FAILED"  # the last start's own failure
    st = replica_statuses(dep, states("PENDING", 1))[0]
    assert (st.state, st.endpoint, st.failure) == ("PENDING", None, None)
    assert st.why.startswith("requeued") and st.restarts == 1
    # queued again with the restart count unknown: still never READY
    assert replica_statuses(dep, states("PENDING", None))[0].state == "PENDING"
    assert replica_statuses(dep, states("RUNNING", 1))[0].state == "STARTING"
    write_json_atomic(rd.loading_path(0), records.loading(job_id="7", epoch=1))
    assert replica_statuses(dep, states("RUNNING", 1))[0].state == "LOADING"
    write_json_atomic(rd.endpoint_path(0), {**_endpoint("7"), "epoch": 1, "url": "http://10.77.0.12:2"})
    st = replica_statuses(dep, states("RUNNING", 1))[0]
    assert st.state == "READY" and st.endpoint is not None and st.endpoint.url.endswith(":2")
    write_json_atomic(rd.failed_path(0), records.failed(job_id="7", epoch=1, role="leader", reason="new failure"))
    assert replica_statuses(dep, states("RUNNING", 1))[0].state == "FAILED"


def test_a_batch_waits_through_a_requeue_and_goes_on_at_the_new_endpoint(tmp_path: Path) -> None:
    """The replica's endpoint stops counting (Slurm says restart 1) and its server goes; later the next start
    writes its endpoint: the batch goes on there, every prompt once.

    The first start's stand-in answers in 0.02 s on 2 slots: the batch holds 10 s of its work, so it still runs
    when the test requeues it after 10 answers, however fast the machine. The second start's answers at once."""
    n = 1000
    prompts = prompts_file(tmp_path, n)
    out = tmp_path / "p.results.jsonl"
    rd = RunDir(tmp_path / "dep")
    rd.replica_dir(0).mkdir(parents=True)
    restarts: dict[int, int] = {0: 0}
    rejected: list[int] = []  # the epochs of the endpoints the source looked at and did not take

    def job_failures() -> dict[int, str]:
        return {}

    def accept(ep: Endpoint) -> bool:
        if ep.epoch != restarts[0]:
            rejected.append(ep.epoch)
            return False
        return True

    source = RunDirSource(rd, 1, job_failures=job_failures, alive_every=0.05, accept=accept)
    first = StubServer(api_key=KEY, slots=2, latency=0.02)
    second = StubServer(api_key=KEY, slots=2)
    first.start()
    write_json_atomic(rd.endpoint_path(0), endpoint(first.url).to_json())
    result: dict[str, tp.Any] = {}

    def batch() -> None:
        result["summary"] = run(source, prompts, out)

    thread = threading.Thread(target=batch)
    thread.start()
    try:
        wait_until("10 answers", lambda: first.stats.completions >= 10, guard=30, every=0.01)
        restarts[0] = 1  # scontrol requeue: Slurm now says restart 1
        first.close_now()
        # queued, starting: the batch looks at the run directory again and again (the first start's endpoint is
        # not taken) and waits instead of failing
        wait_until("the batch waiting for the next start", lambda: len(rejected) >= 20 or not thread.is_alive(),
                   guard=30, every=0.01)
        assert thread.is_alive() and set(rejected) == {0}
        second.start()
        write_json_atomic(rd.endpoint_path(0), dataclasses.replace(endpoint(second.url), epoch=1).to_json())
        thread.join(30)
    finally:
        first.stop()
        second.stop()
    assert not thread.is_alive()
    s = result["summary"]
    assert s.status == "completed" and s.ok + s.skipped == n
    assert first.stats.completions < n and second.stats.completions > 0
    assert_exactly_once_ok(out, n)
