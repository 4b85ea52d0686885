"""A deployment's life from the client: prepare (validate, plan), launch, stop.

Beside it: :mod:`speedslurm.deployments.record` (a deployment's run directory: create, list, find one),
:mod:`speedslurm.cluster.registry` (where the roles run: submit, job states, cancel), :mod:`speedslurm.deployments.status`
(each replica's state and why), :mod:`speedslurm.deployments.waiting` (until ready, until ended).
"""

from __future__ import annotations

import time
import typing as tp

from ..cluster.registry import choose, executor_for, get
from ..cluster.slurm_executor import find_submitted_job, needs_job_ids
from ..errors import UsageError
from ..model.registry import resolve_model
from ..planning.plan import Plan, make_plan
from ..planning.sbatchopts import has_control
from ..rundir.layout import Deployment, check_parent_not_world_writable, make_private_dir
from ..rundir.records import ContractError
from .record import (
    binaries_record,
    create_run_dir,
    deployment_record,
    new_deployment_id,
    runs_root,
)
from .status import (
    ENDED_CAUSES,
    ReplicaStatus,
    failure_is_current,
    replica_statuses,
)

if tp.TYPE_CHECKING:
    from ..settings.settings import Settings



def check_idle_timeout(settings: Settings) -> float:
    """``llama.idle_timeout`` in seconds (0: never); :class:`UsageError` naming where a bad value came from."""
    from ..node.idle import parse_duration

    try:
        return parse_duration(settings.llama.idle_timeout)
    except ValueError as exc:
        where = settings.origins.get("llama.idle_timeout", "settings")
        raise UsageError(f"{where}: llama.idle_timeout: {exc}",
                         fix="give a duration such as 90s, 30m or 2h (0: never), e.g. --idle-timeout 30m") from None


def prepare(settings: Settings, model: str, *, nodes: int | None = None, replicas: int = 1, ctx: int | None = None,
            time_limit: str | None = None, executor: str | None = None,
            require_binaries: bool = True, place: bool = True) -> tuple[Plan, tp.Any]:
    """Validate everything and plan; raises :class:`UsageError` (exit 2) before anything is queued.

    With ``require_binaries=False`` (``speedslurm plan``) missing binaries give None instead of an error.
    ``place``: choose the followers' nodes by their warm rpc cache (:mod:`speedslurm.cluster.warmcache`), from the
    nodes idle now (``render``, whose script is submitted later, passes False).
    """
    from ..cluster import warmcache
    from ..node.binaries import find_llama_binaries

    chosen = choose(settings, executor)
    check_idle_timeout(settings)
    spec = resolve_model(settings, model)
    plan = make_plan(settings, spec, runs_on=get(chosen), ctx=ctx, nodes=nodes, replicas=replicas, time=time_limit,
                     partition_size=get(chosen).nodes_available(settings))
    if place:
        plan = warmcache.place(settings, plan)
    try:
        binaries = find_llama_binaries(settings.llama.bin_dir)
        # Mismatched builds would only show on the nodes, as a failed RPC handshake: refuse them here.
        binaries.check_same_build()
    except UsageError:
        if require_binaries:
            raise
        binaries = None
    root = runs_root(settings)
    if has_control(str(root)):
        # The path is written into the job script's #SBATCH lines, where a line break would start a new option.
        raise UsageError(f"run directory {str(root)!r} contains a line break or another control character",
                         fix="set run.dir to a path without control characters")
    check_parent_not_world_writable(root)
    return plan, binaries


def launch(settings: Settings, plan: Plan, binaries: tp.Any) -> Deployment:
    """Create the run directory, write deployment.json and the API key, submit. Returns at once.

    A job that sbatch refuses (a feature, qos, account, reservation or partition the cluster rejects) leaves
    nothing behind: its run directory is removed, and :class:`~speedslurm.cluster.script.SbatchRefused` (exit 2) says
    sbatch's own words and the setting to change.
    """
    from ..cluster.script import SbatchRefused
    from ..node import roles as jobside

    root = make_private_dir(runs_root(settings))
    deployment_id = new_deployment_id(plan.model.name)
    rd = create_run_dir(root / deployment_id, deployment_record(settings, plan, binaries_record(binaries),
                                                                deployment_id), plan.replicas)
    info = rd.deployment() or {}
    try:
        info.update(get(plan.executor).submit(plan, rd, jobside.serve))
    except SbatchRefused:
        remove_run_dir(rd)  # nothing was queued: no deployment to list, nothing to submit by hand
        raise
    info["submitted_at"] = time.time()
    rd.write_deployment(info)
    return Deployment(rd, info)


