"""Issue 11, classes 1 and 2, against stub servers: the prompts are read once, what was asked is recorded in
each result line, a resume against changed requests is an error, and text that is not valid Unicode is a
validation error, never a fatal one.

The same on a real llama-server: tests/real/test_input_real.py.
"""

from __future__ import annotations

import fcntl
import json
import os
import signal
import struct
import subprocess
import sys
import termios
import time
import typing as tp
from pathlib import Path

import pytest
from inprocess import speedslurm as _inprocess
from repo import REPO
from rich.console import Console

from devtools.stubserver import StubServer
from speedslurm.batch.inputs import CHAT, COMPLETIONS, fingerprint
from speedslurm.batch.results import error_line, success_line
from speedslurm.batch.runner import BatchOptions, prepare_batch, run_batch
from speedslurm.batch.sources import StaticSource

KEY = "k"


@pytest.fixture
def stub() -> tp.Iterator[StubServer]:
    with StubServer(api_key=KEY, slots=4) as s:
        yield s


def write(path: Path, lines: list[dict[str, tp.Any] | str]) -> Path:
    path.write_text("".join((x if isinstance(x, str) else json.dumps(x)) + "\n" for x in lines))
    return path


def records(path: Path) -> list[dict[str, tp.Any]]:
    return [json.loads(x) for x in path.read_bytes().splitlines()]


def ok_ids(path: Path) -> list[str]:
    return [r["custom_id"] for r in records(path) if r["response"] and r["response"]["status_code"] == 200]


def proc_env() -> dict[str, str]:
    return {**os.environ, "PYTHONPATH": str(REPO)}


# ------------------------------------------------------------------------------------------ read once


def test_a_file_changed_after_validation_is_not_read_again(tmp_path: Path, stub: StubServer) -> None:
    """The file is rewritten between validation and the run (an editor saving, a generator still writing): the
    run sends exactly what was validated; before, a repeated custom_id got two successful lines."""
    prompts = write(tmp_path / "p.jsonl", [{"custom_id": f"c{i}", "prompt": f"p{i}"} for i in range(5)])
    options = BatchOptions(quiet=True, poll_interval=0.05)
    prepared = prepare_batch(prompts, None, options)
    try:
        # c0 repeated and a new c9: neither was validated
        write(prompts, [{"custom_id": f"c{i}", "prompt": f"changed {i}"} for i in (0, 0, 1, 2, 3, 4, 9)])
        summary = run_batch(StaticSource.probe(stub.url, KEY), prepared, options, Console(quiet=True))
    finally:
        prepared.close()
    ok = ok_ids(tmp_path / "p.results.jsonl")
    assert sorted(ok) == [f"c{i}" for i in range(5)] and summary.ok == 5  # once each, nothing unvalidated
    assert {r["request_fingerprint"] for r in records(tmp_path / "p.results.jsonl")} == {
        fingerprint(COMPLETIONS, {"prompt": f"p{i}"}) for i in range(5)}


def test_results_lines_carry_the_request_fingerprint(tmp_path: Path, stub: StubServer,
                                                     capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write(tmp_path / "p.jsonl", [{"custom_id": "a", "messages": [{"role": "user", "content": "hi"}]},
                                           {"prompt": "x", "max_tokens": 2}])
    code, _, err = cli(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(prompts),
                        "--max-tokens", "3"], capsys)
    assert code == 0, err
    recs = {r["custom_id"]: r for r in records(tmp_path / "p.results.jsonl")}
    assert recs["a"]["request_fingerprint"] == fingerprint(
        CHAT, {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 3})
    assert recs["line-2"]["request_fingerprint"] == fingerprint(COMPLETIONS, {"prompt": "x", "max_tokens": 2})
    assert len(recs["a"]["request_fingerprint"]) == 16


