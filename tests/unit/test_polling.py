"""Politeness to slurmctld (issue 11), with Slurm faked at its commands and a fake clock: only live deployments
are asked about, with one squeue for all of them, sacct only for jobs squeue no longer lists, and less and less
often while nothing changes. tests/real/test_slurm_politeness.py measures the same on the real bed."""

from __future__ import annotations

import json
import typing as tp
from pathlib import Path

import pytest
import records

from speedslurm.batch.sources import RunDirSource
from speedslurm.cluster import slurm
from speedslurm.cluster.registry import live_job_ids
from speedslurm.deployments.status import StatusProbe, replica_statuses, statuses_of
from speedslurm.errors import CommandError
from speedslurm.polling import Backoff
from speedslurm.rundir.layout import Deployment, RunDir, make_private_dir


class Clock:
    def __init__(self) -> None:
        self.now = 0.0

    def __call__(self) -> float:
        return self.now


class Slurm:
    """squeue -j and sacct -j answering from ``queue`` (id -> state) and ``accounting`` (id -> state); every
    call is logged."""

    def __init__(self) -> None:
        self.queue: dict[str, str] = {}
        self.accounting: dict[str, str] = {}
        self.calls: list[list[str]] = []

    def __call__(self, argv: list[str], **kw: tp.Any) -> str:
        self.calls.append(list(argv))
        ids = argv[argv.index("-j") + 1].split(",")
        if argv[0] == "squeue":
            rows = [(k, v) for k, v in self.queue.items() if k.split("+")[0].split("_")[0] in ids]
            if not rows:
                raise CommandError(argv, 1, "", "slurm_load_jobs error: Invalid job id specified")
            return "".join(f"{k}|{v}|None|n1\n" for k, v in rows)
        if argv[0] == "sacct":
            return "".join(f"{k}|{v}|0:0|n1\n" for k, v in self.accounting.items()
                           if k.split("+")[0].split("_")[0] in ids)
        raise AssertionError(argv)

    def count(self, command: str) -> int:
        return sum(1 for c in self.calls if c[0] == command)


@pytest.fixture
def fake(monkeypatch: pytest.MonkeyPatch) -> Slurm:
    f = Slurm()
    monkeypatch.setattr(slurm, "call", f)
    return f


def _dep(root: Path, name: str, job_ids: list[str], replicas: int = 1) -> Deployment:
    rd = RunDir(make_private_dir(root / name))
    info = records.deployment(rd.root, replicas=replicas, job_ids=job_ids, nodes=2)
    for r in range(replicas):
        make_private_dir(rd.replica_dir(r))
    return Deployment(rd, info)


def test_backoff_doubles_while_nothing_changes_and_resets_on_a_change() -> None:
    clock = Clock()
    b = Backoff(1.0, 30.0, clock)
    asked_at = []
    answer = "PENDING"
    while clock.now < 200:
        asked = b.due()
        if asked:
            asked_at.append(clock.now)
        if clock.now >= 100:
            answer = "RUNNING"
        b.note(answer, asked)
        clock.now = round(clock.now + 0.5, 1)
    gaps = [round(b - a, 1) for a, b in zip(asked_at, asked_at[1:], strict=False)]
    assert gaps[:6] == [1.0, 2.0, 4.0, 8.0, 16.0, 30.0]
    assert max(gaps) == 30.0
    # the change at 100 s (seen by the poll at 100 s, between questions) brings the next question 1 s after the
    # last one, then it backs off again
    after = [t for t in asked_at if t >= 100]
    assert after[1] - after[0] == 2.0 and after[0] - max(t for t in asked_at if t < 100) <= 30.0
    b.hurry(5.0)
    assert b.due()
    b.note("RUNNING", True)
    clock.now += 1.0
    assert b.due()  # hurried: every second for a while, though the answer stays the same
    b.note("RUNNING", True)
    assert b.interval == 1.0


def test_job_states_asks_sacct_only_for_jobs_squeue_no_longer_lists(fake: Slurm) -> None:
    fake.queue = {"5+0": "RUNNING", "5+1": "RUNNING", "6_0": "RUNNING"}
    fake.accounting = {"6_1": "CANCELLED by 0", "7": "COMPLETED"}
    states = slurm.job_states(["5", "6_0"])
    assert [c[0] for c in fake.calls] == ["squeue"]
    assert slurm.state_for("5", states).state == "RUNNING"  # type: ignore[union-attr]
    fake.calls.clear()
    states = slurm.job_states(["5", "6_0", "6_1", "7"])
    assert [c[0] for c in fake.calls] == ["squeue", "sacct"]
    assert fake.calls[1][fake.calls[1].index("-j") + 1] == "6,7"
    assert slurm.state_for("6_1", states).state == "CANCELLED"  # type: ignore[union-attr]
    assert slurm.state_for("7", states).state == "COMPLETED"  # type: ignore[union-attr]


