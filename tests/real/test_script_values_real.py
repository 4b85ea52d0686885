"""Values that reach a job script (issue 11), on the test bed: `up` with a line break in a setting exits 2
and submits nothing (every path without the bed: tests/unit/test_script_values.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

INJECTED = "\n#SBATCH --nodelist=n9\ntouch PWNED"  # a line break, then an #SBATCH line


@pytest.mark.slurm
@pytest.mark.parametrize("setting", ["cluster.account", "cluster.qos", "cluster.exclude"])
def test_bed_up_with_a_line_break_in_a_setting_exits_2_and_submits_nothing(shared_tmp: Path, tiny_gguf: Path,
                                                                           setting: str) -> None:
    value = json.dumps(["n4" + INJECTED]) if setting == "cluster.exclude" else json.dumps("lab" + INJECTED)
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}

    def queue() -> list[str]:
        return subprocess.run(["squeue", "-h", "-o", "%i"], capture_output=True, text=True, check=True).stdout.split()

    before = queue()
    res = subprocess.run([sys.executable, "-m", "speedslurm", "--set", f"{setting}={value}", "up", "--model",
                          str(tiny_gguf), "--nodes", "2", "--executor", "slurm"], capture_output=True, text=True,
                         env=env, timeout=120, stdin=subprocess.DEVNULL, cwd=shared_tmp)
    assert res.returncode == 2, (res.stdout, res.stderr)
    flat = " ".join(res.stderr.split())
    assert f"--set {setting}: {setting} = " in flat and "control character" in flat and f"write {setting} on one line" in flat
    assert set(queue()) <= set(before), "a job was queued"
    assert not list((shared_tmp / "runs").glob("*/deployment.json")) and not list(shared_tmp.rglob("PWNED"))
