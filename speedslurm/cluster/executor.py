"""What an executor is: where a deployment's replicas run, behind one interface (submit, job states, cancel).

An executor tells what it knows of each replica's job (:class:`JobView`, with what the job held:
:class:`Usage`); :mod:`speedslurm.deployments.status` turns that and the run directory's handshake files into
the replica's state. The executors themselves live one per module (:mod:`speedslurm.cluster.slurm_executor`,
:mod:`speedslurm.cluster.local_executor`); :mod:`speedslurm.cluster.registry` knows them by name.
"""

from __future__ import annotations

import abc
import dataclasses
import typing as tp

if tp.TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..rundir.layout import Deployment, RunDir
    from ..settings.settings import Settings
    from . import slurm

# How often a polling loop asks Slurm: after a change every SLURM_FIRST_S, doubling to SLURM_MOST_S while the
# answer stays the same.
SLURM_FIRST_S = 1.0
SLURM_MOST_S = 30.0
# Where a figure of what a job held comes from (Usage.source).
ACCOUNTING = "slurm accounting"
SQUEUE = "slurm (running)"


@dataclasses.dataclass(frozen=True)
class Usage:
    """What one job held, as Slurm counts it: seconds, node-seconds, GPU-seconds (None: GPUs not counted)."""

    elapsed_s: float
    node_s: float
    gpu_s: float | None
    source: str  # ACCOUNTING or SQUEUE


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
    # What differs between executors, asked instead of their names:
    # whether the followers' nodes can be chosen by their warm rpc cache (cluster/warmcache.py);
    places_followers: tp.ClassVar[bool]
    # whether each node's device memory bounds the plan (False: the roles share this machine's memory, one node);
    sizes_devices: tp.ClassVar[bool]
    # whether a model on one node's local disk (its registry entry's ``host:``) puts the leader on that node;
    pins_model_host: tp.ClassVar[bool]
    # whether the jobs run from a job script, so that every value it carries is checked when planning.
    writes_job_script: tp.ClassVar[bool]

    def check_available(self) -> None:
        """:class:`~speedslurm.errors.UsageError` when this executor cannot submit from here (every one can,
        unless it says otherwise)."""
        return None

    @abc.abstractmethod
    def nodes_available(self, settings: Settings) -> int | None:
        """How many nodes a replica can have at most (None: no limit the plan must check)."""

    def idle_nodes(self, settings: Settings) -> int | None:
        """How many nodes could start a job now (None: no such limit, as on this machine)."""
        return None

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


# ----------------------------------------------------------------------------------------------------------
# Local processes


# ----------------------------------------------------------------------------------------------------------
# Choosing one


