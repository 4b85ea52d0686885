"""The job side: one entry point, the role chosen by rank. Runs on the nodes (or locally, same code).

* rank > 0, the **follower**: starts rpc-server bound to this node's cluster address on a free port,
  publishes ``follower-<rank>.json`` once the port listens, then supervises it.
* rank 0, the **leader**: waits for every follower, starts llama-server with ``--rpc`` bound to its
  own cluster address with a per-deployment API key, polls ``/health`` until 200, writes ``endpoint.json``
  atomically (mode 0600), then supervises.

When a child exits, the role writes ``failed.json`` (exit code, reason, last log lines) where the client
reads it, and the task ends non-zero so Slurm ends the whole job (srun --kill-on-bad-exit). SIGTERM (from
scancel or the time limit) and Slurm's time-limit warning (SIGUSR2) stop the children cleanly.
"""

from __future__ import annotations

import contextlib
import os
import signal
import socket
import stat
import struct
import subprocess
import sys
import threading
import time
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

from .jobentry import TIME_LIMIT_SIGNAL, hold_time_limit_warning, release_time_limit_warning
from .rundir import Endpoint, RunDir, file_epoch, read_json, write_json_atomic

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


class _Stop:
    """Set by SIGTERM/SIGINT/SIGUSR2: the job is being cancelled or reached its time limit."""

    def __init__(self) -> None:
        self.signum: int | None = None

    def __call__(self, signum: int, frame: tp.Any) -> None:
        self.signum = signum

    def __bool__(self) -> bool:
        return self.signum is not None


# ----------------------------------------------------------------------------------------------------------
# Small utilities


def log_tail(path: Path, lines: int = LOG_TAIL_LINES) -> str:
    try:
        with open(path, "rb") as fh:
            fh.seek(0, os.SEEK_END)
            size = fh.tell()
            fh.seek(max(0, size - 16384))
            data = fh.read().decode("utf-8", "replace")
    except FileNotFoundError:
        return ""
    return "\n".join(data.splitlines()[-lines:])


def _listening(pid: int, port: int) -> bool:
    """True when process ``pid``'s network namespace has a TCP socket listening on ``port``."""
    for table in ("tcp", "tcp6"):
        try:
            with open(f"/proc/{pid}/net/{table}") as fh:
                next(fh)
                for line in fh:
                    parts = line.split()
                    if parts[3] == "0A" and int(parts[1].rsplit(":", 1)[1], 16) == port:
                        return True
        except (FileNotFoundError, StopIteration, ProcessLookupError):
            continue
    return False


def free_port(address: str, preferred: int = 0) -> int:
    """A port free on ``address``: ``preferred`` when it is free, else one the kernel picks."""
    for port in ([preferred] if preferred else []) + [0]:
        with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
            try:
                s.bind((address, port))
            except OSError:
                continue
            return int(s.getsockname()[1])
    raise RoleFailed(f"no free port on {address}")


def current_job_id(environ: tp.Mapping[str, str] | None = None) -> str:
    """This job's id as the client recorded it at submission: 123 (hetjob leader), 123_4 (array task),
    or the local controller's pid. Every handshake file carries it, so files left by another job in the
    same run directory are never taken for this one's."""
    env = os.environ if environ is None else environ
    array, task = env.get("SLURM_ARRAY_JOB_ID"), env.get("SLURM_ARRAY_TASK_ID")
    if array and task:
        return f"{array}_{task}"
    return env.get("SPEEDSLURM_JOB_ID") or env.get("SLURM_JOB_ID") or env.get("SUBMITIT_LOCAL_JOB_ID", "")


def current_epoch(environ: tp.Mapping[str, str] | None = None) -> int:
    """Which start of this job this is: Slurm's ``SLURM_RESTART_COUNT`` (0 when unset, and always 0 for the
    local executor, see :func:`serve`). A requeued job keeps its job id, so the job id alone would take the
    files of its earlier start (dead ports, an old failure) for this one's: every handshake file carries both."""
    env = os.environ if environ is None else environ
    try:
        return int(env.get("SLURM_RESTART_COUNT") or 0)
    except ValueError:
        return 0


def _ours(data: dict[str, tp.Any] | None) -> bool:
    return (bool(data) and str(data.get("job_id", "")) == current_job_id()  # type: ignore[union-attr]
            and file_epoch(data) == current_epoch())  # type: ignore[arg-type]


