"""Deployments from the client's side: prepare (validate, plan), launch, watch, list, end.

The client never talks to the nodes: it reads the run directory (endpoint.json, failed.json, ...) and asks
Slurm (squeue, then sacct) for the job's state; politely: only about jobs not yet seen ended (a job seen
ended is recorded in ``jobs-ended.json`` and never asked about again), one squeue for all of them, and
less often while nothing changes. The local executor's processes are known by an identity that survives pid
reuse (:mod:`speedslurm.localproc`).
"""

from __future__ import annotations

import dataclasses
import os
import re
import secrets
import signal
import socket
import time
import typing as tp
from pathlib import Path

from . import localproc, slurm
from .contract import ContractError, Failed, JobId
from .errors import DeploymentFailed, UsageError
from .localproc import ProcessIdentity
from .models import resolve_model
from .plan import Plan, make_plan
from .polling import Backoff
from .rundir import (
    Endpoint,
    RunDir,
    check_parent_not_world_writable,
    make_private_dir,
    read_json,
    write_json_atomic,
)
from .settings import Settings

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
# How often a polling loop asks Slurm: after a change every SLURM_FIRST_S, doubling to SLURM_MOST_S while the
# answer stays the same.
SLURM_FIRST_S = 1.0
SLURM_MOST_S = 30.0
_ID_SAFE = re.compile(r"[^A-Za-z0-9_.-]+")


# ----------------------------------------------------------------------------------------------------------
# Prepare and launch


def choose_executor(settings: Settings, executor: str | None) -> str:
    choice = executor or settings.run.executor
    if choice == "auto":
        return "slurm" if slurm.have_slurm() else "local"
    if choice not in ("slurm", "local"):
        raise UsageError(f"unknown executor {choice!r}", fix="use --executor slurm or --executor local")
    if choice == "slurm" and not slurm.have_slurm():
        raise UsageError("sbatch is not on PATH, so the Slurm executor cannot submit",
                         fix="run on a Slurm login node, or use --executor local to run on this machine")
    return choice


def runs_root(settings: Settings) -> Path:
    return settings.run.root


def prepare(settings: Settings, model: str, *, nodes: int | None = None, replicas: int = 1, ctx: int | None = None,
            time_limit: str | None = None, executor: str | None = None,
            require_binaries: bool = True) -> tuple[Plan, tp.Any]:
    """Validate everything and plan; raises :class:`UsageError` (exit 2) before anything is queued.

    With ``require_binaries=False`` (``speedslurm plan``) missing binaries give None instead of an error.
    """
    from .binaries import find_llama_binaries

    chosen = choose_executor(settings, executor)
    spec = resolve_model(settings, model)
    partition_size = None
    if chosen == "slurm":
        part = slurm.partition_info(settings.cluster.partition)
        partition_size = len([n for n in part["nodes"] if n not in settings.cluster.exclude])
    plan = make_plan(settings, spec, ctx=ctx, nodes=nodes, replicas=replicas, time=time_limit, executor=chosen,
                     partition_size=partition_size)
    try:
        binaries = find_llama_binaries(settings.llama.bin_dir)
        # Mismatched builds would only show on the nodes, as a failed RPC handshake: refuse them here.
        binaries.check_same_build()
    except UsageError:
        if require_binaries:
            raise
        binaries = None
    root = runs_root(settings)
    if re.search(r"[\x00-\x1f\x7f]", str(root)):
        # The path is written into the job script's #SBATCH lines, where a line break would start a new option.
        raise UsageError(f"run directory {str(root)!r} contains a line break or another control character",
                         fix="set run.dir to a path without control characters")
    check_parent_not_world_writable(root)
    return plan, binaries


def new_deployment_id(model_name: str) -> str:
    safe = _ID_SAFE.sub("-", model_name).strip("-").lower()[:32] or "model"
    return f"{safe}-{time.strftime('%Y%m%d-%H%M%S')}-{secrets.token_hex(2)}"


@dataclasses.dataclass
class Deployment:
    run_dir: RunDir
    info: dict[str, tp.Any]

    @property
    def id(self) -> str:
        return self.run_dir.deployment_id

    @property
    def replicas(self) -> int:
        return int(self.info.get("replicas", 1))

    @property
    def executor(self) -> str:
        return str(self.info.get("executor", "slurm"))

    @property
    def job_ids(self) -> list[str]:
        return [str(j) for j in self.info.get("job_ids", [])]

    def reload(self) -> Deployment:
        self.info = self.run_dir.deployment() or self.info
        return self


