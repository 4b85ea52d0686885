"""The node's network: its cluster address, free ports, the followers' heartbeat and the TCP watchdog.

Standard library only (the job side runs it on the nodes, and ``doctor`` runs its address lookup there too).
"""

from __future__ import annotations

import contextlib
import errno
import ipaddress
import re
import socket
import struct
import subprocess
import threading
import time
import typing as tp
from pathlib import Path

from ..rundir.records import DeploymentRecord, Follower
from .children import Child, RoleFailed, Stop, node_name


def listening(pid: int, port: int) -> bool:
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


def node_address(node: str) -> str | None:
    """Slurm's NodeAddr for ``node`` (None when scontrol does not know it)."""
    try:
        out = subprocess.run(["scontrol", "show", "node", node, "-o"], capture_output=True, text=True,
                             timeout=20).stdout
    except (OSError, subprocess.SubprocessError):
        return None
    m = re.search(r"\bNodeAddr=(\S+)", out)
    return m.group(1) if m else None


def cluster_address(deployment: DeploymentRecord | None, node: str,
                    addresses: tp.Mapping[str, str] | None = None) -> str:
    """This node's cluster address: settings (the deployment's, or ``addresses``), else Slurm's NodeAddr, else
    DNS; checked to be usable here."""
    if deployment is not None and deployment.on_this_machine:
        return "127.0.0.1"  # the local executor's address, not a cluster address: every role is on this machine
    addr = (deployment.node_addresses if deployment is not None else addresses or {}).get(node)
    source = f"the setting cluster.nodes.{node}.address"
    if not addr:
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


# A peer that acknowledged nothing for this many retransmission timeouts in a row (about 3 s on a LAN: the
# timeout starts at 200 ms and doubles) is gone: its node lost power or its link is cut. A dead peer that can
# still answer (its process died) resets the connection and llama-server aborts by itself; a silent one would
# leave llama-server blocked, with requests in flight, until TCP gives up (about 15 minutes).
PEER_RETRANSMITS = 4


# Reading /proc/PID/net/tcp walks the kernel's whole established-connection hash table, whatever the netns
# (about 2.5 ms of system time on a machine with 256 Ki buckets): the watchdog reads it once for all peers and
# at most every WATCHDOG_EVERY_S, which adds at most that much to the ~3 s a dead peer takes to reach
# PEER_RETRANSMITS, and keeps the leader's supervision well under 1 % of a core while a batch runs.
WATCHDOG_EVERY_S = 1.0


def _tcp_table(pid: int) -> list[str]:
    """The lines of ``pid``'s netns TCP table, header skipped ([] if it cannot be read)."""
    try:
        with open(f"/proc/{pid}/net/tcp") as fh:
            return fh.read().splitlines()[1:]
    except OSError:
        return []


def _unacknowledged(pid: int, targets: tp.Collection[tuple[str, int]]) -> dict[tuple[str, int], int]:
    """For each (host, port): most retransmission timeouts in a row among established connections to it in
    ``pid``'s netns (one read of the table for all of them)."""
    worst = dict.fromkeys(targets, 0)
    for line in _tcp_table(pid):
        parts = line.split()
        if len(parts) < 7 or parts[3] != "01":  # ESTABLISHED
            continue
        try:
            rem_ip, rem_port = parts[2].split(":")
            key = (socket.inet_ntoa(struct.pack("<I", int(rem_ip, 16))), int(rem_port, 16))
            if key in worst and parts[5].split(":")[0] == "01":  # the retransmission timer runs
                worst[key] = max(worst[key], int(parts[6], 16))
        except ValueError:
            continue
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

    def __init__(self, peers: tp.Sequence[Follower], clock: tp.Callable[[], float] = time.monotonic) -> None:
        self.peers = [p for p in peers if p.heartbeat_port]
        self.clock = clock
        self.misses = {id(p): 0 for p in self.peers}
        self.last = -float("inf")

    def check(self) -> None:
        if not self.peers or self.clock() - self.last < HEARTBEAT_EVERY_S:
            return
        self.last = self.clock()
        for peer in self.peers:
            host, port = peer.host, peer.heartbeat_port
            try:
                with socket.create_connection((host, port), timeout=HEARTBEAT_TIMEOUT_S) as conn:
                    ok = conn.recv(3) == b"ok\n"
            except OSError:
                ok = False
            self.misses[id(peer)] = 0 if ok else self.misses[id(peer)] + 1
            if self.misses[id(peer)] >= HEARTBEAT_MISSES:
                raise RoleFailed(f"follower on {peer.node or host} ({host}) stopped answering its heartbeat "
                                 f"{HEARTBEAT_MISSES} times in a row: its node is down or its network link is cut")


def check_peers(pid: int, peers: tp.Sequence[Follower]) -> None:
    """Raise :class:`RoleFailed` for the first peer whose connection went PEER_RETRANSMITS timeouts unanswered."""
    targets = {(p.host, p.port): p for p in peers if p.host and p.port}
    if not targets:
        return
    for key, count in _unacknowledged(pid, targets).items():
        if count >= PEER_RETRANSMITS:
            peer = targets[key]
            raise RoleFailed(f"rpc-server on {peer.node or peer.host} ({peer.host}:{peer.port}) stopped answering: "
                             f"nothing acknowledged after {PEER_RETRANSMITS} TCP retransmissions (its node is down "
                             "or its network link is cut)")


class PeerWatch:
    """:func:`check_peers` at most every WATCHDOG_EVERY_S (the supervision loop asks far more often)."""

    def __init__(self, peers: tp.Sequence[Follower], clock: tp.Callable[[], float] = time.monotonic) -> None:
        self.peers = list(peers)
        self.clock = clock
        self.last = -float("inf")

    def check(self, pid: int) -> None:
        if not self.peers or self.clock() - self.last < WATCHDOG_EVERY_S:
            return
        self.last = self.clock()
        check_peers(pid, self.peers)


def health(url: str, timeout: float = 2.0) -> int:
    import urllib.error  # only the leader asks, once llama-server runs: a follower's start skips ~40 ms of imports
    import urllib.request

    try:
        with urllib.request.urlopen(url + "/health", timeout=timeout) as resp:
            return int(resp.status)
    except urllib.error.HTTPError as exc:
        return int(exc.code)
    except (urllib.error.URLError, OSError):
        return 0


def start_listening(make_argv: tp.Callable[[int], list[str]], address: str, preferred: int, log_path: Path,
                     env: dict[str, str], stop: Stop, timeout: float, what: str,
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
            if listening(child.pid, port):
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


def probe(probe_file: str, ports: list[int], addresses: dict[str, str]) -> dict[str, tp.Any]:
    """``doctor``'s look at this node: the probe file (is the run directory shared?), this node's cluster address
    as the job side finds it, and whether ``ports`` can be bound on it."""
    node = node_name()
    out: dict[str, tp.Any] = {"node": node, "ports": {}}
    try:
        with open(probe_file) as fh:
            out["probe"] = fh.read().strip()
    except OSError as exc:
        out["probe_error"] = str(exc)
    try:
        addr = cluster_address(None, node, addresses)
    except RoleFailed as exc:
        out["address"] = None
        out["address_error"] = exc.reason
        out["ports"] = {str(p): exc.reason for p in ports}
        return out
    out["address"] = addr
    for port in ports:
        with socket.socket() as s:
            try:
                s.bind((addr, port))
                out["ports"][str(port)] = "free"
            except OSError as exc:
                out["ports"][str(port)] = exc.strerror or str(exc)
    return out