@pytest.mark.parametrize("kind", ["process-substitution", "fifo", "stdin"])
def test_prompts_from_a_pipe_are_sent(tmp_path: Path, stub: StubServer, kind: str) -> None:
    """``--prompts <(generator)``, a FIFO and stdin: read once, every prompt sent. Before, the run re-read the
    pipe: ``<(...)`` gave "0 ok of 20" with exit 0, a FIFO blocked the event loop for good (Ctrl-C ignored)."""
    lines = "".join(json.dumps({"custom_id": f"g{i}", "prompt": f"p{i}"}) + "\n" for i in range(20))
    source = write(tmp_path / "src.jsonl", [lines.rstrip("\n")])
    out = tmp_path / "r.jsonl"
    base = f"{sys.executable} -m speedslurm run --base-url {stub.url} --api-key {KEY} --out {out} --json"
    if kind == "process-substitution":
        cmd = f"{base} --prompts <(cat {source})"
    elif kind == "fifo":
        os.mkfifo(tmp_path / "fifo")
        cmd = f"(cat {source} > {tmp_path / 'fifo'} &); {base} --prompts {tmp_path / 'fifo'}"
    else:
        cmd = f"cat {source} | {base} --prompts -"
    res = subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, timeout=60, env=proc_env())
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["requests"]["ok"] == 20
    assert sorted(ok_ids(out)) == sorted(f"g{i}" for i in range(20))
    assert sorted(p.name for p in tmp_path.iterdir()) == sorted(["src.jsonl", "r.jsonl"] + (
        ["fifo"] if kind == "fifo" else []))  # no spool or lock file left behind


def test_a_pipe_without_out_is_refused(tmp_path: Path, stub: StubServer) -> None:
    res = subprocess.run(["bash", "-c", f"{sys.executable} -m speedslurm run --base-url {stub.url} --api-key {KEY} "
                                        "--prompts <(echo '{\"prompt\": \"a\"}')"],
                         capture_output=True, text=True, timeout=60, env=proc_env())
    assert res.returncode == 2 and "reading prompts from a pipe (/dev/fd/" in res.stderr and "--out" in res.stderr


