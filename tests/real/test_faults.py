"""Faults while a batch runs on the real test bed: each one is named on stderr while the batch runs, the
results file stays valid, and running the same command again gives every prompt exactly one successful line.

With ``--replicas 2`` a replica that dies (its rpc-server, its llama-server, a node, a link) costs nothing: the
batch goes on on the other replica, and the failed replica is named. With one replica the command exits
non-zero and says how to resume. See docs/reliability.md for the scenarios and their results.

The batches that a fault must interrupt are long by construction (tests/longbatch.py): more than any machine
answers while a test runs. A fault is injected once the results file has lines, not after a sleep; a batch that
survives it is stopped with Ctrl-C once it went on after the fault (exit 130); the resume then runs on the
prompts up to the last one answered, a short batch whatever the speed of the machine. How long each fault took
to be reported is printed, never asserted: the waits end on events, with a guard only against a hang.
"""

from __future__ import annotations

import contextlib
import http.server
import json
import os
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
import typing as tp
from pathlib import Path

import pytest
from builds import patched_rpc_build
from cliproc import speedslurm_proc as speedslurm
from longbatch import GUARD_S, LONG, count_lines, keep_answered, long_fields

pytestmark = [pytest.mark.llama]
bed = pytest.mark.slurm

# ------------------------------------------------------------------------------------------ helpers


def write_prompts(path: Path, n: int, max_tokens: int, prefix: str = "p") -> list[str]:
    """n chat prompts with custom ids ``<prefix>-<i>``; returns the ids."""
    return _write(path, n, {"max_tokens": max_tokens}, prefix)


def write_long_prompts(path: Path, prefix: str = "p") -> list[str]:
    """A batch no machine finishes while a test runs (LONG prompts of fixed-length answers); returns the ids."""
    return _write(path, LONG, long_fields(), prefix)


def _write(path: Path, n: int, fields: dict[str, tp.Any], prefix: str) -> list[str]:
    ids = [f"{prefix}-{i}" for i in range(n)]
    with open(path, "w") as fh:
        for i, cid in enumerate(ids):
            fh.write(json.dumps({"custom_id": cid, "messages": [{"role": "user", "content": f"Count to {i}"}],
                                 **fields}) + "\n")
    return ids


def assert_no_duplicate(path: Path) -> list[str]:
    """The successful custom_ids of a results file, none of them twice."""
    ok = ok_ids(path)
    assert len(ok) == len(set(ok)), "a custom_id has two successful lines"
    return ok


def result_lines(path: Path) -> list[dict[str, tp.Any]]:
    """Every line of a results file, each checked to be one whole JSON object."""
    data = path.read_bytes()
    assert not data or data.endswith(b"\n"), "the results file ends in a partial line"
    out = []
    for raw in data.splitlines():
        rec = json.loads(raw)
        assert set(rec) == {"id", "custom_id", "request_fingerprint", "response", "error"}, rec
        out.append(rec)
    return out


def ok_ids(path: Path) -> list[str]:
    return [r["custom_id"] for r in result_lines(path) if r["response"] and r["response"]["status_code"] == 200]


def assert_exactly_once(path: Path, ids: list[str]) -> None:
    ok = ok_ids(path)
    assert len(ok) == len(set(ok)), "a custom_id has two successful lines"
    assert sorted(ok) == sorted(ids), f"{len(set(ids) - set(ok))} prompts lack a successful line"


def flat(text: str) -> str:
    """Text with its line breaks undone (messages are wrapped at the console's width)."""
    return " ".join(text.split())


def wait_for(what: str, cond: tp.Callable[[], tp.Any], timeout: float = 180, every: float = 0.1) -> tp.Any:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = cond()
        if value:
            return value
        time.sleep(every)
    raise AssertionError(f"timed out after {timeout:.0f}s waiting for {what}")