def record_warm(settings: Settings, dep: Deployment, statuses: tp.Sequence[ReplicaStatus]) -> None:
    """The ready replicas' follower nodes now hold a warm rpc cache of the model (warm-cache placement)."""
    from ..cluster.warmcache import record_ready

    if not executor_for(dep).places_followers:
        return
    model = dep.info.get("model") or {}
    for s in statuses:
        if s.state == "READY" and s.endpoint and model.get("path"):
            record_ready(settings, str(model["path"]), str(model.get("name") or ""), s.endpoint.follower_nodes)


def remove_run_dir(rd: tp.Any) -> None:
    """Remove a run directory that no job was queued for (only one this process has just made)."""
    import shutil

    shutil.rmtree(rd.root, ignore_errors=True)


def idle_nodes(settings: Settings) -> int | None:
    """Nodes of the partition idle now, that a new replica could start on at once (None: no such limit)."""
    return get(choose(settings, None)).idle_nodes(settings)


def time_left(dep: Deployment) -> float | None:
    """Seconds until the soonest of ``dep``'s running jobs reaches its time limit, asked now (None: not known)."""
    executor = executor_for(dep)
    live = executor.live_job_ids(dep)
    if not live:
        return None
    lefts = [js.time_left_s for js in executor.job_states(live).values() if js.time_left_s is not None]
    return float(min(lefts)) if lefts else None


def handover_window(settings: Settings, info: tp.Mapping[str, tp.Any], before_s: float | None = None
                    ) -> tuple[float, float]:
    """(before, margin) in seconds for a deployment recorded as ``info``: its servers may stop ``margin`` before
    the job's time limit (Slurm's warning: the ``--signal`` delay plus Slurm's 30 s check period), and its
    successor starts ``before`` that (``before_s``, default ``run.handover_before_s``; at most half the time the
    job has before its warning, so that each deployment serves a while). ``before`` <= 0: no handover."""
    import types

    from ..cluster.script import SLURM_CHECK_PERIOD_S, signal_delay_s
    from ..planning.plan import parse_time_minutes

    plan = info.get("plan") or {}
    minutes = parse_time_minutes(str(plan.get("time") or settings.cluster.time))
    margin = signal_delay_s(tp.cast(Plan, types.SimpleNamespace(time_minutes=minutes))) + SLURM_CHECK_PERIOD_S
    before = min(settings.run.handover_before_s if before_s is None else before_s, (minutes * 60 - margin) / 2)
    return before, margin


def down(dep: Deployment, before: list[ReplicaStatus] | None = None, because: str | None = None) -> list[str]:
    """Cancel the deployment's job(s); returns the ids cancelled.

    Nothing cuts it short (:mod:`speedslurm.deployments.cleanup`): SIGINT, SIGTERM and SIGHUP are held until the cancel
    has been issued, and a signal during the look at the jobs before it (squeue, sacct) ends the look at once.

    ``because`` (``idle``, ``scaled down``, ``handed over``) is recorded as why it ended, for ``status``.

    Replicas that had failed already are recorded: the servers that the cancellation kills may write failures
    of their own, which must not be taken for the reason the deployment ended. They come from ``before`` (the
    statuses the caller has just looked at), else from a look of its own, else (a signal cut the look short)
    from the failure files in the run directory.
    """
    from .cleanup import held_signals, look

    with held_signals():
        if needs_job_ids(dep) and not dep.info.get("cancelled_at"):
            find_submitted_job(dep)  # a rendered script's job: its id is what to cancel
        if before is None:
            before = look(lambda: replica_statuses(dep))
        failed = [s.replica for s in before if s.state == "FAILED"] if before is not None else failed_on_file(dep)
        ids = dep.job_ids
        if not executor_for(dep).cancel(dep):
            return ids  # nothing ran: it ended by itself, and status keeps saying so (not "cancelled")
        info = dict(dep.reload().info)
        info["cancelled_at"] = time.time()
        info["failed_before_cancel"] = failed
        if because:
            info["stopped_because"] = because
        dep.run_dir.write_deployment(info)
        dep.info = info
    return ids


def failed_on_file(dep: Deployment) -> list[int]:
    """Replicas whose run directory holds a failure of their current job (not an end the job side chose)."""
    out = []
    for r in range(dep.replicas):
        try:
            failure = dep.run_dir.failure(r)
        except (OSError, ValueError, ContractError):
            continue
        if failure is not None and failure.cause not in ENDED_CAUSES and failure_is_current(dep, r, failure):
            out.append(r)
    return out
