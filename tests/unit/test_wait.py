"""The wait loop with a fake clock: PENDING for long is fine, failures end the wait at once."""

from __future__ import annotations

import pytest

from speedslurm.deployments.status import ReplicaStatus
from speedslurm.deployments.waiting import wait_ready
from speedslurm.errors import DeploymentFailed


class FakeClock:
    def __init__(self) -> None:
        self.now = 0.0
        self.sleeps = 0

    def __call__(self) -> float:
        return self.now

    def sleep(self, s: float) -> None:
        self.now += s
        self.sleeps += 1


def script(*frames: list[str]):
    """A probe that returns the given per-replica states, one frame per call (the last repeats)."""
    calls = {"n": 0}

    def probe() -> list[ReplicaStatus]:
        frame = frames[min(calls["n"], len(frames) - 1)]
        calls["n"] += 1
        return [ReplicaStatus(i, s, str(i)) for i, s in enumerate(frame)]

    return probe


def test_pending_for_hours_is_not_a_failure_without_timeout() -> None:
    clock = FakeClock()
    frames = [["PENDING"]] * 36_000 + [["STARTING"], ["LOADING"], ["READY"]]
    statuses = wait_ready(script(*frames), clock=clock, sleep=clock.sleep, interval=1.0)
    assert statuses[0].state == "READY" and clock.now >= 36_000


def test_timeout_ends_the_wait() -> None:
    clock = FakeClock()
    with pytest.raises(DeploymentFailed, match="not ready after 31s"):
        wait_ready(script(["PENDING"]), clock=clock, sleep=clock.sleep, interval=1.0, timeout=30)


def test_failure_ends_the_wait_at_once_with_reason_and_tail() -> None:
    clock = FakeClock()
    updates = []
    with pytest.raises(DeploymentFailed) as err:
        wait_ready(script(["STARTING"], ["FAILED"]), clock=clock, sleep=clock.sleep, interval=0.1,
                   on_update=lambda s, e: updates.append(s[0].state),
                   describe_failure=lambda s: ("rpc-server on n2 exited with code 1", "line1\nline2"))
    assert clock.sleeps == 1 and updates == ["STARTING", "FAILED"]
    assert "rpc-server on n2" in err.value.render() and "line2" in err.value.render()


def test_all_waits_for_every_replica() -> None:
    clock = FakeClock()
    probe = script(["READY", "PENDING"], ["READY", "LOADING"], ["READY", "READY"])
    assert [s.state for s in wait_ready(probe, clock=clock, sleep=clock.sleep)] == ["READY", "READY"]
    assert clock.sleeps == 2


def test_first_returns_on_first_ready_and_tolerates_one_failure() -> None:
    clock = FakeClock()
    probe = script(["FAILED", "LOADING"], ["FAILED", "READY"])
    statuses = wait_ready(probe, until="first", clock=clock, sleep=clock.sleep)
    assert statuses[1].state == "READY"


def test_first_fails_when_every_replica_failed() -> None:
    clock = FakeClock()
    with pytest.raises(DeploymentFailed):
        wait_ready(script(["FAILED", "ENDED"]), until="first", clock=clock, sleep=clock.sleep)
