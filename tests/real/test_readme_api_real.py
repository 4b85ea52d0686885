"""The README's Python API example, run as a user would run it: real llama-server and rpc-server processes on
127.0.0.1 (the local executor), the tiny test model; what it prints is what the user sees.
"""

from __future__ import annotations

import json
import os
import re
import subprocess
import sys
from pathlib import Path

import pytest
from repo import readme_example


@pytest.mark.llama
def test_readme_python_api_example_runs(tiny_gguf: Path, tmp_path: Path) -> None:
    code = readme_example()
    code = re.sub(r'^MODEL = .*$', f"MODEL = {str(tiny_gguf)!r}", code, count=1, flags=re.M)
    code = re.sub(r'^EXECUTOR = .*$', 'EXECUTOR = "local"', code, count=1, flags=re.M)
    code = re.sub(r'^NODES = .*$', "NODES = 2", code, count=1, flags=re.M)  # a leader and an rpc-server
    script = tmp_path / "example.py"
    script.write_text(code)
    env = {k: v for k, v in os.environ.items() if not k.startswith(("SPEEDSLURM_", "OPENAI_"))}
    env.update(SPEEDSLURM_PROFILE="testbed", SPEEDSLURM_RUN__DIR=str(tmp_path / "runs"),
               SPEEDSLURM_CONFIG=str(tmp_path / "config.yaml"), XDG_CONFIG_HOME=str(tmp_path / "xdg"))
    (tmp_path / "config.yaml").write_text("{}\n")
    res = subprocess.run([sys.executable, str(script)], cwd=tmp_path, env=env, capture_output=True, text=True,
                         timeout=300, stdin=subprocess.DEVNULL)
    assert res.returncode == 0, f"the README example failed:\n{res.stdout}\n{res.stderr}"
    lines = res.stdout.splitlines()
    assert re.fullmatch(r"ready: http://127\.0\.0\.1:\d+/v1 \S+", lines[0]), res.stdout
    assert re.fullmatch(r"answer: '.*'", lines[1], re.S), res.stdout
    assert lines[2] == "batch: 3 ok, 0 failed, results in results.jsonl", res.stdout
    assert lines[3] == "state after the block: ENDED", res.stdout
    results = [json.loads(line) for line in (tmp_path / "results.jsonl").read_text().splitlines()]
    assert sorted(r["custom_id"] for r in results) == ["q0", "q1", "q2"]
    assert all(r["error"] is None and r["response"]["status_code"] == 200 for r in results)
    # Stopped: no llama-server or rpc-server of this deployment is left.
    runs = tmp_path / "runs"
    leftover = subprocess.run(["pgrep", "-f", str(runs)], capture_output=True, text=True).stdout.split()
    assert leftover == [], f"processes of the deployment still run: {leftover}"
