"""One writer per results file, from one node or from several login nodes sharing the file system.

Two locks, because neither alone holds on every cluster file system:

* ``flock`` on the results file. Released by the kernel when the process dies, so it needs no clean-up; but it
  is node-local on NFS mounted ``local_lock=flock|all`` (or ``nolock``), on Lustre mounted ``localflock`` and on
  BeeGFS by default, and fails with ENOSYS/EOPNOTSUPP on Lustre mounted ``noflock`` (ENOLCK on NFSv3 without
  lockd). A second login node then sees no lock at all.
* A lock file ``<results>.lock`` created with ``O_EXCL``, holding the owner's host, pid and process start time.
  An exclusive create is atomic on local file systems, NFSv3 and later, Lustre, GPFS, BeeGFS and CephFS, so only
  one run, on whichever node, gets it. It is removed when the run ends; one left by a run that was killed is
  stale. Staleness is decided only on the owner's own host: there, holding the ``flock`` proves the owner is
  gone (a live owner would hold it), and without ``flock`` the owner's pid and start time are checked and a
  dead owner's lock is reported, not taken (two runs starting at once could otherwise both take it). A lock from
  another host is never taken over: nothing here can tell whether that host's run is alive.

Where even an exclusive create is not atomic (object-store FUSE mounts such as s3fs or gcsfuse, NFS version 2),
no single writer can be guaranteed: :func:`acquire` refuses, naming the mount (``/proc/self/mountinfo``).
``lock=False`` (the ``--no-lock`` flag) skips all of it for users who make sure of one writer themselves.
"""

from __future__ import annotations

import contextlib
import dataclasses
import errno
import fcntl
import json
import os
import re
import socket
import time
from pathlib import Path

from ..errors import UsageError

MOUNTINFO = Path("/proc/self/mountinfo")

# flock unsupported on this file system (Lustre noflock: ENOSYS; some FUSE and NFS set-ups: EOPNOTSUPP, ENOLCK).
FLOCK_UNSUPPORTED = frozenset({errno.ENOSYS, errno.EOPNOTSUPP, errno.ENOTSUP, errno.ENOLCK})

# Mounts whose files cannot be created exclusively and atomically across clients: object stores behind FUSE.
NO_EXCLUSIVE_CREATE = frozenset({"fuse.s3fs", "fuse.gcsfuse", "fuse.goofys", "fuse.rclone", "fuse.blobfuse",
                                 "fuse.blobfuse2", "fuse.mountpoint-s3", "fuse.s3backer", "fuse.geesefs"})

NO_LOCK_FIX = "or pass --no-lock if you make sure yourself that only one run at a time writes it"


@dataclasses.dataclass(frozen=True)
class Mount:
    """One line of /proc/self/mountinfo: where, what file system, and its options (per mount and superblock)."""

    mount_point: str
    fstype: str
    source: str
    options: frozenset[str]
    dev: tuple[int, int] | None = None  # major, minor (what st_dev of a file on it gives)

    def option(self, name: str) -> str | None:
        """The value of ``name=value`` (``""`` for a bare flag), or None when the mount does not have it."""
        for opt in self.options:
            key, _, value = opt.partition("=")
            if key == name:
                return value
        return None


def _unescape(field: str) -> str:
    # The kernel writes space, tab, newline and backslash in paths as \040, \011, \012, \134.
    return re.sub(r"\\([0-7]{3})", lambda m: chr(int(m.group(1), 8)), field)


def parse_mountinfo(text: str) -> list[Mount]:
    """Parse /proc/self/mountinfo (proc(5)); lines it cannot read are skipped."""
    mounts = []
    for line in text.splitlines():
        fields = line.split(" ")
        try:
            sep = fields.index("-", 6)
            major, minor = fields[2].split(":")
            dev: tuple[int, int] | None = (int(major), int(minor))
            mount_point, per_mount = _unescape(fields[4]), fields[5].split(",")
            fstype, source = fields[sep + 1], _unescape(fields[sep + 2])
            super_opts = fields[sep + 3].split(",") if len(fields) > sep + 3 else []
        except (ValueError, IndexError):
            continue
        mounts.append(Mount(mount_point, fstype, source, frozenset(per_mount + super_opts), dev))
    return mounts


