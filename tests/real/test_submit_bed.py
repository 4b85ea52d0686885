"""`speedslurm submit` on the real test bed: replicas, exactly-once results, a replica dying mid-batch.

The batches that a signal or a fault must interrupt are long by construction (tests/longbatch.py): the test waits
for results (and for the fault to be named), stops the batch with Ctrl-C, and resumes it on the prompts up to the
last one answered, a short batch whatever the speed of the machine.
"""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
from cliproc import speedslurm_proc as speedslurm
from longbatch import LONG, Output, count_lines, keep_answered, long_fields, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.llama]


def write_mixed_prompts(path: Path, n: int, max_tokens: int) -> list[str]:
    """n prompts in the three accepted formats; returns their custom_ids."""
    return _write_mixed(path, n, {"max_tokens": max_tokens})


def write_long_mixed_prompts(path: Path) -> list[str]:
    """A batch in the three formats that no machine finishes while a test runs; returns the custom_ids."""
    return _write_mixed(path, LONG, long_fields())


def _write_mixed(path: Path, n: int, fields: dict[str, tp.Any]) -> list[str]:
    ids = []
    with open(path, "w") as fh:
        for i in range(n):
            kind = i % 3
            if kind == 0:
                cid = f"req-{i}"
                line = {"custom_id": cid, "method": "POST", "url": "/v1/chat/completions",
                        "body": {"model": "m", "messages": [{"role": "user", "content": f"Tell me about {i}"}],
                                 **fields}}
            elif kind == 1:
                cid = f"chat-{i}"
                line = {"custom_id": cid, "messages": [{"role": "user", "content": f"Number {i}?"}], **fields}
            else:
                cid = f"line-{i + 1}"  # no custom_id: the line number names it
                line = {"prompt": f"Once upon a time {i}", **fields}
            fh.write(json.dumps(line) + "\n")
            ids.append(cid)
    return ids


def read_results(path: Path) -> list[dict]:
    return [json.loads(line) for line in path.read_text().splitlines()]


def ok_ids(path: Path) -> list[str]:
    """The successful custom_ids of a results file, none of them twice."""
    ok = [r["custom_id"] for r in read_results(path) if r["response"] and r["response"]["status_code"] == 200]
    assert len(ok) == len(set(ok)), "a custom_id has two successful lines"
    return ok


def active_jobs() -> str:
    """Jobs still pending or running (cancelled ones may linger a moment as COMPLETING)."""
    return subprocess.run(["squeue", "-h", "-t", "PD,R"], capture_output=True, text=True).stdout.strip()


@pytest.fixture
def env(shared_tmp: Path) -> dict[str, str]:
    return {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}


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
    ids = write_long_mixed_prompts(prompts)
    out = shared_tmp / "p.results.jsonl"
    args = [sys.executable, "-m", "speedslurm", "submit", "--model", str(tiny_gguf), "--nodes", "2",
            "--executor", "slurm", "--prompts", str(prompts), "--concurrency", "2"]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = Output(proc)
    try:
        wait_until("20 results", lambda: count_lines(out) >= 20 or proc.poll() is not None)
        assert proc.poll() is None, output.stderr
        proc.send_signal(signal.SIGINT)
        output.wait()
        stderr = output.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, stderr
    assert "resume" in stderr.lower() and "speedslurm submit" in stderr
    first = ok_ids(out)
    assert 20 <= len(first) < len(ids)
    assert active_jobs() == ""  # cancelled

    kept = keep_answered(prompts, ids, first)  # the resume: the prompts up to the last one answered
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    ok = ok_ids(out)
    assert sorted(ok) == sorted(kept)  # complete, and no custom_id has two successful lines


def test_replica_rpc_server_killed_mid_batch(env, shared_tmp: Path, tiny_gguf: Path) -> None:
    """Without --json, so that the replica's failure is named on stderr as it happens (the test waits for that);
    the summary names it too."""
    prompts = shared_tmp / "k.jsonl"
    ids = write_long_mixed_prompts(prompts)
    out = shared_tmp / "k.results.jsonl"
    runs = shared_tmp / "runs"
    args = [sys.executable, "-m", "speedslurm", "submit", "--model", str(tiny_gguf), "--nodes", "2",
            "--replicas", "2", "--executor", "slurm", "--prompts", str(prompts)]
    proc = subprocess.Popen(args, env=env, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    output = Output(proc)
    try:
        # once both replicas are ready and results flow, kill replica 1's rpc-server
        def r1_serving() -> Path | None:
            assert proc.poll() is None, output.stderr
            eps = list(runs.glob("*/r1/endpoint.json"))
            return eps[0].parent if eps and count_lines(out) >= 10 else None

        r1 = wait_until("replica 1 ready and results flowing", r1_serving)
        follower = json.loads((r1 / "follower-1.json").read_text())
        os.kill(follower["pid"], signal.SIGKILL)
        output.wait_said("replica r1 failed")
        at_report = count_lines(out)  # the batch goes on on replica 0
        wait_until("results after the failure", lambda: count_lines(out) >= at_report + 10 or proc.poll() is not None)
        assert proc.poll() is None, output.stderr
        proc.send_signal(signal.SIGINT)
        rc = output.wait()
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert rc == 130, output.stderr
    first = ok_ids(out)
    assert 10 <= len(first) < len(ids), (read_results(out)[:3], output.stderr)
    # the summary says which replica failed, and why
    summary = " ".join(output.stderr.split()).split("Batch interrupted")[-1]
    assert f"{len(first)} ok" in summary, output.stderr
    failed = re.findall(r"replica (r\d+) failed: (.*?) (?:replica r\d+ |errors |results |deployment )", summary)
    assert [r for r, _ in failed] == ["r1"], output.stderr
    assert "rpc-server" in failed[0][1] or "exited" in failed[0][1], output.stderr
    assert "To resume, run the same command again" in summary, output.stderr

    kept = keep_answered(prompts, ids, first)  # the resume: the prompts up to the last one answered
    res = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300)
    assert res.returncode == 0, res.stderr
    assert sorted(ok_ids(out)) == sorted(kept)  # complete, and no custom_id has two successful lines
