"""Clean-up that a second signal interrupts, on the test bed: repeated Ctrl-C during `down` still cancels
the job (the signals by construction, not after a guessed delay; the unit tests: tests/unit/test_cleanup_signals.py).
"""

from __future__ import annotations

import os
import shutil
import signal
import stat
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest


def _shim(folder: Path, name: str, real: str, started: Path, release: Path) -> None:
    """``name`` on PATH: its first call says it started (a file), then waits for a line on the FIFO ``release``
    before running the real command; later calls run the real one at once."""
    script = folder / name
    script.write_text(
        "#!/bin/sh\n"
        f"if [ ! -e '{started}' ]; then\n"
        f"  : > '{started}'\n"
        f"  read line < '{release}'\n"
        "fi\n"
        f"exec '{real}' \"$@\"\n")
    script.chmod(script.stat().st_mode | stat.S_IXUSR)


def _wait_for(path: Path, proc: subprocess.Popen[str]) -> None:
    """Until ``path`` exists (the shim got there); fails at once if ``proc`` ended first."""
    import time

    deadline = time.monotonic() + 120  # a safety net only: every step waits for an event
    while not path.exists():
        if proc.poll() is not None:
            out, err = proc.communicate()
            pytest.fail(f"speedslurm down ended (exit {proc.returncode}) before {path.name}:\n{out}\n{err}")
        assert time.monotonic() < deadline, f"{path.name} never came"
        time.sleep(0.05)


def _state(job: str) -> str:
    queued = subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True).stdout.split()
    if queued:
        return queued[0]
    acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "State"], capture_output=True,
                          text=True).stdout.split()
    return acct[0] if acct else ""


@pytest.mark.slurm
@pytest.mark.llama
def test_bed_repeated_ctrl_c_during_down_still_cancels_the_job(shared_tmp: Path, tiny_gguf: Path) -> None:
    from speedslurm import api

    runs = shared_tmp / "runs"
    settings = api.load_settings(profile="testbed", overrides=(f"run.dir={runs}", "cluster.sbatch.hold=true"))
    dep = api.start(str(tiny_gguf), nodes=2, executor="slurm", settings=settings)  # held: it waits, no node used
    job = dep.job_ids[0]
    shims = shared_tmp / "bin"
    shims.mkdir()
    marks = {n: shared_tmp / f"{n}.started" for n in ("squeue", "scancel")}
    fifos = {n: shared_tmp / f"{n}.release" for n in ("squeue", "scancel")}
    for name in ("squeue", "scancel"):
        os.mkfifo(fifos[name])
        _shim(shims, name, tp.cast(str, shutil.which(name)), marks[name], fifos[name])
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs),
           "PATH": f"{shims}{os.pathsep}{os.environ['PATH']}"}
    # Its own process group, as a terminal's foreground job: Ctrl-C there reaches every process in it.
    proc = subprocess.Popen([sys.executable, "-m", "speedslurm", "down", dep.id], env=env, stdin=subprocess.DEVNULL,
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        assert _state(job) == "PENDING"
        _wait_for(marks["squeue"], proc)  # down looks at the job, and squeue hangs (a slow slurmctld)
        os.killpg(proc.pid, signal.SIGINT)
        _wait_for(marks["scancel"], proc)  # the look was cut short: straight on to scancel, which hangs too
        os.killpg(proc.pid, signal.SIGINT)
        os.killpg(proc.pid, signal.SIGTERM)
        os.killpg(proc.pid, signal.SIGINT)
        with open(fifos["scancel"], "w") as fh:  # scancel goes on (it runs in a session of its own)
            fh.write("go\n")
        out, err = proc.communicate(timeout=120)
    finally:
        if proc.poll() is None:
            proc.kill()  # the job, if left, is cancelled by the slurm tests' own clean-up (conftest)
    assert proc.returncode == 130, err
    assert "Traceback" not in err, err
    assert f"Interrupted: deployment {dep.id}: cancelled job(s) {job}" in " ".join(err.split()), err
    assert _state(job) == "CANCELLED", _state(job)
