"""``speedslurm`` run in the test's own process (``cli.main``), as a user's command line would run it: its exit
code and what it printed, read from pytest's ``capsys``."""

from __future__ import annotations

import sys
import typing as tp

import pytest

from speedslurm.cli import main


def speedslurm(args: list[str], capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch | None = None,
               stdin: tp.Any = None, *, join_err: bool = False) -> tuple[int, str, str]:
    """(exit code, stdout, stderr) of ``speedslurm ARGS``; ``stdin`` (with ``monkeypatch``) stands in for its
    standard input; ``join_err``: stderr with line breaks and runs of spaces made single spaces (wrapped
    messages read as one line)."""
    if monkeypatch is not None and stdin is not None:
        monkeypatch.setattr(sys, "stdin", stdin)
    try:
        main(args)
        code = 0
    except SystemExit as exc:
        code = int(exc.code or 0)
    out, err = capsys.readouterr()
    return code, out, " ".join(err.split()) if join_err else err
