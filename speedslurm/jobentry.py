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

import os
import signal

# Slurm's warning before the time limit (``--signal=USR2@S``); the job side treats it like SIGTERM.
TIME_LIMIT_SIGNAL = signal.SIGUSR2


def hold_time_limit_warning() -> None:
    """Block the warning signal: until it is released, a warning waits instead of killing the process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {TIME_LIMIT_SIGNAL})


def release_time_limit_warning() -> None:
    """Unblock the warning signal (after its handler is installed): one that came meanwhile is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {TIME_LIMIT_SIGNAL})


def main() -> None:
    hold_time_limit_warning()  # first: everything below is slow
    job_id = os.environ.get("SPEEDSLURM_JOB_ID")
    if job_id:
        os.environ["SLURM_JOB_ID"] = job_id
    from submitit.core.submission import submitit_main

    submitit_main()


if __name__ == "__main__":
    main()
