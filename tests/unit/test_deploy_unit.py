"""Client-side deployment state from the run directory and Slurm's view, without a cluster."""

from __future__ import annotations

from pathlib import Path

import records

from speedslurm.cluster.slurm import JobState
from speedslurm.deployments.status import deployment_state, replica_statuses
from speedslurm.rundir.layout import Deployment, RunDir, make_private_dir
from speedslurm.rundir.records import Endpoint, write_json_atomic


def _dep(tmp_path: Path, job_ids: list[str], replicas: int = 1) -> Deployment:
    rd = RunDir(make_private_dir(tmp_path / "dep-1"))
    info = records.deployment(rd.root, replicas=replicas, job_ids=job_ids, nodes=2)
    for r in range(replicas):
        rd.replica_dir(r).mkdir()
    return Deployment(rd, info)


def _endpoint(job_id: str, replica: int = 0) -> dict:
    return Endpoint(url="http://10.77.0.11:1", api_key="k", model="m", deployment_id="dep-1", replica=replica,
                    job_id=job_id, leader_node="n1", follower_nodes=["n2"], rpc_servers=[], llama_version="v",
                    parallel=4, ctx=1, started_at=0, ready_at=0).to_json()


def test_states_follow_the_handshake_files(tmp_path: Path) -> None:
    dep = _dep(tmp_path, ["7"])
    running = {"7+0": JobState("7+0", "RUNNING"), "7+1": JobState("7+1", "RUNNING")}
    assert replica_statuses(dep, {"7+0": JobState("7+0", "PENDING")})[0].state == "PENDING"
    assert replica_statuses(dep, running)[0].state == "STARTING"
    write_json_atomic(dep.run_dir.loading_path(0), records.loading(job_id="7"))
    assert replica_statuses(dep, running)[0].state == "LOADING"
    write_json_atomic(dep.run_dir.endpoint_path(0), _endpoint("7"))
    st = replica_statuses(dep, running)[0]
    assert st.state == "READY" and st.endpoint is not None
    ended = {"7+0": JobState("7+0", "CANCELLED"), "7+1": JobState("7+1", "CANCELLED")}
    assert replica_statuses(dep, ended)[0].state == "ENDED"
    write_json_atomic(dep.run_dir.failed_path(0), records.failed(job_id="7", reason="boom"))
    assert replica_statuses(dep, running)[0].state == "FAILED"


def test_a_node_failure_is_failed_not_ended(tmp_path: Path) -> None:
    dep = _dep(tmp_path, ["7"])
    states = {"7+0": JobState("7+0", "RUNNING"), "7+1": JobState("7+1", "NODE_FAIL")}
    assert replica_statuses(dep, states)[0].state == "FAILED"


def test_stale_endpoint_and_failure_of_another_job_are_ignored(tmp_path: Path) -> None:
    dep = _dep(tmp_path, ["8"])
    write_json_atomic(dep.run_dir.endpoint_path(0), _endpoint("5"))  # left by job 5
    write_json_atomic(dep.run_dir.failed_path(0), records.failed(job_id="5", reason="old"))
    write_json_atomic(dep.run_dir.loading_path(0), records.loading(job_id="5"))
    st = replica_statuses(dep, {"8+0": JobState("8+0", "RUNNING")})[0]
    assert st.state == "STARTING" and st.endpoint is None and st.failure is None


def test_array_replicas_and_pending_array(tmp_path: Path) -> None:
    dep = _dep(tmp_path, ["9_0", "9_1"], replicas=2)
    pending = {"9_[0-1]": JobState("9_[0-1]", "PENDING", "Resources")}
    assert [s.state for s in replica_statuses(dep, pending)] == ["PENDING", "PENDING"]
    write_json_atomic(dep.run_dir.endpoint_path(1), _endpoint("9_1", replica=1))
    states = {"9_0": JobState("9_0", "RUNNING"), "9_1": JobState("9_1", "RUNNING")}
    statuses = replica_statuses(dep, states)
    assert [s.state for s in statuses] == ["STARTING", "READY"]
    assert deployment_state(statuses) == "READY"


