"""What a user sees is true: why a deployment ended, a rendered script not yet submitted, Slurm job ids accepted
wherever a deployment id is, and a batch with failed requests told apart by its exit status."""

from __future__ import annotations

import json
import sys
import typing as tp
from pathlib import Path

import pytest

from speedslurm.cli import main
from speedslurm.stubserver import StubServer

KEY = "true-key"


def speedslurm(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, err


# ------------------------------------------------------------------------------------------------------------
# A batch with failed requests exits 3


def _prompts(path: Path, long_ids: tp.Sequence[int] = ()) -> Path:
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": "x" * (500 if i in long_ids else 5)}) + "\n"
                            for i in range(6)))
    return path


def test_a_batch_with_failed_requests_exits_3_and_says_so(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = _prompts(tmp_path / "p.jsonl", long_ids=[2, 4])
    with StubServer(api_key=KEY, max_prompt_chars=100) as stub:  # c2 and c4 exceed the context: 400, no retry
        code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p)], capsys)
        assert code == 3, err
        assert "Error: the batch finished, but 2 of 6 request(s) failed" in err
        assert "Fix: run the same command again to retry them" in err
        code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p), "--json"],
                                    capsys)
        assert code == 3 and json.loads(out)["requests"]["failed"] == 2  # stdout stays the JSON summary
    with StubServer(api_key=KEY) as stub:  # a bigger context: the retry succeeds
        code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p)], capsys)
        assert code == 0, err
        assert "2 ok, 0 failed, 4 skipped" in err


def test_exit_statuses_are_in_the_help_of_run_and_submit(capsys: pytest.CaptureFixture[str]) -> None:
    for command in ("run", "submit"):
        code, out, _ = speedslurm([command, "--help"], capsys)
        assert code == 0
        assert "Exit status:" in out and "3    the batch finished, but some requests failed" in out
    readme = (Path(__file__).parent.parent / "README.md").read_text()
    assert "exit 3 when the batch ran to its end" in readme


def test_the_exit_status_contract_lives_in_errors() -> None:
    from speedslurm import errors

    assert errors.RequestsFailed.exit_code == 3
    assert "* 3: a batch ran to its end, but some requests failed" in (errors.__doc__ or "")
    assert sys.modules["speedslurm.errors"] is errors