class Run:
    """A speedslurm command running in the background; stderr lines are kept with the time they arrived."""

    def __init__(self, env: dict[str, str], args: list[str]) -> None:
        self.args = args
        self.proc = subprocess.Popen([sys.executable, "-m", "speedslurm", *args], env=env, stdin=subprocess.DEVNULL,
                                     stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        self.lines: list[tuple[float, str]] = []
        self.stdout = ""
        self._threads = [threading.Thread(target=self._read_err, daemon=True),
                         threading.Thread(target=self._read_out, daemon=True)]
        for t in self._threads:
            t.start()

    def _read_err(self) -> None:
        assert self.proc.stderr is not None
        for line in self.proc.stderr:
            self.lines.append((time.time(), line.rstrip("\n")))

    def _read_out(self) -> None:
        assert self.proc.stdout is not None
        self.stdout = self.proc.stdout.read()

    @property
    def stderr(self) -> str:
        return "\n".join(line for _t, line in self.lines)

    def first(self, needle: str, after: float = 0.0) -> float | None:
        """When a stderr line containing ``needle`` (case-insensitive) arrived after ``after``."""
        for t, line in self.lines:
            if t >= after and needle.lower() in line.lower():
                return t
        return None

    def show(self, needle: str) -> None:
        """Print the message that names the fault (the whole wrapped line group), for the test log."""
        text = self.stderr
        i = text.lower().find(needle.lower())
        if i >= 0:
            print(f"\n[{self.args[self.args.index('submit') if 'submit' in self.args else 0]}] "
                  + flat(text[i:i + 400]))

    def wait(self, timeout: float = 300) -> int:
        try:
            rc = self.proc.wait(timeout)
        except subprocess.TimeoutExpired:
            self.proc.kill()
            raise
        self.join()
        return rc

    def join(self) -> None:
        """Until the command's output is read to its end (it ended)."""
        for t in self._threads:
            t.join(10)

    def interrupt(self, timeout: float = 300) -> int:
        """Ctrl-C, as a user stops a batch; the exit status."""
        assert self.proc.poll() is None, f"the batch ended before it was stopped:\n{self.stderr}"
        self.proc.send_signal(signal.SIGINT)
        return self.wait(timeout)

    def kill(self) -> None:
        if self.proc.poll() is None:
            self.proc.kill()
            self.proc.wait(10)


def assert_reported(run: Run, needle: str, since: float) -> float:
    """The fault is named on stderr after ``since`` (before the command ended, if it ends); returns how long that
    took, for the test log (a guard against a hang only: the time is not asserted)."""
    def seen() -> bool:
        if run.first(needle, since) is not None:
            return True
        if run.proc.poll() is not None:
            run.join()
            assert run.first(needle, since) is not None, f"ended without naming {needle!r}:\n{run.stderr}"
        return False

    wait_for(f"{needle!r} on stderr", seen, timeout=GUARD_S)
    t = run.first(needle, since)
    assert t is not None
    return t - since


def run_dirs(runs: Path) -> list[Path]:
    return sorted((p.parent for p in runs.glob("*/deployment.json")), key=lambda p: p.stat().st_mtime)


def deployment(runs: Path) -> dict[str, tp.Any]:
    """deployment.json of the newest run dir, once its job ids are recorded."""
    def found() -> dict[str, tp.Any] | None:
        for d in reversed(run_dirs(runs)):
            with contextlib.suppress(ValueError, OSError):
                info = json.loads((d / "deployment.json").read_text())
                if info.get("job_ids"):
                    info["_dir"] = str(d)
                    return info
        return None
    return tp.cast(dict[str, tp.Any], wait_for("the deployment's job ids", found, timeout=60))


def read_json(path: Path) -> dict[str, tp.Any] | None:
    try:
        return tp.cast(dict[str, tp.Any], json.loads(path.read_text()))
    except (OSError, ValueError):
        return None


def netns_inode(ns: str) -> int:
    return os.stat(f"/run/netns/{ns}").st_ino


def processes_in_netns(ns: str) -> list[int]:
    ino = netns_inode(ns)
    pids = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            with contextlib.suppress(OSError):
                if os.stat(entry / "ns" / "net").st_ino == ino:
                    pids.append(int(entry.name))
    return pids


def job_env_of(pid: int) -> dict[str, str]:
    try:
        raw = Path(f"/proc/{pid}/environ").read_bytes()
    except OSError:
        return {}
    return dict(item.split("=", 1) for item in raw.decode(errors="replace").split("\0") if "=" in item)


def node_state(node: str) -> str:
    out = subprocess.run(["sinfo", "-h", "-n", node, "-o", "%t"], capture_output=True, text=True).stdout
    return out.strip()


SLURMD_PID = Path("/var/lib/speedslurm-testbed/run")


def restore_node(node: str) -> None:
    """Start the node's slurmd again if it is not running and bring the node back to idle."""
    pidfile = SLURMD_PID / f"slurmd-{node}.pid"
    alive = False
    with contextlib.suppress(OSError, ValueError):
        pid = int(pidfile.read_text().split()[0])
        alive = Path(f"/proc/{pid}/comm").read_text().strip() == "slurmd"
    if not alive:
        subprocess.run(["nsenter", f"--net=/run/netns/ss{node}", "slurmd", "-N", node], check=True, timeout=60)
    deadline = time.monotonic() + 90
    while time.monotonic() < deadline:
        state = node_state(node)
        if state.rstrip("*~#") in ("idle", "mix", "alloc"):
            return
        if any(s in state for s in ("down", "drain", "drng", "fail")):
            subprocess.run(["scontrol", "update", f"nodename={node}", "state=resume"], capture_output=True)
        time.sleep(1)
    raise AssertionError(f"node {node} did not come back (state {node_state(node)!r})")


def end_deployments(env: dict[str, str], runs: Path) -> None:
    """Cancel every job and stop every local deployment started under ``runs`` (a killed client leaves them)."""
    for d in run_dirs(runs) if runs.is_dir() else []:
        info = read_json(d / "deployment.json") or {}
        ids = [str(j) for j in info.get("job_ids", [])]
        if info.get("executor") == "local":
            speedslurm(env, "down", d.name, timeout=60)
        elif ids:
            subprocess.run(["scancel", *sorted({j.split("_")[0] for j in ids})], capture_output=True)


@pytest.fixture
def env(shared_tmp: Path) -> tp.Iterator[dict[str, str]]:
    e = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}
    yield e
    end_deployments(e, shared_tmp / "runs")


