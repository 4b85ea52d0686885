"""Issue 11 on a real llama-server (the local executor: llama.cpp processes on this machine, the tiny test model).

* class 1: ``submit --prompts <(generator)`` sends every prompt once (it used to end "0 ok of N" with exit 0
  after a full deployment); the same command with one prompt changed stops before anything is queued, naming
  it; a FIFO fed by a slow generator works with ``run``;
* class 2: a lone surrogate and a non-UTF-8 byte are validation errors (exit 2), and with ``--skip-invalid``
  error lines while the rest is answered (the surrogate used to make every run fail);
* class 3: a second "login node" (its own hostname, ``unshare -u``) on a file system without flock (Lustre
  ``noflock``, injected) is kept out of a results file that a run is writing, naming host and pid.

The stub-server versions of these tests: tests/unit/test_read_once.py and tests/unit/test_writelock.py.
"""

from __future__ import annotations

import json
import os
import shutil
import signal
import subprocess
import sys
import typing as tp
from pathlib import Path

import pytest
from longbatch import LONG, Output, count_lines, keep_answered, long_fields, wait_until
from noflock import NOFLOCK
from repo import REPO

pytestmark = [pytest.mark.llama]


GENERATOR = """\
import json, sys, time
n, changed = int(sys.argv[1]), int(sys.argv[2]) if len(sys.argv) > 2 else -1
for i in range(n):
    text = "Changed prompt" if i == changed else f"Count to {i}"
    print(json.dumps({"custom_id": f"g{i}", "messages": [{"role": "user", "content": text}], "max_tokens": 8}),
          flush=True)
    time.sleep(0.01)  # a generator that is still writing while the reader reads
"""


def speedslurm(env: dict[str, str], *args: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "speedslurm", *args], capture_output=True, text=True, env=env,
                          timeout=timeout, stdin=subprocess.DEVNULL)


def bash(env: dict[str, str], cmd: str, timeout: float = 300) -> subprocess.CompletedProcess[str]:
    return subprocess.run(["bash", "-c", cmd], capture_output=True, text=True, env=env, timeout=timeout,
                          stdin=subprocess.DEVNULL)


def records(path: Path) -> list[dict[str, tp.Any]]:
    data = path.read_bytes()
    assert not data or data.endswith(b"\n")
    return [json.loads(x) for x in data.splitlines()]


def ok_ids(path: Path) -> list[str]:
    return [r["custom_id"] for r in records(path) if r["response"] and r["response"]["status_code"] == 200]


def flat(text: str) -> str:
    return " ".join(text.split())


@pytest.fixture(scope="module")
def env(tmp_path_factory: pytest.TempPathFactory) -> tp.Iterator[dict[str, str]]:
    runs = tmp_path_factory.mktemp("runs")
    e = {**os.environ, "SPEEDSLURM_PROFILE": "testbed", "SPEEDSLURM_RUN__DIR": str(runs), "PYTHONPATH": str(REPO)}
    yield e
    for d in runs.iterdir():  # the module's deployment, and any a failed test left running
        if (d / "deployment.json").exists():
            speedslurm(e, "down", d.name, timeout=60)


@pytest.fixture(scope="module")
def deployment(env: dict[str, str], tiny_gguf: Path) -> str:
    res = speedslurm(env, "up", "--model", str(tiny_gguf), "--nodes", "1", "--executor", "local", "--timeout", "120",
                     "--json")
    assert res.returncode == 0, res.stderr
    return str(json.loads(res.stdout)["deployment"])


