"""The job side: one entry point, the role chosen by rank. Runs on the nodes (or locally, same code).

* rank > 0, the **follower**: starts rpc-server bound to this node's cluster address on a free port,
  publishes ``follower-<rank>.json`` once the port listens, then supervises it.
* rank 0, the **leader**: waits for every follower, starts llama-server with ``--rpc`` bound to its
  own cluster address with a per-deployment API key, polls ``/health`` until 200, writes ``endpoint.json``
  atomically (mode 0600), then supervises.

When a child exits, the role writes ``failed.json`` (exit code, reason, last log lines) where the client
reads it, and the task ends non-zero so Slurm ends the whole job (srun --kill-on-bad-exit). SIGTERM (from
scancel or the time limit) and Slurm's time-limit warning (SIGUSR2) stop the children cleanly.

The pieces: :mod:`speedslurm.node.children` (children and their logs), :mod:`speedslurm.node.net` (addresses, ports,
heartbeat, TCP watchdog), :mod:`speedslurm.rundir.records` (the files), :mod:`speedslurm.node.entry` (the task's entry).
"""

from __future__ import annotations

import os
import signal
import sys
import time
import typing as tp
from pathlib import Path

from ..rundir.layout import RunDir
from ..rundir.records import (
    ContractError,
    DeploymentRecord,
    Endpoint,
    Failed,
    Follower,
    Handshake,
    JobId,
    Loading,
    current_epoch,
)
from .children import (
    Child,
    RoleFailed,
    Stop,
    adopt_orphans,
    hold_time_limit_warning,
    log_line,
    node_name,
    release_time_limit_warning,
    rpc_cache_dir,
)
from .idle import IdleWatch, format_duration, parse_duration, read_metrics
from .net import (
    HeartbeatProbe,
    PeerWatch,
    cluster_address,
    health,
    start_heartbeat,
    start_listening,
)

__all__ = ["current_job_id", "run_follower", "run_leader", "serve"]

_Stop = Stop


def current_job_id(environ: tp.Mapping[str, str] | None = None) -> str:
    """This job's id as the client recorded it at submission (see :meth:`JobId.from_env`). Every handshake file
    carries it, so files left by another job in the same run directory are never taken for this one's."""
    return JobId.from_env(environ)


def _ours(record: Handshake | None) -> bool:
    return record is not None and record.job_id == current_job_id() and record.epoch == current_epoch()


def binary_build(path: str) -> str:
    """The build identity of a llama.cpp binary on this node (equal for binaries of one build)."""
    from .binaries import build_id

    return build_id(path)


# ----------------------------------------------------------------------------------------------------------
# Roles


def _fail(rd: RunDir, replica: int, role: str, rank: int, exc: RoleFailed, cause: str = "failed") -> None:
    """Write failed.json; ``cause`` tells the client whether the replica failed or came to an end
    ("time limit": the client shows ENDED, not FAILED)."""
    if _read_ours(rd.failure, replica) is not None:  # the first failure is the cause; later ones are consequences
        return
    rd.write(rd.failed_path(replica), Failed(
        job_id=current_job_id(), epoch=current_epoch(), role=role, rank=rank, node=node_name(),
        exit_code=exc.exit_code, reason=exc.reason, log_tail=exc.log_tail, time=time.time(), cause=cause))


R = tp.TypeVar("R", bound=Handshake)


def _read_ours(read: tp.Callable[[int], R | None], replica: int) -> R | None:
    """A handshake file of this job's current start, or None (absent, another job's or an earlier start's; a
    file that is not a record of this version's contract was not written by this job either)."""
    try:
        record = read(replica)
    except ContractError:
        return None
    return record if _ours(record) else None


class Ended(RoleFailed):
    """The replica comes to an end that is no failure (``cause``: "idle"): its record says why, the task ends 0."""

    def __init__(self, reason: str, cause: str) -> None:
        super().__init__(reason)
        self.cause = cause


