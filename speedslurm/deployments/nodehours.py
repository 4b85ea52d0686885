"""What a deployment or a batch cost the cluster: the node-hours (and GPU-hours, where Slurm counts GPUs) held.

From Slurm where it knows: accounting (``sacct``'s ElapsedRaw x NNodes per job or hetjob component, GPUs from
AllocTRES ``gres/gpu``) for a job that ended, ``squeue``'s TimeUsed x NumNodes for one that runs; both come with
the questions the status poll asks anyway (no extra call, and never a question about a job seen ended: its
figures are kept in ``jobs-ended.json``). Where Slurm has no figure (local processes, a job that left no
accounting record), from the wall time the client saw: the job's first handshake file on the nodes to its end
(or now), times the nodes the plan gave it. Every figure names its source.
"""

from __future__ import annotations

import time
import typing as tp

from ..cluster.executor import SQUEUE
from ..errors import UsageError
from ..rundir.records import read_json

if tp.TYPE_CHECKING:
    from ..rundir.layout import Deployment
    from .status import ReplicaStatus

T = tp.TypeVar("T")

# Where Slurm has no figure (cluster.executor.ACCOUNTING and SQUEUE are its two sources).
WALL = "client wall time"


def _held_since(dep: Deployment, status: ReplicaStatus) -> float | None:
    """When the replica's job started, as its handshake files say (their times are written on the nodes)."""
    rd = dep.run_dir
    times: list[float] = []
    nodes = int(dep.info.get("nodes") or 1)
    for rank in range(1, nodes):
        f = _quiet(lambda r=rank: rd.follower(status.replica, r))  # type: ignore[misc]
        if f is not None and (str(f.job_id) == status.job_id or not f.job_id):
            times.append(float(f.started_at))
    loading = _quiet(lambda: rd.loading(status.replica))
    if loading is not None and (str(loading.job_id) == status.job_id or not loading.job_id):
        times.append(float(loading.time))
    if status.endpoint is not None:
        times.append(float(status.endpoint.started_at))
    if status.failure is not None:
        times.append(float(status.failure.time))
    return min(times) if times else None


def _quiet(read: tp.Callable[[], T]) -> T | None:
    """A handshake file, or None when it is absent or not readable (a figure is not worth an error)."""
    try:
        return read()
    except (OSError, ValueError, UsageError):
        return None


def _held_until(dep: Deployment, status: ReplicaStatus, now: float) -> float:
    if status.state not in ("ENDED", "FAILED"):
        return now
    ends = [float(status.failure.time)] if status.failure is not None else []
    if dep.info.get("cancelled_at"):
        ends.append(float(dep.info["cancelled_at"]))
    seen = _quiet(lambda: read_json(dep.run_dir.jobs_ended_path))
    rec = ((seen or {}).get("jobs") or {}).get(status.job_id) if isinstance(seen, dict) else None
    if isinstance(rec, dict) and isinstance(rec.get("seen_at"), (int, float)):
        ends.append(float(rec["seen_at"]))
    if not ends:  # the last sign of life: the newest line its servers logged
        logs = _quiet(lambda: [p.stat().st_mtime for p in dep.run_dir.log_dir(status.replica).glob("*.log")])
        ends += logs or []
    return min(ends) if ends else now


def replica_usage(dep: Deployment, status: ReplicaStatus, now: float | None = None) -> dict[str, tp.Any]:
    """{node_hours, gpu_hours (None: not counted), elapsed_s, source} of one replica's job."""
    now = time.time() if now is None else now
    usage = status.usage
    if usage is not None:
        return {"node_hours": usage.node_s / 3600, "gpu_hours": None if usage.gpu_s is None else usage.gpu_s / 3600,
                "elapsed_s": usage.elapsed_s, "source": usage.source}
    since = _held_since(dep, status)
    if since is None:
        return {"node_hours": 0.0, "gpu_hours": None, "elapsed_s": 0.0, "source": WALL}
    elapsed = max(0.0, _held_until(dep, status, now) - since)
    nodes = int(dep.info.get("nodes") or 1)
    return {"node_hours": elapsed * nodes / 3600, "gpu_hours": None, "elapsed_s": elapsed, "source": WALL}


def _total(rows: tp.Sequence[dict[str, tp.Any]]) -> dict[str, tp.Any]:
    gpu = [r["gpu_hours"] for r in rows if r["gpu_hours"] is not None]
    sources = sorted({r["source"] for r in rows if r["node_hours"] or r["source"] != WALL}) or [WALL]
    return {"node_hours": round(sum(r["node_hours"] for r in rows), 4),
            "gpu_hours": round(sum(gpu), 4) if gpu else None, "node_hours_source": ", ".join(sources)}


def deployment_usage(dep: Deployment, statuses: tp.Sequence[ReplicaStatus],
                     now: float | None = None) -> dict[str, tp.Any]:
    """The node-hours (and GPU-hours) a deployment's jobs held so far, and where the figure comes from."""
    return _total([replica_usage(dep, s, now) for s in statuses])


def batch_usage(dep: Deployment, statuses: tp.Sequence[ReplicaStatus], started: float, ended: float,
                seen_at: float | None = None) -> dict[str, tp.Any]:
    """The node-hours of a deployment's jobs over a batch's time span (``started`` to ``ended``, epoch
    seconds): each job's nodes times the part of the span it was held. ``seen_at``: when ``statuses`` were
    asked (a running job's time used is Slurm's figure at that moment)."""
    now = time.time()
    seen_at = now if seen_at is None else seen_at
    rows = []
    for s in statuses:
        held = replica_usage(dep, s, now)
        if not held["elapsed_s"]:
            continue
        rate = held["node_hours"] / held["elapsed_s"]  # nodes / 3600
        gpu_rate = None if held["gpu_hours"] is None else held["gpu_hours"] / held["elapsed_s"]
        if held["source"] == SQUEUE:  # running when asked: started that long before, held until now
            since, until = seen_at - held["elapsed_s"], now
        else:
            until = _held_until(dep, s, now)
            since = until - held["elapsed_s"]
        overlap = max(0.0, min(until, ended) - max(since, started))
        rows.append({"node_hours": rate * overlap, "source": held["source"],
                     "gpu_hours": None if gpu_rate is None else gpu_rate * overlap})
    return _total(rows)
