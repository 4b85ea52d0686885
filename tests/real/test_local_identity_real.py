"""Local roles started inside a Slurm job ignore that job's variables: `up --executor local` with a Slurm
job's variables in the environment, and inside a real `srun` job step on the test bed (the process identity:
tests/unit/test_local_identity.py).
"""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import pytest
from cliproc import local_env, speedslurm_proc


@pytest.mark.llama
def test_local_up_with_a_slurm_job_in_the_environment_becomes_ready(tmp_path: Path,
                                                                    tiny_gguf: Path) -> None:
    runs = tmp_path / "runs"
    runs.mkdir(mode=0o700)
    env = {**local_env(runs), "SLURM_JOB_ID": "12345", "SLURM_JOBID": "12345", "SLURM_PROCID": "0",
           "SLURMD_NODENAME": "n1", "SLURM_JOB_NODELIST": "n1", "SLURM_NTASKS": "1"}
    res = speedslurm_proc(env, "up", "--model", str(tiny_gguf), "--nodes", "2", "--executor", "local", "--timeout", "60",
              "--json", timeout=180, cwd=tmp_path)
    try:
        assert res.returncode == 0, res.stderr
        rep = json.loads(res.stdout)["replicas"][0]
        assert rep["state"] == "READY" and rep["endpoint"]["job_id"] == rep["job_id"] != "12345"
        assert rep["endpoint"]["leader_node"] == "localhost"
    finally:
        for d in runs.iterdir():
            speedslurm_proc(env, "down", d.name, timeout=120, cwd=tmp_path)


@pytest.mark.slurm
@pytest.mark.llama
def test_local_up_inside_an_srun_job_on_the_bed_becomes_ready(shared_tmp: Path, tiny_gguf: Path) -> None:
    """``srun ... speedslurm up --executor local``: the client and its local roles run in a real job step on a
    bed node (its network namespace), with every variable Slurm gives a job."""
    script = shared_tmp / "inside.sh"
    script.write_text(f"""#!/bin/bash
set -u
cd {shared_tmp}
echo "$SLURM_JOB_ID" > job_id.txt
{sys.executable} -m speedslurm up --model {tiny_gguf} --nodes 2 --executor local --timeout 90 --json > up.json \\
    2> up.err
echo $? > up.rc
id=$({sys.executable} -c 'import json; print(json.load(open("up.json"))["deployment"])' 2>/dev/null)
[ -n "$id" ] && {sys.executable} -m speedslurm down "$id" > down.txt 2>&1
exit 0
""")
    script.chmod(0o755)
    env = {**local_env(shared_tmp / "runs"), "SPEEDSLURM_PROFILE": "testbed"}
    (shared_tmp / "runs").mkdir(mode=0o700)
    res = subprocess.run(["srun", "-p", "gorgonas", "-N", "1", "-n", "1", "-t", "5", "-J", "speedslurm-local-inside",
                          str(script)], capture_output=True, text=True, env=env, timeout=400,
                         stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    job_id = (shared_tmp / "job_id.txt").read_text().strip()
    assert job_id.isdigit()  # the local deployment did start inside a Slurm job
    assert (shared_tmp / "up.rc").read_text().strip() == "0", (shared_tmp / "up.err").read_text()
    rep = json.loads((shared_tmp / "up.json").read_text())["replicas"][0]
    assert rep["state"] == "READY" and rep["endpoint"]["job_id"] == rep["job_id"] != job_id
    assert rep["endpoint"]["url"].startswith("http://127.0.0.1:")
    assert "cancelled job(s)" in (shared_tmp / "down.txt").read_text()