def binaries_record(binaries: tp.Any) -> dict[str, tp.Any]:
    """The binaries as deployment.json records them for the job side."""
    from .binaries import env_for, kv_unified

    env = env_for(binaries)
    return {"llama_server": str(binaries.llama_server), "rpc_server": str(binaries.rpc_server),
            "version": binaries.version, "source": binaries.source, "env": env,
            "kv_unified": kv_unified(binaries.llama_server, env)}


def deployment_record(settings: Settings, plan: Plan, binaries: dict[str, tp.Any], deployment_id: str, *,
                      submitted_by: str = "speedslurm up", now: float | None = None) -> dict[str, tp.Any]:
    """The content of ``deployment.json``: what the job side reads and ``status`` shows."""
    return {
        "id": deployment_id, "created_at": time.time() if now is None else now, "uid": os.getuid(),
        "model": plan.model.to_json(), "plan": plan.to_json(), "nodes": plan.nodes, "replicas": plan.replicas,
        "ctx": plan.ctx, "parallel": plan.parallel, "executor": plan.executor, "job_ids": [],
        "node_addresses": {n: e.address for n, e in settings.cluster.nodes.items() if e.address},
        "llama": dataclasses.asdict(settings.llama), "binaries": binaries,
        "follower_timeout_s": settings.run.follower_timeout_s, "health_timeout_s": settings.run.health_timeout_s,
        "poll_interval_s": settings.run.poll_interval_s, "submitted_by": submitted_by,
    }


def create_run_dir(root: Path, record: dict[str, tp.Any], replicas: int) -> RunDir:
    """Make the run directory (0700, refusing a world-writable parent) with its API key and deployment.json."""
    check_parent_not_world_writable(root.parent)
    if (root / "deployment.json").exists():
        raise UsageError(f"{root} already holds a deployment", fix="choose a new run directory, or leave it out")
    rd = RunDir(make_private_dir(root))
    make_private_dir(rd.submitit_dir)  # Slurm opens the job's output files there before the script runs
    for r in range(replicas):
        make_private_dir(rd.replica_dir(r))  # mkdir's parents=True would give r<R> the umask's mode
        make_private_dir(rd.log_dir(r))
    fd = os.open(rd.root / "api_key", os.O_WRONLY | os.O_CREAT | os.O_EXCL, 0o600)
    with os.fdopen(fd, "w") as fh:
        fh.write(secrets.token_urlsafe(32) + "\n")
    rd.write_deployment({**record, "id": rd.deployment_id})
    return rd


def launch(settings: Settings, plan: Plan, binaries: tp.Any) -> Deployment:
    """Create the run directory, write deployment.json and the API key, submit. Returns at once."""
    from . import jobside
    from . import launch as submit

    root = make_private_dir(runs_root(settings))
    deployment_id = new_deployment_id(plan.model.name)
    rd = create_run_dir(root / deployment_id, deployment_record(settings, plan, binaries_record(binaries),
                                                                deployment_id), plan.replicas)
    info = rd.deployment() or {}
    if plan.executor == "local":
        # A pid names the controller only while it lives: its identity (start time, boot, host) is what
        # status and down check before they call it running or signal it.
        controllers = submit.submit_local(plan, rd, jobside.serve)
        info["job_ids"] = [str(c.pid) for c in controllers]
        info["local_processes"] = [c.to_json() for c in controllers]
    else:
        info["job_ids"] = submit.submit_slurm(plan, rd, jobside.serve)
    info["submitted_at"] = time.time()
    rd.write_deployment(info)
    return Deployment(rd, info)


# ----------------------------------------------------------------------------------------------------------
# Finding deployments


def list_deployments(settings: Settings) -> list[Deployment]:
    root = runs_root(settings)
    if not root.is_dir():
        return []
    found = []
    for child in root.iterdir():
        try:
            info = RunDir(child).deployment() if child.is_dir() else None
        except ContractError:
            continue  # written by another version of speedslurm: not a deployment this one can read
        if info:
            found.append(Deployment(RunDir(child), info))
    return sorted(found, key=lambda d: float(d.info.get("created_at", 0)))