def test_ctrl_c_while_a_generator_is_still_writing(tmp_path: Path, stub: StubServer) -> None:
    """Reading a slow generator happens before anything starts; Ctrl-C stops it at once (exit 130).

    The generator never finishes while the test waits (its end of the FIFO stays open): a run that went on
    reading after Ctrl-C would never end, so ending at all (within a guard against a hang) is the proof."""
    fifo = tmp_path / "fifo"
    os.mkfifo(fifo)
    proc = subprocess.Popen([sys.executable, "-m", "speedslurm", "run", "--base-url", stub.url, "--api-key", KEY,
                             "--prompts", str(fifo), "--out", str(tmp_path / "r.jsonl")], env=proc_env(),
                            stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
    writer = open(fifo, "w")  # noqa: SIM115 - kept open: the generator has not finished
    try:
        writer.write(json.dumps({"prompt": "first"}) + "\n")
        writer.flush()
        deadline = time.monotonic() + 60  # a guard against a hang only
        while _unread(writer) and proc.poll() is None:  # until the run has read the line: it reads the pipe
            assert time.monotonic() < deadline, "the run never read the FIFO"
            time.sleep(0.01)
        assert proc.poll() is None, proc.communicate()[1]
        proc.send_signal(signal.SIGINT)
        _, err = proc.communicate(timeout=60)
    finally:
        writer.close()
        if proc.poll() is None:
            proc.kill()
    assert proc.returncode == 130, err
    assert stub.stats.received == 0
    assert not (tmp_path / "r.jsonl").exists()


def _unread(writer: tp.IO[str]) -> int:
    """Bytes written to a pipe that its reader has not read yet."""
    return struct.unpack("i", fcntl.ioctl(writer.fileno(), termios.FIONREAD, b"\0\0\0\0"))[0]


# ------------------------------------------------------------------------------------------ resume, changed


def test_resume_against_a_changed_request_is_an_error(tmp_path: Path, stub: StubServer,
                                                      capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write(tmp_path / "p.jsonl", [{"custom_id": f"c{i}", "prompt": f"p{i}"} for i in range(6)])
    args = ["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(prompts)]
    assert cli(args, capsys)[0] == 0
    out = tmp_path / "p.results.jsonl"
    at = {r["custom_id"]: n for n, r in enumerate(records(out), 1)}
    before = out.read_bytes()
    sent = stub.stats.received
    write(prompts, [{"custom_id": f"c{i}", "prompt": "edited" if i in (3, 5) else f"p{i}"} for i in range(6)])
    code, _, err = cli(args, capsys)
    assert code == 2, err
    assert (f"Error: {prompts}:4: request \"c3\" is not the one answered in {out}:{at['c3']}: its text, fields or "
            "url differ") in err
    assert "1 more changed after it" in err
    assert "Fix: the results are not mixed" in err and "a new --out" in err
    assert out.read_bytes() == before and stub.stats.received == sent  # nothing sent, nothing written
    # the way out the message gives: a new --out
    code, _, err = cli([*args, "--out", str(tmp_path / "new.jsonl")], capsys)
    assert code == 0 and sorted(ok_ids(tmp_path / "new.jsonl")) == [f"c{i}" for i in range(6)]


def test_an_inserted_line_renames_generated_ids_and_is_caught(tmp_path: Path, stub: StubServer,
                                                               capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write(tmp_path / "p.jsonl", [{"prompt": f"p{i}"} for i in range(4)])
    args = ["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(prompts)]
    assert cli(args, capsys)[0] == 0
    write(prompts, [{"prompt": "inserted"}] + [{"prompt": f"p{i}"} for i in range(4)])
    code, _, err = cli(args, capsys)
    assert code == 2
    assert f"{prompts}:1: request \"line-1\" is not the one answered" in err and "3 more changed" in err
    assert "named by position (line-N)" in err and "give each line its own custom_id" in err


def test_a_different_flag_default_is_a_changed_request(tmp_path: Path, stub: StubServer,
                                                       capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write(tmp_path / "p.jsonl", [{"custom_id": "a", "prompt": "p"}])
    args = ["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(prompts)]
    assert cli([*args, "--max-tokens", "4"], capsys)[0] == 0
    assert cli([*args, "--max-tokens", "4"], capsys)[0] == 0  # the same command: resumes (nothing to do)
    code, _, err = cli([*args, "--max-tokens", "8"], capsys)
    assert code == 2 and "--max-tokens" in err and "request \"a\" is not the one answered" in err


def test_results_of_older_versions_without_fingerprints_still_resume(tmp_path: Path, stub: StubServer,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write(tmp_path / "p.jsonl", [{"custom_id": f"c{i}", "prompt": f"p{i}"} for i in range(4)])
    out = tmp_path / "p.results.jsonl"
    out.write_bytes(success_line("c0", None, b'{"usage": {}}') + success_line("c1", None, b"{}")
                    + error_line("c2", "timeout", "slow"))
    code, _, err = cli(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(prompts)], capsys)
    assert code == 0, err
    assert "2 successful lines in" in err and "not checked for changes" in err
    assert stub.stats.received == 2  # c2 retried, c3 new; c0 and c1 skipped
    assert sorted(ok_ids(out)) == ["c0", "c1", "c2", "c3"]


# ------------------------------------------------------------------------------------------ not Unicode

SURROGATE_LINE = '{"custom_id": "bad", "messages": [{"role": "user", "content": "cut \\ud83d here"}]}'


@pytest.mark.parametrize("kind", ["lone-surrogate", "invalid-utf8"])
def test_text_that_is_not_unicode_is_a_validation_error(tmp_path: Path, stub: StubServer,
                                                        capsys: pytest.CaptureFixture[str], kind: str) -> None:
    """A lone surrogate passed validation and then failed the whole batch, on every rerun; now it is caught up
    front (exit 2, file:line and the fix) and ``--skip-invalid`` gives it an error line."""
    prompts = tmp_path / "p.jsonl"
    good = [json.dumps({"custom_id": f"c{i}", "prompt": f"p{i}"}).encode() for i in range(4)]
    bad = SURROGATE_LINE.encode() if kind == "lone-surrogate" else b'{"custom_id": "bad", "prompt": "caf\xe9"}'
    prompts.write_bytes(b"\n".join([good[0], good[1], bad, good[2], good[3]]) + b"\n")
    args = ["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(prompts)]
    code, _, err = cli(args, capsys)
    assert code == 2, err
    expected = {"lone-surrogate": f"{prompts}:3: messages[0].content holds the JSON escape \"\\ud83d\", half "
                                  "of a UTF-16 surrogate pair without its other half",
                "invalid-utf8": f"{prompts}:3: not valid UTF-8 (byte 0xe9 at column 36)"}[kind]
    assert f"Error: {expected}" in err, err
    assert "--skip-invalid" in err and stub.stats.received == 0
    code, out, err = cli([*args, "--skip-invalid", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["requests"] == {"total": 4, "ok": 4, "failed": 0, "skipped": 0, "invalid": 1,
                                           "remaining": 0}
    recs = records(tmp_path / "p.results.jsonl")
    errors = [r for r in recs if r["error"]]
    assert len(errors) == 1 and errors[0]["error"]["code"] == "invalid_input"
    assert errors[0]["custom_id"] == ("line-3" if kind == "invalid-utf8" else "bad")
    assert sorted(ok_ids(tmp_path / "p.results.jsonl")) == [f"c{i}" for i in range(4)]
    code, out, err = cli([*args, "--skip-invalid", "--json"], capsys)  # the rerun: nothing sent, nothing fatal
    assert code == 0 and json.loads(out)["requests"]["skipped"] == 4
    assert len(records(tmp_path / "p.results.jsonl")) == 5


def test_a_surrogate_in_a_custom_id_or_key(tmp_path: Path, stub: StubServer,
                                           capsys: pytest.CaptureFixture[str]) -> None:
    prompts = write(tmp_path / "p.jsonl", ['{"custom_id": "x\\udc00", "prompt": "a"}',
                                           '{"prompt": "b", "\\ud800k": 1}', '{"prompt": "c \\ud83d\\ude00"}'])
    code, out, err = cli(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(prompts),
                          "--skip-invalid", "--json"], capsys)
    assert code == 0, err
    recs = {r["custom_id"]: r for r in records(tmp_path / "p.results.jsonl")}
    assert recs["line-1"]["error"]["message"].startswith(f"{prompts}:1: custom_id holds the JSON escape \"\\udc00\"")
    assert "a key in the line holds the JSON escape \"\\ud800\"" in recs["line-2"]["error"]["message"]
    assert recs["line-3"]["response"]["status_code"] == 200  # a complete pair is one character: fine


def test_system_flag_with_a_non_utf8_byte_is_refused_up_front(tmp_path: Path, stub: StubServer) -> None:
    prompts = write(tmp_path / "p.jsonl", [{"messages": [{"role": "user", "content": "hi"}]}])
    res = subprocess.run([sys.executable.encode(), b"-m", b"speedslurm", b"run", b"--base-url", stub.url.encode(),
                          b"--api-key", KEY.encode(), b"--prompts", bytes(prompts), b"--system", b"r\xe9sum\xe9"],
                         capture_output=True, timeout=60, env=proc_env())
    err = res.stderr.decode(errors="replace")
    assert res.returncode == 2, err
    assert "--system holds the byte 0xe9, which is not UTF-8 text" in " ".join(err.split())
    assert stub.stats.received == 0


def test_a_prompts_file_name_that_is_not_utf8(tmp_path: Path, stub: StubServer,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """The error line of an invalid prompt quotes the file name; a non-UTF-8 byte in it made the run fatal."""
    prompts = Path(os.fsdecode(bytes(tmp_path) + b"/caf\xe9.jsonl"))
    write(prompts, [{"prompt": "ok"}, "not json"])
    out = tmp_path / "r.jsonl"
    code, _, err = cli(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(prompts),
                        "--out", str(out), "--skip-invalid"], capsys)
    assert code == 0, err
    recs = {r["custom_id"]: r for r in records(out)}
    assert recs["line-2"]["error"]["message"].endswith(".jsonl:2: malformed JSON (Expecting value at column 1)")
    assert recs["line-1"]["response"]["status_code"] == 200


def test_an_unencodable_request_that_slips_through_fails_alone(tmp_path: Path, stub: StubServer,
                                                               monkeypatch: pytest.MonkeyPatch) -> None:
    """Defence in depth: a request the transport cannot encode gets an error line; the batch goes on."""
    from speedslurm.batch import inputs

    prompts = write(tmp_path / "p.jsonl", [{"custom_id": f"c{i}", "prompt": f"p{i}"} for i in range(3)])
    options = BatchOptions(quiet=True, poll_interval=0.05)
    prepared = prepare_batch(prompts, None, options)
    real_parse = inputs.parse_line

    def parse(text: str, lineno: int, defaults: tp.Any, known: tp.Any = None) -> tp.Any:  # c1 poisoned after validation
        req = real_parse(text, lineno, defaults, known)
        if req.custom_id == "c1":
            req.body["prompt"] = "\udc00"
        return req

    monkeypatch.setattr(inputs, "parse_line", parse)
    try:
        summary = run_batch(StaticSource.probe(stub.url, KEY), prepared, options, Console(quiet=True))
    finally:
        prepared.close()
    assert (summary.ok, summary.failed) == (2, 1)
    recs = {r["custom_id"]: r for r in records(tmp_path / "p.results.jsonl")}
    assert recs["c1"]["error"]["code"] == "invalid_input" and "cannot be encoded" in recs["c1"]["error"]["message"]


def cli(args: list[str], capsys: pytest.CaptureFixture[str]) -> tuple[int, str, str]:
    return _inprocess(args, capsys, join_err=True)