def held(env: dict[str, str], folder: Path) -> dict[str, str]:
    """``env`` whose sbatch submits held jobs (``scontrol release`` starts them): files can be planted first."""
    shim = folder / "held-sbatch"
    shim.mkdir(exist_ok=True)
    real = shutil.which("sbatch")
    assert real
    (shim / "sbatch").write_text(f'#!/bin/sh\nexec {real} --hold "$@"\n')
    (shim / "sbatch").chmod(0o755)
    return {**env, "PATH": f"{shim}{os.pathsep}{env.get('PATH', '')}"}


def replica_fault(env: dict[str, str], shared_tmp: Path, tiny_gguf: Path,
                  inject: tp.Callable[[Path], None], needle: str,
                  extra: tp.Sequence[str] = (), reported: tp.Callable[[], None] | None = None,
                  executor: str = "slurm", before_resume: tp.Callable[[], None] | None = None,
                  ) -> tuple[Run, list[str], Path]:
    """Run a 2-replica batch that no machine finishes, call ``inject(replica 1's dir)`` once results flow, see the
    failure named while the batch goes on on replica 0, stop it (Ctrl-C); then ``before_resume()`` and the same
    command on the prompts up to the last one answered: every one of them once, and nothing left to do after."""
    prompts = shared_tmp / "f.jsonl"
    ids = write_long_prompts(prompts)
    out = shared_tmp / "f.results.jsonl"
    runs = shared_tmp / "runs"
    run = Run(env, ["--set", "llama.rpc_cache=false", *extra, "submit", "--model", str(tiny_gguf), "--nodes", "2",
                    "--replicas", "2", "--executor", executor, "--prompts", str(prompts), "--concurrency", "4"])
    try:
        r1 = wait_for("replica 1 ready and results flowing",
                      lambda: next((d.parent for d in runs.glob("*/r1/endpoint.json")
                                    if count_lines(out) >= 10), None), timeout=240)
        t_fault = time.time()
        inject(r1)
        took = assert_reported(run, needle, t_fault)
        if reported is not None:
            reported()
        # the batch goes on on the other replica
        at_report = count_lines(out)
        wait_for("results after the failure", lambda: count_lines(out) >= at_report + 10 or run.proc.poll() is not None,
                 timeout=GUARD_S)
        rc = run.interrupt()
    finally:
        run.kill()
    assert rc == 130, run.stderr
    text = flat(run.stderr)
    assert "replica r1 failed" in text, run.stderr
    assert "To resume, run the same command again" in text, run.stderr
    done = assert_no_duplicate(out)
    assert 10 <= len(done) < len(ids)
    print(f"reported in {took:.1f}s")
    run.show(needle)
    if before_resume is not None:
        before_resume()
    # the same command again: only the prompts still missing are sent, nothing twice; then nothing left to do
    kept = keep_answered(prompts, ids, done)
    again = speedslurm(env, *run.args)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, kept)
    again = speedslurm(env, *run.args)
    assert again.returncode == 0 and "Nothing to do" in again.stderr, again.stderr
    assert_exactly_once(out, kept)
    return run, ids, out


# ------------------------------------------------------------------------------------------ 1, 2: processes die