def find_deployment(settings: Settings, ident: str) -> Deployment:
    """By deployment id, a unique prefix of it, or a Slurm job id (123, 123_4, 123+1: what sbatch, squeue and
    sacct print). Every command that takes a deployment (status, endpoint, logs, down, run) resolves it here."""
    deps = list_deployments(settings)
    exact = [d for d in deps if d.id == ident] or _by_job_id(deps, ident)
    if not exact and slurm.job_key(ident) and slurm.have_slurm():
        # A script from `render` records its job id once it runs; a job still queued is found by its output folder.
        for dep in deps:
            if _needs_job_ids(dep):
                find_submitted_job(dep)
        exact = _by_job_id(deps, ident)
    if not exact:
        exact = [d for d in deps if d.id.startswith(ident)]
    if len(exact) == 1:
        return exact[0]
    if not exact:
        recent = ", ".join(d.id for d in deps[-5:]) or "none"
        raise UsageError(f"unknown deployment {ident!r}: no deployment id and no job id of one (in "
                         f"{runs_root(settings)})",
                         fix=f"pass a deployment id or a Slurm job id from `speedslurm status` (recent: {recent})")
    raise UsageError(f"{ident!r} matches several deployments: {', '.join(d.id for d in exact)}",
                     fix="pass the full deployment id")


def _by_job_id(deps: tp.Sequence[Deployment], ident: str) -> list[Deployment]:
    """Deployments with a job ``ident``: 123 matches every task of array 123 and every component of hetjob 123."""
    key = slurm.job_key(ident)
    if key is None or key[0] == "":
        return []
    base, task = key
    found = []
    for dep in deps:
        keys = [slurm.job_key(j) for j in dep.job_ids if j]
        if any(k and k[0] == base and (not task or k[1] == task) for k in keys):
            found.append(dep)
    return found


def _needs_job_ids(dep: Deployment) -> bool:
    """A deployment rendered for plain sbatch that has not recorded the job id of every replica yet."""
    if dep.executor != "slurm" or not str(dep.info.get("submitted_by", "")).startswith("sbatch"):
        return False
    ids = dep.job_ids
    return len(ids) < dep.replicas or not all(ids[:dep.replicas])


def script_path(dep: Deployment) -> Path:
    """The job script ``render`` wrote for the deployment."""
    return Path(dep.info.get("script") or dep.run_dir.root / "job.sbatch")


def find_submitted_job(dep: Deployment) -> bool:
    """Find and record the job id(s) of a rendered deployment that plain sbatch submitted.

    The script records its id when it starts; until then (or when it never ran), the job is found in the queue
    by its output folder (the run directory's ``submitit/``), else in accounting by the script it was submitted
    from. An array's other tasks follow from one recorded task. True when every replica has its id.
    """
    from .render import record_job

    ids = dep.job_ids + [""] * max(0, dep.replicas - len(dep.job_ids))
    base = next((k[0] for k in map(slurm.job_key, ids) if k and k[1]), None) if dep.replicas > 1 else None
    if base is None:
        found = slurm.queued_jobs_writing_to(dep.run_dir.submitit_dir) or slurm.accounted_jobs_submitted_from(
            script_path(dep), float(dep.info.get("created_at", 0)))
        bases = sorted({k[0] for k in map(slurm.job_key, found) if k}, key=int)
        if not bases:
            return False
        base = bases[-1]  # submitted twice: the latest submission is the one meant
    for replica, job_id in enumerate(ids[:dep.replicas]):
        if not job_id:
            record_job(dep.run_dir.root, f"{base}_{replica}" if dep.replicas > 1 else base, replica)
    dep.reload()
    return not _needs_job_ids(dep)


def resolve_run_dir(settings: Settings, deployment_id: str) -> RunDir:
    return find_deployment(settings, deployment_id).run_dir


# ----------------------------------------------------------------------------------------------------------
# State


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

    def to_json(self, show_key: bool = False) -> dict[str, tp.Any]:
        return {"replica": self.replica, "state": self.state, "why": self.why, "job_id": self.job_id,
                "job_state": self.job_state, "reason": self.reason, "nodes": self.nodes,
                "endpoint": self.endpoint.public(show_key) if self.endpoint else None,
                "failure": self.failure.to_json() if self.failure else None, "restarts": self.restarts}


