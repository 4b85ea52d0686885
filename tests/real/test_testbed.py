"""Smoke tests that prove the test bed: real Slurm, real llama.cpp, no mocks.

1. A heterogeneous job (1 node + 2 nodes, one GPU each) submitted with plain ``sbatch`` runs one task per node,
   each in its own network namespace with its own address, and ``sacct`` records it COMPLETED.
2. rpc-servers on n2 and n3 and llama-server on n1 (``--rpc`` to both, tiny model, API key) answer a chat
   completion through the ``openai`` client, with the model's layers spread over both rpc-servers.
"""

from __future__ import annotations

import json
import re
import secrets
import shlex
import subprocess
import sys
import time
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

import pytest

# Run on every node by the hetjob: writes what a task sees to probe-<rank>.json beside itself (one file per
# task, since srun may interleave the tasks' output).
PROBE = r'''
import json, os, subprocess, sys
out = subprocess.run(["ip", "-4", "-o", "addr", "show", "scope", "global"], capture_output=True, text=True).stdout
addrs = [f.split("/")[0] for line in out.splitlines() for f in line.split()[3:4]]
env = {k: v for k, v in sorted(os.environ.items()) if k.startswith("SLURM")}
path = os.path.join(os.path.dirname(os.path.abspath(sys.argv[0])), f"probe-{os.environ['SLURM_PROCID']}.json")
with open(path, "w") as fh:
    json.dump({"addresses": addrs, "env": env}, fh)
'''


def _sbatch(script: Path) -> str:
    res = subprocess.run(["sbatch", "--parsable", str(script)], capture_output=True, text=True, timeout=60)
    assert res.returncode == 0, f"sbatch failed ({res.returncode}): {res.stderr}"
    match = re.match(r"(?P<job_id>\d+)", res.stdout.strip())
    assert match, f"no job id in sbatch output {res.stdout!r}"
    return match.group("job_id")