def test_status_asks_once_for_every_live_deployment_and_never_again_about_ended_ones(
        tmp_path: Path, fake: Slurm) -> None:
    root = tmp_path / "runs"
    old = [_dep(root, f"old-{i}", [str(100 + i)]) for i in range(6)]
    live = _dep(root, "live", ["200"])
    fake.queue = {"200+0": "RUNNING", "200+1": "RUNNING"}
    fake.accounting = {str(100 + i): "CANCELLED by 0" if i % 2 else "COMPLETED" for i in range(6)}
    rows = statuses_of([*old, live])
    assert [c[0] for c in fake.calls] == ["squeue", "sacct"]  # not 2 per deployment
    assert [r[0].state for r in rows] == ["ENDED"] * 6 + ["STARTING"]
    assert [r[0].why for r in rows[:2]] == ["completed", "cancelled"]
    fake.calls.clear()
    rows = statuses_of([*old, live])
    assert fake.calls == [["squeue", "-h", "-j", "200", "-O", slurm.SQUEUE_FIELDS]]  # the live one only
    assert [r[0].why for r in rows[:2]] == ["completed", "cancelled"]  # from jobs-ended.json
    assert json.loads(old[1].run_dir.jobs_ended_path.read_text())["jobs"]["101"]["state"] == "CANCELLED"
    fake.calls.clear()
    fake.queue = {}
    fake.accounting["200"] = "TIMEOUT"
    assert statuses_of([live])[0][0].why == "time limit"
    fake.calls.clear()
    assert statuses_of([*old, live])[6][0].why == "time limit" and fake.calls == []
    assert replica_statuses(live)[0].why == "time limit" and fake.calls == []


def test_up_waiting_an_hour_in_the_queue_asks_slurm_about_120_times_not_3600(tmp_path: Path, fake: Slurm) -> None:
    dep = _dep(tmp_path / "runs", "dep", ["300"])
    fake.queue = {"300+0": "PENDING", "300+1": "PENDING"}
    clock = Clock()
    probe = StatusProbe(dep, clock=clock)
    while clock.now < 3600:
        assert probe()[0].state == "PENDING"
        clock.now += 0.5  # up polls the run directory more often (run.poll_interval_s); Slurm is what counts
    pending_asks = fake.count("squeue")
    assert pending_asks <= 3600 / 30 + 6, pending_asks
    fake.queue = {"300+0": "RUNNING", "300+1": "RUNNING"}
    start = clock.now
    while probe()[0].state == "PENDING":
        clock.now += 0.5
    assert clock.now - start <= 30.5  # the start is seen at the next question (at most 30 s later)
    # then, the state having changed, Slurm is asked again a second later
    asked = fake.count("squeue")
    clock.now += 1.0
    probe()
    assert fake.count("squeue") == asked + 1
    assert fake.count("sacct") == 0  # squeue listed the job every time


def test_run_deployment_source_backs_off_during_a_batch_and_hurries_when_a_replica_fails(tmp_path: Path) -> None:
    clock = Clock()
    asked: list[float] = []
    failures: dict[int, str] = {}

    def job_failures() -> dict[int, str]:
        asked.append(clock.now)
        return dict(failures)

    src = RunDirSource(RunDir(tmp_path / "dep"), 1, job_failures=job_failures, alive_every=1.0, alive_most=30.0,
                       clock=clock)
    while clock.now < 120:  # a two-minute batch, the runner polling every 0.25 s
        src.poll()
        clock.now += 0.25
    assert len(asked) <= 10, asked  # was 60 (every 2 s)
    src.hurry()  # the runner saw the replica's connections fail
    failures[0] = "job 5 ended (CANCELLED by 0)"
    assert src.poll().failed == {0: "job 5 ended (CANCELLED by 0)"}
    assert asked[-1] == clock.now


def test_an_end_is_recorded_only_once_the_job_has_left_the_queue(tmp_path: Path, fake: Slurm) -> None:
    """A final state that squeue still shows may be undone by a requeue (same job id): it is asked about again."""
    dep = _dep(tmp_path / "runs", "dep", ["400"])
    fake.queue = {"400": "PREEMPTED"}
    assert replica_statuses(dep)[0].state == "ENDED"
    assert live_job_ids(dep) == ["400"] and not dep.run_dir.jobs_ended_path.exists()
    fake.queue = {"400": "PENDING"}  # requeued
    assert replica_statuses(dep)[0].state == "PENDING"
    fake.queue, fake.accounting = {}, {"400": "CANCELLED by 0"}  # gone from the queue: accounting has the last word
    assert replica_statuses(dep)[0].why == "cancelled"
    assert live_job_ids(dep) == []
    fake.calls.clear()
    assert replica_statuses(dep)[0].why == "cancelled" and fake.calls == []
