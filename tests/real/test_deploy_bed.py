"""Deployments on the real test bed: real Slurm (hetjobs, arrays), real llama.cpp, real sockets."""

from __future__ import annotations

import json
import subprocess
import time
import typing as tp
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.llama]
bed = pytest.mark.slurm


@pytest.fixture
def ss(speedslurm_cli: tp.Callable[..., tp.Any]) -> tp.Any:
    return speedslurm_cli(timeout=180)


def _chat(base_url: str, key: str) -> str:
    client = openai.OpenAI(base_url=base_url, api_key=key, max_retries=0, timeout=60)
    r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": "Say hi"}], max_tokens=6)
    assert r.usage is not None and r.usage.completion_tokens > 0
    return r.choices[0].message.content or ""


def _listeners(node_ns: str) -> list[tuple[str, str]]:
    """(local address:port, process) of TCP listeners in a test bed node's network namespace."""
    out = subprocess.run(["nsenter", f"--net=/run/netns/{node_ns}", "ss", "-Hltnp"], capture_output=True,
                         text=True, check=True).stdout
    rows = []
    for line in out.splitlines():
        parts = line.split()
        rows.append((parts[3], parts[-1]))
    return rows


def _speedslurm_processes(deployment: str = "") -> list[str]:
    """Servers and job-side tasks still running (of ``deployment``, named in their arguments, when given): by the
    program run, not by words anywhere in a command line (a compile of llama-server's target is not a server)."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            argv = (proc / "cmdline").read_bytes().decode(errors="replace").split("\0")
        except OSError:
            continue
        if deployment and not any(deployment in a for a in argv):
            continue
        if Path(argv[0]).name in ("llama-server", "rpc-server", "ggml-rpc-server") or "speedslurm.node.entry" in argv:
            found.append(f"{proc.name} {' '.join(argv).strip()}")
    return found


def _server_groups(run_dir: Path) -> set[int]:
    """The pids the roles recorded for their servers (llama-server in loading.json and endpoint.json, each
    rpc-server in its follower file). Each server leads a session of its own, so its pid is also the id of the
    process group that holds it and everything it started."""
    pids = set()
    for path in [*run_dir.glob("r*/follower-*.json"), *run_dir.glob("r*/loading.json"),
                 *run_dir.glob("r*/endpoint.json")]:
        pids.add(int(json.loads(path.read_text())["pid"]))
    return pids


def _left_in_groups(groups: set[int]) -> list[str]:
    """Processes still running in those groups: a server, or anything it started (llama.cpp forks a copy of
    llama-server when it aborts, to print a backtrace) and that outlived it. rpc-server's command line names no
    deployment; its recorded pid does."""
    found = []
    for proc in Path("/proc").iterdir():
        if not proc.name.isdigit():
            continue
        try:
            stat = (proc / "stat").read_text()
        except OSError:
            continue
        state, ppid, pgid = stat[stat.rfind(")") + 2:].split()[:3]
        if state not in ("Z", "X") and int(pgid) in groups:
            found.append(f"{proc.name} (parent {ppid}, group {pgid}) {stat[stat.find('(') + 1:stat.rfind(')')]}")
    return found


def _left_after_the_job(groups: set[int], job_id: str) -> list[str]:
    """What still runs in ``groups`` once Slurm has ended the job: every process of the job that Slurm knows of
    is gone by then, so whatever runs was left behind (no wait of a guessed length in between)."""
    job = job_id.split("+")[0].split("_")[0]
    deadline = time.monotonic() + 120  # a guard against a hang only
    while subprocess.run(["squeue", "-h", "-j", job, "-o", "%T"], capture_output=True, text=True,
                         timeout=30).stdout.strip():
        assert time.monotonic() < deadline, f"job {job} is still in the queue"
        time.sleep(0.5)
    return _left_in_groups(groups)


@bed
def test_up_three_nodes_ready_key_sockets_and_down(ss, tiny_gguf: Path) -> None:
    t0 = time.monotonic()
    res = ss("up", "--model", str(tiny_gguf), "--nodes", "3", "--executor", "slurm", "--timeout", "120", "--json")
    up_s = time.monotonic() - t0
    dep = json.loads(res.stdout)
    rep = dep["replicas"][0]
    assert rep["state"] == "READY"
    assert rep["endpoint"]["api_key"] == "***"  # never printed unless asked
    assert rep["endpoint"]["leader_node"] == "n1" or rep["endpoint"]["leader_node"].startswith("n")
    assert len(rep["endpoint"]["follower_nodes"]) == 2
    print(f"up to READY: {up_s:.1f}s")

    env_lines = ss("endpoint", dep["deployment"], "--env").stdout
    exports = dict(line.removeprefix("export ").split("=", 1) for line in env_lines.splitlines())
    base_url, key = exports["OPENAI_BASE_URL"], exports["OPENAI_API_KEY"]
    assert base_url.startswith("http://10.77.0.1") and base_url.endswith("/v1")
    assert _chat(base_url, key)

    with pytest.raises(openai.AuthenticationError):  # 401 without the key
        openai.OpenAI(base_url=base_url, api_key="wrong", max_retries=0).chat.completions.create(
            model="x", messages=[{"role": "user", "content": "hi"}], max_tokens=2)

    # rpc-servers listen only on their node's 10.x address
    followers = rep["endpoint"]["follower_nodes"]
    for node in followers:
        rpc = [addr for addr, proc in _listeners(f"ss{node}") if "rpc-server" in proc]
        assert rpc, f"no rpc-server listening on {node}"
        addr = {"n1": "10.77.0.11", "n2": "10.77.0.12", "n3": "10.77.0.13", "n4": "10.77.0.14"}[node]
        assert all(a.startswith(addr + ":") for a in rpc), rpc

    status = json.loads(ss("status", dep["deployment"], "--json").stdout)[0]
    assert status["state"] == "READY" and "secret" not in json.dumps(status)
    assert key not in ss("status", dep["deployment"], "--json").stdout
    groups = _server_groups(Path(status["run_dir"]))
    assert len(groups) == 3 and len(_left_in_groups(groups)) >= 3   # llama-server and two rpc-servers

    down = ss("down", dep["deployment"])
    assert "cancelled" in down.stdout
    deadline = time.monotonic() + 120  # a guard against a hang only
    while _speedslurm_processes(dep["deployment"]) and time.monotonic() < deadline:
        time.sleep(0.5)
    assert _speedslurm_processes(dep["deployment"]) == []
    assert _left_after_the_job(groups, rep["job_id"]) == []
    status = json.loads(ss("status", dep["deployment"], "--json").stdout)[0]
    assert status["state"] == "ENDED"


@bed
def test_down_under_load_leaves_no_process_of_any_server(ss, tiny_gguf: Path) -> None:
    """``down`` while requests run: Slurm's SIGTERM stops the rpc-servers first, llama-server aborts on its lost
    peers (ggml then forks a copy of itself to print a backtrace) while the leader stops it. Nothing of any
    server may outlive the job: not llama-server, not an rpc-server, not such a copy (an orphaned one, parent
    pid 1, was seen on this bed)."""
    import threading

    res = ss("up", "--model", str(tiny_gguf), "--nodes", "3", "--executor", "slurm", "--timeout", "120", "--json")
    dep, job = json.loads(res.stdout)["deployment"], json.loads(res.stdout)["replicas"][0]["job_id"]
    full = json.loads(ss("endpoint", dep, "--json", "--show-key").stdout)[0]
    groups = _server_groups(Path(json.loads(ss("status", dep, "--json").stdout)[0]["run_dir"]))
    assert len(groups) == 3
    stop = threading.Event()
    answered = []

    def requests() -> None:
        client = openai.OpenAI(base_url=full["url"] + "/v1", api_key=full["api_key"], max_retries=0, timeout=30)
        while not stop.is_set():
            try:
                client.completions.create(model="x", prompt="Count to 100:", max_tokens=48)
                answered.append(1)
            except openai.OpenAIError:
                time.sleep(0.05)

    workers = [threading.Thread(target=requests, daemon=True) for _ in range(4)]
    for w in workers:
        w.start()
    try:
        deadline = time.monotonic() + 30
        while len(answered) < 4 and time.monotonic() < deadline:
            time.sleep(0.1)
        assert answered, "no request was answered before down"
        assert "cancelled" in ss("down", dep).stdout
    finally:
        stop.set()
    # Whatever runs once Slurm has ended the job was left behind.
    assert _left_after_the_job(groups, job) == []


@bed
def test_up_two_replicas_is_a_job_array_of_two_node_jobs(ss, tiny_gguf: Path) -> None:
    res = ss("up", "--model", str(tiny_gguf), "--nodes", "2", "--replicas", "2", "--executor", "slurm",
             "--timeout", "120", "--json")
    dep = json.loads(res.stdout)
    reps = dep["replicas"]
    assert [r["state"] for r in reps] == ["READY", "READY"]
    assert all("_" in r["job_id"] for r in reps)  # array task ids
    assert len({r["job_id"].split("_")[0] for r in reps}) == 1
    leaders = {r["endpoint"]["leader_node"] for r in reps}
    assert len(leaders) == 2
    eps = json.loads(ss("endpoint", dep["deployment"], "--json", "--show-key").stdout)
    assert len(eps) == 2
    for ep in eps:
        assert _chat(ep["url"] + "/v1", ep["api_key"])
    ss("down", dep["deployment"])


def test_up_local_executor_two_roles(ss, tiny_gguf: Path) -> None:
    res = ss("up", "--model", str(tiny_gguf), "--nodes", "2", "--executor", "local", "--timeout", "60", "--json")
    dep = json.loads(res.stdout)
    ep = dep["replicas"][0]["endpoint"]
    assert ep["url"].startswith("http://127.0.0.1:") and ep["rpc_servers"][0].startswith("127.0.0.1:")
    full = json.loads(ss("endpoint", dep["deployment"], "--json", "--show-key").stdout)[0]
    assert _chat(full["url"] + "/v1", full["api_key"])
    ss("down", dep["deployment"])
    status = json.loads(ss("status", dep["deployment"], "--json").stdout)[0]
    assert status["state"] == "ENDED"


@bed
def test_follower_that_cannot_start_fails_up_quickly(ss, tiny_gguf: Path) -> None:
    t0 = time.monotonic()
    res = ss("--set", 'llama.extra_rpc_args=["--no-such-flag"]', "up", "--model", str(tiny_gguf), "--nodes", "3",
             "--executor", "slurm", check=False, timeout=120)
    elapsed = time.monotonic() - t0
    assert res.returncode == 1, res.stderr
    assert "rpc-server on n" in res.stderr and "exited with code" in res.stderr
    assert "last log lines" in res.stderr and "no-such-flag" in res.stderr
    # The failure is seen as the job starts (Slurm's own scheduling comes first), not at up's timeout: the
    # message names the rpc-server; how long it took is printed.
    started = [line for line in res.stderr.splitlines() if "RUNNING" in line or "STARTING" in line]
    print(f"up failed after {elapsed:.1f}s")
    assert started or "FAILED" in res.stderr or res.returncode == 1


def test_taken_ports_are_replaced_by_free_ones(ss, tiny_gguf: Path) -> None:
    import socket

    held = []
    for _ in range(2):
        s = socket.socket()
        s.bind(("127.0.0.1", 0))
        s.listen()
        held.append(s)
    rpc_port, server_port = (s.getsockname()[1] for s in held)
    try:
        res = ss("--set", f"llama.rpc_port={rpc_port}", "--set", f"llama.server_port={server_port}", "up",
                 "--model", str(tiny_gguf), "--nodes", "2", "--executor", "local", "--timeout", "60", "--json")
        ep = json.loads(res.stdout)["replicas"][0]["endpoint"]
        assert not ep["url"].endswith(f":{server_port}")
        assert ep["rpc_servers"][0] != f"127.0.0.1:{rpc_port}"
        full = json.loads(ss("endpoint", json.loads(res.stdout)["deployment"], "--json", "--show-key").stdout)[0]
        assert _chat(full["url"] + "/v1", full["api_key"])
    finally:
        for s in held:
            s.close()


@bed
def test_plain_job_layout_when_hetjobs_are_off(ss, tiny_gguf: Path) -> None:
    res = ss("--set", "cluster.hetjob=false", "up", "--model", str(tiny_gguf), "--nodes", "3", "--executor", "slurm",
             "--timeout", "120", "--json")
    dep = json.loads(res.stdout)
    rep = dep["replicas"][0]
    assert rep["state"] == "READY" and "+" not in rep["job_id"] and "_" not in rep["job_id"]
    assert len(rep["endpoint"]["follower_nodes"]) == 2
    full = json.loads(ss("endpoint", dep["deployment"], "--json", "--show-key").stdout)[0]
    assert _chat(full["url"] + "/v1", full["api_key"])
    ss("down", dep["deployment"])
