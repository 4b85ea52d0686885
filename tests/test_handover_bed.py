"""Time-limit handover on the real test bed: a batch longer than its job's limit moves onto successor deployments,
each prompt gets exactly one result line, and no job ends by its time limit (each is drained and cancelled)."""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.llama]

N = 320  # x 128 tokens one at a time: about 100 s on the bed's tiny model, past two 2-minute generations' handovers


def test_submit_hands_over_before_the_time_limit(shared_tmp: Path, tiny_gguf: Path) -> None:
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}
    prompts = shared_tmp / "long.jsonl"
    with open(prompts, "w") as fh:
        for i in range(N):
            fh.write(json.dumps({"custom_id": f"q{i}", "prompt": f"Once upon a time {i}", "max_tokens": 128,
                                 "ignore_eos": True}) + "\n")
    # --time 2: Slurm's warning may stop the servers 60 s before the end, so a deployment serves for a minute;
    # it hands over 30 s before that.
    t0 = time.time()
    res = subprocess.run([sys.executable, "-m", "speedslurm", "submit", "--model", str(tiny_gguf), "--nodes", "1",
                          "--executor", "slurm", "--time", "2", "--handover-before", "30", "--concurrency", "1",
                          "--prompts", str(prompts), "--json"],
                         capture_output=True, text=True, env=env, timeout=600, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, res.stderr
    summary = json.loads(res.stdout)

    results = [json.loads(x) for x in (shared_tmp / "long.results.jsonl").read_text().splitlines()]
    ids = [r["custom_id"] for r in results]
    assert sorted(ids) == sorted(f"q{i}" for i in range(N)), "a prompt has no result line, or two"
    assert {r["response"]["status_code"] for r in results} == {200}
    assert summary["requests"]["ok"] == N and summary["failed_replicas"] == {}

    deps = summary["deployments"]
    print(f"\nhandover timeline (s after submit; {N} prompts, wall {summary['wall_s']:.0f} s):")
    for d in deps:
        steps = ", ".join(f"{k[:-3]} {d[k] - t0:6.1f}" for k in ("submitted_at", "ready_at", "drained_at",
                                                                     "cancelled_at") if d[k])
        print(f"  {d['id']} job {','.join(d['job_ids'])}: {d['served']} served; {steps}")
    assert len(deps) >= 2, summary  # it outlasted the first generation
    assert sum(d["served"] for d in deps) == N and all(d["served"] > 0 for d in deps)
    for old, new in zip(deps, deps[1:], strict=False):
        assert old["drained_at"] >= new["ready_at"] - 1, (old, new)  # drained once the successor served
    assert f"Deployment {deps[-1]['id']} stopped" in res.stderr

    assert subprocess.run(["squeue", "-h", "-t", "PD,R"], capture_output=True, text=True).stdout.strip() == ""
    jobs = [j for d in deps for j in d["job_ids"]]
    states: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # accounting may lag behind the controller a moment
        out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(jobs), "-o", "JobID,State"],
                             capture_output=True, text=True).stdout
        states = {line.split("|")[0]: line.split("|")[1] for line in out.splitlines() if "|" in line}
        if len(states) >= len(jobs) and not any(s in ("RUNNING", "PENDING", "COMPLETING") for s in states.values()):
            break
        time.sleep(2)
    print(f"  sacct: {states}")
    assert states and not any(s.startswith("TIMEOUT") for s in states.values()), states
    assert all(s.startswith("CANCELLED") for s in states.values()), states
