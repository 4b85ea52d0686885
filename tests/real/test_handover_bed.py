"""Time-limit handover on the real test bed: a batch longer than its job's limit moves onto a successor deployment,
no prompt gets two result lines, and no job ends by its time limit (each is drained or stopped, and cancelled)."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import threading
import time
import typing as tp
from pathlib import Path

import pytest

pytestmark = [pytest.mark.slurm, pytest.mark.llama]

# The batch goes on until the test stops it (Ctrl-C) once the handover happened: 6.4 M tokens one at a time, far
# more than any machine answers in the few minutes a 2-minute job and its successor take, so it outlasts the
# first deployment by construction, not by the speed of the machine.
N = 50_000
GUARD_S = 540  # against a hang only: the handover comes about a minute after the first deployment is ready


def lines(path: Path) -> int:
    try:
        return path.read_bytes().count(b"\n")
    except FileNotFoundError:
        return 0


def tp_lines(stream: tp.IO[str] | None) -> tp.Iterator[str]:
    """The lines of a child's output as it writes them."""
    assert stream is not None
    yield from iter(stream.readline, "")


def test_submit_hands_over_before_the_time_limit(shared_tmp: Path, tiny_gguf: Path) -> None:
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}
    prompts = shared_tmp / "long.jsonl"
    out = shared_tmp / "long.results.jsonl"
    with open(prompts, "w") as fh:
        for i in range(N):
            fh.write(json.dumps({"custom_id": f"q{i}", "prompt": f"Once upon a time {i}", "max_tokens": 128,
                                 "ignore_eos": True}) + "\n")
    # --time 2: Slurm's warning may stop the servers 60 s before the end, so a deployment serves for a minute;
    # it hands over 30 s before that.
    t0 = time.time()
    proc = subprocess.Popen([sys.executable, "-m", "speedslurm", "submit", "--model", str(tiny_gguf), "--nodes", "1",
                             "--executor", "slurm", "--time", "2", "--handover-before", "30", "--concurrency", "1",
                             "--prompts", str(prompts), "--json"],
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env,
                            stdin=subprocess.DEVNULL)
    err_lines: list[str] = []
    reader = threading.Thread(target=lambda: err_lines.extend(tp_lines(proc.stderr)), daemon=True)
    reader.start()
    out_lines: list[str] = []
    out_reader = threading.Thread(target=lambda: out_lines.extend(tp_lines(proc.stdout)), daemon=True)
    out_reader.start()
    try:
        # The event under test: the first deployment drained and was cancelled, and its successor answered after.
        end = time.monotonic() + GUARD_S
        written_at_drain: int | None = None
        while time.monotonic() < end and proc.poll() is None:
            if written_at_drain is None and any("drained and cancelled" in x for x in list(err_lines)):
                written_at_drain = lines(out)
            if written_at_drain is not None and lines(out) > written_at_drain:
                break
            time.sleep(0.5)
        assert proc.poll() is None, "".join(err_lines)  # the batch was still going: it did not end before that
        assert written_at_drain is not None and lines(out) > written_at_drain, "".join(err_lines)
        proc.send_signal(signal.SIGINT)  # stop it as a user would: in-flight requests finish, the jobs are cancelled
        # the threads own the pipes: communicate() would read stderr too and take its last lines from the test
        proc.wait(timeout=300)
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    reader.join(timeout=60)
    out_reader.join(timeout=60)
    stdout = "".join(out_lines)
    stderr = "".join(err_lines)
    assert proc.returncode == 130, stderr
    summary = json.loads(stdout)

    results = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["custom_id"] for r in results]
    assert len(ids) == len(set(ids)), "a prompt has two result lines"
    assert {r["response"]["status_code"] for r in results} == {200}
    assert summary["status"] == "interrupted" and summary["failed_replicas"] == {}
    assert summary["requests"]["ok"] == len(ids) and summary["requests"]["remaining"] == N - len(ids)

    deps = summary["deployments"]
    print(f"\nhandover timeline (s after submit; {len(ids)} of {N} prompts, wall {summary['wall_s']:.0f} s):")
    for d in deps:
        steps = ", ".join(f"{k[:-3]} {d[k] - t0:6.1f}" for k in ("submitted_at", "ready_at", "drained_at",
                                                                     "cancelled_at") if d[k])
        print(f"  {d['id']} job {','.join(d['job_ids'])}: {d['served']} served; {steps}")
    assert len(deps) >= 2, summary  # it outlasted the first generation
    assert sum(d["served"] for d in deps) == len(ids) and deps[0]["served"] > 0 and deps[1]["served"] > 0
    assert deps[0]["drained_at"] is not None and deps[0]["cancelled_at"] is not None, deps
    for old, new in zip(deps, deps[1:], strict=False):
        if old["drained_at"] is not None:
            assert new["ready_at"] is not None and old["drained_at"] >= new["ready_at"] - 1, (old, new)
    assert f"Deployment {deps[-1]['id']} stopped" in stderr

    assert subprocess.run(["squeue", "-h", "-t", "PD,R"], capture_output=True, text=True).stdout.strip() == ""
    jobs = [j for d in deps for j in d["job_ids"]]
    states: dict[str, str] = {}
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:  # accounting may lag behind the controller a moment
        acct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ",".join(jobs), "-o", "JobID,State"],
                              capture_output=True, text=True).stdout
        states = {line.split("|")[0]: line.split("|")[1] for line in acct.splitlines() if "|" in line}
        if len(states) >= len(jobs) and not any(s in ("RUNNING", "PENDING", "COMPLETING") for s in states.values()):
            break
        time.sleep(2)
    print(f"  sacct: {states}")
    assert states and not any(s.startswith("TIMEOUT") for s in states.values()), states
    assert all(s.startswith("CANCELLED") for s in states.values()), states