def test_status_probe_asks_slurm_at_most_once_a_second(tmp_path: Path, monkeypatch) -> None:
    from speedslurm.cluster import slurm
    from speedslurm.deployments.status import StatusProbe

    dep = _dep(tmp_path, ["7"])
    calls = []
    monkeypatch.setattr(slurm, "job_states",
                        lambda ids: calls.append(ids) or {"7+0": JobState("7+0", "RUNNING")})
    now = [0.0]
    probe = StatusProbe(dep, slurm_every=1.0, clock=lambda: now[0])
    for _ in range(10):
        assert probe()[0].state == "STARTING"
        now[0] += 0.1
    assert len(calls) == 1
    write_json_atomic(dep.run_dir.failed_path(0), records.failed(job_id="7", reason="boom"))
    assert probe()[0].state == "FAILED"  # a failure shows at once, without asking Slurm
    assert len(calls) == 1
    now[0] = 5.0
    probe()
    assert len(calls) == 2  # a second later it asks again


def test_a_completing_job_no_longer_serves(tmp_path: Path) -> None:
    dep = _dep(tmp_path, ["7"])
    write_json_atomic(dep.run_dir.endpoint_path(0), _endpoint("7"))
    states = {"7+0": JobState("7+0", "COMPLETING"), "7+1": JobState("7+1", "COMPLETING")}
    assert replica_statuses(dep, states)[0].state == "ENDED"


def test_a_job_gone_from_the_queue_has_ended_even_without_accounting(monkeypatch) -> None:
    from speedslurm.cluster import slurm
    from speedslurm.errors import CommandError

    def fake_call(argv, **kw):
        if argv[0] == "squeue":
            if "12" in argv[3]:
                return "12_0|RUNNING|None|n1\n"
            raise CommandError(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
        return "11|RUNNING||n3\n"  # accounting lags: it still says RUNNING for a job squeue forgot

    monkeypatch.setattr(slurm, "call", fake_call)
    states = slurm.job_states(["12_0", "12_1"])
    assert slurm.state_for("12_0", states).state == "RUNNING"
    assert slurm.state_for("12_1", states).state == "GONE"
    states = slurm.job_states(["11"])
    assert slurm.state_for("11", states).state == "GONE" and slurm.state_for("11", states).final


def test_an_unreachable_controller_is_not_taken_for_an_ended_job(monkeypatch) -> None:
    from speedslurm.cluster import slurm
    from speedslurm.errors import CommandError

    def fake_call(argv, **kw):
        if argv[0] == "squeue":
            raise CommandError(argv, 1, "", "Unable to contact slurm controller (connect failure)")
        return ""

    monkeypatch.setattr(slurm, "call", fake_call)
    assert slurm.state_for("12", slurm.job_states(["12"])) is None


def test_logs_refuse_a_replica_the_deployment_does_not_have_and_negative_counts(tmp_path: Path) -> None:
    import os
    import subprocess
    import sys

    runs = tmp_path / "runs"
    (runs / "m-20260101-abcd").mkdir(parents=True)
    records.deployment(runs / "m-20260101-abcd", replicas=2, executor="local", job_ids=["1"])
    env = {**os.environ, "SPEEDSLURM_RUN__DIR": str(runs), "SPEEDSLURM_PROFILE": "local"}
    for args, words in ((["--replica", "2"], "has no replica 2"), (["--replica", "-1"], "-1 is not in the range"),
                        (["--lines", "-5"], "-5 is not in the range")):
        res = subprocess.run([sys.executable, "-m", "speedslurm", "logs", "m-20260101-abcd", *args],
                             capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert res.returncode == 2 and words in res.stderr and "Traceback" not in res.stderr, res.stderr
