"""The task entry runs a submitted ``jobside.serve`` without importing submitit, and leaves submitit's files as
submitit would; any other submitted callable still goes through submitit."""

from __future__ import annotations

import os
import pickle
import subprocess
import sys
from pathlib import Path

import pytest
import records
from submitit.core.utils import DelayedSubmission

from speedslurm.node import roles as jobside

# Runs the entry as a task does, with submitit (and numpy) unimportable unless the job needs them, and a leader
# that only says it ran.
_TASK = r"""
import runpy, sys

forbid = sys.argv[1] == "forbid"

class NoSubmitit:
    def find_spec(self, name, path=None, target=None):
        if forbid and name.split(".")[0] in ("submitit", "numpy", "cloudpickle"):
            raise ImportError(f"the entry imported {name}")
        return None

sys.meta_path.insert(0, NoSubmitit())
from speedslurm.node import roles as jobside

def leader(dep, rd, replica, stop):
    print(f"leader of replica {replica} ran", flush=True)

jobside.run_leader = leader
sys.argv = ["speedslurm.node.entry", sys.argv[2]]
runpy.run_module("speedslurm.node.entry", run_name="__main__", alter_sys=True)
"""


def _env(**extra: str) -> dict[str, str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SLURM_", "SUBMITIT_", "SPEEDSLURM_"))}
    return {**env, **extra}


@pytest.mark.parametrize("array", [False, True], ids=["job", "array-task"])
def test_a_submitted_serve_runs_without_submitit_and_leaves_its_result(tmp_path: Path, array: bool) -> None:
    records.deployment(tmp_path, replicas=2)
    folder = tmp_path / "submitit"
    folder.mkdir()
    job = "81_1" if array else "81"
    DelayedSubmission(jobside.serve, str(tmp_path), 1).dump(folder / f"{job}_submitted.pkl")
    ids = {"SLURM_JOB_ID": "90", "SLURM_ARRAY_JOB_ID": "81", "SLURM_ARRAY_TASK_ID": "1"} if array else \
        {"SLURM_JOB_ID": "81"}
    env = _env(SLURM_PROCID="0", SUBMITIT_EXECUTOR="slurm", **ids)
    res = subprocess.run([sys.executable, "-c", _TASK, "forbid", str(folder)], capture_output=True, text=True,
                         env=env, timeout=60)
    assert res.returncode == 0, res.stderr
    started, ran = res.stdout.strip().split("\n")
    assert ran == "leader of replica 1 ran"
    assert started.startswith("speedslurm (") and f"Starting {job}_submitted.pkl" in started  # the task's log says when
    with open(folder / f"{job}_0_result.pkl", "rb") as fh:
        assert pickle.load(fh) == ("success", 0)  # what submitit writes after a job returned 0


def test_another_callable_still_goes_through_submitit(tmp_path: Path) -> None:
    folder = tmp_path / "submitit"
    folder.mkdir()
    DelayedSubmission(sorted, [3, 1, 2]).dump(folder / "82_submitted.pkl")
    res = subprocess.run([sys.executable, "-c", _TASK, "allow", str(folder)], capture_output=True, text=True,
                         env=_env(SLURM_JOB_ID="82", SLURM_PROCID="0", SUBMITIT_EXECUTOR="slurm"), timeout=120)
    assert res.returncode == 0, res.stderr
    with open(folder / "82_0_result.pkl", "rb") as fh:
        assert pickle.load(fh) == ("success", [1, 2, 3])