def _replica_job_id(dep: Deployment, replica: int) -> str:
    ids = dep.job_ids
    if not ids:
        return ""
    return ids[replica] if replica < len(ids) else ids[0]


# ----------------------------------------------------------------------------------------------------------
# The local executor's controller processes


def controller_identity(dep: Deployment, replica: int) -> ProcessIdentity | None:
    """The recorded identity of ``replica``'s local controller process; for a deployment recorded without one
    (older versions), the process now holding its pid if that is submitit's controller for this run directory's
    replica, else None."""
    job_id = _replica_job_id(dep, replica)
    if not job_id.isdigit():
        return None
    for record in dep.info.get("local_processes") or []:
        if isinstance(record, dict) and str(record.get("pid")) == job_id:
            try:
                return ProcessIdentity.from_json(record)
            except (KeyError, TypeError, ValueError):
                break
    return _legacy_controller(dep, replica, int(job_id))


def _legacy_controller(dep: Deployment, replica: int, pid: int) -> ProcessIdentity | None:
    """The process holding ``pid``, if its command line is ``python -m submitit.local._local <run
    dir>/submitit/r<R>``: nothing else starts so, so a reused pid is told apart without a recorded identity."""
    before = localproc.identify(pid)
    words = localproc.command_line(pid)
    folder = (dep.run_dir.submitit_dir / f"r{replica}").resolve()
    ours = "submitit.local._local" in words and any(w.startswith("/") and Path(w).resolve() == folder
                                                   for w in words)
    # The same start time before and after reading the command line: it was this process's.
    return before if ours and before is not None and localproc.identify(pid) == before else None


def controller_check(dep: Deployment, replica: int) -> tuple[str, ProcessIdentity | None]:
    """("", identity) when ``replica``'s local controller runs on this machine; else (why not: "gone",
    "rebooted" or "other host", the identity when one is known)."""
    ident = controller_identity(dep, replica)
    if ident is None:
        return "gone", None
    return localproc.check(ident), ident


def endpoint_is_current(dep: Deployment, endpoint: Endpoint, restarts: int | None = None) -> bool:
    """False for an endpoint file left by another job than the replica's current one, or by an earlier start
    of it (``restarts``: Slurm's restart count of the job now, None when not known)."""
    return _same_job(endpoint.job_id, _replica_job_id(dep, endpoint.replica)) and \
        _same_start(endpoint.epoch, restarts)


