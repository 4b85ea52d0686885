"""Inputs a review of the command line found mishandled: each now gets the answer a user expects, before
anything is queued or written."""

from __future__ import annotations

import typing as tp
from pathlib import Path

import pytest
from inprocess import speedslurm

from speedslurm.errors import UsageError
from speedslurm.gateway.keys import KeyStore
from speedslurm.gateway.pool import alias_specs
from speedslurm.node.children import log_tail


@pytest.mark.parametrize("argv", [
    ["up", "--model", "gemma-3-270m", "--timeout", "-1"],
    ["up", "--model", "gemma-3-270m", "--timeout", "0"],
    ["submit", "--model", "gemma-3-270m", "--prompts", "p.jsonl", "--ready-timeout", "-1"],
    ["build-llama", "--cpu", "--timeout", "0"],
])
def test_a_timeout_that_is_not_positive_exits_2_before_anything_is_submitted(
        argv: list[str], user_config: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, _out, err = speedslurm(argv, capsys)
    assert code == 2 and "is not in the range x>0" in err and "Traceback" not in err, err


def test_logs_n_0_prints_no_line(tmp_path: Path) -> None:
    log = tmp_path / "leader.log"
    log.write_text("one\ntwo\nthree\n")
    assert log_tail(log, 2) == "two\nthree"
    assert log_tail(log, 0) == ""


@pytest.mark.parametrize("name", ["bob\n", "ann\n\n"])
def test_a_key_name_with_a_trailing_line_break_is_refused(name: str, tmp_path: Path) -> None:
    with pytest.raises(UsageError, match="is not a valid key name"):
        KeyStore(tmp_path / "gw").add(name)
    assert not (tmp_path / "gw" / "keys.json").exists()


def test_an_alias_is_taken_without_the_spaces_and_line_breaks_around_it(gsettings: tp.Any) -> None:
    [spec] = alias_specs(gsettings(), ["a\n=http://127.0.0.1:9"])
    assert spec.name == "a"


def test_an_idle_timeout_in_slurms_clock_form_is_a_duration() -> None:
    from speedslurm.node.idle import parse_duration

    assert [parse_duration(v) for v in ("30:00", "1:00:00", "90s", "1h30m")] == [1800.0, 3600.0, 90.0, 5400.0]
    with pytest.raises(ValueError, match="is not a duration"):
        parse_duration("1:2:3:4")


def test_keys_on_a_file_system_without_locks_are_still_added(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    import errno
    import fcntl

    def flock(fd: int, op: int) -> None:
        raise OSError(errno.ENOLCK, "No locks available")

    monkeypatch.setattr(fcntl, "flock", flock)
    store = KeyStore(tmp_path / "gw")
    key = store.add("ann")
    assert store.check(key) == "ann"
