"""A deployment's state, and why: the run directory's handshake files plus what the executor says of its jobs.

The client never talks to the nodes: it reads the run directory (endpoint.json, failed.json, ...) at every look
and asks the executor (:mod:`speedslurm.cluster.executor`) about the jobs; for Slurm politely: only about jobs not yet
seen ended (recorded in ``jobs-ended.json`` and never asked about again), one squeue for all of them, and less
often while nothing changes (:class:`StatusProbe`).
"""

from __future__ import annotations

import dataclasses
import time
import typing as tp

from ..cluster import slurm
from ..cluster.executor import SLURM_FIRST_S, SLURM_MOST_S, Usage
from ..cluster.registry import executor_for, job_states, live_jobs
from ..polling import Backoff
from ..rundir.layout import Deployment, script_path
from ..rundir.records import Endpoint, Failed, JobId

if tp.TYPE_CHECKING:
    pass

__all__ = ["ENDED_CAUSES", "ENDED_WHY", "FAILED_WHY", "GONE_WHY", "QUEUED_STATES", "ReplicaStatus", "STATES",
           "StatusProbe", "deployment_state", "deployment_why", "endpoint_is_current",
           "failure_is_current", "failure_text", "replica_statuses", "statuses_of"]

# Causes in failed.json that are ends, not failures: the leader saw the time limit coming, or llama-server had
# no request for llama.idle_timeout.
ENDED_CAUSES = ("time limit", "idle")
# UNSUBMITTED: written by `speedslurm render`, and no job of it found yet (run `sbatch` on its script).
STATES = ("UNSUBMITTED", "PENDING", "STARTING", "LOADING", "READY", "FAILED", "ENDED")
# Why a job ended, from Slurm's final state: these are ends (ENDED), every other final state is a failure.
ENDED_WHY = {"CANCELLED": "cancelled", "TIMEOUT": "time limit", "PREEMPTED": "preempted",
             "DEADLINE": "deadline reached", "COMPLETED": "completed"}
FAILED_WHY = {"NODE_FAIL": "node failure", "OUT_OF_MEMORY": "out of memory", "BOOT_FAIL": "node boot failure",
              "FAILED": "job failed", "REVOKED": "revoked", "SPECIAL_EXIT": "special exit"}
# Slurm states of a job waiting in the queue (again, after a requeue): none of its handshake files is current.
QUEUED_STATES = {"PENDING", "REQUEUED", "REQUEUE_HOLD", "REQUEUE_FED"}
# Why a local replica's controller process is not running (localproc.check's answers).
GONE_WHY = {"gone": "its processes are gone", "rebooted": "its processes are gone (the machine restarted)"}


@dataclasses.dataclass(frozen=True)
class ReplicaStatus:
    replica: int
    state: str
    job_id: str
    job_state: str = ""
    reason: str = ""
    endpoint: Endpoint | None = None
    failure: Failed | None = None
    nodes: str = ""
    why: str = ""  # what the state alone does not say: why it ended or failed, what it waits for
    restarts: int | None = None  # Slurm's restart count: the job's start the handshake files must come from
    usage: Usage | None = None  # what the job held, as Slurm counts it (speedslurm.deployments.nodehours)
    time_left_s: int | None = None  # Slurm's TimeLeft of the running job when asked (None: not known)

    def to_json(self, show_key: bool = False) -> dict[str, tp.Any]:
        return {"replica": self.replica, "state": self.state, "why": self.why, "job_id": self.job_id,
                "job_state": self.job_state, "reason": self.reason, "nodes": self.nodes,
                "endpoint": self.endpoint.public(show_key) if self.endpoint else None,
                "failure": self.failure.to_json() if self.failure else None, "restarts": self.restarts}


def endpoint_is_current(dep: Deployment, endpoint: Endpoint, restarts: int | None = None) -> bool:
    """False for an endpoint file left by another job than the replica's current one, or by an earlier start
    of it (``restarts``: Slurm's restart count of the job now, None when not known)."""
    return _same_job(endpoint.job_id, dep.replica_job_id(endpoint.replica)) and \
        _same_start(endpoint.epoch, restarts)


def failure_is_current(dep: Deployment, replica: int, failure: Failed, restarts: int | None = None) -> bool:
    """False for a failed.json left by another job than the replica's current one, or by an earlier start."""
    return _same_job(failure.job_id, dep.replica_job_id(replica)) and _same_start(failure.epoch, restarts)


def _same_start(epoch: int, restarts: int | None) -> bool:
    """A handshake file belongs to the job's current start (Slurm's restart count unknown: accept)."""
    return restarts is None or epoch == restarts


