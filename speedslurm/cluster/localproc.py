"""The local executor's controller processes, known by an identity that survives pid reuse.

``--executor local`` runs each replica under one submitit controller process, and the deployment records its
pid as the replica's job id. A pid alone names a process only while that process lives: once it has exited the
kernel hands the number to the next process started (sooner on a busy machine, at once after a reboot), and a
client that trusted the pid would call an unrelated process the deployment's and signal it on ``down``.

So the deployment also records, for each controller, what no other process can share with it: its start time
(field 22 of ``/proc/<pid>/stat``, clock ticks since boot), the boot it started in
(``/proc/sys/kernel/random/boot_id``) and the host. :func:`check` compares them before anything is reported
alive, and :func:`signal_process` signals only through a pidfd opened and checked first, so a pid taken over
between the check and the signal is never hit.
"""

from __future__ import annotations

import contextlib
import dataclasses
import os
import signal
import socket
import typing as tp
from pathlib import Path

BOOT_ID = Path("/proc/sys/kernel/random/boot_id")
PROC = Path("/proc")


@dataclasses.dataclass(frozen=True)
class ProcessIdentity:
    """One process, for as long as it lives: pid + start time + boot + host."""

    pid: int
    start_ticks: int  # /proc/<pid>/stat field 22: when it started, in clock ticks since boot
    boot_id: str
    host: str

    def to_json(self) -> dict[str, tp.Any]:
        return dataclasses.asdict(self)

    @classmethod
    def from_json(cls, data: tp.Mapping[str, tp.Any]) -> ProcessIdentity:
        return cls(pid=int(data["pid"]), start_ticks=int(data["start_ticks"]), boot_id=str(data["boot_id"]),
                   host=str(data["host"]))


def boot_id() -> str:
    try:
        return BOOT_ID.read_text().strip()
    except OSError:
        return ""


def _stat_fields(pid: int) -> list[str] | None:
    """The fields of /proc/<pid>/stat after the command name (field 3, the state, first); None when gone."""
    try:
        text = (PROC / str(pid) / "stat").read_text()
    except (OSError, ValueError):
        return None
    # The command name (field 2) is in parentheses and may itself hold spaces and ')': split after the last one.
    return text[text.rfind(")") + 2:].split()


def identify(pid: int) -> ProcessIdentity | None:
    """The identity of the process now holding ``pid`` (None when there is none). Call it while the process
    cannot have been reaped yet (right after starting it), or the pid may already name another one."""
    fields = _stat_fields(pid)
    if not fields or len(fields) < 20:
        return None
    return ProcessIdentity(pid=pid, start_ticks=int(fields[19]), boot_id=boot_id(), host=socket.gethostname())


def check(ident: ProcessIdentity) -> str:
    """Why ``ident`` is not a live process of this machine: "" when it is; else "gone" (it exited, or its pid
    now names another process), "rebooted" (the machine restarted since) or "other host" (it runs, or ran,
    on another machine: nothing here can tell)."""
    if ident.host != socket.gethostname():
        return "other host"
    if ident.boot_id and ident.boot_id != boot_id():
        return "rebooted"
    fields = _stat_fields(ident.pid)
    if not fields or len(fields) < 20 or int(fields[19]) != ident.start_ticks:
        return "gone"
    if fields[0] in ("Z", "X"):  # exited, not yet reaped: it holds its pid but runs nothing
        return "gone"
    return ""


def command_line(pid: int) -> list[str]:
    """``/proc/<pid>/cmdline`` as words ([] when gone or unreadable)."""
    try:
        raw = (PROC / str(pid) / "cmdline").read_bytes()
    except OSError:
        return []
    return [w.decode("utf-8", "replace") for w in raw.split(b"\0") if w]


def signal_process(ident: ProcessIdentity, sig: int = signal.SIGTERM) -> bool:
    """Send ``sig`` to the process ``ident`` names, only if it is that process; True when sent.

    The pid is pinned first (a pidfd), then checked: a pidfd keeps naming the process it was opened on, so a
    pid that changes hands after the check cannot receive the signal. Without pidfds (Linux before 5.3) the
    check and ``kill`` leave a window of microseconds.
    """
    pidfd = -1
    with contextlib.suppress(OSError, AttributeError):
        pidfd = os.pidfd_open(ident.pid)
    try:
        if check(ident):
            return False
        try:
            if pidfd >= 0:
                signal.pidfd_send_signal(pidfd, sig)
            else:
                os.kill(ident.pid, sig)
        except ProcessLookupError:
            return False
        return True
    finally:
        if pidfd >= 0:
            os.close(pidfd)