def node_name() -> str:
    # The UTS hostname is shared by the test bed's namespaces and says nothing about the node:
    # Slurm's SLURMD_NODENAME is the node's identity.
    return os.environ.get("SLURMD_NODENAME") or "localhost"


def cluster_address(deployment: dict[str, tp.Any], node: str) -> str:
    """This node's cluster address: settings, else Slurm's NodeAddr, else DNS; checked to be usable here."""
    if deployment.get("executor") == "local":
        return "127.0.0.1"  # the local executor's address, not a cluster address: every role is on this machine
    addr = (deployment.get("node_addresses") or {}).get(node)
    source = f"the setting cluster.nodes.{node}.address"
    if not addr:
        from .slurm import node_address

        addr = node_address(node)
        source = "Slurm's NodeAddr"
        if addr == node:  # NodeAddr defaults to the node name: resolve it below
            addr = None
    if not addr:
        source = f"DNS (the address {node} resolves to)"
        try:
            addr = socket.gethostbyname(node)
        except OSError as exc:
            raise RoleFailed(f"cannot find the cluster address of node {node}: not in settings, "
                             f"not in Slurm's NodeAddr, not in DNS ({exc})") from exc
    return usable_address(addr, node, source)


def usable_address(addr: str, node: str, source: str) -> str:
    """``addr`` (an IPv4 address, or a name resolved here) if the node's servers can listen on it for the others:
    not loopback (a Debian host name maps to 127.0.1.1), not unspecified, and assigned to one of this node's own
    interfaces (else every bind fails, which would read as "no free port"). Else :class:`RoleFailed`."""
    import errno
    import ipaddress

    fix = f"set cluster.nodes.{node}.address to {node}'s address on the cluster network"
    try:
        ip = socket.gethostbyname(addr)
    except OSError as exc:
        raise RoleFailed(f"node {node}'s cluster address {addr!r} (from {source}) does not resolve on {node} "
                         f"({exc}); {fix}") from exc
    shown = addr if ip == addr else f"{addr} ({ip})"
    parsed = ipaddress.ip_address(ip)
    if parsed.is_loopback or parsed.is_unspecified:
        kind = "a loopback" if parsed.is_loopback else "the unspecified"
        raise RoleFailed(f"node {node}'s cluster address {shown} (from {source}) is {kind} address: the other "
                         f"nodes could not reach its servers; {fix}")
    with socket.socket(socket.AF_INET, socket.SOCK_STREAM) as s:
        try:
            s.bind((ip, 0))
        except OSError as exc:
            if exc.errno == errno.EADDRNOTAVAIL:
                raise RoleFailed(f"node {node}'s cluster address {shown} (from {source}) is not assigned to any "
                                 f"interface of {node}; {fix}") from exc
            raise RoleFailed(f"cannot bind node {node}'s cluster address {shown} (from {source}): {exc}; "
                             f"{fix}") from exc
    return ip


def binary_build(path: str) -> str:
    """The build identity of a llama.cpp binary on this node (equal for binaries of one build)."""
    from .binaries import build_id

    return build_id(path)


# ----------------------------------------------------------------------------------------------------------
# Children


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


class Child:
    """One supervised child process whose output goes to a log file."""

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

    def poll(self) -> int | None:
        return self.proc.poll()

    def stop(self, timeout: float = 3) -> int | None:
        # Shorter than Slurm's KillWait, so that the role still runs when the grace period ends.
        if self.proc.poll() is None:
            with contextlib.suppress(ProcessLookupError):
                os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                with contextlib.suppress(ProcessLookupError):
                    os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(5)
        self._log.close()
        return self.proc.returncode

    def tail(self) -> str:
        return log_tail(self.log_path)

    def bind_failed(self) -> bool:
        text = self.tail().lower()
        return any(marker in text for marker in _BIND_ERRORS)


def _start_listening(make_argv: tp.Callable[[int], list[str]], address: str, preferred: int, log_path: Path,
                     env: dict[str, str], stop: _Stop, timeout: float, what: str,
                     redact: tp.Sequence[str] = ()) -> tuple[Child, int]:
    """Start a server on a free port; if the port is taken meanwhile, pick another (up to 5 tries)."""
    last = ""
    for _attempt in range(5):
        port = free_port(address, preferred)
        child = Child(make_argv(port), log_path, env, redact)
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline and not stop:
            if child.poll() is not None:
                break
            if _listening(child.pid, port):
                return child, port
            time.sleep(0.02)
        if stop:
            child.stop()
            raise RoleFailed(f"stopped by signal {stop.signum} while starting {what}")
        code = child.poll()
        if code is not None and child.bind_failed():
            last = child.tail()
            child.stop()
            preferred = 0
            continue
        tail = child.tail()
        child.stop()
        if code is None:
            raise RoleFailed(f"{what} did not listen on {address}:{port} within {timeout:.0f}s", None, tail)
        raise RoleFailed(f"{what} exited with code {code} while starting", code, tail)
    raise RoleFailed(f"{what} could not bind a port on {address} after 5 tries", None, last)


