"""Task entry for heterogeneous jobs: ``python -m speedslurm.jobentry SUBMITIT_FOLDER``.

In a hetjob every component has a job id of its own, so the followers' tasks would look for a pickle
named after their component's id. The batch script exports the leader's id as SPEEDSLURM_JOB_ID; this
entry puts it back in SLURM_JOB_ID before handing over to submitit, so all tasks run the one job.
"""

from __future__ import annotations

import os

from submitit.core.submission import submitit_main


def main() -> None:
    job_id = os.environ.get("SPEEDSLURM_JOB_ID")
    if job_id:
        os.environ["SLURM_JOB_ID"] = job_id
    submitit_main()


if __name__ == "__main__":
    main()
