"""A server's own helper processes end with it.

llama.cpp forks when it aborts (ggml prints a backtrace: a fork of llama-server that waits on a pipe, then runs
gdb against it). Such a fork shares llama-server's handlers and its ignored time-limit signal but not its death
signal (fork clears it), and one that is signalled before its ``exec`` runs llama-server's shutdown handler in a
copy of a threaded process, where it can hang for good. Once llama-server itself has exited, the fork's parent
is init: it has left the step's process tree that Slurm's proctrack/linuxproc walks, so neither Slurm nor the
role would ever stop it. An orphaned ``llama-server`` with SIGTERM caught and blocked and SIGUSR2 ignored was seen
on the test bed after ``down`` three times. The role ends the server's whole process group instead: these tests
stand in for llama-server with a program that forks such a helper.
"""

from __future__ import annotations

import contextlib
import os
import sys
import threading
import time
import typing as tp
from pathlib import Path

from speedslurm.node.children import Child

# A "server" that forks a helper ignoring SIGTERM (it would run for an hour), writes the helper's pid, then exits
# at once on SIGTERM (llama-server's second interrupt) or, with "crash", on its own.
_SERVER = r"""
import os, signal, sys, time
helper = os.fork()
if helper == 0:
    signal.signal(signal.SIGTERM, signal.SIG_IGN)
    time.sleep(3600)
    os._exit(0)
with open(sys.argv[1] + ".tmp", "w") as fh:
    fh.write(str(helper))
os.replace(sys.argv[1] + ".tmp", sys.argv[1])
if sys.argv[2] == "crash":
    os._exit(134)
signal.signal(signal.SIGTERM, lambda *_: os._exit(1))
time.sleep(3600)
"""


def _helper_of(child: Child, pid_file: Path) -> int:
    deadline = time.monotonic() + 10
    while not pid_file.exists():
        assert time.monotonic() < deadline, f"the server wrote no helper pid:\n{child.tail()}"
        time.sleep(0.01)
    return int(pid_file.read_text())


def _running(pid: int) -> bool:
    """Whether ``pid`` is a process that still runs (an exited one waiting for init to reap it does not)."""
    try:
        text = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return False
    return text[text.rfind(")") + 2:].split()[0] not in ("Z", "X")


def _gone_soon(pid: int, guard: float = 60) -> bool:
    """Whether ``pid`` ends: the helpers here would run for an hour on their own, so a guard against a hang tells
    an ended one from a left one, on any machine."""
    deadline = time.monotonic() + guard
    while _running(pid) and time.monotonic() < deadline:
        time.sleep(0.02)
    return not _running(pid)


@contextlib.contextmanager
def _server_with_helper(tmp_path: Path, mode: str) -> tp.Iterator[tuple[Child, int]]:
    """The stand-in server (``serve`` or ``crash``) and the pid of the helper it forked; the helper is killed
    afterwards whatever the test found."""
    pid_file = tmp_path / "helper.pid"
    child = Child([sys.executable, "-c", _SERVER, str(pid_file), mode], tmp_path / "server.log",
                  env=dict(os.environ))
    helper = _helper_of(child, pid_file)
    try:
        yield child, helper
    finally:
        if _running(helper):
            os.kill(helper, 9)
        child.stop()


def test_stopping_a_server_ends_the_helpers_it_forked(tmp_path: Path) -> None:
    with _server_with_helper(tmp_path, "serve") as (child, helper):
        assert _running(helper)
        # A grace period of an hour: a stop that waited it out for the helper would not return (a guard ends it).
        stopped: list[int | None] = []
        stopping = threading.Thread(target=lambda: stopped.append(child.stop(timeout=3600)), daemon=True)
        stopping.start()
        stopping.join(60)
        assert stopped == [1], "the stop waited for the helper"  # the server itself ended on the SIGTERM
        assert _gone_soon(helper), "the server's helper outlived the stop"


def test_a_server_that_exits_on_its_own_takes_its_helpers_along(tmp_path: Path) -> None:
    with _server_with_helper(tmp_path, "crash") as (child, helper):
        deadline = time.monotonic() + 10
        while child.poll() is None:
            assert time.monotonic() < deadline, "the server did not exit"
            time.sleep(0.01)
        assert child.poll() == 134               # the exit is reported as before, once
        assert _gone_soon(helper), "the helper of a server that exited runs on"


# A role: adopts orphans, starts the "server" above, which crashes; reports the helper's parent once the server
# has exited (not yet reaped, so its group is not ended yet), then ends the helper.
_ROLE = r"""
import os, signal, sys, time
from pathlib import Path
from speedslurm.node.children import Child, adopt_orphans
adopted = adopt_orphans()
pid_file = Path(sys.argv[2])
child = Child([sys.executable, "-c", sys.argv[1], str(pid_file), "crash"], pid_file.with_name("server.log"),
              env=dict(os.environ))
while not pid_file.exists():
    time.sleep(0.01)
helper = int(pid_file.read_text())
while os.waitid(os.P_PID, child.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is None:
    time.sleep(0.01)
stat = Path(f"/proc/{helper}/stat").read_text()
print(adopted, os.getpid(), stat[stat.rfind(")") + 2:].split()[1], flush=True)
child.poll()
"""


def test_the_role_adopts_what_its_server_leaves_behind(tmp_path: Path) -> None:
    """The helper of a server that exited stays in the role's process tree (so in the Slurm step's, where
    proctrack/linuxproc finds it) instead of going to init, even before the role ends the server's group."""
    import subprocess

    res = subprocess.run([sys.executable, "-c", _ROLE, _SERVER, str(tmp_path / "helper.pid")], capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    adopted, role, helper_parent = res.stdout.split()
    assert adopted == "True"
    assert helper_parent == role, "the server's helper went to another parent than its role"
    assert not _running(int((tmp_path / "helper.pid").read_text()))