def _supervise(child: Child, rd: RunDir, replica: int, stop: Stop, what: str, poll_s: float,
               peers: tp.Sequence[Follower] = (), idle: IdleWatch | None = None) -> None:
    """Wait while the child runs; a child exit, a failure or end elsewhere in the replica, an rpc peer that
    stopped acknowledging (``peers``: the leader's followers), no request for the idle timeout (``idle``: the
    leader's watch on llama-server's activity), or a signal ends it."""
    failed = rd.failed_path(replica)
    heartbeat = HeartbeatProbe(peers)
    watch = PeerWatch(peers)
    while not stop:
        code = child.poll()
        if code is not None:
            raise RoleFailed(f"{what} exited with code {code}", code, child.tail())
        if failed.exists():
            failure = _read_ours(rd.failure, replica)
            if failure is not None:
                child.stop()
                if failure.cause != "failed":  # the leader ended the replica (idle): so does this role, cleanly
                    raise Ended(f"the replica ended ({failure.cause})", failure.cause)
                raise RoleFailed("another role of this replica failed", None, "")
        watch.check(child.pid)
        heartbeat.check()
        if idle is not None and idle.idle():
            child.stop()
            raise Ended(f"no request for {format_duration(idle.timeout_s)} (llama.idle_timeout): llama-server "
                        "and its rpc-servers stopped, the job ends and frees its nodes", "idle")
        time.sleep(poll_s)
    child.stop()


def idle_timeout_s(llama: tp.Mapping[str, tp.Any]) -> float:
    """``llama.idle_timeout`` in seconds (0: never)."""
    try:
        return parse_duration(llama.get("idle_timeout") or 0)
    except ValueError as exc:
        raise RoleFailed(f"llama.idle_timeout: {exc}") from None


def run_follower(dep: DeploymentRecord, rd: RunDir, replica: int, rank: int, stop: Stop) -> None:
    node = node_name()
    address = cluster_address(dep, node)
    llama = dep.llama
    bins = dep.binaries
    env = {**os.environ, **bins.get("env", {})}
    version = binary_build(bins["rpc_server"])
    cache_args: list[str] = []
    if llama.get("rpc_cache"):
        cache_dir, note = rpc_cache_dir(llama.get("rpc_cache_dir"), node)
        if note:  # a folder another user made first, say: never used, and no reason to fail the job
            log_line(rd.log_path(replica, "follower", rank), note)
        if cache_dir is not None:
            env["LLAMA_CACHE"] = cache_dir
            cache_args = ["-c"]
    threads = ["-t", str(llama["threads"])] if llama.get("threads") else []

    def argv(port: int) -> list[str]:
        return [bins["rpc_server"], "-H", address, "-p", str(port), *threads, *cache_args,
                *llama.get("extra_rpc_args", [])]

    child, port = start_listening(argv, address, int(llama.get("rpc_port") or 0),
                                  rd.log_path(replica, "follower", rank), env, stop, 60, f"rpc-server on {node}")
    rd.write(rd.follower_path(replica, rank), Follower(
        job_id=current_job_id(), epoch=current_epoch(), rank=rank, node=node, host=address, port=port, pid=child.pid,
        version=version, heartbeat_port=start_heartbeat(address), started_at=time.time()))
    _supervise(child, rd, replica, stop, f"rpc-server on {node} ({address}:{port})", dep.poll_interval_s)


