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


_EXECUTORS: dict[str, Executor] = {ex.name: ex for ex in (SlurmExecutor(), LocalExecutor())}
NAMES = tuple(_EXECUTORS)


def get(name: str) -> Executor:
    """The executor called ``name`` (one of :data:`NAMES`)."""
    try:
        return _EXECUTORS[name]
    except KeyError:
        raise UsageError(f"unknown executor {name!r}",
                         fix="use " + " or ".join(f"--executor {n}" for n in NAMES)) from None


def executor_for(dep: Deployment) -> Executor:
    """The executor that runs ``dep`` (as its deployment.json records it)."""
    return get(dep.executor)


def choose(settings: Settings, executor: str | None) -> str:
    """The executor to start a deployment with: ``executor`` (a flag), else ``run.executor``; "auto" is Slurm
    where sbatch exists, else local."""
    choice = executor or settings.run.executor
    if choice == "auto":
        return "slurm" if slurm.have_slurm() else "local"
    get(choice).check_available()
    return choice


def live_job_ids(dep: Deployment) -> list[str]:
    """The job ids of ``dep`` whose end is not known yet: the only ones worth asking about."""
    return executor_for(dep).live_job_ids(dep)


def live_jobs(deps: tp.Sequence[Deployment]) -> dict[str, list[str]]:
    """The live job ids of several deployments, by the name of the executor that runs them."""
    out: dict[str, list[str]] = {}
    for dep in deps:
        ids = live_job_ids(dep)
        if ids:
            out.setdefault(dep.executor, []).extend(ids)
    return out


def job_states(live: tp.Mapping[str, tp.Sequence[str]]) -> dict[str, slurm.JobState]:
    """The states of the jobs in ``live`` (:func:`live_jobs`): one question to each executor that has some."""
    states: dict[str, slurm.JobState] = {}
    for name, ids in live.items():
        states.update(get(name).job_states(ids))
    return states
