"""`speedslurm run` as a user runs it: exit codes, messages, --json, stdin, Ctrl-C then resume."""

from __future__ import annotations

import json
import os
import signal
import subprocess
import sys
import time
import typing as tp
from pathlib import Path

import pytest
from inprocess import speedslurm

from devtools.stubserver import StubServer

KEY = "cli-key"


def prompts(tmp_path: Path, n: int, name: str = "prompts.jsonl") -> Path:
    path = tmp_path / name
    path.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"p{i}"}) + "\n" for i in range(n)))
    return path


@pytest.fixture
def stub() -> tp.Iterator[StubServer]:
    with StubServer(api_key=KEY, slots=4) as s:
        yield s


def test_run_json_prints_only_the_summary(tmp_path: Path, stub: StubServer,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    p = prompts(tmp_path, 15)
    code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p), "--json",
                                 "--max-tokens", "3"], capsys)
    assert code == 0, err
    data = json.loads(out)
    assert data["status"] == "completed"
    assert data["requests"] == {"total": 15, "ok": 15, "failed": 0, "skipped": 0, "invalid": 0, "remaining": 0}
    assert data["tokens"]["completion"] == 45 and data["replicas"] == {"0": 15}
    assert data["results"] == str(tmp_path / "prompts.results.jsonl")
    assert KEY not in out + err


def test_run_prints_summary_table_on_stderr(tmp_path: Path, stub: StubServer,
                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = prompts(tmp_path, 5)
    code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p)], capsys)
    assert code == 0 and out == ""
    assert "5 ok, 0 failed, 0 skipped" in err and "r0: 5" in err and "p50" in err
    code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p)], capsys)
    assert "0 ok, 0 failed, 5 skipped" in err


def test_bad_line_exits_2_before_sending_and_writes_nothing(tmp_path: Path, stub: StubServer,
                                                            capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "bad.jsonl"
    p.write_text('{"prompt": "ok"}\n{"prompt": "broken\n')
    code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p)], capsys)
    assert code == 2
    assert f"Error: {p}:2: malformed JSON" in err and "Fix:" in err
    assert stub.stats.received == 0
    assert not (tmp_path / "bad.results.jsonl").exists()


def test_skip_invalid_writes_error_lines(tmp_path: Path, stub: StubServer,
                                         capsys: pytest.CaptureFixture[str]) -> None:
    p = tmp_path / "mixed.jsonl"
    p.write_text('{"prompt": "ok"}\nnot json\n{"messages": [{"role": "user", "content": "hi"}]}\n')
    code, out, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p),
                                 "--skip-invalid", "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["requests"]["invalid"] == 1
    recs = {r["custom_id"]: r for r in map(json.loads, (tmp_path / "mixed.results.jsonl").read_text().splitlines())}
    assert recs["line-2"]["error"]["code"] == "invalid_input"
    assert recs["line-2"]["error"]["message"].startswith(f"{p}:2: malformed JSON")
    assert recs["line-3"]["response"]["status_code"] == 200
    speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p), "--skip-invalid"], capsys)
    assert len((tmp_path / "mixed.results.jsonl").read_text().splitlines()) == 3  # not logged twice


@pytest.mark.parametrize("case", ["missing-folder", "directory", "same-as-input"])
def test_unusable_out_exits_2(tmp_path: Path, stub: StubServer, capsys: pytest.CaptureFixture[str],
                              case: str) -> None:
    p = prompts(tmp_path, 3)
    out = {"missing-folder": tmp_path / "nope" / "r.jsonl", "directory": tmp_path, "same-as-input": p}[case]
    code, _, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p),
                               "--out", str(out)], capsys)
    assert code == 2
    assert {"missing-folder": "does not exist", "directory": "it is a directory",
            "same-as-input": "is the prompts file itself"}[case] in err
    assert stub.stats.received == 0


def test_unwritable_out_exits_2(tmp_path: Path, stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    ro = tmp_path / "ro"
    ro.mkdir(mode=0o500)
    # Root writes through mode bits; sysfs refuses new files even to root.
    target = Path("/sys/speedslurm-results.jsonl") if os.geteuid() == 0 else ro / "r.jsonl"
    p = prompts(tmp_path, 3)
    code, _, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", str(p),
                               "--out", str(target)], capsys)
    assert code == 2 and "Permission denied" in err


def test_stdin_needs_out_and_works(tmp_path: Path, stub: StubServer, capsys: pytest.CaptureFixture[str],
                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import io

    data = b'{"prompt": "a"}\n{"prompt": "b", "custom_id": "bee"}\n'

    class Stdin:
        buffer = io.BytesIO(data)

    code, _, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", "-"], capsys,
                              monkeypatch, Stdin())
    assert code == 2 and "needs --out" in err
    out = tmp_path / "r.jsonl"
    code, _, err = speedslurm(["run", "--base-url", stub.url, "--api-key", KEY, "--prompts", "-", "--out", str(out)],
                              capsys, monkeypatch, type("S", (), {"buffer": io.BytesIO(data)})())
    assert code == 0, err
    assert {json.loads(x)["custom_id"] for x in out.read_text().splitlines()} == {"line-1", "bee"}


