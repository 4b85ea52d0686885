"""A ``speedslurm gateway`` run as its own process, as a user or systemd runs it, for tests of both tiers."""

from __future__ import annotations

import json
import re
import signal
import subprocess
import sys
import typing as tp

from longbatch import GUARD_S, Output

SERVES = re.compile(r"speedslurm gateway serves (http://\S+)/v1 ")


class Gateway:
    """``python -m speedslurm ARGS`` (ARGS hold the ``gateway`` command); ``url`` once it listens (the line it
    prints on stderr). ``preexec_fn`` runs in the child before it starts (e.g. to ignore SIGHUP, as nohup does)."""

    def __init__(self, env: dict[str, str], args: tp.Sequence[str],
                 preexec_fn: tp.Callable[[], tp.Any] | None = None) -> None:
        self.proc = subprocess.Popen([sys.executable, "-m", "speedslurm", *args], env=env, text=True,
                                     stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE,
                                     preexec_fn=preexec_fn)  # noqa: PLW1509
        self.output = Output(self.proc)
        self.output.wait_said("speedslurm gateway serves")
        m = SERVES.search(self.output.stderr)
        assert m, self.output.stderr
        self.url = m.group(1)

    def events(self, name: str) -> list[dict[str, tp.Any]]:
        """The gateway's JSON log lines of event ``name`` (its access log lines are events "request")."""
        found = []
        for line in self.output.stderr.splitlines():
            if line.startswith("{"):
                try:
                    data = json.loads(line)
                except ValueError:
                    continue
                if data.get("event") == name:
                    found.append(data)
        return found

    def stop(self, sig: int = signal.SIGTERM) -> int:
        """Sends ``sig`` (unless it has ended) and returns its exit status once it has ended."""
        if self.proc.poll() is None:
            self.proc.send_signal(sig)
        return self.output.wait(GUARD_S)

    def kill(self) -> None:
        """SIGKILL unless it has ended; returns once it and its output ended."""
        if self.proc.poll() is None:
            self.proc.kill()
            self.output.wait(60)
