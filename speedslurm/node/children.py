"""The job side's children: starting a server on a free port, supervising it, stopping it, its log; and Slurm's
time-limit warning, held from the task's first moment until the role's handler takes it, ignored by the children.

Standard library only (the job side runs it on the nodes).
"""

from __future__ import annotations

import contextlib
import errno
import os
import signal
import stat
import subprocess
import time
import typing as tp
from pathlib import Path

# Slurm's warning before the time limit (``--signal=USR2@S``); the job side treats it like SIGTERM.
TIME_LIMIT_SIGNAL = signal.SIGUSR2


def hold_time_limit_warning() -> None:
    """Block the warning signal: until it is released, a warning waits instead of killing the process."""
    signal.pthread_sigmask(signal.SIG_BLOCK, {TIME_LIMIT_SIGNAL})


def release_time_limit_warning() -> None:
    """Unblock the warning signal (after its handler is installed): one that came meanwhile is delivered now."""
    signal.pthread_sigmask(signal.SIG_UNBLOCK, {TIME_LIMIT_SIGNAL})


LOG_TAIL_LINES = 20
# What rpc-server ("Failed to create server socket") and llama-server ("couldn't bind HTTP server socket")
# print when their port was taken between our check and their bind.
_BIND_ERRORS = ("failed to create server socket", "couldn't bind", "address already in use")


class RoleFailed(Exception):
    def __init__(self, reason: str, exit_code: int | None = None, log_tail: str = "") -> None:
        super().__init__(reason)
        self.reason = reason
        self.exit_code = exit_code
        self.log_tail = log_tail


