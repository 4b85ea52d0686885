"""A command run on a pseudo-terminal, the way a user's shell runs it: what it printed there, escapes kept.

The child is started with :mod:`subprocess` on the slave side of ``os.openpty()``, not with ``pty.fork()``: the
test process may have threads (fixtures' servers, pytest's own), and a fork of a threaded process may deadlock
in the child before it execs (Python 3.13 warns of it). The terminal has a size (``rows`` x ``cols``), as a
real one does; a new pty has none. ``TERM`` is what the caller passes in ``env``: it says what the terminal
can do (a dumb one cannot move the cursor), so a test names it rather than inheriting the runner's.
"""

from __future__ import annotations

import fcntl
import os
import select
import struct
import subprocess
import termios
import time
import typing as tp


def on_a_terminal(argv: tp.Sequence[str], env: tp.Mapping[str, str], *, rows: int = 40, cols: int = 140,
                  timeout: float = 300) -> tuple[int, str]:
    """Run ``argv`` with stdin, stdout and stderr on a new terminal; read until it exits. Returns its exit status
    and the text it wrote (escape sequences kept). ``timeout`` only guards against a hang: the child is killed
    then, and the test fails on what it had printed."""
    master, slave = os.openpty()
    fcntl.ioctl(slave, termios.TIOCSWINSZ, struct.pack("HHHH", rows, cols, 0, 0))
    try:
        proc = subprocess.Popen(list(argv), stdin=slave, stdout=slave, stderr=slave, env=dict(env),
                                start_new_session=True, close_fds=True)
    finally:
        os.close(slave)  # the child holds it: its exit ends the reads below with EIO
    out = bytearray()
    end = time.monotonic() + timeout
    try:
        while time.monotonic() < end:
            ready, _, _ = select.select([master], [], [], 1.0)
            if not ready:
                continue
            try:
                chunk = os.read(master, 65536)
            except OSError:  # EIO: every writer closed the terminal
                break
            if not chunk:
                break
            out += chunk
    finally:
        if proc.poll() is None and time.monotonic() >= end:
            proc.kill()
        code = proc.wait()
        os.close(master)
    return code, out.decode("utf-8", "replace")
