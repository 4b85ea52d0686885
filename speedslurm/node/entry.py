"""Task entry of every submitted job: ``python -m speedslurm.node.entry SUBMITIT_FOLDER``.

Slurm (and submitit's local executor) starts each task with this command. When the pickled job is
:func:`speedslurm.node.roles.serve` (every job ``up`` submits) it runs it without importing submitit and numpy
(:func:`run_submitted`: 0.3-0.6 s sooner to the servers' ``exec``), writing the result file as submitit would;
any other job goes to submitit's own entry. Before that it does two things:

* **Holds Slurm's time-limit warning.** SIGUSR2's default action kills the process, and importing submitit
  and unpickling the job took 0.3-0.6 s, and reading the job still takes a moment, during which the warning of a short job can come (Slurm checks time
  limits only every 30 s). So SIGUSR2 is blocked first, before any slow import; a warning that comes meanwhile
  stays pending and reaches the job side's handler once
  :func:`~speedslurm.node.children.release_time_limit_warning` unblocks it.
* **One job id for every component.** In a hetjob every component has a job id of its own, so the
  followers' tasks would look for a pickle named after their component's id. The batch script exports the
  leader's id as SPEEDSLURM_JOB_ID; this entry puts it back in SLURM_JOB_ID, so all tasks run the one job.
"""

from __future__ import annotations

import json
import os
import sys
import typing as tp
from pathlib import Path

from .children import hold_time_limit_warning

COMMANDS = {
    "serve": "serve RUN_DIR [REPLICA] [--rank-offset N]   run this task's role (rank = SLURM_PROCID + N)",
    "template": "template hetjob|array --model GGUF ...       a plain-sbatch template's job (see template --help)",
    "record-job": "record-job RUN_DIR                           record this job's id in deployment.json",
    "probe": "probe FILE PORTS_JSON ADDRESSES_JSON          doctor's look at a node (one JSON line)",
}


def node_main(argv: list[str]) -> int:
    """The job side's commands, for ``render``'s script, the templates (through ``speedslurm-node.pyz``) and
    ``doctor``: ``python -m speedslurm.node.entry COMMAND ...``. Standard library only, no submitit."""
    hold_time_limit_warning()
    if not argv or argv[0] not in COMMANDS:
        print("usage: speedslurm-node.pyz COMMAND ...\n  " + "\n  ".join(COMMANDS.values()), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        from .roles import serve

        offset = 0
        if "--rank-offset" in args:
            at = args.index("--rank-offset")
            offset, args = int(args[at + 1]), args[:at] + args[at + 2:]
        replica = int(args[1]) if len(args) > 1 else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
        return serve(args[0], replica, rank_offset=offset)
    if cmd == "template":
        from .template import main as template_main

        return template_main(args)
    if cmd == "record-job":
        from ..rundir.layout import RunDir
        from ..rundir.records import JobId

        job_id = JobId.from_env()
        if not job_id:
            print("record-job: SLURM_JOB_ID is not set (not inside a Slurm job)", file=sys.stderr)
            return 1
        RunDir(Path(args[0])).record_job(job_id, JobId.parse(job_id).array_task or 0)
        return 0
    from .net import probe

    print("DOCTOR " + json.dumps(probe(args[0], json.loads(args[1]), json.loads(args[2]))), flush=True)
    return 0


class _Stub:
    """Stands in for submitit's classes in a submitted pickle (their state is plain data)."""


class _NotOurs(Exception):
    pass


def _load_submission(path: Path) -> tp.Any:
    """The pickled ``DelayedSubmission``, read without importing submitit: its classes become stubs holding
    their state. :class:`_NotOurs` when the pickle needs anything else than plain data and importable names."""
    import pickle

    class Unpickler(pickle.Unpickler):
        def find_class(self, module: str, name: str) -> tp.Any:
            if module.split(".")[0] == "submitit":
                return _Stub
            if module.split(".")[0] in ("cloudpickle", "numpy", "torch"):
                raise _NotOurs(f"{module}.{name}")
            return super().find_class(module, name)

    with open(path, "rb") as fh:
        return Unpickler(fh).load()


def _task_paths(folder: str) -> tuple[Path, Path]:
    """(the submitted pickle, this task's result pickle), named as submitit's ``JobPaths`` names them."""
    from ..rundir.records import JobId

    env = os.environ
    if env.get("SUBMITIT_EXECUTOR") == "local":
        job, rank = JobId(env["SUBMITIT_LOCAL_JOB_ID"]), env.get("SUBMITIT_LOCAL_GLOBALID") or "0"
    else:
        array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
        job = JobId(array, task) if array and task else JobId(env["SLURM_JOB_ID"])
        rank = env.get("SLURM_PROCID") or "0"
    where = folder.replace("%j", str(job)).replace("%A", job.base).replace("%a", job.task)
    root = Path(where).expanduser().absolute()
    return root / f"{job}_submitted.pkl", root / f"{job}_{rank}_result.pkl"


def run_submitted(folder: str, wait_s: float = 60) -> int | None:
    """Run a submitted job whose callable is :func:`speedslurm.node.roles.serve` without importing submitit (and the
    numpy it imports): the task reaches its server's ``exec`` 0.3-0.6 s sooner. Writes the result pickle as
    submitit does, so its files stay what submitit expects (what it relies on of submitit is checked with
    ``cluster/submitit_adapter.py``'s ``assumptions``). None when the pickle holds another callable: the caller hands
    it to submitit."""
    import pickle
    import time
    import traceback

    try:
        submitted, result = _task_paths(folder)
    except KeyError:
        return None  # not started as a submitit task: submitit says what is missing
    deadline = time.monotonic() + wait_s
    while not submitted.exists() and time.monotonic() < deadline:
        time.sleep(0.2)  # as submitit waits for a pickle that the shared filesystem has not shown yet
    try:
        delayed = _load_submission(submitted)
        from .roles import serve

        if getattr(delayed, "function", None) is not serve:
            return None
    except (_NotOurs, OSError, pickle.UnpicklingError, AttributeError, ImportError):
        return None
    os.environ["SUBMITIT_FOLDER"] = folder
    now = time.time()  # one reading for both parts: two could straddle a second
    stamp = time.strftime("%Y-%m-%d %H:%M:%S", time.localtime(now)) + f",{int(now * 1000) % 1000:03d}"
    print(f"speedslurm ({stamp}) - Starting {submitted.name} (jobside.serve{tuple(delayed.args)}) without submitit",
          flush=True)
    outcome: tuple[str, tp.Any] = ("error", "interrupted")
    try:
        outcome = ("success", serve(*delayed.args, **delayed.kwargs))
    except Exception:
        outcome = ("error", traceback.format_exc())
        raise
    finally:
        tmp = result.with_name(f".{result.name}.tmp")
        with open(tmp, "wb") as fh:
            pickle.dump(outcome, fh)
        tmp.replace(result)
    return 0


def main() -> None:
    hold_time_limit_warning()  # first: everything below is slow
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        raise SystemExit(node_main(sys.argv[1:]))
    job_id = os.environ.get("SPEEDSLURM_JOB_ID")
    if job_id:
        os.environ["SLURM_JOB_ID"] = job_id
    if len(sys.argv) == 2 and run_submitted(sys.argv[1]) is not None:
        return
    from submitit.core.submission import submitit_main

    submitit_main()


if __name__ == "__main__":
    main()
