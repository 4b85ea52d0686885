"""Results file: line format, mode 0600, lock, partial-line repair, the final-view rule; summary arithmetic."""

from __future__ import annotations

import json
import os
from pathlib import Path

import pytest
from rich.console import Console

from speedslurm.batch.results import ResultsFile, default_out_path, error_line, final_view, success_line
from speedslurm.batch.summary import Summary, percentile
from speedslurm.errors import UsageError


def test_success_line_is_openai_batch_output() -> None:
    body = b'{"id": "chatcmpl-1",\n "choices": [{"message": {"content": "a\\nb"}}]}'
    rec = json.loads(success_line("q1", "req-9", body))
    assert rec["custom_id"] == "q1" and rec["id"].startswith("batch_req_") and rec["error"] is None
    assert rec["response"]["status_code"] == 200 and rec["response"]["request_id"] == "req-9"
    assert rec["response"]["body"]["choices"][0]["message"]["content"] == "a\nb"
    assert success_line("q1", None, b"{}").count(b"\n") == 1  # always exactly one line


def test_error_line() -> None:
    rec = json.loads(error_line("q2", "http_400", "too long"))
    assert rec["response"] is None and rec["error"] == {"code": "http_400", "message": "too long"}


def test_default_out_path(tmp_path: Path) -> None:
    assert default_out_path(tmp_path / "prompts.jsonl") == tmp_path / "prompts.results.jsonl"


def test_new_file_is_0600_and_locked(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    with ResultsFile.open(out) as rf:
        assert out.stat().st_mode & 0o777 == 0o600
        with pytest.raises(UsageError, match="another speedslurm run is writing"):
            ResultsFile.open(out)
        rf.write(error_line("a", "x", "y"))
    with ResultsFile.open(out) as rf:  # released on close
        assert rf.previous.failed == {"a": "x"}


def test_unwritable_and_same_as_input(tmp_path: Path) -> None:
    prompts = tmp_path / "p.jsonl"
    prompts.write_text('{"prompt": "a"}\n')
    with pytest.raises(UsageError, match="is the prompts file itself"):
        ResultsFile.open(prompts, prompts)
    with pytest.raises(UsageError, match="folder .*missing.* does not exist"):
        ResultsFile.open(tmp_path / "missing" / "r.jsonl")
    with pytest.raises(UsageError, match="it is a directory"):
        ResultsFile.open(tmp_path)
    locked = tmp_path / "ro"
    locked.mkdir(mode=0o500)
    if os.geteuid() != 0:
        with pytest.raises(UsageError, match="cannot write results to .*Permission denied"):
            ResultsFile.open(locked / "r.jsonl")


def test_partial_last_line_is_cut_with_a_notice(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    good = success_line("a", None, b'{"usage": {}}') + error_line("b", "timeout", "slow")
    out.write_bytes(good + b'{"id": "batch_req_x", "custom_id": "c", "resp')
    with ResultsFile.open(out) as rf:
        assert rf.previous.done == {"a"} and rf.previous.failed == {"b": "timeout"}
        assert any("removed a partial last line" in n for n in rf.previous.notices)
    assert out.read_bytes() == good


def test_partial_only_line(tmp_path: Path) -> None:
    out = tmp_path / "r.jsonl"
    out.write_bytes(b'{"id": "x"')
    with ResultsFile.open(out) as rf:
        assert rf.previous.lines == 0
    assert out.read_bytes() == b""


def test_final_view_rule(tmp_path: Path) -> None:
    """Earlier error lines for an id may precede its one success line; the success is its final state."""
    out = tmp_path / "r.jsonl"
    out.write_bytes(error_line("a", "timeout", "1") + error_line("a", "http_503", "2") + success_line("a", "r", b"{}")
                    + error_line("b", "http_400", "too long") + b"not json\n")
    view = final_view(out)
    assert set(view) == {"a", "b"}
    assert view["a"]["response"]["status_code"] == 200
    assert view["b"]["error"]["code"] == "http_400"
    with ResultsFile.open(out) as rf:
        assert rf.previous.done == {"a"} and rf.previous.failed == {"b": "http_400"}
        assert any(":5: not a results line" in n for n in rf.previous.notices)


@pytest.mark.parametrize(("values", "q", "expected"), [
    ([], 50, None), ([3.0], 95, 3.0), ([1.0, 2.0, 3.0, 4.0], 50, 2.5),
    ([float(i) for i in range(1, 101)], 95, 95.05), ([5.0, 1.0, 3.0], 50, 3.0), ([1.0, 2.0], 100, 2.0),
])
def test_percentile(values: list[float], q: float, expected: float | None) -> None:
    result = percentile(values, q)
    assert result == expected if expected is None else result == pytest.approx(expected)


def test_summary_arithmetic_and_json() -> None:
    s = Summary("r.jsonl", total=10, ok=6, failed=1, skipped=2, invalid=1, prompt_tokens=60, completion_tokens=120,
                wall_s=4.0, per_replica={0: 4, 1: 3}, failed_replicas={1: "leader on n2: killed"})
    s.latencies.extend([0.1, 0.2, 0.3, 0.4, 1.0])
    data = s.to_json()
    assert data["requests"] == {"total": 10, "ok": 6, "failed": 1, "skipped": 2, "invalid": 1, "remaining": 2}
    assert data["completion_tok_s"] == 30.0 and data["requests_s"] == 1.75
    assert data["latency_s"] == {"p50": 0.3, "p95": 0.88}
    assert data["replicas"] == {"0": 4, "1": 3} and data["failed_replicas"] == {"1": "leader on n2: killed"}
    console = Console(record=True, width=120)
    s.render(console)
    text = console.export_text()
    for expected in ("6 ok, 1 failed, 2 skipped", "60 prompt, 120 completion", "30.0 completion tok/s",
                     "p50 0.300 s, p95 0.880 s", "r0: 4, r1: 3", "leader on n2: killed"):
        assert expected in text