def _same_job(file_job_id: tp.Any, job_id: str) -> bool:
    """A handshake file belongs to the replica's job (unknown on either side: accept)."""
    return not job_id or not file_job_id or str(file_job_id) == job_id


def _failure_why(failure: Failed) -> str:
    """failed.json's reason in one line (the job side names the server and the node in it)."""
    reason = failure.reason or "failed (no reason recorded)"
    return " ".join(reason.split())


def replica_statuses(dep: Deployment, states: dict[str, slurm.JobState] | None = None) -> list[ReplicaStatus]:
    """Each replica's state, and why: from the run directory's handshake files and the executor's view of the job.

    Slurm's final state says why a job ended: CANCELLED (``down`` or scancel), TIMEOUT and the like are ends
    (ENDED), NODE_FAIL, FAILED and the like failures. A failed.json written after the job was cancelled is a
    consequence of the cancellation (the servers were killed), not the reason it ended; one that ``down`` found
    before it cancelled (up's own clean-up after a failure) stays the reason.
    """
    dep.reload()
    views = executor_for(dep).views(dep, states)
    cancelled = bool(dep.info.get("cancelled_at"))
    failed_first = _failed_before_cancel(dep)
    out = []
    for r, view in enumerate(views):
        job_id = view.job_id
        # Handshake files of another job (an earlier submission into this run dir), or of an earlier start of
        # this one (a requeued job keeps its id), are not this start's.
        restarts = view.start
        failure = dep.run_dir.failure(r)
        endpoint = dep.run_dir.endpoint(r)
        loading_info = dep.run_dir.loading(r)
        # An earlier start's file of this very job: Slurm counted a restart that has not written files yet.
        earlier = bool(restarts) and any(
            _same_job(f.job_id, job_id) and f.epoch < tp.cast(int, restarts)
            for f in (failure, endpoint, loading_info) if f is not None)
        if failure and not failure_is_current(dep, r, failure, restarts):
            failure = None
        if endpoint and not endpoint_is_current(dep, endpoint, restarts):
            endpoint = None
        loading = loading_info is not None and _same_job(loading_info.job_id, job_id) and \
            _same_start(loading_info.epoch, restarts)
        final, word, reason = view.final, view.word, view.reason
        if word in QUEUED_STATES:
            # Queued again (requeued, or preempted with PreemptMode=REQUEUE): nothing of it serves now,
            # whatever files its earlier start left (and restarts unknown could not tell them apart).
            failure, endpoint, loading = None, None, False
        elif word == "COMPLETING" and earlier and not (failure or endpoint or loading):
            # Being requeued: Slurm counted the restart and kills the earlier start's processes; it is
            # queued again in a moment, not ended.
            final, word, reason = False, "PENDING", "requeued"
        was_cancelled = r not in failed_first and (word == "CANCELLED" or cancelled)
        if view.unsubmitted:
            state, why = "UNSUBMITTED", f"rendered, not submitted: sbatch {script_path(dep)}"
        elif failure and failure.cause in ENDED_CAUSES:  # the job side ended it: time limit, or idle
            state, why = "ENDED", failure.cause
        elif failure and was_cancelled:
            state, why = "ENDED", "cancelled"
        elif failure:
            state, why = "FAILED", _failure_why(failure)
        elif final:
            state, why = _final_state(word, cancelled)
            if view.gone and not cancelled:
                why = GONE_WHY.get(view.gone, why)
        elif endpoint:
            state, why = "READY", ""
        elif loading:
            state, why = "LOADING", ""
        elif view.job_state in ("RUNNING", "UNKNOWN"):
            state, why = "STARTING", ""
        else:
            state, why = "PENDING", reason if reason and reason != "None" else ""
            if restarts:
                why = f"requeued{': ' + why if why and why != 'requeued' else ''} (start {restarts + 1} waits)"
        if state == "ENDED" and why == "cancelled" and dep.info.get("stopped_because"):
            why = str(dep.info["stopped_because"])  # the gateway said why it stopped it: idle, scaled down, ...
        if view.elsewhere and state in ("READY", "LOADING", "STARTING"):
            why = f"runs on {view.elsewhere}: its processes can only be checked there"
        out.append(ReplicaStatus(r, state, job_id, view.job_state, reason, endpoint, failure, view.nodes, why,
                                 view.restarts, view.usage, view.time_left_s))
    return out


def statuses_of(deps: tp.Sequence[Deployment]) -> list[list[ReplicaStatus]]:
    """:func:`replica_statuses` of several deployments, with one question to Slurm for all their live jobs."""
    for dep in deps:
        dep.reload()
    states = job_states(live_jobs(deps))  # one question per executor that has live jobs
    return [replica_statuses(dep, states) for dep in deps]