def mount_of(path: Path, mountinfo: str | None = None) -> Mount | None:
    """The mount that holds ``path`` (an existing file or folder), or None when mountinfo cannot be read.

    Matched by device number first (bind mounts and overmounts share prefixes), then by the longest mount point
    that contains the path; of equal candidates the last one listed (mounted last) wins.
    """
    if mountinfo is None:
        try:
            mountinfo = MOUNTINFO.read_text(errors="replace")
        except OSError:
            return None
    mounts = parse_mountinfo(mountinfo)
    real = os.path.realpath(path)
    try:
        st = os.stat(real)
        dev: tuple[int, int] | None = (os.major(st.st_dev), os.minor(st.st_dev))
    except OSError:
        dev = None

    def contains(m: Mount) -> bool:
        mp = m.mount_point.rstrip("/")
        return real == mp or real.startswith(mp + "/") or mp == ""

    candidates = [m for m in mounts if contains(m)]
    same_dev = [m for m in candidates if m.dev == dev]
    pool = same_dev or candidates
    if not pool:
        return None
    best = max(len(m.mount_point) for m in pool)
    return [m for m in pool if len(m.mount_point) == best][-1]


def single_writer_problem(mount: Mount | None) -> str | None:
    """Why no lock can keep a second writer out of files on ``mount``; None when the lock file can."""
    if mount is None:
        return None
    if mount.fstype in NO_EXCLUSIVE_CREATE:
        return (f"{mount.mount_point} is a {mount.fstype} mount (an object store), where a file cannot be created "
                "exclusively: two runs could both take its lock")
    if mount.fstype == "nfs" and "2" in (mount.option("vers"), mount.option("nfsvers")):
        return f"{mount.mount_point} is mounted with NFS version 2, where an exclusive create is not atomic"
    return None


@dataclasses.dataclass(frozen=True)
class Owner:
    """Who holds a lock file."""

    host: str
    pid: int
    start: str  # the process's start time in clock ticks since boot (/proc/<pid>/stat field 22)
    since: float

    def describe(self, here: str) -> str:
        when = time.strftime("%Y-%m-%d %H:%M", time.localtime(self.since))
        where = f"this host ({here})" if self.host == here else f"host {self.host}"
        return f"pid {self.pid} on {where}, since {when}"


def _process_start(pid: int) -> str | None:
    """The start time of process ``pid`` (None when there is no such process)."""
    try:
        stat = Path(f"/proc/{pid}/stat").read_text()
    except OSError:
        return None
    return stat.rsplit(")", 1)[-1].split()[19]  # field 22; the command name before ")" may hold spaces


def _alive(owner: Owner) -> bool:
    return _process_start(owner.pid) == owner.start


def _read_owner(lock: Path) -> Owner | None:
    """The lock file's owner; None when it is gone. Raises ValueError when it holds no owner."""
    for attempt in range(20):
        try:
            data = json.loads(lock.read_bytes())
            return Owner(str(data["host"]), int(data["pid"]), str(data["start"]), float(data["since"]))
        except FileNotFoundError:
            return None
        except (ValueError, KeyError, TypeError):
            if attempt == 19:
                raise ValueError(f"{lock} names no owner") from None
            time.sleep(0.05)  # its owner is still writing it
    raise AssertionError("unreachable")


