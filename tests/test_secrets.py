"""Keys never appear in output: the resume hint hides --api-key, and SPEEDSLURM_API_KEY is no setting."""

from __future__ import annotations

import os
import subprocess
import sys

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