def _failed_before_cancel(dep: Deployment) -> set[int]:
    """Replicas that had failed when ``down`` cancelled the deployment: their failure is why they ended."""
    if "failed_before_cancel" in dep.info:
        return {int(r) for r in dep.info["failed_before_cancel"]}
    # Recorded by older versions without the list: a failure older than the cancellation came first.
    at = float(dep.info.get("cancelled_at") or 0)
    return {r for r in range(dep.replicas) if at and _failed_at(dep, r, at) < at}


def _failed_at(dep: Deployment, replica: int, default: float) -> float:
    failure = dep.run_dir.failure(replica)
    return failure.time if failure else default


def _final_state(word: str, cancelled: bool) -> tuple[str, str]:
    """(ENDED or FAILED, why) of a job that is over, from Slurm's state word (empty: local, or no record)."""
    if word in FAILED_WHY:
        return "FAILED", FAILED_WHY[word]
    if word in ENDED_WHY:
        return "ENDED", ENDED_WHY[word]
    if cancelled:
        return "ENDED", "cancelled"
    if word in ("", "GONE", "COMPLETING"):
        return "ENDED", "ended" if word != "GONE" else "left the queue (no accounting record)"
    return "FAILED", word.lower()


class StatusProbe:
    """``replica_statuses`` for a polling loop: the run directory at every call, Slurm ``slurm_every`` seconds
    after a change, then less and less often (up to every ``slurm_most`` seconds) while nothing changes, and
    never about a job already seen ended. squeue and sacct cost a process each here and a request to slurmctld
    or slurmdbd there; a job waiting an hour in the queue must not ask 3,600 times. Failures still show at
    once: they come from failed.json."""

    def __init__(self, dep: Deployment, slurm_every: float = SLURM_FIRST_S,
                 clock: tp.Callable[[], float] = time.monotonic, slurm_most: float = SLURM_MOST_S) -> None:
        self.dep = dep
        self.backoff = Backoff(slurm_every, slurm_most, clock)
        self._states: dict[str, slurm.JobState] | None = None
        self._live: list[str] = []

    def __call__(self) -> list[ReplicaStatus]:
        asked = False
        executor = executor_for(self.dep)
        live = executor.live_job_ids(self.dep)
        if not live:
            self._states = {}  # nothing to ask (every end is recorded, or no Slurm job): earlier answers are stale
        elif self._states is None or live != self._live or self.backoff.due():
            self._states = executor.job_states(live)
            asked = True
        self._live = live
        statuses = replica_statuses(self.dep, self._states if self._states is not None else {})
        self.backoff.note([(s.state, s.job_state, s.reason, s.why) for s in statuses], asked)
        return statuses


def deployment_state(statuses: tp.Sequence[ReplicaStatus]) -> str:
    """One state for the deployment: the best state any replica reached, FAILED when all failed."""
    states = [s.state for s in statuses]
    for state in ("READY", "LOADING", "STARTING", "PENDING", "UNSUBMITTED"):
        if state in states:
            return state
    return "FAILED" if "FAILED" in states else "ENDED"


def deployment_why(statuses: tp.Sequence[ReplicaStatus]) -> str:
    """Why the deployment is in :func:`deployment_state`: the first such replica's why."""
    state = deployment_state(statuses)
    return next((s.why for s in statuses if s.state == state), "")


def failure_text(dep: Deployment, status: ReplicaStatus) -> tuple[str, str]:
    """(reason, last log lines) for a failed replica."""
    f = status.failure
    reason = (f.reason if f else "") or f"job {status.job_id} ended in state {status.job_state}"
    if f and f.node:
        reason = f"replica {status.replica}: {f.role or 'role'} on {f.node}: {reason}"
    else:
        reason = f"replica {status.replica}: {reason}"
    tail = f.log_tail if f else ""
    if not tail:
        rd = dep.run_dir
        path = rd.log_path(status.replica, f.role if f else "leader", f.rank if f else 0)
        from ..node.children import log_tail

        tail = log_tail(path) or _submitit_tail(dep, status)
    return reason, tail


def _submitit_tail(dep: Deployment, status: ReplicaStatus) -> str:
    from ..node.children import log_tail

    folder = dep.run_dir.submitit_dir
    if not folder.is_dir():
        return ""
    base = JobId.base_of(status.job_id)
    files = sorted(folder.rglob(f"{base}*_0_log.err")) + sorted(folder.rglob(f"{base}*_0_log.out"))
    return "\n".join(t for t in (log_tail(p) for p in files) if t)