# ----------------------------------------------------------------------------------------------------------
# Roles


def _fail(rd: RunDir, replica: int, role: str, rank: int, exc: RoleFailed, cause: str = "failed") -> None:
    """Write failed.json; ``cause`` tells the client whether the replica failed or came to an end
    ("time limit": the client shows ENDED, not FAILED)."""
    path = rd.failed_path(replica)
    if _ours(read_json(path)):  # the first failure is the cause; later ones are consequences
        return
    write_json_atomic(path, {
        "job_id": current_job_id(), "epoch": current_epoch(), "role": role, "rank": rank, "node": node_name(), "exit_code": exc.exit_code,
        "reason": exc.reason, "log_tail": exc.log_tail, "time": time.time(), "cause": cause,
    })


def _supervise(child: Child, rd: RunDir, replica: int, stop: _Stop, what: str, poll_s: float,
               peers: tp.Sequence[dict[str, tp.Any]] = ()) -> None:
    """Wait while the child runs; a child exit, a failure elsewhere in the replica, an rpc peer that stopped
    acknowledging (``peers``: the leader's followers), or a signal ends it."""
    failed = rd.failed_path(replica)
    heartbeat = HeartbeatProbe(peers)
    while not stop:
        code = child.poll()
        if code is not None:
            raise RoleFailed(f"{what} exited with code {code}", code, child.tail())
        if failed.exists() and _ours(read_json(failed)):
            child.stop()
            raise RoleFailed("another role of this replica failed", None, "")
        _check_peers(child.pid, peers)
        heartbeat.check()
        time.sleep(poll_s)
    child.stop()


# A peer that acknowledged nothing for this many retransmission timeouts in a row (about 3 s on a LAN: the
# timeout starts at 200 ms and doubles) is gone: its node lost power or its link is cut. A dead peer that can
# still answer (its process died) resets the connection and llama-server aborts by itself; a silent one would
# leave llama-server blocked, with requests in flight, until TCP gives up (about 15 minutes).
PEER_RETRANSMITS = 4


def _unacknowledged(pid: int, host: str, port: int) -> int:
    """Most retransmission timeouts in a row among established connections to host:port in ``pid``'s netns."""
    worst = 0
    try:
        with open(f"/proc/{pid}/net/tcp") as fh:
            next(fh)
            for line in fh:
                parts = line.split()
                if len(parts) < 7 or parts[3] != "01":  # ESTABLISHED
                    continue
                rem_ip, rem_port = parts[2].split(":")
                if int(rem_port, 16) != port or socket.inet_ntoa(struct.pack("<I", int(rem_ip, 16))) != host:
                    continue
                if parts[5].split(":")[0] == "01":  # the retransmission timer runs
                    worst = max(worst, int(parts[6], 16))
    except (OSError, StopIteration, ValueError):
        return 0
    return worst


# Heartbeat: each follower answers on a port of its own (bound to its cluster address, answering one fixed
# line and nothing else); the leader connects every HEARTBEAT_EVERY_S. A follower whose node lost power or
# whose link is cut stops answering even while llama-server waits for a reply with nothing unacknowledged,
# which the retransmission watchdog below cannot see.
HEARTBEAT_EVERY_S = 1.0
HEARTBEAT_TIMEOUT_S = 1.0
HEARTBEAT_MISSES = 3


def start_heartbeat(address: str) -> int:
    """Answer ``ok`` on a free port of ``address`` in a daemon thread; returns the port."""
    server = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    server.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    server.bind((address, 0))
    server.listen(16)

    def serve() -> None:
        while True:
            try:
                conn, _ = server.accept()
            except OSError:
                return
            with contextlib.suppress(OSError), conn:
                conn.sendall(b"ok\n")

    threading.Thread(target=serve, name="heartbeat", daemon=True).start()
    return int(server.getsockname()[1])


