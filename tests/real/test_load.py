"""Load: 10,000 prompts at concurrency 64 through `submit --replicas 2` on the test bed: every prompt exactly once.

The figures (wall time, completion tok/s, requests/s) are printed and recorded in docs/reliability.md.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.llama, pytest.mark.slow]

N = 10_000


def test_ten_thousand_prompts_exactly_once(shared_tmp: Path, tiny_gguf: Path) -> None:
    prompts = shared_tmp / "load.jsonl"
    with open(prompts, "w") as fh:
        for i in range(N):
            fh.write(json.dumps({"custom_id": f"load-{i}", "messages": [{"role": "user", "content": f"Item {i}:"}],
                                 "max_tokens": 4}) + "\n")
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}
    t0 = time.monotonic()
    # 32 slots per replica x 2 replicas = the 64 requests in flight.
    res = subprocess.run([sys.executable, "-m", "speedslurm", "--set", "llama.parallel=32", "--set",
                          "llama.rpc_cache=false", "submit", "--model", str(tiny_gguf), "--nodes", "1",
                          "--replicas", "2", "--executor", "slurm", "--prompts", str(prompts), "--concurrency", "64",
                          "--json"], capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    total_s = time.monotonic() - t0
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)
    ids = []
    with open(shared_tmp / "load.results.jsonl", "rb") as fh:
        for raw in fh:
            rec = json.loads(raw)
            assert rec["response"]["status_code"] == 200, rec
            ids.append(rec["custom_id"])
    assert len(ids) == N
    assert len(set(ids)) == N, f"{N - len(set(ids))} duplicates"
    assert set(ids) == {f"load-{i}" for i in range(N)}
    assert summary["requests"]["ok"] == N and summary["tokens"]["completion"] > 0
    assert all(summary["replicas"].get(r) for r in ("0", "1")), summary["replicas"]
    print(f"\nload: {N} prompts, wall {summary['wall_s']:.1f} s batch / {total_s:.1f} s with deployment, "
          f"{summary['completion_tok_s']:.0f} completion tok/s, {summary['requests_s']:.0f} requests/s, "
          f"p50 {summary['latency_s']['p50']} s, p95 {summary['latency_s']['p95']} s, replicas {summary['replicas']}")
