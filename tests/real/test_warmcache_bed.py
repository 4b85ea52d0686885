"""Warm-cache placement on the test bed: a second deployment's follower lands on the first one's follower node
when that node is idle, and takes another node at once when it is not."""

from __future__ import annotations

import json
import subprocess
import time
import typing as tp
from pathlib import Path

import pytest

pytestmark = [pytest.mark.llama, pytest.mark.slurm]


@pytest.fixture
def ss(speedslurm_cli: tp.Callable[..., tp.Any]) -> tp.Any:
    return speedslurm_cli(timeout=180)


def _node_state(node: str) -> str:
    return subprocess.run(["sinfo", "-h", "-N", "-n", node, "-o", "%t"], capture_output=True, text=True,
                          timeout=20).stdout.split()[0]


def _wait_state(node: str, want: tuple[str, ...], timeout: float = 60) -> str:
    deadline = time.monotonic() + timeout
    state = _node_state(node)
    while state not in want and time.monotonic() < deadline:
        time.sleep(0.5)
        state = _node_state(node)
    return state


def _up_down(ss, model: Path) -> tuple[dict, float]:
    """`up` (2 nodes), the follower component's NodeList in sacct, `down`; (replica, seconds to ready)."""
    t0 = time.monotonic()
    res = ss("up", "--model", str(model), "--nodes", "2", "--executor", "slurm", "--timeout", "150", "--json")
    ready_s = time.monotonic() - t0
    out = json.loads(res.stdout)
    rep = out["replicas"][0]
    ss("down", out["deployment"])
    job = rep["endpoint"]["job_id"].split("+")[0]
    deadline = time.monotonic() + 20      # slurmdbd may record the job a moment after it started
    rep["sacct_followers"] = ""
    while not rep["sacct_followers"] and time.monotonic() < deadline:
        rows = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job, "-o", "JobID,NodeList"], capture_output=True,
                              text=True, timeout=30).stdout.split()
        rep["sacct_followers"] = next((r.split("|")[1] for r in rows if r.split("|")[0] == f"{job}+1"), "")
        time.sleep(0 if rep["sacct_followers"] else 1)
    return rep, ready_s


def test_followers_go_back_to_their_warm_node_only_when_it_is_idle(ss, tiny_gguf: Path) -> None:
    first, _ = _up_down(ss, tiny_gguf)
    (warm,) = first["endpoint"]["follower_nodes"]
    assert _wait_state(warm, ("idle",)) == "idle"

    plan = json.loads(ss("plan", "--model", str(tiny_gguf), "--nodes", "2", "--executor", "slurm", "--json").stdout)
    assert list(plan["plan"]["warm_nodes"]) == [warm]
    assert f"#SBATCH --nodelist={warm}" in plan["job_script"].split("#SBATCH hetjob")[1]

    second, _ = _up_down(ss, tiny_gguf)
    assert second["endpoint"]["follower_nodes"] == [warm]
    assert second["sacct_followers"] == warm            # Slurm's own record of where the followers ran
    assert _wait_state(warm, ("idle",)) == "idle"

    # Another job holds the warm node: the deployment takes other nodes at once instead of waiting for it. The
    # blocker holds it until the test cancels it (or its 5-minute limit, past up's --timeout 150).
    blocker = subprocess.run(["sbatch", "--parsable", "-p", "gorgonas", "-w", warm, "-t", "5", "-J", "warm-blocker", "--exclusive",
                              "--wrap", "sleep 3600", "--output", "/dev/null"], capture_output=True, text=True, check=True,
                             timeout=30).stdout.strip().split(";")[0]
    try:
        assert _wait_state(warm, ("alloc",)) == "alloc"     # the whole node: nothing else fits beside it
        text = ss("plan", "--model", str(tiny_gguf), "--nodes", "2", "--executor", "slurm").stdout
        assert f"placement  any nodes: the warm node(s) are not idle: {warm} (" in text
        third, ready_s = _up_down(ss, tiny_gguf)
        assert warm not in third["endpoint"]["follower_nodes"] and third["endpoint"]["leader_node"] != warm
        print(f"ready in {ready_s:.1f}s beside the blocker")
        blocked = subprocess.run(["squeue", "-h", "-j", blocker, "-o", "%T"], capture_output=True, text=True,
                                 timeout=30).stdout.split()
        assert blocked == ["RUNNING"], blocked  # it was ready while the blocker held the node: it did not wait
    finally:
        subprocess.run(["scancel", blocker], check=False, timeout=30)
