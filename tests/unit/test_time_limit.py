"""Slurm's time-limit warning (SIGUSR2): asked for late enough, and never fatal however early it comes.

SIGUSR2's default action kills the process. Slurm checks time limits every 30 s and sends the warning at the
first check at which it is due within 30 s, so ``--signal=USR2@30`` on a one-minute job came 0.2 s after the
task started, while submitit was still being imported, and killed it (state FAILED, exit 12:0).
"""

from __future__ import annotations

import json
import subprocess
import sys
import types
import typing as tp
from pathlib import Path

import pytest

from speedslurm.cluster.script import SLURM_CHECK_PERIOD_S, signal_delay_s
from speedslurm.cluster.submitit_adapter import DetachedLocalExecutor, EntrySlurmExecutor


def _delay(minutes: int) -> int:
    return signal_delay_s(tp.cast(tp.Any, types.SimpleNamespace(time_minutes=minutes)))


@pytest.mark.parametrize("minutes", [1, 2, 3, 5, 240])
def test_warning_comes_in_the_second_half_and_before_the_end(minutes: int) -> None:
    limit = minutes * 60
    delay = _delay(minutes)
    earliest, latest = limit - delay - SLURM_CHECK_PERIOD_S, limit - delay  # seconds after the job starts
    assert earliest >= 20 and earliest >= limit // 3, (minutes, delay)
    assert latest <= limit - 10, (minutes, delay)  # due before the end, whatever the check's phase
    if minutes >= 3:
        assert delay == 60


def test_one_minute_job() -> None:
    assert _delay(1) == 10  # warned 20-50 s after the start; 30 let it come at once


# A stand-in for Slurm's warning at its earliest: sent to the task as soon as it first imports submitit.
_PROBE = r"""
import os, runpy, signal, sys

class WarnOnSubmitit:
    def find_spec(self, name, path=None, target=None):
        if name == "submitit":
            os.kill(os.getpid(), signal.SIGUSR2)  # fatal here unless held
            held = signal.SIGUSR2 in signal.pthread_sigmask(signal.SIG_BLOCK, [])
            print("held" if held else "not held", flush=True)
            os._exit(0)
        return None

sys.meta_path.insert(0, WarnOnSubmitit())
module = sys.argv[1]
sys.argv = [module, *sys.argv[2:]]
runpy.run_module(module, run_name="__main__", alter_sys=True)
"""


@pytest.mark.parametrize("module", ["speedslurm.node.entry"])
def test_entry_holds_the_warning_before_importing_submitit(module: str, tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-c", _PROBE, module, str(tmp_path)], capture_output=True, text=True,
                         timeout=60)
    assert res.returncode == 0, f"killed by the warning (rc {res.returncode}): {res.stderr[-500:]}"
    assert res.stdout.strip() == "held"


_SERVE = r"""
import os, signal, sys
from speedslurm.node import roles as jobside
from speedslurm.node.entry import hold_time_limit_warning

hold_time_limit_warning()
os.kill(os.getpid(), signal.SIGUSR2)  # the warning comes before serve() has its handler

def leader(dep, rd, replica, stop):
    print("stopped" if stop else "running", flush=True)

jobside.run_leader = leader
sys.exit(jobside.serve(sys.argv[1], 0))
"""


def test_a_held_warning_reaches_the_job_side(tmp_path: Path) -> None:
    import records

    records.deployment(tmp_path)
    env = {"PATH": "/usr/bin:/bin", "SLURM_PROCID": "0", "SLURM_JOB_ID": "77"}
    res = subprocess.run([sys.executable, "-c", _SERVE, str(tmp_path)], capture_output=True, text=True, env=env,
                         timeout=60)
    assert res.returncode == 0, res.stderr[-1000:]
    assert res.stdout.strip() == "stopped"
    failed = json.loads((tmp_path / "r0" / "failed.json").read_text())
    assert "time limit" in failed["reason"] and failed["role"] == "leader"


def test_every_executor_starts_tasks_through_the_entry(tmp_path: Path) -> None:
    for ex in (EntrySlurmExecutor(folder=tmp_path / "s"), DetachedLocalExecutor(folder=tmp_path / "l")):
        assert " -u -m speedslurm.node.entry " in ex._submitit_command_str


def test_servers_survive_the_warning_sent_to_the_whole_step(tmp_path: Path) -> None:
    """Slurm sends the warning to every process of the step; a server killed by it made the replica fail as
    "llama-server exited with code -12" instead of ending for the time limit (seen on the bed)."""
    import os
    import signal
    import time

    from speedslurm.node.children import Child

    child = Child(["sleep", "30"], tmp_path / "server.log", env={"PATH": "/usr/bin:/bin"})
    try:
        os.kill(child.pid, signal.SIGUSR2)
        time.sleep(0.5)
        assert child.poll() is None, f"the server died of the warning (code {child.poll()})"
    finally:
        child.stop()
    assert child.poll() is not None