def _wait_followers(dep: DeploymentRecord, rd: RunDir, replica: int, stop: Stop) -> list[Follower]:
    n = dep.nodes
    deadline = time.monotonic() + dep.follower_timeout_s
    found: dict[int, Follower] = {}
    quick_until = time.monotonic() + 5  # the followers start with this task: look often at first (a stat each)
    while len(found) < n - 1:
        if stop:
            raise RoleFailed(f"stopped by signal {stop.signum} while waiting for rpc-servers")
        failure = _read_ours(rd.failure, replica)
        if failure is not None:
            raise RoleFailed(f"a follower failed: {failure.reason}", None, failure.log_tail)
        for rank in range(1, n):
            if rank not in found:
                follower = _read_ours(lambda _r, rank=rank: rd.follower(replica, rank), replica)  # type: ignore[misc]
                if follower is not None:
                    found[rank] = follower
        if len(found) == n - 1:
            break
        if time.monotonic() > deadline:
            missing = [r for r in range(1, n) if r not in found]
            raise RoleFailed(f"rpc-servers of follower rank(s) {missing} did not start within "
                             f"{dep.follower_timeout_s:.0f}s (run.follower_timeout_s)")
        time.sleep(min(dep.poll_interval_s, 0.02) if time.monotonic() < quick_until else dep.poll_interval_s)
    return [found[r] for r in range(1, n)]


def run_leader(dep: DeploymentRecord, rd: RunDir, replica: int, stop: Stop) -> None:
    node = node_name()
    address = cluster_address(dep, node)
    llama = dep.llama
    bins = dep.binaries
    env = {**os.environ, **bins.get("env", {})}
    model_path = dep.model["path"]
    if not os.path.exists(model_path):
        raise RoleFailed(f"model file {model_path} does not exist on {node}")
    version = binary_build(bins["llama_server"])
    idle_s = idle_timeout_s(llama)
    followers = _wait_followers(dep, rd, replica, stop)
    for f in followers:
        if f.version and f.version != version:
            raise RoleFailed(
                f"llama-server on {node} ({version}) and rpc-server on {f.node} ({f.version}) come from "
                "different llama.cpp builds; the RPC handshake would fail. Point llama.bin_dir at one build "
                "for every node (`speedslurm build-llama`).")
    rpc = ",".join(f"{f.host}:{f.port}" for f in followers)
    key_file = str(rd.root / "api_key")

    def argv(port: int) -> list[str]:
        cmd = [bins["llama_server"], "-m", model_path, "--host", address, "--port", str(port),
               "-ngl", str(llama["ngl"]), "-c", str(dep.ctx), "--parallel", str(dep.parallel),
               "--metrics", "--api-key-file", key_file, "--no-webui"]
        if bins.get("kv_unified", True):  # probed once where the binaries were found (binaries.kv_unified)
            cmd.append("--kv-unified")
        if bins.get("fit", False):  # the plan sets ctx, layers and split: llama.cpp's own fitting pass is redundant
            cmd += ["--fit", "off"]
        if rpc:
            cmd += ["--rpc", rpc]
        split = dep.plan.get("tensor_split")  # the planner's, one value per device (split.balance_split)
        if split:
            cmd += ["--tensor-split", ",".join(str(v) for v in split)]
        template = dep.model.get("chat_template")
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
    child, port = start_listening(argv, address, int(llama.get("server_port") or 0), rd.log_path(replica, "leader"),
                                  env, stop, 120, f"llama-server on {node}")
    url = f"http://{address}:{port}"
    rd.write(rd.loading_path(replica), Loading(job_id=current_job_id(), epoch=current_epoch(), url=url, node=node,
                                               pid=child.pid, time=time.time()))
    deadline = time.monotonic() + dep.health_timeout_s
    poll = dep.poll_interval_s
    loading_poll = min(poll, 0.05)  # a look costs ~2 ms: the endpoint is published within 50 ms of ready
    watch = PeerWatch(followers)
    while True:
        if stop:
            child.stop()
            return
        code = child.poll()
        if code is not None:
            raise RoleFailed(f"llama-server on {node} exited with code {code} while loading the model", code,
                             child.tail())
        failure = _read_ours(rd.failure, replica)
        if failure is not None:
            child.stop()
            raise RoleFailed(f"a follower failed: {failure.reason}", None, failure.log_tail)
        watch.check(child.pid)
        if health(url) == 200:
            break
        if time.monotonic() > deadline:
            tail = child.tail()
            child.stop()
            raise RoleFailed(f"llama-server on {node} did not become healthy within {dep.health_timeout_s:.0f}s"
                             " (run.health_timeout_s)", None, tail)
        time.sleep(loading_poll)
    with open(key_file) as fh:
        api_key = fh.read().strip()
    endpoint = Endpoint(
        url=url, api_key=api_key, model=dep.model["name"], deployment_id=rd.deployment_id, replica=replica,
        job_id=current_job_id(), epoch=current_epoch(), leader_node=node,
        follower_nodes=[f.node for f in followers], rpc_servers=[f"{f.host}:{f.port}" for f in followers],
        llama_version=str(bins.get("version") or version), parallel=dep.parallel, ctx=dep.ctx,
        started_at=started, ready_at=time.time(), pid=child.pid,
    )
    rd.write(rd.endpoint_path(replica), endpoint)
    idle = IdleWatch(idle_s, lambda: read_metrics(url, api_key)) if idle_s > 0 else None
    _supervise(child, rd, replica, stop, f"llama-server on {node} ({url})", poll, peers=followers, idle=idle)