class Stop:
    """Set by SIGTERM/SIGINT/SIGUSR2: the job is being cancelled or reached its time limit."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: tp.Any) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


def node_name() -> str:
    # The UTS hostname is shared by the test bed's namespaces and says nothing about the node:
    # Slurm's SLURMD_NODENAME is the node's identity.
    return os.environ.get("SLURMD_NODENAME") or "localhost"


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:]) if lines > 0 else ""


def die_with_parent(parent: int | None = None) -> tp.Callable[[], None]:
    """A ``preexec_fn``: in the child before exec, be killed when the role process ``parent`` dies, however it dies;
    and ignore Slurm's time-limit warning.

    A role killed outright (SIGKILL after Slurm's KillWait, OOM) would otherwise leave its server running
    outside any supervision, still holding the node's port and GPU memory. SIGKILL, not SIGTERM: a
    llama-server whose RPC peer is gone can hang in its graceful shutdown. A role that ends normally has
    already stopped its child gracefully (:meth:`Child.stop`). libc is loaded here, in the role, not in the
    forked child; and a role that died between the fork and ``prctl`` (a cancel while a server starts) is
    caught by comparing the parent: the child then exits instead of running on, orphaned.

    Slurm sends the warning (``--signal=USR2@S``) to every process of the step, servers included, and its
    default action kills them: the replica would then fail as "llama-server exited with code -12" before the
    role could say "time limit" and stop them itself. An ignored signal stays ignored across ``exec``.
    """
    parent = os.getpid() if parent is None else parent
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        prctl = libc.prctl
        set_handler = libc.signal
        set_handler.argtypes = [ctypes.c_int, ctypes.c_void_p]
        set_handler.restype = ctypes.c_void_p
    except (OSError, AttributeError):
        return lambda: None

    def preexec() -> None:
        set_handler(TIME_LIMIT_SIGNAL, 1)  # SIG_IGN
        prctl(1, signal.SIGKILL)  # PR_SET_PDEATHSIG
        if os.getppid() != parent:
            os._exit(1)

    return preexec


def adopt_orphans() -> bool:
    """Make this role the parent of whatever its servers leave behind (PR_SET_CHILD_SUBREAPER); True when set.

    A process whose parent exits goes to the nearest such ancestor instead of init. A server's helper (see
    :class:`Child`) then stays in the step's process tree, where Slurm's proctrack/linuxproc finds it and kills
    it with the step even when the role itself is killed before it could end the helper's group. The adopted
    processes are only ever children of this role: none of them is reaped here, and they end with the step.
    """
    try:
        import ctypes

        libc = ctypes.CDLL(None, use_errno=True)
        return int(libc.prctl(36, 1, 0, 0, 0)) == 0  # PR_SET_CHILD_SUBREAPER
    except (OSError, AttributeError):
        return False


class Child:
    """One supervised child process whose output goes to a log file.

    The server runs in a session of its own, so its process group is everything it started: llama.cpp forks
    when it aborts (ggml's backtrace, a fork of llama-server that then runs gdb), and such a fork has neither
    the server's death signal (fork clears it) nor, once the server has exited, a place in the step's process
    tree (its parent is then init), so neither Slurm nor the role would ever stop it. Whenever the server is
    seen to have exited, whatever is left of its group is killed before the server is reaped: until then its
    pid stays the group's id and cannot name another process.
    """

    def __init__(self, argv: list[str], log_path: Path, env: dict[str, str], redact: tp.Sequence[str] = ()) -> None:
        self.argv = argv
        self.log_path = log_path
        log_path.parent.mkdir(parents=True, exist_ok=True)
        shown = " ".join("***" if a in redact else a for a in argv)
        with open(log_path, "a") as fh:
            fh.write(f"[speedslurm] {time.strftime('%Y-%m-%d %H:%M:%S')} on {node_name()}: {shown}\n")
        self._log = open(log_path, "ab")  # noqa: SIM115 - kept open for the child's lifetime
        os.chmod(log_path, 0o600)
        self.proc = subprocess.Popen(argv, stdout=self._log, stderr=subprocess.STDOUT, stdin=subprocess.DEVNULL,
                                     env=env, start_new_session=True, preexec_fn=die_with_parent())

    @property
    def pid(self) -> int:
        return self.proc.pid

    def _exited(self) -> bool:
        """Whether the server has exited, without reaping it (its pid keeps naming its group meanwhile)."""
        if self.proc.returncode is not None:
            return True
        if not hasattr(os, "waitid"):  # not on every platform: reaped at once, its group then goes unsignalled
            return self.proc.poll() is not None
        try:
            return os.waitid(os.P_PID, self.proc.pid, os.WEXITED | os.WNOHANG | os.WNOWAIT) is not None
        except ChildProcessError:
            return True

    def _signal_group(self, sig: int) -> None:
        if self.proc.returncode is None:  # not reaped yet: the group id is still the server's
            with contextlib.suppress(ProcessLookupError, PermissionError):
                os.killpg(self.proc.pid, sig)

    def _reap(self, timeout: float) -> int | None:
        """Kill what is left of the server's group (its helpers), then reap the server."""
        self._signal_group(signal.SIGKILL)
        return self.proc.wait(timeout)

    def poll(self) -> int | None:
        if self.proc.returncode is None and self._exited():
            self._reap(5)
        return self.proc.returncode

    def stop(self, timeout: float = 3) -> int | None:
        # Shorter than Slurm's KillWait, so that the role still runs when the grace period ends.
        if self.proc.returncode is None:
            self._signal_group(signal.SIGTERM)
            deadline = time.monotonic() + timeout
            while not self._exited() and time.monotonic() < deadline:
                time.sleep(0.02)
            self._reap(5)  # SIGKILL: the server if it is still shutting down, and any helper of its group
        self._log.close()
        return self.proc.returncode

    def tail(self) -> str:
        return log_tail(self.log_path)

    def bind_failed(self) -> bool:
        text = self.tail().lower()
        return any(marker in text for marker in _BIND_ERRORS)


def rpc_cache_folder(setting: str | None, node: str, environ: tp.Mapping[str, str] | None = None) -> str:
    """``llama.rpc_cache_dir`` on this node: ``{node}`` becomes the node's Slurm name (one folder per node where the
    nodes share a file system), ``~`` is expanded; unset: ``$TMPDIR/speedslurm-rpc-cache-<uid>``."""
    environ = os.environ if environ is None else environ
    if not setting:
        return os.path.join(_tmpdir(environ), f"speedslurm-rpc-cache-{os.getuid()}")
    return os.path.expanduser(setting.replace("{node}", node))


def _tmpdir(environ: tp.Mapping[str, str]) -> str:
    return environ.get("TMPDIR") or "/tmp"


def private_dir_problem(path: str) -> str:
    """Create ``path`` mode 0700, or check the one already there: "" when it is a real folder of this user that
    nobody else can write (then made mode 0700), else what is wrong with it. rpc-server loads cached tensors from
    it, so a folder another user controls (made before ours: /tmp is shared) could feed it weights."""
    parent = os.path.dirname(path) or "."
    try:
        os.makedirs(parent, exist_ok=True)
    except FileExistsError:  # what makedirs says of a file in the way
        return f"cannot be created ({parent} is not a folder)"
    except OSError as exc:
        return f"cannot be created ({exc.strerror})"
    try:
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        return f"cannot be created ({exc.strerror})"
    try:
        st = os.lstat(path)
        if not stat.S_ISDIR(st.st_mode):
            return "is not a folder (a link or a file)"
        if st.st_uid != os.getuid():
            return f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})"
        if st.st_mode & 0o022:
            return f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})"
        # The folder itself, not whatever the name points to by now (O_NOFOLLOW): checked again through the fd.
        fd = os.open(path, os.O_RDONLY | os.O_DIRECTORY | os.O_NOFOLLOW)
    except OSError as exc:
        return "is not a folder (a link or a file)" if exc.errno in (errno.ELOOP, errno.ENOTDIR) \
            else f"cannot be opened ({exc.strerror})"
    try:
        now = os.fstat(fd)
        if (now.st_dev, now.st_ino, now.st_uid) != (st.st_dev, st.st_ino, st.st_uid) or now.st_mode & 0o022:
            return "changed while it was checked"
        if stat.S_IMODE(now.st_mode) != 0o700:
            os.fchmod(fd, 0o700)  # ours and not writable by others: just make it private (and writable by us)
    except OSError as exc:
        return f"cannot be made private ({exc.strerror})"
    finally:
        os.close(fd)
    return ""