def _sacct_states(job_id: str) -> dict[str, str]:
    res = subprocess.run(["sacct", "-n", "-P", "-X", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                         text=True, timeout=30)
    return dict(line.split("|", 1) for line in res.stdout.split() if "|" in line)


def _wait_sacct(job_id: str, want: tp.Callable[[dict[str, str]], bool], timeout: float = 60) -> dict[str, str]:
    # The controller sends job records to slurmdbd asynchronously: allow it a few seconds.
    deadline = time.monotonic() + timeout
    states: dict[str, str] = {}
    while time.monotonic() < deadline:
        states = _sacct_states(job_id)
        if states and want(states):
            return states
        time.sleep(1)
    return states


_ACTIVE = {"PENDING", "CONFIGURING", "RUNNING", "COMPLETING", "SUSPENDED", "REQUEUED", "RESIZING", "SIGNALING",
           "STAGE_OUT"}


def _job_state(job_id: str) -> str:
    """The job's state while the controller holds it, "GONE" after."""
    res = subprocess.run(["squeue", "-h", "-j", job_id, "-o", "%T"], capture_output=True, text=True, timeout=20)
    return res.stdout.split()[0] if res.stdout.split() else "GONE"


def _wait_gone(job_id: str, timeout: float) -> bool:
    # Polled here: `sbatch --wait` checks with a growing interval and returns up to 30 s late.
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if _job_state(job_id) not in _ACTIVE:
            return True
        time.sleep(0.25)
    return False


@pytest.mark.slurm
def test_hetjob_runs_one_task_per_node_each_with_its_own_address(testbed, shared_tmp: Path) -> None:
    probe = shared_tmp / "probe.py"
    probe.write_text(PROBE)
    out = shared_tmp / "hetjob.out"
    script = shared_tmp / "hetjob.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=smoke-hetjob
#SBATCH --partition={testbed.partition}
#SBATCH --output={out}
#SBATCH --time=5
#SBATCH --nodes=1 --ntasks-per-node=1 --gres=gpu:1
#SBATCH hetjob
#SBATCH --nodes=2 --ntasks-per-node=1 --gres=gpu:1
srun --het-group=0,1 {shlex.quote(sys.executable)} {shlex.quote(str(probe))}
""")
    job_id = _sbatch(script)
    assert _wait_gone(job_id, timeout=120), f"job {job_id} still queued after 120 s"
    files = sorted(shared_tmp.glob("probe-*.json"))
    assert len(files) == 3, f"expected 3 probe files, got {files}; job output:\n{out.read_text()}"
    tasks = [json.loads(f.read_text()) for f in files]
    by_rank = {int(t["env"]["SLURM_PROCID"]): t for t in tasks}
    assert sorted(by_rank) == [0, 1, 2]

    nodes = {rank: t["env"]["SLURMD_NODENAME"] for rank, t in by_rank.items()}
    # Idle bed: the leader gets the first node, the two followers the next two.
    assert nodes[0] == "n1"
    assert {nodes[1], nodes[2]} == {"n2", "n3"}
    for rank, task in by_rank.items():
        # Each task runs in its node's namespace and sees that node's address, and only that one.
        assert task["addresses"] == [testbed.nodes[nodes[rank]]], (rank, task["addresses"])
        env = task["env"]
        assert env["SLURM_HET_SIZE"] == "2"
        assert env["SLURM_JOB_ID_HET_GROUP_0"] == job_id
        assert env["SLURM_JOB_NODELIST_HET_GROUP_0"] == "n1"
        assert env["SLURM_JOB_NODELIST_HET_GROUP_1"] == "n[2-3]"
    assert by_rank[0]["env"]["SLURM_JOB_ID"] == job_id

    states = _wait_sacct(job_id, lambda s: all(v == "COMPLETED" for v in s.values()) and len(s) == 2)
    assert states == {f"{job_id}+0": "COMPLETED", f"{job_id}+1": "COMPLETED"}, states


def _get(url: str, headers: dict[str, str] | None = None, timeout: float = 5) -> tuple[int, str]:
    # No proxies: the bed's addresses are local.
    opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
    req = urllib.request.Request(url, headers=headers or {})
    try:
        with opener.open(req, timeout=timeout) as resp:
            return resp.status, resp.read().decode(errors="replace")
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read().decode(errors="replace")
    except OSError as exc:
        return 0, str(exc)


@pytest.mark.slurm
@pytest.mark.llama
def test_llama_server_splits_a_model_over_two_rpc_servers(testbed, llama_bins, tiny_gguf: Path, shared_tmp: Path,
                                                          monkeypatch: pytest.MonkeyPatch) -> None:
    import openai

    for var in ("http_proxy", "https_proxy", "all_proxy", "HTTP_PROXY", "HTTPS_PROXY", "ALL_PROXY"):
        monkeypatch.delenv(var, raising=False)  # the bed's addresses are local

    leader, followers = "n1", ["n2", "n3"]
    rpc_port, http_port = 50052, 8080
    api_key = secrets.token_hex(16)
    rpc_list = ",".join(f"{testbed.nodes[n]}:{rpc_port}" for n in followers)
    q = shlex.quote
    # Each rpc-server binds to the address of the node it runs on, read inside its own namespace, and logs to
    # rpc-<node>.log (srun's %N would name the machine, which all namespaces share).
    rpc_cmd = (f'exec >{q(str(shared_tmp))}/rpc-"$SLURMD_NODENAME".log 2>&1; '
               f'addr=$(ip -4 -o addr show scope global | awk \'{{split($4, a, "/"); print a[1]; exit}}\'); '
               f'exec {q(str(llama_bins.rpc_server))} --host "$addr" --port {rpc_port}')
    wait_rpc = " ".join(
        f'until (exec 3<>/dev/tcp/{testbed.nodes[n]}/{rpc_port}) 2>/dev/null; do sleep 0.2; done;'
        for n in followers)
    script = shared_tmp / "llama-rpc.sbatch"
    script.write_text(f"""#!/bin/bash
#SBATCH --job-name=smoke-llama-rpc
#SBATCH --partition={testbed.partition}
#SBATCH --output={shared_tmp}/batch.log
#SBATCH --time=10
#SBATCH --nodes=1 --ntasks-per-node=1 --gres=gpu:1 --nodelist={leader}
#SBATCH hetjob
#SBATCH --nodes=2 --ntasks-per-node=1 --gres=gpu:1 --nodelist={",".join(followers)}
srun --het-group=1 bash -c {q(rpc_cmd)} &
timeout 60 bash -c {q(wait_rpc)} || {{ echo "rpc-servers did not open port {rpc_port}"; exit 1; }}
srun --het-group=0 --output={shared_tmp}/llama-server.log {q(str(llama_bins.llama_server))} \\
    -m {q(str(tiny_gguf))} --rpc {rpc_list} -ngl 99 -c 1024 -t 1 -lv 4 \\
    --host {testbed.nodes[leader]} --port {http_port} --api-key {api_key} &
wait
""")
    job_id = _sbatch(script)
    base = f"http://{testbed.nodes[leader]}:{http_port}"

    def logs() -> str:
        return "\n".join(f"--- {p.name} ---\n{p.read_text(errors='replace')[-3000:]}"
                         for p in sorted(shared_tmp.glob("*.log")))

    deadline = time.monotonic() + 120
    status = 0
    while time.monotonic() < deadline:
        status, _ = _get(f"{base}/health")
        if status == 200:
            break
        state = _job_state(job_id)
        assert state in ("PENDING", "CONFIGURING", "RUNNING"), f"job {job_id} is {state}\n{logs()}"
        time.sleep(0.5)
    assert status == 200, f"/health never answered 200 (last {status})\n{logs()}"

    assert _get(f"{base}/v1/models")[0] == 401, "the API key is not enforced"
    client = openai.OpenAI(base_url=f"{base}/v1", api_key=api_key, max_retries=0, timeout=60)
    reply = client.chat.completions.create(model="tiny", max_tokens=8,
                                           messages=[{"role": "user", "content": "Say something."}])
    assert reply.usage is not None and reply.usage.completion_tokens > 0, reply
    assert reply.choices[0].message.content, reply

    server_log = (shared_tmp / "llama-server.log").read_text(errors="replace")
    for node in followers:
        # llama-server reports (at log verbosity 4) a model buffer on each RPC device it placed layers on.
        sizes = re.findall(rf"RPC\d*\[{re.escape(testbed.nodes[node])}:{rpc_port}\][^\n]*?model buffer size\s*=\s*"
                           r"([\d.]+) MiB", server_log)
        assert sizes and float(sizes[0]) > 0, f"no model buffer on the rpc-server of {node}\n{logs()}"
        rpc_log = (shared_tmp / f"rpc-{node}.log").read_text(errors="replace")
        assert re.search(r"accepted client connection", rpc_log, re.I), f"{node} got no client\n{logs()}"

    subprocess.run(["scancel", job_id], check=True, timeout=30)
    states = _wait_sacct(job_id, lambda s: all(v.startswith("CANCELLED") for v in s.values()))
    assert states and all(v.startswith("CANCELLED") for v in states.values()), states
