"""`speedslurm show`: answers from a results file, one per custom_id (its final line)."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path


def test_show_prints_the_final_answer_of_each_id(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    lines = [
        {"id": "1", "custom_id": "a", "response": None, "error": {"code": "timeout", "message": "took too long"}},
        {"id": "2", "custom_id": "b", "response": {"status_code": 200, "request_id": "x",
                                                   "body": {"choices": [{"text": " forty-two"}]}}, "error": None},
        {"id": "3", "custom_id": "a", "response": {"status_code": 200, "request_id": "y", "body": {
            "choices": [{"message": {"role": "assistant", "content": "Paris"}}]}}, "error": None},
        {"id": "4", "custom_id": "c", "response": None, "error": {"code": "400", "message": "context exceeded"}},
    ]
    out.write_text("".join(json.dumps(x) + "\n" for x in lines) + '{"id": "5", "custom_id": "d", "resp')
    res = subprocess.run([sys.executable, "-m", "speedslurm", "show", str(out), "--json"], capture_output=True,
                         text=True, check=True)
    assert json.loads(res.stdout) == {"a": "Paris", "b": " forty-two", "c": "[error 400] context exceeded"}
    res = subprocess.run([sys.executable, "-m", "speedslurm", "show", str(out), "-n", "1"], capture_output=True,
                         text=True, check=True)
    assert "a: Paris" in res.stdout and "1 of 3 result(s)" in res.stdout


def test_show_missing_file_is_a_usage_error(tmp_path: Path) -> None:
    res = subprocess.run([sys.executable, "-m", "speedslurm", "show", str(tmp_path / "nope.jsonl")],
                         capture_output=True, text=True)
    assert res.returncode == 2 and "does not exist" in res.stderr and "Fix:" in res.stderr
