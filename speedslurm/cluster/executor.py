"""Where a deployment's roles run, behind one interface: submit, job states, cancel.

* :class:`SlurmExecutor`: jobs submitted through submitit (a hetjob, a job array, a plain job); their states
  from squeue, then sacct (politely: one question for all live jobs, never about a job seen ended).
* :class:`LocalExecutor`: the same job side as processes on this machine (127.0.0.1), one submitit local
  controller per replica, known by an identity that survives pid reuse (:mod:`speedslurm.cluster.localproc`).

:func:`executor_for` gives a deployment's executor from the name ``deployment.json`` records; nothing else
branches on that name. :mod:`speedslurm.deployments.status` turns what an executor says about a replica's job
(:class:`JobView`) and the run directory's handshake files into the replica's state.
"""

from __future__ import annotations

import abc
import dataclasses
import signal
import socket
import time
import typing as tp
from pathlib import Path

from ..deployments.nodehours import ACCOUNTING, SQUEUE, Usage
from ..deployments.record import Deployment, find_submitted_job, needs_job_ids
from ..errors import UsageError
from ..rundir.layout import read_json, write_json_atomic
from ..rundir.records import JobId
from . import localproc, slurm
from .localproc import ProcessIdentity

if tp.TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..rundir.layout import RunDir
    from ..settings.settings import Settings

NAMES = ("slurm", "local")
# How often a polling loop asks Slurm: after a change every SLURM_FIRST_S, doubling to SLURM_MOST_S while the
# answer stays the same.
SLURM_FIRST_S = 1.0
SLURM_MOST_S = 30.0
# How long `down` gives local roles to stop after SIGTERM before SIGKILL.
LOCAL_STOP_S = 15.0


@dataclasses.dataclass(frozen=True)
class JobView:
    """What an executor knows about one replica's job, before the run directory's files are read."""

    job_id: str
    job_state: str            # RUNNING, PENDING, COMPLETED, ... (Slurm's words); RUNNING/ENDED/UNKNOWN locally
    final: bool               # the job is over
    word: str = ""            # Slurm's state word ("" locally, or when Slurm has no record)
    reason: str = ""          # Slurm's reason (why it waits)
    nodes: str = ""
    restarts: int | None = None  # Slurm's restart count, as status reports it (None: not known / not Slurm)
    start: int | None = None  # the start whose handshake files count (None: any)
    unsubmitted: bool = False  # rendered for plain sbatch, no job of it found yet
    gone: str = ""            # local: why its processes are not running ("gone", "rebooted")
    elsewhere: str = ""       # local: the host its processes run on, when that is not this one
    usage: Usage | None = None  # what the job held, as Slurm counts it (None: Slurm gave no figure)
    time_left_s: int | None = None  # Slurm's TimeLeft of the running job, when this view was taken


class Executor(abc.ABC):
    """Submits a deployment's replicas, tells their jobs' states, cancels them."""

    name: tp.ClassVar[str]
    # How often at most a batch asks whether the replicas' jobs still live (each question may cost slurmctld).
    alive_most_s: tp.ClassVar[float]

    @abc.abstractmethod
    def nodes_available(self, settings: Settings) -> int | None:
        """How many nodes a replica can have at most (None: no limit the plan must check)."""

    @abc.abstractmethod
    def submit(self, plan: Plan, run_dir: RunDir, fn: tp.Callable[..., tp.Any]) -> dict[str, tp.Any]:
        """Start ``fn(run_dir, replica)`` for every replica; returns what deployment.json records of the jobs
        (``job_ids``, one per replica, and whatever the executor needs to find them again)."""

    @abc.abstractmethod
    def live_job_ids(self, dep: Deployment) -> list[str]:
        """The job ids of ``dep`` whose end is not known yet: the only ones worth asking about."""

    @abc.abstractmethod
    def job_states(self, job_ids: tp.Sequence[str]) -> dict[str, slurm.JobState]:
        """One question for the states of many jobs (of one or several deployments)."""

    @abc.abstractmethod
    def views(self, dep: Deployment, states: dict[str, slurm.JobState] | None = None) -> list[JobView]:
        """Each replica's job as the executor sees it; ``states`` from :meth:`job_states` (None: ask now)."""

    @abc.abstractmethod
    def cancel(self, dep: Deployment) -> bool:
        """Stop every job of ``dep``; False when nothing of it was running (it ended by itself)."""

    def job_script(self, plan: Plan, run_dir: RunDir) -> str | None:
        """The script :meth:`submit` would submit for ``plan`` (None: no script, processes are started)."""
        return None