class WriteLock:
    """The locks of one results file, held until :meth:`release`."""

    def __init__(self, path: Path, lock_file: Path | None = None, ident: tuple[int, int] | None = None,
                 notices: list[str] | None = None) -> None:
        self.path = path
        self.lock_file = lock_file
        self._ident = ident  # (st_dev, st_ino) of the lock file we created
        self.notices = notices or []

    @staticmethod
    def lock_path(path: Path) -> Path:
        return path.with_name(path.name + ".lock")

    @classmethod
    def acquire(cls, path: Path, fd: int, *, enabled: bool = True, mountinfo: str | None = None,
                host: str | None = None) -> WriteLock:
        """Lock ``path`` (open as ``fd``) for this process, or raise :class:`UsageError` saying who holds it."""
        if not enabled:
            return cls(path)
        here = host or socket.gethostname()
        problem = single_writer_problem(mount_of(path.parent, mountinfo))
        if problem is not None:
            raise UsageError(f"cannot make sure that only one run writes {path}: {problem}",
                             fix=f"write results to a local disk or a cluster file system (NFS, Lustre, GPFS), "
                                 f"{NO_LOCK_FIX}")
        lock = cls.lock_path(path)
        notices: list[str] = []
        flocked = True
        try:
            fcntl.flock(fd, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except OSError as exc:
            if exc.errno in (errno.EWOULDBLOCK, errno.EAGAIN):
                raise UsageError(f"another speedslurm run is writing {path}{_owner_words(lock, here)}",
                                 fix="wait for it to finish (or stop it), or choose another --out") from None
            if exc.errno not in FLOCK_UNSUPPORTED:
                raise UsageError(f"cannot lock {path}: {exc.strerror or exc}",
                                 fix=f"write results to another file system, {NO_LOCK_FIX}") from None
            flocked = False
            mount = mount_of(path.parent, mountinfo)
            on = f" ({mount.fstype} at {mount.mount_point})" if mount is not None else ""
            notices.append(f"the file system of {path}{on} does not support flock ({exc.strerror or exc}); "
                           f"the lock file {lock} alone keeps other runs out, and one left by a run that was "
                           "killed must be deleted by hand")
        for _ in range(3):
            try:
                ident = _create(lock, here)
                return cls(path, lock, ident, notices)
            except FileExistsError:
                pass
            except OSError as exc:
                raise UsageError(f"cannot create the lock file {lock}: {exc.strerror or exc}",
                                 fix=f"make its folder writable, {NO_LOCK_FIX}") from None
            try:
                owner = _read_owner(lock)
            except ValueError:
                raise UsageError(f"the lock file {lock} exists but names no owner (a run stopped while "
                                 f"creating it?); results in {path} may be being written",
                                 fix=f"if no speedslurm run writes {path}, delete {lock} and run the same command "
                                     "again") from None
            if owner is None:
                continue  # removed meanwhile: try again
            if owner.host == here and flocked:
                # A live owner on this host would hold the flock that we hold now: the file is left over.
                with contextlib.suppress(FileNotFoundError):
                    os.unlink(lock)
                notices.append(f"removed the lock file {lock} left by a run that ended without removing it "
                               f"({owner.describe(here)})")
                continue
            if owner.host == here and _alive(owner):
                raise UsageError(f"another speedslurm run is writing {path} ({owner.describe(here)})",
                                 fix=f"wait for it to finish (or stop it: kill {owner.pid}), or choose another --out")
            if owner.host == here:
                raise UsageError(f"the lock file {lock} was left by a run that is no longer running "
                                 f"({owner.describe(here)})",
                                 fix=f"delete {lock} and run the same command again (this file system has no flock, "
                                     "so stale lock files are not removed automatically)")
            raise UsageError(f"another speedslurm run is writing {path} ({owner.describe(here)}), or it stopped "
                             f"without removing its lock file {lock}",
                             fix=f"wait for it to finish; if no run on {owner.host} writes {path} any more (it was "
                                 f"killed, or {owner.host} went down), delete {lock} and run the same command again")
        raise UsageError(f"the lock file {lock} keeps changing: other runs are starting on {path}",
                         fix="run one batch per results file at a time, or choose another --out")

    def release(self) -> None:
        """Remove the lock file if it is still the one we created (the flock goes with the file's descriptor)."""
        if self.lock_file is None or self._ident is None:
            return
        with contextlib.suppress(OSError):
            st = os.stat(self.lock_file)
            if (st.st_dev, st.st_ino) == self._ident:
                os.unlink(self.lock_file)
        self._ident = None


def _create(lock: Path, host: str) -> tuple[int, int]:
    """Create ``lock`` exclusively with this process as its owner; FileExistsError when it exists."""
    fd = os.open(lock, os.O_WRONLY | os.O_CREAT | os.O_EXCL | os.O_CLOEXEC, 0o600)
    try:
        record = {"host": host, "pid": os.getpid(), "start": _process_start(os.getpid()) or "",
                  "since": time.time(), "results": str(lock.with_suffix(""))}
        os.write(fd, (json.dumps(record) + "\n").encode())
        os.fsync(fd)
        st = os.fstat(fd)
    except BaseException:
        os.close(fd)
        with contextlib.suppress(OSError):
            os.unlink(lock)
        raise
    os.close(fd)
    return st.st_dev, st.st_ino


def _owner_words(lock: Path, here: str) -> str:
    """`` (pid N on host H, since T)`` from the lock file, or nothing when it cannot be read."""
    try:
        owner = _read_owner(lock)
    except ValueError:
        return ""
    return f" ({owner.describe(here)})" if owner is not None else ""


__all__ = ["Mount", "WriteLock", "mount_of", "parse_mountinfo", "single_writer_problem"]
