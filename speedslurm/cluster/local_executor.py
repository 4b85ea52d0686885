"""The local executor: the same job side as processes on this machine (127.0.0.1), one submitit local controller
per replica, known by an identity that survives pid reuse (:mod:`speedslurm.cluster.localproc`); asking about them
costs Slurm nothing.
"""

from __future__ import annotations

import os
import signal
import socket
import time
import typing as tp

from ..errors import UsageError
from ..rundir.layout import Deployment
from . import localproc
from .executor import SLURM_FIRST_S, Executor, JobView
from .localproc import ProcessIdentity, boot_id, identify

if tp.TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..rundir.layout import RunDir
    from ..settings.settings import Settings
    from . import slurm

# How long `down` gives local roles to stop after SIGTERM before SIGKILL.
LOCAL_STOP_S = 15.0


class LocalExecutor(Executor):
    name = "local"
    alive_most_s = SLURM_FIRST_S  # asking costs Slurm nothing: every second
    places_followers = False
    sizes_devices = False
    pins_model_host = False
    writes_job_script = False

    def nodes_available(self, settings: Settings) -> int | None:
        return None  # every role is a process on this machine

    def submit(self, plan: Plan, run_dir: RunDir, fn: tp.Callable[..., tp.Any]) -> dict[str, tp.Any]:
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
    """The recorded identity of ``replica``'s local controller process (None: none recorded)."""
    job_id = dep.replica_job_id(replica)
    if not job_id.isdigit():
        return None
    for record in dep.info.get("local_processes") or []:
        if isinstance(record, dict) and str(record.get("pid")) == job_id:
            try:
                return ProcessIdentity.from_json(record)
            except (KeyError, TypeError, ValueError):
                break
    return None


def controller_check(dep: Deployment, replica: int) -> tuple[str, ProcessIdentity | None]:
    """("", identity) when ``replica``'s local controller runs on this machine; else (why not: "gone",
    "rebooted" or "other host", the identity when one is known)."""
    ident = controller_identity(dep, replica)
    if ident is None:
        return "gone", None
    return localproc.check(ident), ident


def local_environment(environ: tp.Mapping[str, str]) -> dict[str, str]:
    """The environment of local roles: ``environ`` without the variables of a Slurm job.

    ``speedslurm up --executor local`` run inside an allocation (``salloc``, a batch script, ``srun``) would
    hand its local roles SLURM_JOB_ID and the like; the job side would take that id for its own and write it
    into every handshake file, which the client (expecting the controller's pid) would never accept, and
    SLURMD_NODENAME would name a node instead of this machine. SLURM_CONF, the client configuration, stays.
    """
    return {k: v for k, v in environ.items()
            if not ((k.startswith("SLURM_") and k != "SLURM_CONF") or k.startswith("SLURMD_")
                    or k == "SPEEDSLURM_JOB_ID")}


def submit_local(plan: Plan, run_dir: RunDir, fn: tp.Callable[..., tp.Any]) -> list[ProcessIdentity]:
    """Run the same job side as local processes: one submitit local job of N tasks per replica.

    Returns each replica's controller process by its identity (its pid is the replica's job id), read while
    the process is still this one's unreaped child, so its pid cannot have passed to another process yet.
    """
    from .script import signal_delay_s
    from .submitit_adapter import DetachedLocalExecutor

    controllers = []
    for replica in range(plan.replicas):
        ex = DetachedLocalExecutor(run_dir.submitit_dir / f"r{replica}", lambda: local_environment(os.environ))
        ex.update_parameters(tasks_per_node=plan.nodes, timeout_min=plan.time_minutes,
                             signal_delay_s=signal_delay_s(plan))
        job = ex.submit(fn, str(run_dir.root), replica)
        pid = int(job.job_id)
        # No /proc entry: never matches a process (start time -1), so the replica shows as ended.
        controllers.append(identify(pid) or ProcessIdentity(pid, -1, boot_id(), socket.gethostname()))
    return controllers