# ----------------------------------------------------------------------------------------------------------
# Slurm


class SlurmExecutor(Executor):
    name = "slurm"
    alive_most_s = SLURM_MOST_S

    def nodes_available(self, settings: Settings) -> int | None:
        part = slurm.partition_info(settings.cluster.partition)
        return len([n for n in part["nodes"] if n not in settings.cluster.exclude])

    def submit(self, plan: Plan, run_dir: RunDir, fn: tp.Callable[..., tp.Any]) -> dict[str, tp.Any]:
        from .script import submit_slurm

        return {"job_ids": submit_slurm(plan, run_dir, fn)}

    def job_script(self, plan: Plan, run_dir: RunDir) -> str | None:
        from .script import entry_command, python_command, render_job_script

        return render_job_script(plan, run_dir, entry_command(python_command(), run_dir.submitit_dir))

    def live_job_ids(self, dep: Deployment) -> list[str]:
        ended = recorded_ends(dep)
        return [j for j in dep.job_ids if j and j not in ended]

    def job_states(self, job_ids: tp.Sequence[str]) -> dict[str, slurm.JobState]:
        return slurm.job_states(job_ids) if job_ids else {}

    def views(self, dep: Deployment, states: dict[str, slurm.JobState] | None = None) -> list[JobView]:
        if needs_job_ids(dep) and not dep.info.get("cancelled_at") and find_submitted_job(dep):
            states = None  # new ids: ask Slurm about them
        ended = recorded_ends(dep)
        if states is None:
            states = self.job_states([j for j in dep.job_ids if j and j not in ended])
        cancelled = bool(dep.info.get("cancelled_at"))
        seen_ended: dict[str, slurm.JobState] = {}
        out = []
        for r in range(dep.replicas):
            job_id = dep.replica_job_id(r)
            js = slurm.state_for(job_id, states) if job_id else None
            if js is not None:
                js = slurm.with_usage(job_id, js, states)  # a hetjob: every component's nodes
            if js is None and job_id:
                js = ended.get(job_id)
            if js is not None and job_id not in ended and js.state.split()[0] in slurm.FINAL_STATES:
                seen_ended[job_id] = js  # its end is known: never ask again
            out.append(JobView(
                job_id=job_id,
                job_state=js.state if js else ("PENDING" if job_id and not cancelled else ""),
                final=bool(js and js.final) or (js is None and cancelled),
                word=js.state.split()[0] if js else "",
                reason=js.reason if js else "",
                nodes=js.nodes if js and js.nodes != "None assigned" else "",  # sacct's words: it never ran
                restarts=js.restarts if js else None, start=js.restarts if js else None,
                unsubmitted=not job_id and not cancelled, usage=_usage(js),
                time_left_s=js.time_left_s if js else None))
        _record_ends(dep, seen_ended)
        return out

    def cancel(self, dep: Deployment) -> bool:
        ids = [JobId.base_of(j) for j in dep.job_ids if j]  # an array task: its whole array
        if not ids:
            return False  # rendered, never submitted: nothing to cancel
        slurm.scancel(ids)
        return True


def _usage(js: slurm.JobState | None) -> Usage | None:
    """What Slurm counted of a job: accounting's figures once it ended (exit code known), squeue's while it runs."""
    if js is None or js.node_s is None or js.elapsed_s is None:
        return None
    source = ACCOUNTING if js.exit_code else SQUEUE  # accounting's rows carry an exit code, squeue's never do
    return Usage(float(js.elapsed_s), js.node_s, js.gpu_s, source)


def _num(value: tp.Any) -> float | None:
    return float(value) if isinstance(value, (int, float)) else None


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
            elapsed = _num(rec.get("elapsed_s"))
            out[str(job_id)] = slurm.JobState(str(rec.get("job_id") or job_id), str(rec["state"]),
                                              str(rec.get("reason", "")), str(rec.get("exit_code", "")),
                                              str(rec.get("nodes", "")), None,
                                              None if elapsed is None else int(elapsed),
                                              _num(rec.get("node_s")), _num(rec.get("gpu_s")))
    return out


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