def failure_is_current(dep: Deployment, replica: int, failure: Failed, restarts: int | None = None) -> bool:
    """False for a failed.json left by another job than the replica's current one, or by an earlier start."""
    return _same_job(failure.job_id, _replica_job_id(dep, replica)) and _same_start(failure.epoch, restarts)


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
    """Each replica's state, and why: from the run directory's handshake files and Slurm's view of the job.

    Slurm's final state says why a job ended: CANCELLED (``down`` or scancel), TIMEOUT and the like are ends
    (ENDED), NODE_FAIL, FAILED and the like failures. A failed.json written after the job was cancelled is a
    consequence of the cancellation (the servers were killed), not the reason it ended; one that ``down`` found
    before it cancelled (up's own clean-up after a failure) stays the reason.
    """
    dep.reload()
    if dep.executor == "slurm" and _needs_job_ids(dep) and not dep.info.get("cancelled_at") \
            and find_submitted_job(dep):
        states = None  # new ids: ask Slurm about them
    ended = recorded_ends(dep) if dep.executor == "slurm" else {}
    if states is None and dep.executor == "slurm":
        live = [j for j in dep.job_ids if j and j not in ended]
        states = slurm.job_states(live) if live else {}
    cancelled = bool(dep.info.get("cancelled_at"))
    seen_ended: dict[str, slurm.JobState] = {}
    failed_first = _failed_before_cancel(dep)
    out = []
    for r in range(dep.replicas):
        job_id = _replica_job_id(dep, r)
        js = None
        if dep.executor == "slurm":
            js = slurm.state_for(job_id, states or {}) if job_id else None
            if js is None and job_id:
                js = ended.get(job_id)
        # Handshake files of another job (an earlier submission into this run dir), or of an earlier start of
        # this one (a requeued job keeps its id), are not this start's.
        restarts = 0 if dep.executor == "local" else (js.restarts if js else None)
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
        reason, nodes, word, gone, elsewhere = "", "", "", "", ""
        if dep.executor == "local":
            gone, ident = controller_check(dep, r)
            if gone == "other host" and ident is not None:
                gone, elsewhere = "", ident.host  # its processes can only be looked at there
            job_state = "UNKNOWN" if elsewhere else ("ENDED" if gone else "RUNNING")
            final, nodes = bool(gone), elsewhere or "localhost"
        else:
            if js is not None and job_id not in ended and js.state.split()[0] in slurm.FINAL_STATES:
                seen_ended[job_id] = js  # its end is known: never ask again
            job_state = js.state if js else ("PENDING" if job_id and not cancelled else "")
            final = bool(js and js.final) or (js is None and cancelled)
            word = js.state.split()[0] if js else ""
            reason = js.reason if js else ""
            nodes = js.nodes if js and js.nodes != "None assigned" else ""  # sacct's words for a job that never ran
            if word in QUEUED_STATES:
                # Queued again (requeued, or preempted with PreemptMode=REQUEUE): nothing of it serves now,
                # whatever files its earlier start left (and restarts unknown could not tell them apart).
                failure, endpoint, loading = None, None, False
            elif word == "COMPLETING" and earlier and not (failure or endpoint or loading):
                # Being requeued: Slurm counted the restart and kills the earlier start's processes; it is
                # queued again in a moment, not ended.
                final, word, reason = False, "PENDING", "requeued"
        was_cancelled = r not in failed_first and (word == "CANCELLED" or cancelled)
        if dep.executor == "slurm" and not job_id and not cancelled:
            state, why = "UNSUBMITTED", f"rendered, not submitted: sbatch {script_path(dep)}"
        elif failure and failure.cause == "time limit":
            state, why = "ENDED", "time limit"
        elif failure and was_cancelled:
            state, why = "ENDED", "cancelled"
        elif failure:
            state, why = "FAILED", _failure_why(failure)
        elif final:
            state, why = _final_state(word, cancelled)
            if gone and not cancelled:
                why = GONE_WHY.get(gone, why)
        elif endpoint:
            state, why = "READY", ""
        elif loading:
            state, why = "LOADING", ""
        elif job_state in ("RUNNING", "UNKNOWN"):
            state, why = "STARTING", ""
        else:
            state, why = "PENDING", reason if reason and reason != "None" else ""
            if restarts:
                why = f"requeued{': ' + why if why and why != 'requeued' else ''} (start {restarts + 1} waits)"
        if elsewhere and state in ("READY", "LOADING", "STARTING"):
            why = f"runs on {elsewhere}: its processes can only be checked there"
        out.append(ReplicaStatus(r, state, job_id, job_state, reason, endpoint, failure, nodes, why,
                                 restarts if dep.executor == "slurm" else None))
    _record_ends(dep, seen_ended)
    return out


def recorded_ends(dep: Deployment) -> dict[str, slurm.JobState]:
    """Jobs of ``dep`` already seen ended (``jobs-ended.json``): job id -> its final state."""
    try:
        data = read_json(dep.run_dir.jobs_ended_path) or {}
    except (OSError, ValueError):
        return {}
    jobs = data.get("jobs") if isinstance(data, dict) else None
    out = {}
    for job_id, rec in (jobs or {}).items():
        if isinstance(rec, dict) and rec.get("state"):
            out[str(job_id)] = slurm.JobState(str(rec.get("job_id") or job_id), str(rec["state"]),
                                              str(rec.get("reason", "")), str(rec.get("exit_code", "")),
                                              str(rec.get("nodes", "")))
    return out


def live_job_ids(dep: Deployment) -> list[str]:
    """The job ids of ``dep`` whose end is not known yet: the only ones worth asking Slurm about."""
    if dep.executor != "slurm":
        return []
    ended = recorded_ends(dep)
    return [j for j in dep.job_ids if j and j not in ended]


