"""``speedslurm render``: the job script ``up`` would submit, as a file to submit with plain ``sbatch``.

The script comes from :func:`speedslurm.cluster.script.render_job_script`, the one renderer ``up`` submits through
submitit, so the ``#SBATCH`` header, the setup lines and the ``srun`` flags are the same. Two things differ:

* the task command is ``python -u -m speedslurm.node.entry serve RUN_DIR`` (the job side without submitit's pickles),
  which reads ``RUN_DIR/deployment.json``; so rendering also creates the run directory (mode 0700) with
  ``deployment.json`` and the deployment's API key, as ``up`` does before it submits;
* one line before ``srun`` records the Slurm job id in ``deployment.json`` (``python -m speedslurm.node.entry
  record-job``), which ``up`` learns from sbatch; ``speedslurm status`` and ``down`` then see the job.

Values reach the script shell-quoted (``shlex.quote``). A line break cannot be quoted inside an ``#SBATCH``
comment line (it would end the comment and start a shell line), so run directories and settings that contain
one are refused, and control characters in the model's name are replaced in the script (the run directory's
``deployment.json`` keeps the real name).
"""

from __future__ import annotations

import dataclasses
import shlex
import typing as tp
from pathlib import Path

from ..planning.plan import Plan
from ..planning.sbatchopts import one_line, refuse_control
from ..rundir.layout import RunDir, make_private_dir
from ..rundir.records import JobId
from ..settings.settings import Settings
from . import record

RECORD_MARK = "# record this job's id in deployment.json (speedslurm status and down find the job by it)"


def entry_command(python: str, run_dir: RunDir) -> str:
    """The task command ``srun`` starts on every node: the job side, reading the run directory."""
    return " ".join([shlex.quote(python), "-u", "-m", "speedslurm.node.entry", "serve", shlex.quote(str(run_dir.root))])


def record_command(python: str, run_dir: RunDir) -> str:
    return " ".join([shlex.quote(python), "-m", "speedslurm.node.entry", "record-job", shlex.quote(str(run_dir.root))])


def _script_plan(plan: Plan) -> Plan:
    """``plan`` with control characters out of the model's name (the settings the script carries are checked
    by :func:`speedslurm.cluster.script.slurm_parameters`, on every path)."""
    name = one_line(plan.model.name)
    if name == plan.model.name:
        return plan
    return dataclasses.replace(plan, model=dataclasses.replace(plan.model, name=name))


def render_script(plan: Plan, run_dir: RunDir, python: str) -> str:
    """The sbatch script for ``plan`` that runs the job side from ``run_dir``. Pure (golden-file tested)."""
    from ..cluster.script import render_job_script

    refuse_control("run directory", str(run_dir.root))
    refuse_control("python path", python)
    text = render_job_script(_script_plan(plan), run_dir, entry_command(python, run_dir))
    lines = text.split("\n")
    at = lines.index("# command")
    lines[at:at] = [RECORD_MARK, record_command(python, run_dir) + " || true", ""]
    return "\n".join(lines)


# ----------------------------------------------------------------------------------------------------------
# The run directory


def deployment_record(settings: Settings, plan: Plan, binaries: dict[str, tp.Any], deployment_id: str,
                      *, now: float | None = None) -> dict[str, tp.Any]:
    """``deployment.json`` as ``up`` writes it, marked as submitted by hand."""
    return record.deployment_record(settings, plan, binaries, deployment_id, now=now,
                                    submitted_by="sbatch (speedslurm render)")


def create_run_dir(root: Path, info: dict[str, tp.Any], replicas: int) -> RunDir:
    """The run directory of a rendered script: as ``up`` makes it, refusing control characters in its path."""
    refuse_control("run directory", str(root))
    return record.create_run_dir(root, info, replicas)


def default_run_dir(settings: Settings, model_name: str) -> Path:
    root = settings.run.root
    make_private_dir(root)
    return root / record.new_deployment_id(model_name)


# ----------------------------------------------------------------------------------------------------------
# Job id, recorded by the script itself


def job_id_from_env(environ: tp.Mapping[str, str]) -> tuple[str, int]:
    """(job id as ``up`` records it, replica) of the running batch script: ``123`` or ``123_4`` for arrays."""
    job_id = JobId.from_env(environ)
    task = JobId.parse(job_id).array_task if job_id else None
    return job_id, task or 0


def record_job(run_dir: Path, job_id: str, replica: int) -> None:
    """Put ``job_id`` at index ``replica`` of deployment.json's job_ids (array tasks do this concurrently)."""
    RunDir(Path(run_dir)).record_job(job_id, replica)