class HeartbeatProbe:
    """The leader's view of its followers' heartbeats; raises :class:`RoleFailed` after repeated misses."""

    def __init__(self, peers: tp.Sequence[dict[str, tp.Any]], clock: tp.Callable[[], float] = time.monotonic) -> None:
        self.peers = [p for p in peers if p.get("heartbeat_port")]
        self.clock = clock
        self.misses = {id(p): 0 for p in self.peers}
        self.last = -float("inf")

    def check(self) -> None:
        if not self.peers or self.clock() - self.last < HEARTBEAT_EVERY_S:
            return
        self.last = self.clock()
        for peer in self.peers:
            host, port = str(peer["host"]), int(peer["heartbeat_port"])
            try:
                with socket.create_connection((host, port), timeout=HEARTBEAT_TIMEOUT_S) as conn:
                    ok = conn.recv(3) == b"ok\n"
            except OSError:
                ok = False
            self.misses[id(peer)] = 0 if ok else self.misses[id(peer)] + 1
            if self.misses[id(peer)] >= HEARTBEAT_MISSES:
                raise RoleFailed(f"follower on {peer.get('node', host)} ({host}) stopped answering its heartbeat "
                                 f"{HEARTBEAT_MISSES} times in a row: its node is down or its network link is cut")


def _check_peers(pid: int, peers: tp.Sequence[dict[str, tp.Any]]) -> None:
    for peer in peers:
        host, port = str(peer.get("host", "")), int(peer.get("port") or 0)
        if host and port and _unacknowledged(pid, host, port) >= PEER_RETRANSMITS:
            raise RoleFailed(f"rpc-server on {peer.get('node', host)} ({host}:{port}) stopped answering: nothing "
                             f"acknowledged after {PEER_RETRANSMITS} TCP retransmissions (its node is down or "
                             "its network link is cut)")


def private_dir(path: str, node: str, setting: str) -> str:
    """Create ``path`` mode 0700, or accept it only when it is a real folder of this user that nobody else can
    write: rpc-server loads cached tensors from it, so a folder another user controls could feed it weights."""
    try:
        os.makedirs(os.path.dirname(path) or ".", exist_ok=True)
        os.mkdir(path, 0o700)
    except FileExistsError:
        pass
    except OSError as exc:
        raise RoleFailed(f"cannot create the rpc-server cache folder {path} on {node}: {exc.strerror}; "
                         f"set {setting} to a folder of yours on local disk") from None
    st = os.lstat(path)
    problem = ("is not a folder (a link or a file)" if not stat.S_ISDIR(st.st_mode)
               else f"belongs to uid {st.st_uid}, not to you (uid {os.getuid()})" if st.st_uid != os.getuid()
               else f"is writable by others (mode {stat.S_IMODE(st.st_mode):04o})" if st.st_mode & 0o022
               else "")
    if problem:
        raise RoleFailed(f"refusing the rpc-server cache folder {path} on {node}: it {problem}; remove it, or set "
                         f"{setting} to a private folder of yours on local disk")
    if st.st_mode & 0o077:
        os.chmod(path, 0o700)   # ours and not writable by others: just make it private
    return path


def run_follower(dep: dict[str, tp.Any], rd: RunDir, replica: int, rank: int, stop: _Stop) -> None:
    node = node_name()
    address = cluster_address(dep, node)
    llama = dep["llama"]
    bins = dep["binaries"]
    env = {**os.environ, **bins.get("env", {})}
    version = binary_build(bins["rpc_server"])
    cache_args: list[str] = []
    if llama.get("rpc_cache"):
        cache_dir = llama.get("rpc_cache_dir") or os.path.join(
            os.environ.get("TMPDIR", "/tmp"), f"speedslurm-rpc-cache-{os.getuid()}")
        cache_dir = private_dir(os.path.expanduser(cache_dir), node, "llama.rpc_cache_dir")
        env["LLAMA_CACHE"] = cache_dir
        cache_args = ["-c"]
    threads = ["-t", str(llama["threads"])] if llama.get("threads") else []

    def argv(port: int) -> list[str]:
        return [bins["rpc_server"], "-H", address, "-p", str(port), *threads, *cache_args,
                *llama.get("extra_rpc_args", [])]

    child, port = _start_listening(argv, address, int(llama.get("rpc_port") or 0), rd.log_path(replica, "follower", rank),
                                   env, stop, 60, f"rpc-server on {node}")
    write_json_atomic(rd.follower_path(replica, rank), {
        "job_id": current_job_id(), "epoch": current_epoch(), "rank": rank, "node": node, "host": address, "port": port, "pid": child.pid,
        "version": version, "heartbeat_port": start_heartbeat(address), "started_at": time.time(),
    })
    _supervise(child, rd, replica, stop, f"rpc-server on {node} ({address}:{port})", dep["poll_interval_s"])


