"""``cluster.sbatch``: the extra sbatch options reach the job that Slurm runs on the test bed (the option
checks and the rendering: tests/unit/test_sbatchopts.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest


@pytest.mark.slurm
def test_slurm_gets_the_options(testbed: tp.Any, tiny_gguf: Path, shared_tmp: Path) -> None:
    """`plan`'s script (the one `up` submits), held so that it never runs: both components carry the comment."""
    runs = shared_tmp / "runs"
    runs.mkdir(mode=0o700)
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs)}
    env.pop("SPEEDSLURM_CONFIG", None)
    comment = "speedslurm sbatch test; $(x)"
    res = subprocess.run([sys.executable, "-m", "speedslurm", "--set", f"cluster.sbatch.comment={comment}",
                          "--set", "cluster.sbatch.hold=true", "plan", "--model", str(tiny_gguf), "--nodes", "2",
                          "--executor", "slurm", "--time", "2", "--json"],
                         capture_output=True, text=True, env=env, timeout=120)
    assert res.returncode == 0, res.stderr
    script = shared_tmp / "job.sbatch"
    script.write_text(json.loads(res.stdout)["job_script"])
    sub = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, cwd=shared_tmp,
                         timeout=60)
    assert sub.returncode == 0, sub.stderr
    job_id = sub.stdout.strip().split(";")[0]
    try:
        rows: list[str] = []
        deadline = time.monotonic() + 30
        while len(rows) < 2 and time.monotonic() < deadline:  # both hetjob components
            rows = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%k|%r"], capture_output=True,
                                  text=True).stdout.splitlines()
            time.sleep(0.2)
        assert len(rows) == 2 and all(r == f"{comment}|JobHeldUser" for r in rows), rows
        shown = subprocess.run(["scontrol", "show", "job", job_id], capture_output=True, text=True).stdout
        assert f"Comment={comment}" in shown, shown
    finally:
        subprocess.run(["scancel", job_id], capture_output=True)
