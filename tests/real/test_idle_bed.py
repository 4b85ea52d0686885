"""Idle release on the real test bed: a deployment nobody uses ends itself after ``--idle-timeout`` and frees its
nodes (status says idle, Slurm's accounting says the job completed, no server is left); one that keeps getting
requests is not ended while they come, and ends once they stop."""

from __future__ import annotations

import json
import subprocess
import time
import typing as tp
from pathlib import Path

import openai
import pytest

pytestmark = [pytest.mark.llama, pytest.mark.slurm]


@pytest.fixture
def ss(speedslurm_cli: tp.Callable[..., tp.Any]) -> tp.Any:
    return speedslurm_cli(timeout=120)


def _status(ss: tp.Callable[..., subprocess.CompletedProcess[str]], dep: str) -> dict[str, tp.Any]:
    data = json.loads(ss("status", dep, "--json").stdout)
    return data[0] if isinstance(data, list) else data


def _sacct_state(job_id: str) -> str:
    out = subprocess.run(["sacct", "-n", "-X", "-P", "-j", job_id, "-o", "JobID,State"], capture_output=True,
                         text=True, timeout=30).stdout
    return " ".join(line.split("|")[1] for line in out.splitlines() if line.strip())


def _servers(run_dir: str) -> list[str]:
    out = subprocess.run(["pgrep", "-af", "rpc-server|llama-server"], capture_output=True, text=True).stdout
    return [line for line in out.splitlines() if "pgrep" not in line and run_dir in line]


def _up(ss: tp.Callable[..., subprocess.CompletedProcess[str]], model: Path, idle: str) -> tuple[str, float]:
    res = ss("up", "--model", str(model), "--nodes", "2", "--executor", "slurm", "--timeout", "120",
             "--idle-timeout", idle, "--json")
    dep = json.loads(res.stdout)
    assert dep["replicas"][0]["state"] == "READY", res.stdout
    return dep["deployment"], dep["replicas"][0]["endpoint"]["ready_at"]


def _wait_ended(ss: tp.Callable[..., subprocess.CompletedProcess[str]], dep: str, limit: float) -> dict[str, tp.Any]:
    deadline = time.time() + limit
    while time.time() < deadline:
        row = _status(ss, dep)
        if row["state"] in ("ENDED", "FAILED"):
            return row
        time.sleep(1)
    raise AssertionError(f"deployment {dep} still {row['state']} {limit:.0f}s later")


def test_an_unused_deployment_ends_itself_after_the_idle_timeout_and_frees_its_nodes(ss, tiny_gguf: Path) -> None:
    dep, ready_at = _up(ss, tiny_gguf, "20s")
    row = _wait_ended(ss, dep, 120)  # a guard against a hang only
    ended_at = row["replicas"][0]["failure"]["time"]
    print(f"timeline: ready at 0s, ENDED idle recorded at {ended_at - ready_at:.1f}s, status saw it at "
          f"{time.time() - ready_at:.1f}s")
    assert (row["state"], row["replicas"][0]["why"]) == ("ENDED", "idle"), row
    assert 20 <= ended_at - ready_at, ended_at - ready_at  # not before the timeout (how long after: printed)
    text = ss("status", dep).stdout
    assert "ENDED" in text and "idle" in text, text
    job = row["job_ids"][0]
    deadline = time.time() + 120  # a guard against a hang only
    while time.time() < deadline and (_sacct_state(job) in ("", "RUNNING", "COMPLETING") or _servers(row["run_dir"])):
        time.sleep(1)
    print(f"job {job}: sacct {_sacct_state(job)} at {time.time() - ready_at:.1f}s after ready")
    # Ended by itself, cleanly: every component (a hetjob has two) COMPLETED, neither FAILED nor CANCELLED.
    assert set(_sacct_state(job).split()) == {"COMPLETED"}
    assert _servers(row["run_dir"]) == []
    assert _status(ss, dep)["replicas"][0]["why"] == "idle"  # still idle after Slurm's record is final


def test_a_deployment_getting_requests_is_not_ended_while_they_come(ss, tiny_gguf: Path) -> None:
    dep, ready_at = _up(ss, tiny_gguf, "15s")
    lines = ss("endpoint", dep, "--env").stdout.splitlines()
    exports = dict(line.removeprefix("export ").split("=", 1) for line in lines)
    client = openai.OpenAI(base_url=exports["OPENAI_BASE_URL"].strip("'\""),
                           api_key=exports["OPENAI_API_KEY"].strip("'\""), max_retries=0, timeout=30)
    sent, last = 0, 0.0
    while time.time() - ready_at < 32:  # a small batch with pauses, for twice the timeout
        r = client.chat.completions.create(model="x", messages=[{"role": "user", "content": f"Count to {sent}"}],
                                           max_tokens=4)
        assert r.choices
        sent += 1
        last = time.time()
        time.sleep(4)
    row = _status(ss, dep)
    print(f"timeline: {sent} requests over {last - ready_at:.1f}s after ready, state {row['state']}")
    assert row["state"] == "READY", row
    row = _wait_ended(ss, dep, 120)  # a guard against a hang only
    ended_at = row["replicas"][0]["failure"]["time"]
    print(f"timeline: ENDED idle {ended_at - last:.1f}s after the last request")
    assert (row["state"], row["replicas"][0]["why"]) == ("ENDED", "idle"), row
    assert 15 - 0.5 <= ended_at - last, ended_at - last  # not before the timeout (how long after: printed)
