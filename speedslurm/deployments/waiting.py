"""Waiting for a deployment: until it is ready (or fails), until it has ended. Clock and sleep are injectable;
unit tests drive them."""

from __future__ import annotations

import time
import typing as tp

from ..errors import DeploymentFailed
from ..rundir.layout import Deployment
from .status import ReplicaStatus, replica_statuses


def wait_ready(probe: tp.Callable[[], list[ReplicaStatus]], *, until: str = "all", timeout: float | None = None,
               clock: tp.Callable[[], float] = time.monotonic, sleep: tp.Callable[[float], None] = time.sleep,
               interval: float = 0.1, on_update: tp.Callable[[list[ReplicaStatus], float], None] | None = None,
               describe_failure: tp.Callable[[ReplicaStatus], tuple[str, str]] | None = None) -> list[ReplicaStatus]:
    """Poll until every replica (``until='all'``) or one (``'first'``) is READY.

    A FAILED replica ends the wait at once with :class:`DeploymentFailed` (for ``'first'``: once no replica
    can still become ready). A job that stays PENDING is not a failure unless ``timeout`` (seconds) passes.
    """
    start = clock()
    while True:
        statuses = probe()
        elapsed = clock() - start
        if on_update:
            on_update(statuses, elapsed)
        states = [s.state for s in statuses]
        failed = [s for s in statuses if s.state in ("FAILED", "ENDED")]
        if failed and (until == "all" or len(failed) == len(statuses)):
            worst = next((s for s in failed if s.state == "FAILED"), failed[0])
            reason, tail = describe_failure(worst) if describe_failure else (worst.state, "")
            raise DeploymentFailed(reason, fix="see `speedslurm logs` for the full logs", log_tail=tail)
        if until == "all" and all(s == "READY" for s in states):
            return statuses
        if until == "first" and "READY" in states:
            return statuses
        if timeout is not None and elapsed > timeout:
            raise DeploymentFailed(f"not ready after {elapsed:.0f}s (states: {', '.join(states)})",
                                   fix="raise --timeout, or check `speedslurm status` and `speedslurm logs`")
        sleep(interval)


def wait_ended(dep: Deployment, timeout: float = 60, clock: tp.Callable[[], float] = time.monotonic,
               sleep: tp.Callable[[float], None] = time.sleep) -> list[ReplicaStatus]:
    start = clock()
    while True:
        statuses = replica_statuses(dep)
        if all(s.state in ("ENDED", "FAILED") for s in statuses) or clock() - start > timeout:
            return statuses
        sleep(0.25)