def test_1_follower_rpc_server_killed_mid_batch(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    def kill_rpc(r1: Path) -> None:
        os.kill(json.loads((r1 / "follower-1.json").read_text())["pid"], signal.SIGKILL)

    run, _ids, _out = replica_fault(env, shared_tmp, tiny_gguf, kill_rpc, "replica r1 failed", executor="local")
    assert "rpc-server" in run.stderr or "llama-server" in run.stderr


def test_2_leader_llama_server_killed_mid_batch(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    def kill_server(r1: Path) -> None:
        os.kill(json.loads((r1 / "endpoint.json").read_text())["pid"], signal.SIGKILL)

    run, _ids, _out = replica_fault(env, shared_tmp, tiny_gguf, kill_server, "replica r1 failed", executor="local")
    assert "llama-server" in run.stderr and "exited with code -9" in flat(run.stderr), run.stderr


def test_1_single_replica_rpc_server_killed_then_resume(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    """One replica: the command fails (exit 1) naming the dead rpc-server; the same command resumes."""
    prompts = shared_tmp / "s.jsonl"
    ids = write_long_prompts(prompts)
    out = shared_tmp / "s.results.jsonl"
    runs = shared_tmp / "runs"
    args = ["--set", "llama.rpc_cache=false", "submit", "--model", str(tiny_gguf), "--nodes", "2",
            "--executor", "local", "--prompts", str(prompts), "--concurrency", "2"]
    run = Run(env, args)
    try:
        r0 = wait_for("results flowing", lambda: next((d.parent for d in runs.glob("*/r0/endpoint.json")
                                                       if count_lines(out) >= 10), None), timeout=120)
        t_fault = time.time()
        os.kill(json.loads((r0 / "follower-1.json").read_text())["pid"], signal.SIGKILL)
        took = assert_reported(run, "replica r0 failed", t_fault)
        rc = run.wait(GUARD_S)
    finally:
        run.kill()
    assert rc == 1, run.stderr
    print(f"reported in {took:.1f}s")
    run.show("replica r0 failed")
    assert "every replica failed" in run.stderr and "run the same command" in flat(run.stderr)
    first = assert_no_duplicate(out)
    assert 10 <= len(first) < len(ids)
    kept = keep_answered(prompts, ids, first)
    again = speedslurm(env, *args)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, kept)


# ------------------------------------------------------------------------------------------ 3: scancel


@bed
def test_3_scancel_mid_batch_then_resume(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    prompts = shared_tmp / "c.jsonl"
    ids = write_long_prompts(prompts)
    out = shared_tmp / "c.results.jsonl"
    runs = shared_tmp / "runs"
    args = ["--set", "llama.rpc_cache=false", "submit", "--model", str(tiny_gguf), "--nodes", "2",
            "--executor", "slurm", "--prompts", str(prompts), "--concurrency", "2"]
    run = Run(env, args)
    try:
        wait_for("results flowing", lambda: count_lines(out) >= 10, timeout=240)
        job = deployment(runs)["job_ids"][0]
        t_fault = time.time()
        subprocess.run(["scancel", job], check=True)
        took = assert_reported(run, "replica r0 failed", t_fault)
        rc = run.wait(GUARD_S)
    finally:
        run.kill()
    assert rc == 1, run.stderr
    run.show("replica r0 failed")
    text = flat(run.stderr)
    assert f"job {job}" in text and "CANCELLED" in text, run.stderr
    print(f"reported in {took:.1f}s")
    first = assert_no_duplicate(out)
    assert 10 <= len(first) < len(ids)
    kept = keep_answered(prompts, ids, first)
    again = speedslurm(env, *args)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, kept)


# ------------------------------------------------------------------------------------------ 4: SIGINT


def test_4_sigint_then_resume(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    prompts = shared_tmp / "i.jsonl"
    ids = write_long_prompts(prompts)
    out = shared_tmp / "i.results.jsonl"
    args = ["submit", "--model", str(tiny_gguf), "--nodes", "2", "--executor", "local", "--prompts", str(prompts),
            "--concurrency", "2"]
    run = Run(env, args)
    try:
        wait_for("results flowing", lambda: count_lines(out) >= 10, timeout=120)
        t_fault = time.time()
        run.proc.send_signal(signal.SIGINT)
        took = assert_reported(run, "Stopping", t_fault)
        rc = run.wait(GUARD_S)  # grace for in-flight requests, then down: not the rest of the batch
        stopped = time.time() - t_fault
    finally:
        run.kill()
    assert rc == 130, run.stderr
    print(f"'Stopping' after {took:.1f}s, ended {stopped:.1f}s after Ctrl-C")
    run.show("Interrupted")
    assert "To resume, run the same command again" in flat(run.stderr), run.stderr
    first = assert_no_duplicate(out)
    assert 10 <= len(first) < len(ids)  # it stopped, long before the batch's end
    kept = keep_answered(prompts, ids, first)
    again = speedslurm(env, *args)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, kept)


# ------------------------------------------------------------------------------------------ 5, 6: node and link


@bed
def test_5_follower_node_fails_mid_batch(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    """A node failure: the follower node's slurmd and every process of the job on it are killed at once."""
    victim: dict[str, str] = {}

    def power_off(r1: Path) -> None:
        follower = json.loads((r1 / "follower-1.json").read_text())
        node = victim["node"] = follower["node"]
        job = str(follower["job_id"]).split("_")[0]
        slurmd = int((SLURMD_PID / f"slurmd-{node}.pid").read_text().split()[0])
        os.kill(slurmd, signal.SIGKILL)
        for pid in processes_in_netns(f"ss{node}"):
            e = job_env_of(pid)
            cmd = Path(f"/proc/{pid}/cmdline").read_bytes() if Path(f"/proc/{pid}").exists() else b""
            if e.get("SLURM_JOB_ID") == job or e.get("SLURM_ARRAY_JOB_ID") == job or f"[{job}".encode() in cmd:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)

    def power_on() -> None:  # the resume needs all four nodes
        if victim:
            restore_node(victim["node"])

    try:
        run, _ids, _out = replica_fault(env, shared_tmp, tiny_gguf, power_off, "replica r1 failed",
                                        before_resume=power_on)
    finally:
        power_on()
    assert "rpc-server" in run.stderr or "llama-server" in run.stderr


@bed
def test_6_follower_link_cut_mid_batch(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    """The follower's link goes down: nothing answers, nothing resets; the leader notices the silence."""
    cut: dict[str, str] = {}

    def link_down(r1: Path) -> None:
        node = json.loads((r1 / "follower-1.json").read_text())["node"]
        cut["node"], cut["down"] = node, "yes"
        subprocess.run(["ip", "-n", f"ss{node}", "link", "set", "eth0", "down"], check=True)

    def restore() -> None:
        if cut.get("down"):
            subprocess.run(["ip", "-n", f"ss{cut['node']}", "link", "set", "eth0", "up"], check=True)
            cut.pop("down")

    def node_back() -> None:  # the resume needs all four nodes
        restore()
        if cut.get("node"):
            restore_node(cut["node"])

    # The link comes back as soon as the failure is reported, before Slurm would declare the node dead.
    node = ""
    try:
        run, _ids, _out = replica_fault(env, shared_tmp, tiny_gguf, link_down, "replica r1 failed", reported=restore,
                                        before_resume=node_back)
    finally:
        node = cut.get("node", node)
        restore()
        if node:
            restore_node(node)
    assert "stopped answering" in flat(run.stderr), run.stderr


# ------------------------------------------------------------------------------------------ 7: time limit


@bed
def test_7_time_limit_mid_batch_then_resume(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    """A one-minute job on a batch slower than that: the server is paused after 10 results (of a batch no machine
    finishes), so the job reaches its limit with requests in flight. Exit 1 naming the time limit; running the
    same command again (each run gets a minute) finishes the prompts up to the last one answered."""
    prompts = shared_tmp / "t.jsonl"
    ids = _write(prompts, LONG, {"max_tokens": 16, "ignore_eos": True}, "p")  # short answers: the resume fits a minute
    out = shared_tmp / "t.results.jsonl"
    runs = shared_tmp / "runs"
    args = ["--set", "llama.rpc_cache=false", "submit", "--model", str(tiny_gguf), "--nodes", "2",
            "--executor", "slurm", "--time", "1", "--handover-before", "0",  # no successor: the limit ends it
            "--prompts", str(prompts), "--concurrency", "2",
            "--timeout", "300"]
    run = Run(env, args)
    paused = None
    try:
        r0 = wait_for("results flowing", lambda: run.proc.poll() is not None or next(
            (d.parent for d in runs.glob("*/r0/endpoint.json") if count_lines(out) >= 10), None), timeout=240)
        if isinstance(r0, Path):  # Slurm may warn early (it checks limits every 30 s): then it is over already
            paused = json.loads((r0 / "endpoint.json").read_text())["pid"]
            os.kill(paused, signal.SIGSTOP)
        rc = run.wait(GUARD_S)
    finally:
        if paused:
            with contextlib.suppress(ProcessLookupError):
                os.kill(paused, signal.SIGCONT)
        run.kill()
    assert rc == 1, run.stderr
    run.show("replica r0 failed")
    text = flat(run.stderr)
    assert "time limit" in text and "run the same command" in text, run.stderr
    failure = read_json(next(runs.glob("*/r0/failed.json")))
    assert failure is not None
    t_msg = run.first("replica r0 failed")
    assert t_msg is not None, run.stderr
    print(f"time limit reported {t_msg - failure['time']:.1f}s after the job side's warning")
    first = assert_no_duplicate(out)
    assert 10 <= len(first) < len(ids)
    ids = keep_answered(prompts, ids, first)
    for _ in range(3):
        again = speedslurm(env, *args)
        if again.returncode == 0:
            break
        assert again.returncode == 1 and "time limit" in again.stderr, again.stderr
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, ids)


# ------------------------------------------------------------------------------------------ 8: port taken


def _holders(port: int, nodes: dict[str, str]) -> list[subprocess.Popen[str]]:
    """Processes listening on ``port`` at each node's address, inside each node's namespace."""
    code = ("import socket,sys,time;s=socket.socket();s.bind((sys.argv[1],int(sys.argv[2])));s.listen();"
            "print('ok',flush=True);time.sleep(3600)")
    procs = []
    for node, addr in nodes.items():
        p = subprocess.Popen(["nsenter", f"--net=/run/netns/ss{node}", sys.executable, "-c", code, addr, str(port)],
                             stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
        procs.append(p)
    for p in procs:
        assert p.stdout is not None and p.stdout.readline().strip() == "ok", "could not occupy the port"
    return procs


@bed
def test_8_taken_port_on_the_nodes_is_replaced(env, shared_tmp: Path, tiny_gguf: Path, testbed) -> None:
    with socket.socket() as s:  # a port that is free here; the nodes' namespaces have their own port spaces
        s.bind(("127.0.0.1", 0))
        port = s.getsockname()[1]
    holders = _holders(port, testbed.nodes)
    try:
        prompts = shared_tmp / "o.jsonl"
        ids = write_prompts(prompts, 20, max_tokens=8)
        res = speedslurm(env, "--set", f"llama.rpc_port={port}", "--set", f"llama.server_port={port}",
                         "--set", "llama.rpc_cache=false", "submit", "--model", str(tiny_gguf), "--nodes", "3",
                         "--executor", "slurm", "--prompts", str(prompts), "--keep")
        assert res.returncode == 0, res.stderr
        assert_exactly_once(shared_tmp / "o.results.jsonl", ids)
        dep = deployment(shared_tmp / "runs")
        ep = json.loads((Path(dep["_dir"]) / "r0" / "endpoint.json").read_text())
        assert not ep["url"].endswith(f":{port}")
        assert len(ep["rpc_servers"]) == 2 and all(not r.endswith(f":{port}") for r in ep["rpc_servers"])
        speedslurm(env, "down", Path(dep["_dir"]).name)
    finally:
        for p in holders:
            p.kill()
            p.wait()


# ------------------------------------------------------------------------------------------ 9: stale files


class _Trap(http.server.BaseHTTPRequestHandler):
    hits: list[str] = []

    def _any(self) -> None:
        _Trap.hits.append(f"{self.command} {self.path}")
        self.send_response(500)
        self.end_headers()

    do_GET = do_POST = _any

    def log_message(self, *args: tp.Any) -> None:
        pass


@bed
def test_9_stale_handshake_files_of_another_job_are_never_used(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    """Endpoint, failure and rendezvous files of an earlier job sit in r0 before the job starts: all ignored."""
    trap = http.server.ThreadingHTTPServer(("127.0.0.1", 0), _Trap)
    _Trap.hits = []
    threading.Thread(target=trap.serve_forever, daemon=True).start()
    prompts = shared_tmp / "st.jsonl"
    ids = write_prompts(prompts, 20, max_tokens=8)
    runs = shared_tmp / "runs"
    # queued held, so that the stale files are in place before it starts
    run = Run(held(env, shared_tmp), ["--set", "llama.rpc_cache=false", "submit", "--model", str(tiny_gguf), "--nodes", "2",
                     "--executor", "slurm", "--prompts", str(prompts)])
    try:
        dep = deployment(runs)
        job = dep["job_ids"][0]
        r0 = Path(dep["_dir"]) / "r0"
        stale = "1" if job != "1" else "2"
        url = f"http://127.0.0.1:{trap.server_address[1]}"
        # whole records of the contract, only of another job
        (r0 / "endpoint.json").write_text(json.dumps({
            "schema": 1, "epoch": 0, "url": url, "api_key": "stale-key", "model": "stale",
            "deployment_id": dep["id"], "replica": 0, "job_id": stale, "leader_node": "n1", "follower_nodes": ["n2"],
            "rpc_servers": ["10.77.0.12:1"], "llama_version": "old", "parallel": 4, "ctx": 512, "started_at": 1.0,
            "ready_at": 2.0, "pid": 1}))
        (r0 / "failed.json").write_text(json.dumps({
            "schema": 1, "epoch": 0, "job_id": stale, "role": "leader", "rank": 0, "node": "n1",
            "reason": "an earlier job failed", "exit_code": 1, "log_tail": "", "time": 1.0}))
        (r0 / "follower-1.json").write_text(json.dumps({
            "schema": 1, "epoch": 0, "job_id": stale, "rank": 1, "node": "n2", "host": "127.0.0.1",
            "port": trap.server_address[1], "pid": 1, "version": "old", "heartbeat_port": 0, "started_at": 1.0}))
        time.sleep(1.5)  # the client polls the run dir meanwhile: neither READY nor FAILED from these
        status = json.loads(speedslurm(env, "status", dep["id"], "--json").stdout)[0]
        assert status["replicas"][0]["state"] == "PENDING", (status, run.stderr)
        subprocess.run(["scontrol", "release", job], check=True)
        rc = run.wait(300)
    finally:
        run.kill()
        trap.shutdown()
    assert rc == 0, run.stderr
    assert_exactly_once(shared_tmp / "st.results.jsonl", ids)
    assert _Trap.hits == [], f"the stale endpoint was used: {_Trap.hits}"
    ep = json.loads((r0 / "endpoint.json").read_text())
    assert ep["job_id"] == job and ep["url"] != url
    assert "earlier job failed" not in run.stderr


# ------------------------------------------------------------------------------------------ 10: two builds


@pytest.fixture
def two_builds(shared_tmp: Path, llama_bins) -> tuple[Path, Path]:
    """(a llama.bin_dir whose two binaries are links into one build, the RPC server of another build)."""
    real = Path(llama_bins.rpc_server).resolve().parent
    other = patched_rpc_build(real, shared_tmp / "other-build")
    bin_dir = shared_tmp / "bin"
    bin_dir.mkdir()
    os.symlink(real / "llama-server", bin_dir / "llama-server")
    os.symlink(real / "ggml-rpc-server", bin_dir / "ggml-rpc-server")
    return bin_dir, other / "ggml-rpc-server"


@bed
def test_10_rpc_server_of_another_build_fails_saying_the_builds_differ(env, shared_tmp: Path, tiny_gguf: Path,
                                                                        two_builds, llama_bins) -> None:
    """The client sees one build; on the nodes the RPC server comes from another (a per-node install that
    drifted). The leader compares build ids and fails at once instead of a broken RPC handshake."""
    bin_dir, other_rpc = two_builds
    prompts = shared_tmp / "b.jsonl"
    ids = write_prompts(prompts, 20, max_tokens=8)
    out = shared_tmp / "b.results.jsonl"
    runs = shared_tmp / "runs"
    args = ["--set", f"llama.bin_dir={bin_dir}", "--set", "llama.rpc_cache=false", "submit", "--model",
            str(tiny_gguf), "--nodes", "2", "--executor", "slurm", "--prompts", str(prompts)]
    run = Run(held(env, shared_tmp), args)
    link = bin_dir / "ggml-rpc-server"
    try:
        job = deployment(runs)["job_ids"][0]
        link.unlink()
        os.symlink(other_rpc, link)
        t_start = time.time()
        subprocess.run(["scontrol", "release", job], check=True)
        rc = run.wait(180)
        took = time.time() - t_start
    finally:
        run.kill()
        if link.is_symlink():
            link.unlink()
        os.symlink(Path(llama_bins.rpc_server).resolve(), link)
    assert rc == 1, run.stderr
    run.show("Error:")
    assert "different llama.cpp builds" in flat(run.stderr), run.stderr
    print(f"failed {took:.1f}s after release (Slurm's scheduling included)")
    failure = read_json(next(runs.glob("*/r0/failed.json")))
    t_msg = run.first("different llama.cpp builds")
    assert failure is not None and t_msg is not None, run.stderr
    print(f"reported {t_msg - failure['time']:.1f}s after the job side's record")
    assert out.exists() and result_lines(out) == []  # nothing was sent; the file is valid
    again = speedslurm(env, *args)  # builds match again: the same command completes
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, ids)


# ------------------------------------------------------------------------------------------ 11: requeue


def _requeue_scenario(env: dict[str, str], folder: Path, tiny_gguf: Path, hetjob: bool) -> str:
    """One requeue scenario, in ``folder`` with a run directory of its own; its timeline, for the test log."""
    folder.mkdir()
    runs = folder / "runs"
    env = {**env, "SPEEDSLURM_RUN__DIR": str(runs)}
    prompts = folder / "rq.jsonl"
    ids = write_long_prompts(prompts)
    out = folder / "rq.results.jsonl"
    run = Run(env, ["--set", "llama.rpc_cache=false", "--set", f"cluster.hetjob={str(hetjob).lower()}", "submit",
                    "--model", str(tiny_gguf), "--nodes", "2", "--executor", "slurm", "--prompts", str(prompts),
                    "--concurrency", "2"])
    seen: list[tuple[float, str, str, int | None]] = []
    try:
        wait_for("results flowing", lambda: count_lines(out) >= 10, timeout=240)
        dep = deployment(runs)
        job, r0 = dep["job_ids"][0], Path(dep["_dir"]) / "r0"
        first = read_json(r0 / "endpoint.json")
        assert first and first.get("epoch", 0) == 0 and first["job_id"] == job
        t_fault = time.time()
        subprocess.run(["scontrol", "requeue", job], check=True, timeout=30)

        def restarted() -> bool:
            st = json.loads(speedslurm(env, "status", dep["id"], "--json").stdout)[0]["replicas"][0]
            ep = st["endpoint"] or {}
            seen.append((time.time() - t_fault, st["state"], st["why"], ep.get("epoch")))
            return st["state"] == "READY" and ep.get("epoch") == 1

        wait_for("the restarted job READY in status", restarted, timeout=300, every=0.5)
        t_ready = time.time()
        assert_reported(run, "ready again", t_fault)
        at_again = count_lines(out)  # the batch goes on against the new endpoint
        wait_for("results after the requeue", lambda: count_lines(out) >= at_again + 10 or run.proc.poll() is not None,
                 timeout=GUARD_S)
        rc = run.interrupt()
    finally:
        run.kill()
        end_deployments(env, runs)
    t_end = time.time()
    assert rc == 130, run.stderr
    assert "To resume, run the same command again" in flat(run.stderr), run.stderr
    done = assert_no_duplicate(out)
    # Once status saw the requeue, it never said READY with the first start's endpoint.
    after = seen[next((i for i, s in enumerate(seen) if s[1] != "READY"), len(seen)):]
    assert after, seen
    assert not [s for s in after if s[1] == "READY" and s[3] != 1], seen
    assert any(s[1] == "PENDING" and "requeued" in s[2] for s in seen), seen
    t_left = run.first("requeued or preempted", t_fault) or run.first("replica r0 failed", t_fault)
    t_again = run.first("ready again", t_fault)
    assert t_again is not None, run.stderr
    # the same command again: the prompts up to the last one answered, each once
    kept = keep_answered(prompts, ids, done)
    again = speedslurm(env, *run.args)
    end_deployments(env, runs)
    assert again.returncode == 0, again.stderr
    assert_exactly_once(out, kept)
    states: list[tuple[float, str, str]] = []
    for t, state, why, _epoch in seen:
        if not states or states[-1][1:] != (state, why):
            states.append((round(t, 1), state, why))
    return (f"[{'hetjob' if hetjob else 'plain'}] requeued at 0 s; the batch stopped sending at "
            f"{t_left - t_fault if t_left else -1:.1f} s; status: {states}; READY again (status) at "
            f"{t_ready - t_fault:.1f} s; the batch resumed at {t_again - t_fault:.1f} s; stopped (Ctrl-C) at "
            f"{t_end - t_fault:.1f} s, {len(done)} prompts once; resumed: {len(kept)} prompts once")


@bed
def test_11_requeue_mid_batch_waits_and_resumes_exactly_once(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    """``scontrol requeue`` mid-batch (what preemption with PreemptMode=REQUEUE does): the job keeps its id and
    its first start's files stay in r0. ``status`` never says READY with that start's endpoint; the batch waits
    while the job is queued and starting again, then goes on against the new endpoint (a batch no machine
    finishes, stopped with Ctrl-C once it did): no prompt twice, and the resume gives every prompt once.

    A plain job and a heterogeneous job, 2 nodes each of the bed's 4, at the same time (Slurm keeps a requeued
    job queued about two minutes; the two scenarios wait through it together)."""
    outcome: dict[bool, str | BaseException] = {}

    def scenario(hetjob: bool) -> None:
        try:
            outcome[hetjob] = _requeue_scenario(env, shared_tmp / ("hetjob" if hetjob else "plain"), tiny_gguf,
                                                hetjob)
        except BaseException as exc:  # noqa: BLE001  # raised in the test's thread below
            outcome[hetjob] = exc

    threads = [threading.Thread(target=scenario, args=(hetjob,)) for hetjob in (False, True)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    failed = [r for r in outcome.values() if isinstance(r, BaseException)]
    for r in outcome.values():
        if not isinstance(r, BaseException):
            print("\n" + r)
    for other in failed[1:]:
        print(f"\nthe other scenario failed too: {other!r}")
    if failed:
        raise failed[0]
    assert sorted(outcome) == [False, True]
