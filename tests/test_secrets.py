"""Keys never appear in output: the resume hint hides --api-key, and SPEEDSLURM_API_KEY is no setting."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from speedslurm.cli.common import resume_command


def test_resume_hint_hides_the_api_key_in_both_spellings() -> None:
    for argv in (["run", "--base-url", "http://h:1", "--api-key", "sk-SECRET", "--prompts", "p q.jsonl"],
                 ["run", "--base-url", "http://h:1", "--api-key=sk-SECRET", "--prompts", "p q.jsonl"]):
        hint = resume_command(argv)
        assert "sk-SECRET" not in hint
        assert hint.startswith('speedslurm run --base-url http://h:1 --api-key "$SPEEDSLURM_API_KEY" --prompts '
                               "'p q.jsonl'")
        assert "put it in SPEEDSLURM_API_KEY" in hint
    assert resume_command(["submit", "--model", "m", "--prompts", "p"]) == "speedslurm submit --model m --prompts p"


def test_the_api_key_variable_does_not_break_commands() -> None:
    env = {**os.environ, "SPEEDSLURM_API_KEY": "sk-SECRET", "SPEEDSLURM_PROFILE": "testbed"}
    res = subprocess.run([sys.executable, "-m", "speedslurm", "config", "show"], env=env, capture_output=True,
                         text=True, timeout=60)
    assert res.returncode == 0, res.stderr
    assert "sk-SECRET" not in res.stdout + res.stderr


@pytest.mark.llama
def test_a_key_given_on_the_command_line_is_not_printed_when_the_run_stops(shared_tmp: Path, tiny_gguf: Path) -> None:
    """`run --base-url --api-key KEY` against a real llama-server, stopped by SIGTERM: the resume hint hides KEY."""
    env = {**os.environ, "SPEEDSLURM_PROFILE": "local", "SPEEDSLURM_RUN__DIR": str(shared_tmp / "runs")}
    env.pop("SPEEDSLURM_API_KEY", None)
    up = subprocess.run([sys.executable, "-m", "speedslurm", "up", "--model", str(tiny_gguf), "--nodes", "1",
                         "--executor", "local", "--timeout", "120", "--json"], env=env, capture_output=True,
                        text=True, timeout=180, stdin=subprocess.DEVNULL)
    assert up.returncode == 0, up.stderr
    dep = json.loads(up.stdout)["deployment"]
    try:
        exports = subprocess.run([sys.executable, "-m", "speedslurm", "endpoint", dep, "--env"], env=env,
                                 capture_output=True, text=True, timeout=60).stdout
        values = dict(line.removeprefix("export ").split("=", 1) for line in exports.splitlines())
        url, key = values["OPENAI_BASE_URL"].removesuffix("/v1"), values["OPENAI_API_KEY"].strip("'")
        prompts, out = shared_tmp / "p.jsonl", shared_tmp / "p.results.jsonl"
        prompts.write_text("".join(json.dumps({"custom_id": f"p{i}", "prompt": f"Story {i}:", "max_tokens": 48})
                                   + "\n" for i in range(200)))
        proc = subprocess.Popen([sys.executable, "-m", "speedslurm", "run", "--base-url", url, "--api-key", key,
                                 "--prompts", str(prompts), "--out", str(out), "--concurrency", "2"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 120
        while not (out.exists() and out.read_text().count("\n") >= 3):
            assert proc.poll() is None and time.monotonic() < deadline, proc.communicate()
            time.sleep(0.1)
        proc.send_signal(signal.SIGTERM)
        stdout, stderr = proc.communicate(timeout=60)
        assert proc.returncode == 130, stderr
        assert "To resume, run the same command again" in " ".join(stderr.split())
        assert '--api-key "$SPEEDSLURM_API_KEY"' in stderr
        assert key not in stdout + stderr
        assert key not in out.read_text()
    finally:
        subprocess.run([sys.executable, "-m", "speedslurm", "down", dep], env=env, capture_output=True, timeout=60)