def test_submit_from_process_substitution_then_a_changed_prompt(env: dict[str, str], tmp_path: Path,
                                                                 tiny_gguf: Path) -> None:
    gen = tmp_path / "gen.py"
    gen.write_text(GENERATOR)
    out = tmp_path / "results.jsonl"
    submit = (f"{sys.executable} -m speedslurm submit --model {tiny_gguf} --nodes 1 --executor local "
              f"--out {out} --json --prompts")
    res = bash(env, f"{submit} <({sys.executable} {gen} 30)")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["requests"]["ok"] == 30
    ok = ok_ids(out)
    assert sorted(ok) == sorted(f"g{i}" for i in range(30)) and len(ok) == 30
    assert all(len(r["request_fingerprint"]) == 16 for r in records(out))
    line_of = {r["custom_id"]: n for n, r in enumerate(records(out), 1)}
    before = out.read_bytes()
    runs = Path(env["SPEEDSLURM_RUN__DIR"])
    deployments = len(list(runs.iterdir()))

    # the generator now writes another prompt 7: stopped before anything is queued, naming it
    res = bash(env, f"{submit} <({sys.executable} {gen} 30 7)")
    assert res.returncode == 2, res.stderr
    err = flat(res.stderr)
    print(err)
    assert f':8: request "g7" is not the one answered in {out}:{line_of["g7"]}: its text, fields or url differ' in err
    assert "write to a new --out" in err
    assert out.read_bytes() == before and len(list(runs.iterdir())) == deployments  # nothing started

    # the same prompts again: nothing to do, no deployment
    res = bash(env, f"{submit} <({sys.executable} {gen} 30)")
    assert res.returncode == 0 and "Nothing to do" in res.stderr, res.stderr
    assert out.read_bytes() == before


def test_fifo_fed_by_a_slow_generator(env: dict[str, str], tmp_path: Path, deployment: str) -> None:
    """A FIFO used to be opened again for the run: that blocked the event loop for good (Ctrl-C ignored)."""
    gen = tmp_path / "gen.py"
    gen.write_text(GENERATOR)
    fifo = tmp_path / "prompts.fifo"
    os.mkfifo(fifo)
    out = tmp_path / "fifo.results.jsonl"
    res = bash(env, f"({sys.executable} {gen} 20 > {fifo} &); {sys.executable} -m speedslurm run --deployment "
                    f"{deployment} --prompts {fifo} --out {out} --json", timeout=120)
    assert res.returncode == 0, res.stderr
    assert sorted(ok_ids(out)) == sorted(f"g{i}" for i in range(20))


def test_text_that_is_not_unicode(env: dict[str, str], tmp_path: Path, deployment: str) -> None:
    """A lone surrogate (a JSON escape json.loads accepts) used to fail the batch on every run; a byte that is
    not UTF-8 was already caught. Both: exit 2 up front, or error lines with --skip-invalid."""
    prompts = tmp_path / "text.jsonl"
    good = [json.dumps({"custom_id": f"t{i}", "prompt": f"Once upon a time {i}", "max_tokens": 8}).encode()
            for i in range(6)]
    surrogate = b'{"custom_id": "cut", "messages": [{"role": "user", "content": "half an emoji \\ud83d"}]}'
    latin1 = b'{"custom_id": "latin1", "prompt": "caf\xe9", "max_tokens": 8}'
    prompts.write_bytes(b"\n".join(good[:2] + [surrogate] + good[2:4] + [latin1] + good[4:]) + b"\n")
    args = ["run", "--deployment", deployment, "--prompts", str(prompts)]
    res = speedslurm(env, *args)
    assert res.returncode == 2, res.stderr
    err = flat(res.stderr)
    print(err)
    assert (f'Error: {prompts}:3: messages[0].content holds the JSON escape "\\ud83d", half of a UTF-16 surrogate '
            "pair without its other half: not valid Unicode, and it cannot be sent (1 more invalid line after it)") in err
    assert "Fix: write the character itself" in err and "--skip-invalid" in err
    results = tmp_path / "text.results.jsonl"
    assert not results.exists()

    res = speedslurm(env, *args, "--skip-invalid", "--json")
    assert res.returncode == 0, res.stderr
    assert json.loads(res.stdout)["requests"] == {"total": 6, "ok": 6, "failed": 0, "skipped": 0, "invalid": 2,
                                                  "remaining": 0}
    errors = {r["custom_id"]: r["error"] for r in records(results) if r["error"]}
    assert set(errors) == {"cut", "line-6"} and {e["code"] for e in errors.values()} == {"invalid_input"}
    assert errors["line-6"]["message"] == f"{prompts}:6: not valid UTF-8 (byte 0xe9 at column 39)"
    assert sorted(ok_ids(results)) == [f"t{i}" for i in range(6)]
    res = speedslurm(env, *args, "--skip-invalid", "--json")  # the rerun: nothing fatal, nothing new
    assert res.returncode == 0 and json.loads(res.stdout)["requests"]["skipped"] == 6, res.stderr
    assert len(records(results)) == 8


