"""The speedslurm CLI run as a user runs it, in its own process with no stdin, for tests of both tiers."""

from __future__ import annotations

import os
import subprocess
import sys
from pathlib import Path


def local_env(runs: Path) -> dict[str, str]:
    """This process's environment with the local profile, ``runs`` as the runs folder and no user config file."""
    env = {**os.environ, "SPEEDSLURM_RUN__DIR": str(runs), "SPEEDSLURM_PROFILE": "local"}
    env.pop("SPEEDSLURM_CONFIG", None)
    return env


def speedslurm_proc(env: dict[str, str], *args: str, timeout: float = 300, cwd: Path | None = None,
                    ) -> subprocess.CompletedProcess[str]:
    """``python -m speedslurm ARGS`` with ``env``; its exit status and output, never raising on failure.
    ``timeout`` guards against a hang only."""
    return subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL, cwd=cwd)