def serve(run_dir: str, replica: int = 0, rank: int | None = None, rank_offset: int = 0) -> int:
    """The job function submitted for each replica; its rank picks the role.

    Slurm's time-limit warning (SIGUSR2) stays blocked (the task entry blocked it first thing) until its
    handler below is installed: one that came earlier is delivered then, never lost and never fatal.
    """
    hold_time_limit_warning()  # already held when started through jobentry; this covers other callers
    stop = Stop()
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, stop)
    rd = RunDir(Path(run_dir))
    dep = rd.deployment_record()
    if dep is None:
        raise RuntimeError(f"{run_dir} holds no deployment.json")
    if dep.on_this_machine:
        # Local processes are never requeued; a SLURM_RESTART_COUNT here is inherited from an enclosing job.
        os.environ.pop("SLURM_RESTART_COUNT", None)
    rank = (task_rank() if rank is None else rank) + rank_offset
    role = "leader" if rank == 0 else "follower"
    rd.log_dir(replica).mkdir(parents=True, exist_ok=True, mode=0o700)

    def time_limit_warning(signum: int, frame: tp.Any) -> None:
        stop(signum, frame)
        if rank == 0:  # say why the replica ends, or the client could only report "the job ended"
            _fail(rd, replica, role, rank, RoleFailed("the job is reaching its time limit (Slurm's warning signal "
                                                      "came); its servers stop now"), cause="time limit")

    signal.signal(signal.SIGUSR2, time_limit_warning)
    release_time_limit_warning()  # before any child starts: children inherit the signal mask
    adopt_orphans()  # what a server forks stays in the step's process tree after the server exits
    try:
        if rank == 0:
            run_leader(dep, rd, replica, stop)
        else:
            run_follower(dep, rd, replica, rank, stop)
    except Ended as exc:  # idle: the leader records why; every role ends cleanly, and so does the job
        if rank == 0:
            _fail(rd, replica, role, rank, exc, cause=exc.cause)
        print(f"[speedslurm] {role} rank {rank} on {node_name()}: {exc.reason}", file=sys.stderr, flush=True)
        return 0
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


def task_rank(environ: tp.Mapping[str, str] | None = None) -> int:
    """This task's rank in its replica (0: the leader), read as submitit's job environment reads it: the local
    executor's SUBMITIT_LOCAL_GLOBALID when submitit's local executor started it, else SLURM_PROCID (a hetjob's
    step spans both components, so its ranks are global)."""
    env = os.environ if environ is None else environ
    if env.get("SUBMITIT_EXECUTOR") == "local" and env.get("SUBMITIT_LOCAL_GLOBALID") is not None:
        return int(env["SUBMITIT_LOCAL_GLOBALID"])
    return int(env.get("SLURM_PROCID") or 0)