def test_target_flags_are_checked(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    p = prompts(tmp_path, 1)
    code, _, err = speedslurm(["run", "--prompts", str(p)], capsys)
    assert code == 2 and "exactly one of --deployment, --endpoint-file, --base-url" in err
    code, _, err = speedslurm(["run", "--prompts", str(tmp_path / "none.jsonl"), "--base-url", "http://127.0.0.1:9"],
                              capsys)
    assert code == 2 and "does not exist" in err


def test_unreachable_server_exits_1(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    with StubServer() as s:
        url = s.url
    code, _, err = speedslurm(["run", "--base-url", url, "--prompts", str(prompts(tmp_path, 1))], capsys)
    assert code == 1 and f"cannot reach the server at {url}" in err


def test_endpoint_file(tmp_path: Path, stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.rundir.records import Endpoint, write_json_atomic

    ep = Endpoint(url=stub.url, api_key=KEY, model="m", deployment_id="d", replica=0, job_id="1", leader_node="n1",
                  follower_nodes=[], rpc_servers=[], llama_version="x", parallel=3, ctx=1024, started_at=0,
                  ready_at=0)
    write_json_atomic(tmp_path / "endpoint.json", ep.to_json())
    code, out, err = speedslurm(["run", "--endpoint-file", str(tmp_path / "endpoint.json"),
                                 "--prompts", str(prompts(tmp_path, 4)), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["requests"]["ok"] == 4


def test_sigint_then_resume_is_exactly_once(tmp_path: Path) -> None:
    """The stand-in answers in 0.1 s on 4 slots until Ctrl-C (the batch holds 50 s of that, so it still runs when
    the signal comes, however fast the machine), then at once for the resume."""
    n = 2000
    p = prompts(tmp_path, n)
    out = tmp_path / "r.jsonl"
    stub = StubServer(api_key=KEY, latency=0.1, slots=4).start()
    try:
        cmd = [sys.executable, "-m", "speedslurm", "run", "--base-url", stub.url, "--api-key", KEY, "--prompts",
               str(p), "--out", str(out)]
        first = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
        deadline = time.monotonic() + 60  # a guard against a hang only
        while (not out.exists() or len(out.read_bytes().splitlines()) < 12) and first.poll() is None:
            assert time.monotonic() < deadline, "no results"
            time.sleep(0.02)
        assert first.poll() is None, first.communicate()[1]
        first.send_signal(signal.SIGINT)
        _, err = first.communicate(timeout=30)
        assert first.returncode == 130, err
        assert "Stopping:" in err and "Interrupted:" in err
        assert "To resume, run the same command again: speedslurm run --base-url" in err
        done_first = len(out.read_text().splitlines())
        assert 12 <= done_first < n
        stub.config.latency = 0.0
        second = subprocess.run(cmd, capture_output=True, text=True, timeout=120)
        assert second.returncode == 0, second.stderr
        assert "skipped (done earlier)" in second.stderr and f"{done_first} skipped" in second.stderr
    finally:
        stub.stop()
    recs = [json.loads(x) for x in out.read_text().splitlines()]
    ids = [r["custom_id"] for r in recs if r["response"] and r["response"]["status_code"] == 200]
    assert len(ids) == len(set(ids)) == n
    assert set(ids) == {f"c{i}" for i in range(n)}


def test_deployment_by_id(tmp_path: Path, stub: StubServer, capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.cluster.localproc import identify
    from speedslurm.rundir.layout import RunDir
    from speedslurm.rundir.records import Endpoint, write_json_atomic

    rd = RunDir(tmp_path / "runs" / "tiny-20250101-abcd")
    rd.replica_dir(0).mkdir(parents=True)
    # a local deployment of 2 replicas whose "job" is this process (recorded by its identity, as `up` records
    # the controller's: a bare pid would name whatever process holds it later): replica 1 is still starting
    me = identify(os.getpid())
    assert me is not None
    import records

    records.deployment(rd.root, replicas=2, executor="local", created_at=1.0, job_ids=[str(os.getpid())],
                       local_processes=[me.to_json()])
    ep = Endpoint(url=stub.url, api_key=KEY, model="m", deployment_id=rd.deployment_id, replica=0,
                  job_id=str(os.getpid()), leader_node="localhost", follower_nodes=[], rpc_servers=[],
                  llama_version="x", parallel=2, ctx=1024, started_at=0, ready_at=0)
    write_json_atomic(rd.endpoint_path(0), ep.to_json())
    p = prompts(tmp_path, 6)
    code, out, err = speedslurm(["--set", f"run.dir={tmp_path / 'runs'}", "run", "--deployment", "tiny-2025",
                                 "--prompts", str(p), "--json"], capsys)
    assert code == 0, err
    assert json.loads(out)["replicas"] == {"0": 6}
    code, out, err = speedslurm(["--set", f"run.dir={tmp_path / 'runs'}", "run", "--deployment", "nope",
                                 "--prompts", str(p)], capsys)
    assert code == 2 and "unknown deployment 'nope'" in err
