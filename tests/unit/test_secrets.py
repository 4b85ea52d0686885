"""Keys never appear in output: the resume hint hides --api-key, and SPEEDSLURM_API_KEY is no setting; a key read
with --api-key-file (or from SPEEDSLURM_API_KEY) is on no command line, and --api-key on one is warned about.

Against a real llama-server: tests/real/test_secrets_real.py.
"""

from __future__ import annotations

import json
import os
import secrets
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
from inprocess import speedslurm as _inprocess

from devtools.stubserver import StubServer
from speedslurm.cli.common import resume_command

CMDLINE_WARNING = "Warning: --api-key puts the key on the command line, where every user of this machine can read it"


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


def _prompts(tmp_path: Path, n: int = 3) -> Path:
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"p{i}"}) + "\n" for i in range(n)))
    return path


def _command_lines_holding(text: str) -> list[str]:
    """The command lines of this machine's processes that hold ``text`` (what any user can read in /proc)."""
    found = []
    for entry in Path("/proc").iterdir():
        if entry.name.isdigit():
            try:
                argv = (entry / "cmdline").read_bytes()
            except OSError:
                continue
            if text.encode() in argv:
                found.append(argv.replace(b"\0", b" ").decode(errors="replace"))
    return found


def _run_watching_process_list(tmp_path: Path, key: str, *args: str,
                               env: dict[str, str] | None = None) -> tuple[subprocess.CompletedProcess[str], list[str]]:
    """`speedslurm run --base-url STUB ARGS` in its own process against a stub that needs ``key``; while it serves
    each request (the client and whatever it started are alive then: they wait for the answer), the process list
    is searched for the key. Returns the run and the command lines that held the key."""
    held: list[str] = []
    looked = []
    with StubServer(api_key=key, slots=2) as stub:
        handle = stub.app.handle

        def watching(conn: tp.Any, method: str, path: str, auth: bytes, body: bytes, close: bool) -> None:
            if path.endswith("completions"):
                looked.append(path)
                held.extend(_command_lines_holding(key))
            handle(conn, method, path, auth, body, close)

        stub.app.handle = watching  # type: ignore[method-assign]
        env = dict(os.environ if env is None else env)
        res = subprocess.run([sys.executable, "-m", "speedslurm", "run", "--base-url", stub.url, *args,
                              "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "r.jsonl")],
                             env=env, capture_output=True, text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert stub.stats.completions == 3, res.stderr
    assert len(looked) >= 3
    assert key not in res.stdout + res.stderr + (tmp_path / "r.jsonl").read_text()
    return res, held


def test_a_key_file_is_used_and_the_key_is_on_no_command_line(tmp_path: Path) -> None:
    key = "sk-file-" + secrets.token_hex(8)
    key_file = tmp_path / "key"
    key_file.write_text(key + "\n")  # as `echo "$KEY" > key` writes it: the newline is no part of the key
    key_file.chmod(0o600)
    env = {k: v for k, v in os.environ.items() if k != "SPEEDSLURM_API_KEY"}
    res, held = _run_watching_process_list(tmp_path, key, "--api-key-file", str(key_file), env=env)
    assert res.returncode == 0, res.stderr
    assert held == []
    assert "Warning" not in res.stderr


def test_a_key_on_the_command_line_is_seen_by_everyone_and_warned_about(tmp_path: Path) -> None:
    key = "sk-argv-" + secrets.token_hex(8)
    res, held = _run_watching_process_list(tmp_path, key, "--api-key", key)
    assert res.returncode == 0, res.stderr
    assert held and all("speedslurm run" in line for line in held)  # what the warning is about
    warning = " ".join(res.stderr.split())
    assert CMDLINE_WARNING in warning
    assert "put it in SPEEDSLURM_API_KEY, or in a file of mode 0600 given with --api-key-file, instead" in warning


def test_the_key_from_the_variable_is_not_warned_about(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEEDSLURM_API_KEY", "sk-env")
    with StubServer(api_key="sk-env") as stub:
        code, _, err = _cli(["run", "--base-url", stub.url, "--prompts", str(_prompts(tmp_path)), "--json"], capsys)
        assert code == 0, err
        assert stub.stats.completions == 3
    assert "Warning" not in err


def test_a_key_file_that_is_open_to_others_or_a_pipe(tmp_path: Path, capsys: pytest.CaptureFixture[str],
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SPEEDSLURM_API_KEY", "sk-not-this-one")  # --api-key-file comes first
    loose = tmp_path / "loose-key"
    loose.write_text("  sk-loose\r\n")
    loose.chmod(0o644)
    with StubServer(api_key="sk-loose") as stub:
        code, _, err = _cli(["run", "--base-url", stub.url, "--api-key-file", str(loose),
                             "--prompts", str(_prompts(tmp_path)), "--json"], capsys)
        assert code == 0, err
        assert stub.stats.completions == 3
    assert (f"Warning: --api-key-file {loose} is not private (mode 0644): other users may read the key; make it "
            f"yours alone: chmod 600 {loose}") in err
    # A pipe, as `--api-key-file <(pass show server-key)` gives: read once, no warning about its mode.
    r, w = os.pipe()
    os.write(w, b"sk-pipe\n")
    os.close(w)
    try:
        with StubServer(api_key="sk-pipe") as stub:
            code, _, err = _cli(["run", "--base-url", stub.url, "--api-key-file", f"/dev/fd/{r}",
                                 "--prompts", str(_prompts(tmp_path)), "--out", str(tmp_path / "pipe.jsonl")], capsys)
            assert code == 0, err
            assert stub.stats.completions == 3
    finally:
        os.close(r)
    assert "Warning" not in err


def test_bad_key_files_exit_2_before_anything_is_sent(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    files = {"empty": "", "blank": " \n", "two": "sk-a\nsk-b\n", "binary": b"\xff\xfe\x00k"}
    for name, content in files.items():
        (tmp_path / name).write_bytes(content if isinstance(content, bytes) else content.encode())
        (tmp_path / name).chmod(0o600)
    missing = tmp_path / "missing"
    cases: list[tuple[list[str], str]] = [
        (["--api-key-file", str(missing)], f"--api-key-file {missing}: cannot read it (No such file or directory) "
                                           "Fix: check the path, and that the file is readable by you"),
        (["--api-key-file", str(tmp_path)], f"--api-key-file {tmp_path} is not a file"),
        (["--api-key-file", str(tmp_path / "empty")], f"--api-key-file {tmp_path / 'empty'} is empty"),
        (["--api-key-file", str(tmp_path / "blank")], f"--api-key-file {tmp_path / 'blank'} is empty"),
        (["--api-key-file", str(tmp_path / "two")],
         f"--api-key-file {tmp_path / 'two'} does not hold one key (one line of text)"),
        (["--api-key-file", str(tmp_path / "binary")],
         f"--api-key-file {tmp_path / 'binary'} does not hold one key (one line of text)"),
        (["--api-key", "sk-a", "--api-key-file", str(tmp_path / "two")],
         "--api-key and --api-key-file both give the key Fix: give only --api-key-file"),
    ]
    if os.getuid() != 0:  # root reads any file
        (tmp_path / "locked").write_text("sk-a")
        (tmp_path / "locked").chmod(0)
        cases.append((["--api-key-file", str(tmp_path / "locked")], "cannot read it (Permission denied)"))
    prompts = _prompts(tmp_path)
    with StubServer(api_key="sk-a") as stub:
        for args, says in cases:
            code, out, err = _cli(["run", "--base-url", stub.url, *args, "--prompts", str(prompts)], capsys)
            assert code == 2 and says in err and "Traceback" not in err, (args, err)
            assert "sk-b" not in out + err  # an error about a key file never shows what it holds
        endpoint = tmp_path / "endpoint.json"
        code, _, err = _cli(["run", "--endpoint-file", str(endpoint), "--api-key-file", str(tmp_path / "two"),
                             "--prompts", str(prompts)], capsys)
        assert code == 2 and "--api-key-file is the key of a --base-url server" in err, err
        assert stub.stats.received == 0
    assert not (tmp_path / "p.jsonl.results.jsonl").exists()


def _cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return _inprocess(args, capsys, join_err=True)