def _record_ends(dep: Deployment, seen: dict[str, slurm.JobState]) -> None:
    """Add jobs seen in a final state to ``jobs-ended.json`` once it is their last word (:func:`slurm.settled`:
    gone from the queue, so nothing can requeue them); a run directory that cannot be written: they are asked
    about again next time, as before."""
    seen = {job_id: js for job_id, js in seen.items() if slurm.settled(js)}
    if not seen:
        return
    try:
        data = read_json(dep.run_dir.jobs_ended_path) or {}
        jobs = dict(data.get("jobs") or {}) if isinstance(data, dict) else {}
        for job_id, js in seen.items():
            jobs[job_id] = {**dataclasses.asdict(js), "seen_at": time.time()}
        write_json_atomic(dep.run_dir.jobs_ended_path, {"jobs": jobs})
    except (OSError, ValueError):
        pass


def statuses_of(deps: tp.Sequence[Deployment]) -> list[list[ReplicaStatus]]:
    """:func:`replica_statuses` of several deployments, with one question to Slurm for all their live jobs."""
    ids: list[str] = []
    for dep in deps:
        dep.reload()
        ids += live_job_ids(dep)
    states = slurm.job_states(ids) if ids else {}
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
        if self.dep.executor == "slurm":
            live = live_job_ids(self.dep)
            if not live:
                self._states = {}  # every end is recorded: the answers kept from before are stale
            elif self._states is None or live != self._live or self.backoff.due():
                self._states = slurm.job_states(live)
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
        from .jobside import log_tail

        tail = log_tail(path) or _submitit_tail(dep, status)
    return reason, tail


def _submitit_tail(dep: Deployment, status: ReplicaStatus) -> str:
    from .jobside import log_tail

    folder = dep.run_dir.submitit_dir
    if not folder.is_dir():
        return ""
    base = JobId.base_of(status.job_id)
    files = sorted(folder.rglob(f"{base}*_0_log.err")) + sorted(folder.rglob(f"{base}*_0_log.out"))
    return "\n".join(t for t in (log_tail(p) for p in files) if t)


# ----------------------------------------------------------------------------------------------------------
# Waiting (the clock and sleep are injectable; unit tests drive them)


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


# ----------------------------------------------------------------------------------------------------------
# Ending


def down(dep: Deployment) -> list[str]:
    """Cancel the deployment's job(s); returns the ids cancelled.

    Replicas that had failed already are recorded: the servers that the cancellation kills may write failures
    of their own, which must not be taken for the reason the deployment ended.
    """
    ids = dep.job_ids
    failed = [s.replica for s in replica_statuses(dep) if s.state == "FAILED"]
    if dep.executor == "local":
        # Only processes whose identity matches the record are signalled: a pid that another process has
        # taken since (after the controller ended, or a reboot) is left alone.
        controllers = []
        for r in range(dep.replicas):
            gone, ident = controller_check(dep, r)
            if gone == "other host" and ident is not None:
                raise UsageError(f"deployment {dep.id} runs its processes on {ident.host}, not on this machine "
                                 f"({socket.gethostname()})", fix=f"run `speedslurm down {dep.id}` on {ident.host}")
            if not gone and ident is not None and ident not in controllers:
                controllers.append(ident)
        for ident in controllers:
            localproc.signal_process(ident, signal.SIGTERM)  # the controller forwards it to every task
        deadline = time.monotonic() + 15
        while any(not localproc.check(c) for c in controllers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for ident in controllers:
            localproc.signal_process(ident, signal.SIGKILL)
        if not controllers:
            return ids  # nothing ran: it ended by itself, and status keeps saying so (not "cancelled")
    else:
        slurm.scancel([JobId.base_of(j) for j in ids if j])
    info = dict(dep.reload().info)
    info["cancelled_at"] = time.time()
    info["failed_before_cancel"] = failed
    dep.run_dir.write_deployment(info)
    dep.info = info
    return ids


def wait_ended(dep: Deployment, timeout: float = 60, clock: tp.Callable[[], float] = time.monotonic,
               sleep: tp.Callable[[float], None] = time.sleep) -> list[ReplicaStatus]:
    start = clock()
    while True:
        statuses = replica_statuses(dep)
        if all(s.state in ("ENDED", "FAILED") for s in statuses) or clock() - start > timeout:
            return statuses
        sleep(0.25)
