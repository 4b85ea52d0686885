"""The Slurm executor: a deployment's replicas as Slurm jobs submitted through submitit (a hetjob, a job array, a
plain job), their states from squeue, then sacct (politely: one question for all live jobs, never about a job seen
ended: its final state is kept in ``jobs-ended.json``), cancelled with scancel. A job script rendered for plain
sbatch (``speedslurm render``) is found in the queue, or in accounting, once it was submitted.
"""

from __future__ import annotations

import dataclasses
import time
import typing as tp

from ..errors import UsageError
from ..rundir.layout import Deployment, script_path
from ..rundir.records import JobId, JobsEnded, read_record, write_record
from . import slurm
from .executor import ACCOUNTING, SLURM_MOST_S, SQUEUE, Executor, JobView, Usage

if tp.TYPE_CHECKING:
    from ..planning.plan import Plan
    from ..rundir.layout import RunDir
    from ..settings.settings import Settings


class SlurmExecutor(Executor):
    name = "slurm"
    alive_most_s = SLURM_MOST_S
    places_followers = True
    sizes_devices = True
    pins_model_host = True
    writes_job_script = True

    def check_available(self) -> None:
        if not slurm.have_slurm():
            raise UsageError("sbatch is not on PATH, so the Slurm executor cannot submit",
                             fix="run on a Slurm login node, or use --executor local to run on this machine")

    def nodes_available(self, settings: Settings) -> int | None:
        part = slurm.partition_info(settings.cluster.partition)
        return len([n for n in part["nodes"] if n not in settings.cluster.exclude])

    def idle_nodes(self, settings: Settings) -> int | None:
        part = slurm.partition_info(settings.cluster.partition)
        return len([n for n, d in part["detail"].items()
                    if d["state"].strip().lower() == "idle" and n not in settings.cluster.exclude])

    def submit(self, plan: Plan, run_dir: RunDir, fn: tp.Callable[..., tp.Any]) -> dict[str, tp.Any]:
        return {"job_ids": submit_slurm(plan, run_dir, fn)}

    def job_script(self, plan: Plan, run_dir: RunDir) -> str | None:
        from .script import python_command, render_job_script
        from .submitit_adapter import entry_command

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
    """Jobs of ``dep`` already seen ended (``jobs-ended.json``): job id -> its final state. A file that cannot be
    read or is no such record: none (Slurm is asked again)."""
    try:
        record = read_record(dep.run_dir.jobs_ended_path, JobsEnded)
    except (OSError, UsageError):
        return {}
    out = {}
    for job_id, rec in (record.jobs if record else {}).items():
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
        try:
            record = read_record(dep.run_dir.jobs_ended_path, JobsEnded)
        except UsageError:
            record = None  # not such a record: written anew
        jobs = dict(record.jobs) if record else {}
        for job_id, js in seen.items():
            jobs[job_id] = {**dataclasses.asdict(js), "seen_at": time.time()}
        write_record(dep.run_dir.jobs_ended_path, JobsEnded(jobs=jobs))
    except OSError:
        pass


def _refused(exc: BaseException) -> str | None:
    """sbatch's stderr when ``exc`` is sbatch's refusal (it exited non-zero: nothing was queued), else None."""
    import subprocess

    from submitit.core.utils import FailedJobError

    from ..errors import CommandError

    if isinstance(exc, FailedJobError) and isinstance(exc.__cause__, subprocess.CalledProcessError):
        cause = exc.__cause__
        if cause.cmd and str(cause.cmd[0]).endswith("sbatch"):
            return str(cause.stderr or exc)
    if isinstance(exc, CommandError) and exc.argv and exc.argv[0].endswith("sbatch") \
            and exc.returncode not in (124, 127):  # not a timeout (the job may be queued), not a missing sbatch
        return exc.stderr or exc.stdout
    return None


def submit_slurm(plan: Plan, run_dir: RunDir, fn: tp.Callable[..., tp.Any]) -> list[str]:
    """Submit ``fn(run_dir, replica)`` for every replica; returns the Slurm job id(s) per replica.

    :class:`SbatchRefused` (exit 2) when sbatch refuses the job, with its message and the setting to change."""
    import contextlib
    import io

    from .script import refusal

    try:
        # submitit prints sbatch's stderr itself when it fails: it is said once, in the error below.
        with contextlib.redirect_stderr(io.StringIO()):
            return _submit_slurm(plan, run_dir, fn)
    except Exception as exc:
        stderr = _refused(exc)
        if stderr is None:
            raise
        raise refusal(plan, stderr) from None


def _submit_slurm(plan: Plan, run_dir: RunDir, fn: tp.Callable[..., tp.Any]) -> list[str]:
    from .script import render_job_script, slurm_parameters
    from .submitit_adapter import EntrySlurmExecutor, ScriptSlurmExecutor

    if plan.replicas == 1:
        ex = ScriptSlurmExecutor(run_dir.submitit_dir, lambda command: render_job_script(plan, run_dir, command),
                                 ntasks=plan.nodes)
        job = ex.submit(fn, str(run_dir.root), 0)
        return [str(job.job_id)]
    # Arrays: submitit's own array path renders the same script as render_job_script (map_count = R).
    ex_arr = EntrySlurmExecutor(folder=run_dir.submitit_dir, max_num_timeout=0)
    ex_arr.update_parameters(**slurm_parameters(plan, run_dir), array_parallelism=plan.replicas)
    jobs = ex_arr.map_array(fn, [str(run_dir.root)] * plan.replicas, list(range(plan.replicas)))
    return [str(j.job_id) for j in jobs]


# ----------------------------------------------------------------------------------------------------------
# A job script rendered for plain sbatch


def needs_job_ids(dep: Deployment) -> bool:
    """A deployment rendered for plain sbatch that has not recorded the job id of every replica yet."""
    if not str(dep.info.get("submitted_by", "")).startswith("sbatch"):  # `up` records every id itself
        return False
    ids = dep.job_ids
    return len(ids) < dep.replicas or not all(ids[:dep.replicas])


def find_submitted_job(dep: Deployment) -> bool:
    """Find and record the job id(s) of a rendered deployment that plain sbatch submitted.

    The script records its id when it starts; until then (or when it never ran), the job is found in the queue
    by its output folder (the run directory's ``submitit/``), else in accounting by the script it was submitted
    from. An array's other tasks follow from one recorded task. True when every replica has its id.
    """
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
            dep.run_dir.record_job(str(JobId(base, str(replica))) if dep.replicas > 1 else base, replica)
    dep.reload()
    return not needs_job_ids(dep)