@pytest.mark.skipif(os.geteuid() != 0 or shutil.which("unshare") is None, reason="needs root and unshare (UTS)")
def test_second_login_node_without_flock_is_kept_out(env: dict[str, str], tmp_path: Path, deployment: str) -> None:
    """The first run's batch is one no machine finishes while the test runs (tests/longbatch.py): it still writes
    when the second run starts and ends, and is then stopped with Ctrl-C; the resume finishes the prompts up to
    the last one answered."""
    prompts = tmp_path / "p.jsonl"
    ids = [f"c{i}" for i in range(LONG)]
    prompts.write_text("".join(json.dumps({"custom_id": c, "messages": [{"role": "user", "content": f"Count to {i}"}],
                                           **long_fields()}) + "\n" for i, c in enumerate(ids)))
    out = tmp_path / "r.jsonl"
    lock = tmp_path / "r.jsonl.lock"
    script = tmp_path / "noflock.py"
    script.write_text(NOFLOCK)
    args = ["run", "--deployment", deployment, "--prompts", str(prompts), "--out", str(out), "--concurrency", "2"]
    first = subprocess.Popen([sys.executable, str(script), *args], env=env, stdout=subprocess.PIPE,
                             stderr=subprocess.PIPE, text=True, stdin=subprocess.DEVNULL)
    output = Output(first)
    try:
        wait_until("5 results", lambda: count_lines(out) >= 5 or first.poll() is not None)
        assert lock.exists() and first.poll() is None, f"the first run ended before the second started:\n{output.stderr}"
        owner = json.loads(lock.read_text())
        assert owner["pid"] == first.pid and owner["host"] == os.uname().nodename
        second = subprocess.run(["unshare", "-u", sys.executable, str(script), "--hostname", "login2", *args],
                                env=env, capture_output=True, text=True, timeout=60, stdin=subprocess.DEVNULL)
        assert first.poll() is None, "the first run ended before the second did"
        first.send_signal(signal.SIGINT)
        output.wait()
        first_err = output.stderr
    finally:
        if first.poll() is None:
            first.kill()
            first.wait()
    err = flat(second.stderr)
    print(err)
    assert second.returncode == 2, second.stderr
    assert (f"Error: another speedslurm run is writing {out} (pid {first.pid} on host {os.uname().nodename}, since "
            in err)
    assert f"delete {lock}" in err and "Traceback" not in second.stderr
    assert first.returncode == 130, first_err
    assert "does not support flock" in flat(first_err)
    ok = ok_ids(out)
    assert len(ok) == len(set(ok)) and 5 <= len(ok) < len(ids)  # one writer: no prompt twice
    assert not lock.exists()
    kept = keep_answered(prompts, ids, ok)  # the resume: the prompts up to the last one answered
    again = subprocess.run([sys.executable, str(script), *args], env=env, capture_output=True, text=True, timeout=300,
                           stdin=subprocess.DEVNULL)
    assert again.returncode == 0, again.stderr
    ok = ok_ids(out)
    assert sorted(ok) == sorted(kept) and len(ok) == len(set(ok))  # each prompt once
    assert not lock.exists()