def _wait_followers(dep: dict[str, tp.Any], rd: RunDir, replica: int, stop: _Stop) -> list[dict[str, tp.Any]]:
    n = int(dep["nodes"])
    deadline = time.monotonic() + float(dep["follower_timeout_s"])
    found: dict[int, dict[str, tp.Any]] = {}
    while len(found) < n - 1:
        if stop:
            raise RoleFailed(f"stopped by signal {stop.signum} while waiting for rpc-servers")
        failure = rd.failure(replica)
        if _ours(failure):
            assert failure is not None
            raise RoleFailed(f"a follower failed: {failure.get('reason')}", None, failure.get("log_tail", ""))
        for rank in range(1, n):
            if rank not in found:
                data = read_json(rd.follower_path(replica, rank))
                if _ours(data):
                    assert data is not None
                    found[rank] = data
        if len(found) == n - 1:
            break
        if time.monotonic() > deadline:
            missing = [r for r in range(1, n) if r not in found]
            raise RoleFailed(f"rpc-servers of follower rank(s) {missing} did not start within "
                             f"{dep['follower_timeout_s']:.0f}s (run.follower_timeout_s)")
        time.sleep(dep["poll_interval_s"])
    return [found[r] for r in range(1, n)]


def _health(url: str, timeout: float = 2.0) -> int:
    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def run_leader(dep: dict[str, tp.Any], rd: RunDir, replica: int, stop: _Stop) -> None:
    node = node_name()
    address = cluster_address(dep, node)
    llama = dep["llama"]
    bins = dep["binaries"]
    env = {**os.environ, **bins.get("env", {})}
    model_path = dep["model"]["path"]
    if not os.path.exists(model_path):
        raise RoleFailed(f"model file {model_path} does not exist on {node}")
    version = binary_build(bins["llama_server"])
    followers = _wait_followers(dep, rd, replica, stop)
    for f in followers:
        if f.get("version") and f["version"] != version:
            raise RoleFailed(
                f"llama-server on {node} ({version}) and rpc-server on {f['node']} ({f['version']}) come from "
                "different llama.cpp builds; the RPC handshake would fail. Point llama.bin_dir at one build "
                "for every node (`speedslurm build-llama`).")
    rpc = ",".join(f"{f['host']}:{f['port']}" for f in followers)
    key_file = str(rd.root / "api_key")

    def argv(port: int) -> list[str]:
        cmd = [bins["llama_server"], "-m", model_path, "--host", address, "--port", str(port),
               "-ngl", str(llama["ngl"]), "-c", str(dep["ctx"]), "--parallel", str(dep["parallel"]),
               "--metrics", "--api-key-file", key_file, "--no-webui", "--kv-unified"]
        if rpc:
            cmd += ["--rpc", rpc]
        split = dep.get("plan", {}).get("tensor_split")  # the planner's, one value per device (plan.balance_split)
        if split:
            cmd += ["--tensor-split", ",".join(str(v) for v in split)]
        template = dep["model"].get("chat_template")
        if template:
            # A Jinja text is used as is; a built-in name ("gemma", "chatml", ...) is only recognised with the
            # Jinja engine off (with it on, llama-server would take the name itself as the template).
            cmd += (["--chat-template", template] if "{" in template
                    else ["--no-jinja", "--chat-template", template])
        for flag, key in (("-t", "threads"), ("-b", "batch_size"), ("-ub", "ubatch_size"), ("-fa", "flash_attn")):
            if llama.get(key) is not None:
                cmd += [flag, str(llama[key])]
        return cmd + list(llama.get("extra_server_args", []))

    started = time.time()
    child, port = _start_listening(argv, address, int(llama.get("server_port") or 0), rd.log_path(replica, "leader"),
                                   env, stop, 120, f"llama-server on {node}")
    url = f"http://{address}:{port}"
    write_json_atomic(rd.loading_path(replica), {"job_id": current_job_id(), "epoch": current_epoch(), "url": url, "node": node, "pid": child.pid, "time": time.time()})
    deadline = time.monotonic() + float(dep["health_timeout_s"])
    poll = float(dep["poll_interval_s"])
    while True:
        if stop:
            child.stop()
            return
        code = child.poll()
        if code is not None:
            raise RoleFailed(f"llama-server on {node} exited with code {code} while loading the model", code,
                             child.tail())
        failure = rd.failure(replica)
        if _ours(failure):
            assert failure is not None
            child.stop()
            raise RoleFailed(f"a follower failed: {failure.get('reason')}", None, failure.get("log_tail", ""))
        _check_peers(child.pid, followers)
        if _health(url) == 200:
            break
        if time.monotonic() > deadline:
            tail = child.tail()
            child.stop()
            raise RoleFailed(f"llama-server on {node} did not become healthy within {dep['health_timeout_s']:.0f}s"
                             " (run.health_timeout_s)", None, tail)
        time.sleep(poll)
    with open(key_file) as fh:
        api_key = fh.read().strip()
    endpoint = Endpoint(
        url=url, api_key=api_key, model=dep["model"]["name"], deployment_id=rd.deployment_id, replica=replica,
        job_id=current_job_id(), epoch=current_epoch(), leader_node=node,
        follower_nodes=[f["node"] for f in followers], rpc_servers=[f"{f['host']}:{f['port']}" for f in followers],
        llama_version=str(bins.get("version") or version), parallel=int(dep["parallel"]), ctx=int(dep["ctx"]), started_at=started,
        ready_at=time.time(), pid=child.pid,
    )
    write_json_atomic(rd.endpoint_path(replica), endpoint.to_json())
    _supervise(child, rd, replica, stop, f"llama-server on {node} ({url})", poll, peers=followers)