# ----------------------------------------------------------------------------------------------------------
# Local processes


class LocalExecutor(Executor):
    name = "local"
    alive_most_s = SLURM_FIRST_S  # asking costs Slurm nothing: every second

    def nodes_available(self, settings: Settings) -> int | None:
        return None  # every role is a process on this machine

    def submit(self, plan: Plan, run_dir: RunDir, fn: tp.Callable[..., tp.Any]) -> dict[str, tp.Any]:
        from .script import submit_local

        # A pid names the controller only while it lives: its identity (start time, boot, host) is what
        # status and down check before they call it running or signal it.
        controllers = submit_local(plan, run_dir, fn)
        return {"job_ids": [str(c.pid) for c in controllers], "local_processes": [c.to_json() for c in controllers]}

    def live_job_ids(self, dep: Deployment) -> list[str]:
        return []

    def job_states(self, job_ids: tp.Sequence[str]) -> dict[str, slurm.JobState]:
        return {}

    def views(self, dep: Deployment, states: dict[str, slurm.JobState] | None = None) -> list[JobView]:
        out = []
        for r in range(dep.replicas):
            gone, ident = controller_check(dep, r)
            elsewhere = ""
            if gone == "other host" and ident is not None:
                gone, elsewhere = "", ident.host  # its processes can only be looked at there
            out.append(JobView(job_id=dep.replica_job_id(r),
                               job_state="UNKNOWN" if elsewhere else ("ENDED" if gone else "RUNNING"),
                               final=bool(gone), nodes=elsewhere or "localhost", start=0, gone=gone,
                               elsewhere=elsewhere))
        return out

    def cancel(self, dep: Deployment) -> bool:
        # Only processes whose identity matches the record are signalled: a pid that another process has
        # taken since (after the controller ended, or a reboot) is left alone.
        controllers: list[ProcessIdentity] = []
        for r in range(dep.replicas):
            gone, ident = controller_check(dep, r)
            if gone == "other host" and ident is not None:
                raise UsageError(f"deployment {dep.id} runs its processes on {ident.host}, not on this machine "
                                 f"({socket.gethostname()})", fix=f"run `speedslurm down {dep.id}` on {ident.host}")
            if not gone and ident is not None and ident not in controllers:
                controllers.append(ident)
        for ident in controllers:
            localproc.signal_process(ident, signal.SIGTERM)  # the controller forwards it to every task
        deadline = time.monotonic() + LOCAL_STOP_S
        while any(not localproc.check(c) for c in controllers) and time.monotonic() < deadline:
            time.sleep(0.1)
        for ident in controllers:
            localproc.signal_process(ident, signal.SIGKILL)
        return bool(controllers)


def controller_identity(dep: Deployment, replica: int) -> ProcessIdentity | None:
    """The recorded identity of ``replica``'s local controller process; for a deployment recorded without one
    (older versions), the process now holding its pid if that is submitit's controller for this run directory's
    replica, else None."""
    job_id = dep.replica_job_id(replica)
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


# ----------------------------------------------------------------------------------------------------------
# Choosing one


_EXECUTORS: dict[str, Executor] = {"slurm": SlurmExecutor(), "local": LocalExecutor()}


def get(name: str) -> Executor:
    """The executor called ``name`` ("slurm" or "local")."""
    try:
        return _EXECUTORS[name]
    except KeyError:
        raise UsageError(f"unknown executor {name!r}", fix="use --executor slurm or --executor local") from None


def executor_for(dep: Deployment) -> Executor:
    """The executor that runs ``dep`` (as its deployment.json records it)."""
    return get(dep.executor)


def choose(settings: Settings, executor: str | None) -> str:
    """The executor to start a deployment with: ``executor`` (a flag), else ``run.executor``; "auto" is Slurm
    where sbatch exists, else local."""
    choice = executor or settings.run.executor
    if choice == "auto":
        return "slurm" if slurm.have_slurm() else "local"
    get(choice)
    if choice == "slurm" and not slurm.have_slurm():
        raise UsageError("sbatch is not on PATH, so the Slurm executor cannot submit",
                         fix="run on a Slurm login node, or use --executor local to run on this machine")
    return choice


def live_job_ids(dep: Deployment) -> list[str]:
    """The job ids of ``dep`` whose end is not known yet: the only ones worth asking about."""
    return executor_for(dep).live_job_ids(dep)