def rpc_cache_dir(setting: str | None, node: str,
                  environ: tp.Mapping[str, str] | None = None) -> tuple[str | None, str]:
    """The folder rpc-server caches tensors in on this node, and a line for the role's log when it is not the one
    the settings name ("" when it is). A folder that cannot be used or is not safely ours (see
    :func:`private_dir_problem`) is never used, and never fails the job either: instead, the default folder (when
    ``llama.rpc_cache_dir`` was the problem), else a private folder of ours beside it, kept for the next
    deployments (``$TMPDIR/speedslurm-rpc-cache-<uid>-XXXXXXXX``), else no cache (None: rpc-server without -c)."""
    environ = os.environ if environ is None else environ
    wanted = rpc_cache_folder(setting, node, environ)
    problem = private_dir_problem(wanted)
    if not problem:
        return wanted, ""
    chosen = _fallback_cache_dir(environ, wanted)
    fix = ("set llama.rpc_cache_dir to a private folder of yours on local disk, or unset it" if setting
           else "remove it, or set llama.rpc_cache_dir to a private folder of yours on local disk")
    instead = f"caching in {chosen} instead" if chosen else "rpc-server runs without its tensor cache"
    return chosen, (f"the rpc-server cache folder {wanted} is not used: it {problem}; {instead} "
                    f"(to use a folder of your choice: {fix})")


def _fallback_cache_dir(environ: tp.Mapping[str, str], refused: str) -> str | None:
    tmp = _tmpdir(environ)
    default = rpc_cache_folder(None, "", environ)
    if default != refused and not private_dir_problem(default):
        return default
    prefix = f"speedslurm-rpc-cache-{os.getuid()}-"
    try:
        earlier = sorted(name for name in os.listdir(tmp) if name.startswith(prefix))
    except OSError:
        earlier = []
    for name in earlier:  # an earlier job's fallback: only this user can have made a folder that passes the checks
        path = os.path.join(tmp, name)
        if path != refused and not private_dir_problem(path):
            return path
    import tempfile  # only here: the job side starts without it

    try:
        return tempfile.mkdtemp(prefix=prefix, dir=tmp)  # mode 0700, a name nobody could have taken before
    except OSError:
        return None


def log_line(log_path: Path, text: str) -> None:
    """One ``[speedslurm]`` line in a role's log (made mode 0600 when it is not there yet, as :class:`Child` does)."""
    log_path.parent.mkdir(parents=True, exist_ok=True)
    fd = os.open(log_path, os.O_WRONLY | os.O_APPEND | os.O_CREAT, 0o600)
    with os.fdopen(fd, "a") as fh:
        fh.write(f"[speedslurm] {time.strftime('%Y-%m-%d %H:%M:%S')} on {node_name()}: {text}\n")


