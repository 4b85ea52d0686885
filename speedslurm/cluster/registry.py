"""The executors by name: the one that runs a deployment (as ``deployment.json`` records it), the one to start
one with. A new executor is one module and one line of :data:`_EXECUTORS`.
"""

from __future__ import annotations

import typing as tp

from ..errors import UsageError
from . import slurm
from .executor import Executor
from .local_executor import LocalExecutor
from .slurm_executor import SlurmExecutor

if tp.TYPE_CHECKING:
    from ..rundir.layout import Deployment
    from ..settings.settings import Settings


NAMES = ("slurm", "local")


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
