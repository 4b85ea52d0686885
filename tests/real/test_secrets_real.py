"""Keys never appear in output, against a real llama-server: a key given with --api-key is not printed when
the run stops (the unit tests: tests/unit/test_secrets.py).
"""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
from pathlib import Path

import pytest
from longbatch import LONG, Output, count_lines, long_fields, wait_until


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
        # a batch no machine finishes while the test runs (tests/longbatch.py): the signal comes while it runs
        prompts.write_text("".join(json.dumps({"custom_id": f"p{i}", "prompt": f"Story {i}:", **long_fields()})
                                   + "\n" for i in range(LONG)))
        proc = subprocess.Popen([sys.executable, "-m", "speedslurm", "run", "--base-url", url, "--api-key", key,
                                 "--prompts", str(prompts), "--out", str(out), "--concurrency", "2"], env=env,
                                stdin=subprocess.DEVNULL, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        output = Output(proc)
        try:
            wait_until("3 results", lambda: count_lines(out) >= 3 or proc.poll() is not None)
            assert proc.poll() is None, output.stderr
            proc.send_signal(signal.SIGTERM)
            output.wait()
        finally:
            if proc.poll() is None:
                proc.kill()
                proc.wait()
        stdout, stderr = output.stdout, output.stderr
        assert proc.returncode == 130, stderr
        assert "To resume, run the same command again" in " ".join(stderr.split())
        assert '--api-key "$SPEEDSLURM_API_KEY"' in stderr
        assert key not in stdout + stderr
        assert key not in out.read_text()
    finally:
        subprocess.run([sys.executable, "-m", "speedslurm", "down", dep], env=env, capture_output=True, timeout=60)
