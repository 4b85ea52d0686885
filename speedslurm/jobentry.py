"""Task entry of every submitted job: ``python -m speedslurm.jobentry SUBMITIT_FOLDER``.

Slurm (and submitit's local executor) starts each task with this command; it hands over to submitit, which
loads the pickled job and calls :func:`speedslurm.jobside.serve`. Before that it does two things:

* **Holds Slurm's time-limit warning.** SIGUSR2's default action kills the process, and importing submitit
  and unpickling the job take 0.3-0.6 s, during which the warning of a short job can come (Slurm checks time
  limits only every 30 s). So SIGUSR2 is blocked first, before any slow import; a warning that comes meanwhile
  stays pending and reaches the job side's handler once :func:`release_time_limit_warning` unblocks it.
* **One job id for every component.** In a hetjob every component has a job id of its own, so the
  followers' tasks would look for a pickle named after their component's id. The batch script exports the
  leader's id as SPEEDSLURM_JOB_ID; this entry puts it back in SLURM_JOB_ID, so all tasks run the one job.
"""

from __future__ import annotations

import json
import os
import signal
import sys
from pathlib import Path

# Slurm's warning before the time limit (``--signal=USR2@S``); the job side treats it like SIGTERM.
TIME_LIMIT_SIGNAL = signal.SIGUSR2


def hold_time_limit_warning() -> None:
    """Block the warning signal: until it is released, a warning waits instead of killing the process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {TIME_LIMIT_SIGNAL})


def release_time_limit_warning() -> None:
    """Unblock the warning signal (after its handler is installed): one that came meanwhile is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {TIME_LIMIT_SIGNAL})


COMMANDS = {
    "serve": "serve RUN_DIR [REPLICA] [--rank-offset N]   run this task's role (rank = SLURM_PROCID + N)",
    "template": "template hetjob|array --model GGUF ...       a plain-sbatch template's job (see template --help)",
    "record-job": "record-job RUN_DIR                           record this job's id in deployment.json",
    "probe": "probe FILE PORTS_JSON ADDRESSES_JSON          doctor's look at a node (one JSON line)",
}


def node_main(argv: list[str]) -> int:
    """The job side's commands, for ``render``'s script, the templates (through ``speedslurm-node.pyz``) and
    ``doctor``: ``python -m speedslurm.jobentry COMMAND ...``. Standard library only, no submitit."""
    hold_time_limit_warning()
    if not argv or argv[0] not in COMMANDS:
        print("usage: speedslurm-node.pyz COMMAND ...\n  " + "\n  ".join(COMMANDS.values()), file=sys.stderr)
        return 0 if argv[:1] in (["-h"], ["--help"]) else 2
    cmd, args = argv[0], argv[1:]
    if cmd == "serve":
        from .jobside import serve

        offset = 0
        if "--rank-offset" in args:
            at = args.index("--rank-offset")
            offset, args = int(args[at + 1]), args[:at] + args[at + 2:]
        replica = int(args[1]) if len(args) > 1 else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
        return serve(args[0], replica, rank_offset=offset)
    if cmd == "template":
        from .jobtemplate import main as template_main

        return template_main(args)
    if cmd == "record-job":
        from .contract import JobId
        from .rundir import RunDir

        job_id = JobId.from_env()
        if not job_id:
            print("record-job: SLURM_JOB_ID is not set (not inside a Slurm job)", file=sys.stderr)
            return 1
        RunDir(Path(args[0])).record_job(job_id, JobId.parse(job_id).array_task or 0)
        return 0
    from .nodenet import probe

    print("DOCTOR " + json.dumps(probe(args[0], json.loads(args[1]), json.loads(args[2]))), flush=True)
    return 0


def main() -> None:
    hold_time_limit_warning()  # first: everything below is slow
    if len(sys.argv) > 1 and sys.argv[1] in COMMANDS:
        raise SystemExit(node_main(sys.argv[1:]))
    job_id = os.environ.get("SPEEDSLURM_JOB_ID")
    if job_id:
        os.environ["SLURM_JOB_ID"] = job_id
    from submitit.core.submission import submitit_main

    submitit_main()


if __name__ == "__main__":
    main()
