"""`speedslurm doctor` on the test bed: it passes there, and a failing check is named (each check with a
replaced command runner: tests/unit/test_doctor.py).
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest


def _doctor(args: list[str]) -> subprocess.CompletedProcess[str]:
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed"}
    env.pop("SPEEDSLURM_CONFIG", None)
    return subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                          timeout=600)


@pytest.mark.slurm
@pytest.mark.llama
def test_doctor_passes_on_the_testbed(testbed: tp.Any, llama_bins: tp.Any, gemma_270m: Path) -> None:
    res = _doctor(["doctor", "--json"])
    out = json.loads(res.stdout)
    failing = [c for c in out["checks"] if not c["ok"]]
    assert res.returncode == 0 and out["ok"], failing
    names = [c["name"] for c in out["checks"]]
    assert names == ["slurm commands", "partition", "binaries", "run directory private", "run directory shared",
                     "free ports", "model files", "munge"]


@pytest.mark.slurm
def test_doctor_names_the_failing_check(testbed: tp.Any) -> None:
    res = _doctor(["--set", "llama.bin_dir=/nonexistent", "doctor", "--no-nodes"])
    assert res.returncode == 1, res.stdout + res.stderr
    assert "FAIL binaries: llama.bin_dir is set to /nonexistent, which does not exist" in res.stdout
    assert "failing: binaries" in res.stdout
    assert "fix: point llama.bin_dir at the folder" in res.stdout
