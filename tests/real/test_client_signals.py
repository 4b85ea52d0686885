"""SIGTERM and SIGHUP to the client (a `timeout`, a dropped ssh session, an outer job's time limit) do what Ctrl-C
does: stop cleanly, cancel the Slurm job unless --keep, leave a valid results file and say how to resume.

The batch is long by construction (tests/longbatch.py): the signal comes once results are written, and the
resume runs on the prompts up to the last one answered, a short batch whatever the speed of the machine."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from longbatch import LONG, Output, keep_answered, long_fields, wait_until

pytestmark = [pytest.mark.slurm, pytest.mark.llama]


def ok_ids(path: Path) -> list[str]:
    lines = [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []
    return [r["custom_id"] for r in lines if r.get("response") and r["response"]["status_code"] == 200]


@pytest.mark.parametrize("sig", [signal.SIGTERM, signal.SIGHUP], ids=["SIGTERM", "SIGHUP"])
def test_term_and_hup_stop_like_ctrl_c_and_free_the_nodes(sig: signal.Signals, shared_tmp: Path,
                                                          tiny_gguf: Path) -> None:
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}
    prompts, out = shared_tmp / "p.jsonl", shared_tmp / "p.results.jsonl"
    ids = [f"p{i}" for i in range(LONG)]
    prompts.write_text("".join(json.dumps({"custom_id": i, "prompt": f"Story {i}:", **long_fields()}) + "\n"
                               for i in ids))
    args = [sys.executable, "-m", "speedslurm", "submit", "--model", str(tiny_gguf), "--nodes", "2", "--executor",
            "slurm", "--prompts", str(prompts), "--concurrency", "2"]
    proc = subprocess.Popen(args, env=env, stdin=subprocess.DEVNULL, stdout=subprocess.PIPE,
                            stderr=subprocess.PIPE, text=True)
    output = Output(proc)
    try:
        wait_until("8 results", lambda: len(ok_ids(out)) >= 8 or proc.poll() is not None)
        assert proc.poll() is None, output.stderr
        dep_id = next(p.name for p in (shared_tmp / "runs").iterdir())
        proc.send_signal(sig)
        output.wait()  # in-flight requests finish and the job is cancelled: not the rest of the batch
        err = output.stderr
    finally:
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    assert proc.returncode == 130, err
    flat = " ".join(err.split())
    assert "To resume, run the same command again" in flat, err
    assert f"Deployment {dep_id} stopped" in flat, err
    done = ok_ids(out)
    assert 8 <= len(done) < len(ids) and len(set(done)) == len(done)
    status = subprocess.run([sys.executable, "-m", "speedslurm", "status", dep_id, "--json"], env=env,
                            capture_output=True, text=True, timeout=60)
    state = json.loads(status.stdout)[0]
    assert state["state"] not in ("READY", "PENDING", "STARTING", "LOADING"), state
    jobs = [j.split("+")[0].split("_")[0] for j in state["job_ids"]]
    left = subprocess.run(["squeue", "-h", "-t", "PD,R", "-j", ",".join(jobs), "-o", "%i"], capture_output=True,
                          text=True).stdout.strip()
    assert not left, f"the job still holds its nodes after {sig.name}: {left}"
    kept = keep_answered(prompts, ids, done)  # the resume: the prompts up to the last one answered
    again = subprocess.run(args, env=env, capture_output=True, text=True, timeout=300, stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    done = ok_ids(out)
    assert sorted(done) == sorted(kept) and len(done) == len(set(done))