def serve(run_dir: str, replica: int = 0) -> int:
    """The job function submitted for each replica; its rank picks the role.

    Slurm's time-limit warning (SIGUSR2) stays blocked (the task entry blocked it first thing) until its
    handler below is installed: one that came earlier is delivered then, never lost and never fatal.
    """
    hold_time_limit_warning()  # already held when started through jobentry; this covers other callers
    stop = _Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    import submitit

    rd = RunDir(Path(run_dir))
    dep = rd.deployment()
    if dep is None:
        raise RuntimeError(f"{run_dir} holds no deployment.json")
    if dep.get("executor") == "local":
        # Local processes are never requeued; a SLURM_RESTART_COUNT here is inherited from an enclosing job.
        os.environ.pop("SLURM_RESTART_COUNT", None)
    try:
        rank = submitit.JobEnvironment().global_rank
    except RuntimeError:
        rank = int(os.environ.get("SLURM_PROCID", "0"))
    role = "leader" if rank == 0 else "follower"
    rd.log_dir(replica).mkdir(parents=True, exist_ok=True, mode=0o700)

    def time_limit_warning(signum: int, frame: tp.Any) -> None:
        stop(signum, frame)
        if rank == 0:  # say why the replica ends, or the client could only report "the job ended"
            _fail(rd, replica, role, rank, RoleFailed("the job is reaching its time limit (Slurm's warning signal "
                                                      "came); its servers stop now"), cause="time limit")

    signal.signal(signal.SIGUSR2, time_limit_warning)
    release_time_limit_warning()  # before any child starts: children inherit the signal mask
    try:
        if rank == 0:
            run_leader(dep, rd, replica, stop)
        else:
            run_follower(dep, rd, replica, rank, stop)
    except RoleFailed as exc:
        if stop:  # cancelled or timed out while starting: an end, not a failure
            return 0
        _fail(rd, replica, role, rank, exc)
        print(f"[speedslurm] {role} rank {rank} on {node_name()} failed: {exc.reason}", file=sys.stderr, flush=True)
        if exc.log_tail:
            print(exc.log_tail, file=sys.stderr, flush=True)
        # A non-zero exit makes srun (--kill-on-bad-exit) end every task of the job.
        os._exit(1)
    except Exception as exc:  # an unexpected error must still reach the client
        _fail(rd, replica, role, rank, RoleFailed(f"{type(exc).__name__}: {exc}"))
        raise
    return 0


def main(argv: list[str] | None = None) -> None:
    """``python -m speedslurm.jobside RUN_DIR [REPLICA]``: the same job side without submitit (templates)."""
    hold_time_limit_warning()  # first, before the slow imports in serve()
    args = sys.argv[1:] if argv is None else argv
    if not args:
        print("usage: python -m speedslurm.jobside RUN_DIR [REPLICA]", file=sys.stderr)
        raise SystemExit(2)
    replica = int(args[1]) if len(args) > 1 else int(os.environ.get("SLURM_ARRAY_TASK_ID", "0"))
    raise SystemExit(serve(args[0], replica))


if __name__ == "__main__":
    main()

