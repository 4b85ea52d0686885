"""`speedslurm top` and node-hours on the real test bed: a 2-node deployment of the tiny model with a batch
running against it; `top --json` shows its slots busy and the batch's progress, `top` on a terminal refreshes in
place, and once it is down `status --json` carries the node-hours Slurm's accounting gives."""

from __future__ import annotations

import json
import os
import re
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
from terminal import on_a_terminal

pytestmark = [pytest.mark.slurm, pytest.mark.llama]

# The batch runs until the test stops it (Ctrl-C) once top has shown it: far more than any machine answers in the
# minute or so the test looks (9.6 M tokens), so it is running whenever top looks, however fast the servers are.
N = 100_000


def speedslurm(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def test_top_shows_a_running_batch_and_status_the_node_hours(shared_tmp: Path, tiny_gguf: Path) -> None:
    env = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}
    up = speedslurm(env, "up", "--model", str(tiny_gguf), "--nodes", "2", "--time", "00:10:00", "--json")
    assert up.returncode == 0, up.stderr
    dep = json.loads(up.stdout)["deployment"]
    prompts = shared_tmp / "prompts.jsonl"
    prompts.write_text("".join(json.dumps({"prompt": f"Once upon a time {i}", "max_tokens": 96}) + "\n"
                               for i in range(N)))
    batch = subprocess.Popen([sys.executable, "-m", "speedslurm", "run", "--deployment", dep, "--prompts",
                              str(prompts), "--out", str(shared_tmp / "out.jsonl"), "--json"],
                             stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, env=env)
    try:
        snap: dict = {}
        deadline = time.monotonic() + 300  # a guard against a hang only
        while time.monotonic() < deadline:  # until the batch has published progress and requests are in flight
            res = speedslurm(env, "top", "--json")  # no id: the only running deployment
            assert res.returncode == 0, res.stderr
            snap = json.loads(res.stdout)
            m = snap["replicas"][0]["metrics"]
            if snap["batches"] and snap["batches"][0]["done"] > 0 and m and m["slots_busy"]:
                break
            time.sleep(1)
        assert snap["deployment"] == dep and snap["state"] == "READY"
        m = snap["replicas"][0]["metrics"]
        assert m["error"] == "" and m["slots_busy"] > 0 and m["slots_total"] >= m["slots_busy"]
        assert m["requests_waiting"] is not None and m["generation_tok_s"] is not None
        assert 0 < m["kv_cache_used"] <= 1
        (b,) = snap["batches"]
        assert b["status"] == "running" and b["total"] == N and 0 < b["done"] < N
        assert snap["node_hours"] > 0 and snap["node_hours_source"] == "slurm (running)"

        # A terminal that moves the cursor (TERM named: the runner's own may be a dumb one, where top prints one
        # view after another instead; tests/unit/test_live.py covers both).
        code, screen = on_a_terminal([sys.executable, "-m", "speedslurm", "top", dep, "--count", "3",
                                      "--interval", "1"], {**env, "TERM": "xterm-256color"})
        print("top's last view:\n" + re.sub(r"\x1b\[[0-9;?]*[A-Za-z]", "", screen).split("deployment ")[-1])
        assert code == 0, screen
        assert screen.count("REPLICA") >= 3, screen  # three views, redrawn in place
        assert "\x1b[" in screen and re.search(r"\x1b\[\d*A", screen), "top did not redraw in place"
        assert re.search(rf"batches:\s*\n\s+\d+/{N} done", screen), screen
        assert re.search(r"^0\s+READY\s+\S+\s+[1-9]\d*/\d+", screen, re.M), screen

        batch.send_signal(signal.SIGINT)  # the batch has been seen: stop it as a user would
        out, err = batch.communicate(timeout=600)
        assert batch.returncode == 130, err
        summary = json.loads(out)
        results = [json.loads(x) for x in (shared_tmp / "out.jsonl").read_text().splitlines()]
        ids = [r["custom_id"] for r in results]
        assert summary["status"] == "interrupted" and len(ids) == len(set(ids)) == summary["requests"]["ok"] > 0
        assert summary["node_hours"] > 0 and summary["node_hours_source"] == "slurm (running)"
        # the batch ran on 2 nodes for its wall time: its node-hours are that, within the second that Slurm's
        # TimeUsed is rounded to and the moment it was asked (a few seconds of 2 nodes, whatever the wall time)
        assert summary["node_hours"] == pytest.approx(2 * summary["wall_s"] / 3600, abs=2 * 3 / 3600)
    finally:
        if batch.poll() is None:
            batch.kill()
        speedslurm(env, "down", dep)

    ended: dict = {}
    for _ in range(30):  # until accounting has the cancelled job's record
        res = speedslurm(env, "status", dep, "--json")
        assert res.returncode == 0, res.stderr
        (ended,) = json.loads(res.stdout)
        if ended["node_hours_source"] == "slurm accounting":
            break
        time.sleep(2)
    assert ended["state"] == "ENDED" and ended["node_hours_source"] == "slurm accounting"
    sacct = subprocess.run(["sacct", "-n", "-X", "-P", "-j", ended["job_ids"][0].split("_")[0], "-o",
                            "ElapsedRaw,NNodes"], capture_output=True, text=True, check=True).stdout
    expected = sum(int(e) * int(n) for e, n in (line.split("|") for line in sacct.split())) / 3600
    assert ended["node_hours"] == pytest.approx(expected, abs=1e-3) and ended["node_hours"] > 0
    assert ended["replicas"][0]["node_hours"] == pytest.approx(expected, abs=1e-3)
    assert ended["gpu_hours"] is None  # the bed counts no GPUs
    print(f"batch: {summary['wall_s']} s, {summary['node_hours']} node-hours ({summary['node_hours_source']}); "
          f"deployment: {ended['node_hours']} node-hours ({ended['node_hours_source']}), sacct {sacct.split()}")
