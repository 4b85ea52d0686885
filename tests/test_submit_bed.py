"""`speedslurm submit` on the real test bed: replicas, exactly-once results, a replica dying mid-batch."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.llama]


def write_mixed_prompts(path: Path, n: int, max_tokens: int) -> list[str]:
    """n prompts in the three accepted formats; returns their custom_ids."""
    ids = []
    with open(path, "w") as fh:
        for i in range(n):
            kind = i % 3
            if kind == 0:
                cid = f"req-{i}"
                line = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "m", "messages": [{"role": "user", "content": f"Tell me about {i}"}],
                                 "max_tokens": max_tokens}}
            elif kind == 1:
                cid = f"chat-{i}"
                line = {"custom_id": cid, "messages": [{"role": "user", "content": f"Number {i}?"}],
                        "max_tokens": max_tokens}
            else:
                cid = f"line-{i + 1}"  # no custom_id: the line number names it
                line = {"prompt": f"Once upon a time {i}", "max_tokens": max_tokens}
            fh.write(json.dumps(line) + "\n")
            ids.append(cid)
    return ids


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def active_jobs() -> str:
    """Jobs still pending or running (cancelled ones may linger a moment as COMPLETING)."""
    return subprocess.run(["squeue", "-h", "-t", "PD,R"], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def env(shared_tmp: Path) -> dict[str, str]:
    return {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}


def speedslurm(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_submit_200_mixed_prompts_over_two_replicas(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    prompts = shared_tmp / "prompts.jsonl"
    ids = write_mixed_prompts(prompts, 200, max_tokens=24)
    res = speedslurm(env, "submit", "--model", str(tiny_gguf), "--nodes", "2", "--replicas", "2",
                     "--executor", "slurm", "--prompts", str(prompts), "--json")
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    results = read_results(shared_tmp / "prompts.results.jsonl")
    assert len(results) == 200
    assert sorted(r["custom_id"] for r in results) == sorted(ids)
    assert {r["response"]["status_code"] for r in results} == {200}
    assert summary["requests"]["ok"] == 200
    served = {k: v for k, v in summary["replicas"].items() if v}
    assert len(served) == 2, summary["replicas"]  # both replicas served requests
    assert "stopped" in res.stderr
    assert active_jobs() == ""


def test_sigint_then_resume_is_exactly_once(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    prompts = shared_tmp / "p.jsonl"
    ids = write_mixed_prompts(prompts, 120, max_tokens=48)
    out = shared_tmp / "p.results.jsonl"
    args = [sys.executable, "-m", "speedslurm", "submit", "--model", str(tiny_gguf), "--nodes", "2",
            "--executor", "slurm", "--prompts", str(prompts), "--concurrency", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        if out.exists() and len(out.read_text().splitlines()) >= 20:
            break
        time.sleep(0.2)
    proc.send_signal(signal.SIGINT)
    _stdout, stderr = proc.communicate(timeout=60)
    assert proc.returncode == 130, stderr
    assert "resume" in stderr.lower() and "speedslurm submit" in stderr
    first = read_results(out)
    assert 20 <= len(first) < 120
    assert active_jobs() == ""  # cancelled

    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    results = read_results(out)
    ok = [r["custom_id"] for r in results if r["response"] and r["response"]["status_code"] == 200]
    assert sorted(ok) == sorted(ids)  # complete, and no custom_id has two successful lines


def test_replica_rpc_server_killed_mid_batch(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    prompts = shared_tmp / "k.jsonl"
    ids = write_mixed_prompts(prompts, 150, max_tokens=48)
    out = shared_tmp / "k.results.jsonl"
    runs = shared_tmp / "runs"
    proc = subprocess.Popen([sys.executable, "-m", "speedslurm", "submit", "--model", str(tiny_gguf), "--nodes", "2",
                             "--replicas", "2", "--executor", "slurm", "--prompts", str(prompts), "--json"],
                            env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    # wait until both replicas are ready and results flow, then kill replica 1's rpc-server
    deadline = time.monotonic() + 120
    follower = None
    while time.monotonic() < deadline:
        eps = list(runs.glob("*/r1/endpoint.json"))
        if eps and out.exists() and len(out.read_text().splitlines()) >= 10:
            follower = json.loads((eps[0].parent / "follower-1.json").read_text())
            break
        time.sleep(0.2)
    assert follower, "replica 1 never became ready"
    os.kill(follower["pid"], signal.SIGKILL)
    stdout, stderr = proc.communicate(timeout=300)
    assert proc.returncode == 0, stderr
    summary = json.loads(stdout)
    results = read_results(out)
    ok = [r["custom_id"] for r in results if r["response"] and r["response"]["status_code"] == 200]
    assert sorted(ok) == sorted(ids) and len(ok) == 150
    # the report says which replica failed, and why
    assert list(summary["failed_replicas"]) in (["1"], ["r1"]), summary["failed_replicas"]
    assert "rpc-server" in json.dumps(summary["failed_replicas"]) or "exited" in json.dumps(summary["failed_replicas"])
