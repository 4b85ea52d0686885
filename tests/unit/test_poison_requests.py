"""A request that crashes its server: after two replicas died with it in flight it gets an error line and is not
sent again; a later run into the same results file names it and skips it unless asked (--retry-suspected)."""

from __future__ import annotations

import contextlib
import json
import time
import typing as tp
from pathlib import Path

import pytest
import records
from rich.console import Console

from devtools.stubserver import StubServer, _App
from speedslurm.batch.results import final_view
from speedslurm.batch.runner import BatchFailed, BatchOptions, prepare_batch, run_batch
from speedslurm.batch.sources import RunDirSource, StaticSource
from speedslurm.batch.summary import Summary
from speedslurm.rundir.layout import RunDir
from speedslurm.rundir.records import Endpoint, write_json_atomic

KEY = "poison-key"
FAST: dict[str, tp.Any] = dict(poll_interval=0.02, backoff_base=0.01, backoff_max=0.05, settle=0.3, quiet=True,
                               timeout=20.0, probe_base=0.01, probe_max=0.05)
POISON = "POISON"


class CrashingServer(StubServer):
    """The stand-in for a llama-server that crashes on one request: on a completion request whose body holds
    POISON it stops listening and resets every connection (what a crashed server looks like), then its job side
    writes the replica's failed.json, as the leader role does when llama-server exits."""

    def __init__(self, run_dir: RunDir, replica: int, **config: tp.Any) -> None:
        super().__init__(api_key=KEY, **config)
        self.poisoned = 0
        server = self
        rd = run_dir

        class App(_App):
            def handle(self, conn: tp.Any, method: str, path: str, auth: bytes, body: bytes, close: bool) -> None:
                if method == "POST" and POISON.encode() in body:
                    server.poisoned += 1
                    server.close_now()
                    write_json_atomic(rd.failed_path(replica), records.failed(
                        role="leader", node=f"n{replica}", exit_code=-11, reason="llama-server crashed (SIGSEGV)"))
                    return
                super().handle(conn, method, path, auth, body, close)

        self.app = App(self.config)


def endpoint(url: str, replica: int, job: str = "1") -> Endpoint:
    return Endpoint(url=url, api_key=KEY, model="stub-model", deployment_id="d", replica=replica, job_id=job,
                    leader_node="127.0.0.1", follower_nodes=[], rpc_servers=[], llama_version="stub", parallel=2,
                    ctx=4096, started_at=0.0, ready_at=0.0)


def deploy(folder: Path, replicas: int, **config: tp.Any) -> tuple[RunDir, list[CrashingServer]]:
    """A run directory whose replicas are crashing stand-ins, each READY (its endpoint.json written)."""
    rd = RunDir(folder)
    servers = [CrashingServer(rd, r, **config).start() for r in range(replicas)]
    for r, srv in enumerate(servers):
        rd.replica_dir(r).mkdir(parents=True, exist_ok=True)
        write_json_atomic(rd.endpoint_path(r), endpoint(srv.url, r).to_json())
    return rd, servers


def prompts_file(tmp_path: Path, n: int, poison: tp.Iterable[int]) -> Path:
    bad = set(poison)
    path = tmp_path / "p.jsonl"
    path.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": f"{POISON} {i}" if i in bad else f"q {i}"})
                            + "\n" for i in range(n)))
    return path


def run(source: tp.Any, prompts: Path, out: Path, **kw: tp.Any) -> Summary:
    options = BatchOptions(**{**FAST, **kw})
    prepared = prepare_batch(prompts, out, options)
    try:
        return run_batch(source, prepared, options, Console(stderr=True, quiet=True))
    finally:
        prepared.close()


def lines(path: Path) -> list[dict[str, tp.Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


@contextlib.contextmanager
def killed_both() -> tp.Iterator[None]:
    """A run whose replicas the suspect killed both: it fails ("every replica failed") when requests were left,
    or completes when the others had their lines before the second one died."""
    try:
        yield
    except BatchFailed as exc:
        assert "every replica failed" in exc.message


def run_killing_both(tmp_path: Path, prompts: Path, out: Path) -> None:
    """A run on two crashing replicas, which the poison request kills both (see :func:`killed_both`)."""
    rd, servers = deploy(tmp_path / "dep", 2)
    try:
        with killed_both():
            run(RunDirSource(rd, 2), prompts, out)
    finally:
        for srv in servers:
            srv.stop()


def ok_ids(path: Path) -> list[str]:
    return [r["custom_id"] for r in lines(path) if r["response"] and r["response"]["status_code"] == 200]


def test_a_request_that_kills_two_replicas_gets_an_error_line_and_the_third_serves_the_rest(tmp_path: Path) -> None:
    n = 60
    prompts = prompts_file(tmp_path, n, poison=[7])
    out = tmp_path / "out.jsonl"
    rd, servers = deploy(tmp_path / "dep", 3, latency=0.01)
    try:
        s = run(RunDirSource(rd, 3), prompts, out)
    finally:
        for srv in servers:
            srv.stop()
    # it crashed two servers and was never sent to the third
    assert sum(srv.poisoned for srv in servers) == 2
    assert sorted(srv.poisoned for srv in servers) == [0, 1, 1]
    assert len(s.failed_replicas) == 2 and all("crashed (SIGSEGV)" in w for w in s.failed_replicas.values())
    assert (s.ok, s.failed, s.errors, s.suspected, s.status) == (n - 1, 1, {"suspected_crash": 1}, ["q7"],
                                                                 "completed")
    ok = ok_ids(out)
    assert sorted(ok) == sorted(f"q{i}" for i in range(n) if i != 7) and len(ok) == len(set(ok))
    err = final_view(out)["q7"]["error"]
    assert err["code"] == "suspected_crash"
    assert "in flight on 2 replicas that died" in err["message"] and "SIGSEGV" in err["message"]
    assert "--retry-suspected" in err["message"]
    assert [r["custom_id"] for r in lines(out) if r["error"]] == ["q7"]  # one error line, for it alone


def test_a_rerun_names_the_suspect_skips_it_and_sends_it_only_when_asked(tmp_path: Path) -> None:
    n = 12
    prompts = prompts_file(tmp_path, n, poison=[3])
    out = tmp_path / "out.jsonl"
    run_killing_both(tmp_path, prompts, out)
    assert final_view(out)["q3"]["error"]["code"] == "suspected_crash"
    with StubServer(api_key=KEY) as stub:  # a new server: the suspect is not sent to it
        again = run(StaticSource(endpoint(stub.url, 0)), prompts, out)
        received = stub.stats.received
    assert again.suspected == ["q3"] and again.suspected_skipped == 1 and received == n - 1 - again.skipped
    assert again.ok + again.skipped == n - 1 and again.failed == 0 and again.remaining == 1
    assert again.to_json()["suspected"] == {"ids": ["q3"], "skipped": 1}
    with StubServer(api_key=KEY) as stub:  # asked: it is sent (this server does not crash on it)
        asked = run(StaticSource(endpoint(stub.url, 0)), prompts, out, retry_suspected=True)
        assert stub.stats.received == 1
    assert (asked.ok, asked.skipped, asked.suspected, asked.remaining) == (1, n - 1, [], 0)
    assert final_view(out)["q3"]["response"]["status_code"] == 200


def test_one_replica_two_runs_a_death_each_then_the_third_run_skips_it(tmp_path: Path) -> None:
    """With one replica every crash fails the run; the death is written down (replica_died), so the second
    crash, in the next run, makes it a suspect, and the run after that completes without it."""
    n = 10
    prompts = prompts_file(tmp_path, n, poison=[4])
    out = tmp_path / "out.jsonl"
    for attempt in (1, 2):
        rd, servers = deploy(tmp_path / f"dep{attempt}", 1)
        try:
            with pytest.raises(BatchFailed, match="every replica failed"):
                run(RunDirSource(rd, 1), prompts, out)
        finally:
            servers[0].stop()
        assert servers[0].poisoned == 1
        last = final_view(out)["q4"]["error"]
        if attempt == 1:
            assert last["code"] == "replica_died" and "in flight on 1 replica that died" in last["message"]
        else:
            assert last["code"] == "suspected_crash"
            assert "in flight on 2 replicas that died" in last["message"] and "1 in an earlier run" in last["message"]
    with StubServer(api_key=KEY) as stub:
        s = run(StaticSource(endpoint(stub.url, 0)), prompts, out)
    assert s.suspected == ["q4"] and s.suspected_skipped == 1 and s.ok + s.skipped == n - 1
    assert sorted(set(ok_ids(out))) == sorted(f"q{i}" for i in range(n) if i != 4)


def test_cli_rerun_lists_the_suspect_and_exits_3_and_retry_suspected_sends_it(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    from speedslurm.cli import main

    prompts = prompts_file(tmp_path, 5, poison=[1])
    out = tmp_path / "out.jsonl"
    run_killing_both(tmp_path, prompts, out)

    def cli(*args: str) -> tuple[int, str, str]:
        try:
            main(list(args))
            code = 0
        except SystemExit as exc:
            code = int(exc.code or 0)
        o, e = capsys.readouterr()
        return code, o, e

    done_before = len(ok_ids(out))
    with StubServer() as stub:
        code, _, err = cli("run", "--base-url", stub.url, "--prompts", str(prompts), "--out", str(out))
        assert code == 3, err
        assert stub.stats.received == 5 - 1 - done_before  # all but the suspect and those done
        flat = " ".join(err.split())
        assert "1 request suspected of crashing its server in an earlier run" in flat and "q1" in flat
        assert "--retry-suspected" in flat
        code, out_json, err = cli("run", "--base-url", stub.url, "--prompts", str(prompts), "--out", str(out),
                                  "--json")
        assert code == 3 and json.loads(out_json)["suspected"] == {"ids": ["q1"], "skipped": 1}
        before = stub.stats.received
        code, _, err = cli("run", "--base-url", stub.url, "--prompts", str(prompts), "--out", str(out),
                           "--retry-suspected")
        assert code == 0, err
        assert stub.stats.received == before + 1


def died_line(cid: str) -> str:
    return json.dumps({"id": "x", "custom_id": cid, "response": None,
                       "error": {"code": "replica_died", "message": "in flight on 1 replica that died"}}) + "\n"


def test_the_last_request_turning_suspect_completes_the_run(tmp_path: Path) -> None:
    """The only request left had one death in an earlier run and crashes this run's one replica: it has its
    line, so the run completes (1 failed), not 'every replica failed'."""
    prompts = prompts_file(tmp_path, 1, poison=[0])
    out = tmp_path / "out.jsonl"
    out.write_text(died_line("q0"))
    rd, servers = deploy(tmp_path / "dep", 1)
    try:
        s = run(RunDirSource(rd, 1), prompts, out)
    finally:
        servers[0].stop()
    assert (s.failed, s.suspected, s.status) == (1, ["q0"], "completed")
    assert final_view(out)["q0"]["error"]["code"] == "suspected_crash"


def test_a_job_cancelled_twice_blames_no_request(tmp_path: Path) -> None:
    """No request crashes anything: the deployment's job ends (cancelled) twice with requests in flight. That is
    no death of a server: no request gets a replica_died or suspected_crash line, and a later run sends them."""
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"q{i}", "prompt": f"q {i}"}) + "\n" for i in range(6)))
    out = tmp_path / "out.jsonl"
    for attempt in (1, 2):
        rd = RunDir(tmp_path / f"dep{attempt}")
        with StubServer(api_key=KEY, latency=3600.0, slots=2) as stub:  # the answers never come in the test
            rd.replica_dir(0).mkdir(parents=True, exist_ok=True)
            write_json_atomic(rd.endpoint_path(0), endpoint(stub.url, 0).to_json())

            def alive(stub: StubServer = stub) -> bool:
                return stub.stats.active < 2  # the job is cancelled once 2 are in flight

            with pytest.raises(BatchFailed, match="every replica failed"):
                run(RunDirSource(rd, 1, job_alive=alive, alive_every=0.01), prompts, out)
    assert [r for r in lines(out) if r["error"]] == []
    with StubServer(api_key=KEY) as stub:
        s = run(StaticSource(endpoint(stub.url, 0)), prompts, out)
    assert (s.ok, s.failed, s.suspected) == (6, 0, [])


class RestartingServer(StubServer):
    """A server under a supervisor that restarts it when it crashes: a completion request holding POISON resets
    every connection; with ``loading_s`` the restarted server answers 503 (loading its model) for that long, as
    llama-server does; with 0 it answers at once (a restart quicker than a probe)."""

    def __init__(self, **config: tp.Any) -> None:
        super().__init__(**config)
        self.poisoned = 0
        server = self

        class App(_App):
            def handle(self, conn: tp.Any, method: str, path: str, auth: bytes, body: bytes, close: bool) -> None:
                if method == "POST" and POISON.encode() in body:
                    server.poisoned += 1
                    for c in list(self.conns):
                        if c.transport is not None:
                            c.transport.abort()
                    self.started = time.monotonic()  # loading again
                    return
                super().handle(conn, method, path, auth, body, close)

        self.app = App(self.config)


@pytest.mark.parametrize("loading_s", [0.2, 0.0], ids=["loads-again", "instant"])
def test_a_request_that_crashes_a_restarted_server_is_not_sent_for_ever(tmp_path: Path, loading_s: float) -> None:
    """``run --base-url`` against a server that is restarted at once after each crash: no failed.json ever says
    it died. A restart seen by the probe (503 while loading) is a death: the second makes it a suspect; a restart
    too quick to see costs an attempt: --retries bounds it. Either way the batch completes with the rest."""
    n = 12
    prompts = prompts_file(tmp_path, n, poison=[5])
    out = tmp_path / "out.jsonl"
    with RestartingServer(latency=0.01, loading_s=loading_s) as srv:
        srv.app.started -= 10  # loaded before the batch
        s = run(StaticSource(endpoint(srv.url, 0)), prompts, out, retries=3)
        crashes = srv.poisoned
    assert (s.ok, s.failed, s.status) == (n - 1, 1, "completed")
    err = final_view(out)["q5"]["error"]
    # (a crash may take more than one send: on kept-alive connections that it broke, then on a new one)
    if loading_s:
        assert err["code"] == "suspected_crash" and s.suspected == ["q5"] and crashes >= 2
        assert "its server restarted" in err["message"]
    else:
        assert err["code"] == "connection_error" and "gave up after 4 attempts" in err["message"] and crashes >= 4
    assert sorted(ok_ids(out)) == sorted(f"q{i}" for i in range(n) if i != 5)


def test_a_suspect_edited_since_is_a_new_request_and_is_sent(tmp_path: Path) -> None:
    """The user fixes the prompt that crashed the servers: the next run sends it (it is not the suspect any more)."""
    n = 6
    prompts = prompts_file(tmp_path, n, poison=[2])
    out = tmp_path / "out.jsonl"
    run_killing_both(tmp_path, prompts, out)
    assert final_view(out)["q2"]["error"]["code"] == "suspected_crash"
    edited = [json.loads(line) for line in prompts.read_text().splitlines()]
    for rec in edited:
        if rec["custom_id"] == "q2":
            rec["prompt"] = "a harmless prompt now"
    prompts.write_text("".join(json.dumps(rec) + "\n" for rec in edited))
    with StubServer(api_key=KEY) as stub:
        again = run(StaticSource(endpoint(stub.url, 0)), prompts, out)
    assert (again.suspected, again.suspected_skipped, again.failed, again.remaining) == ([], 0, 0, 0)
    view = final_view(out)
    assert view["q2"]["response"]["status_code"] == 200
    assert "harmless" in json.dumps(view["q2"]["response"]["body"])  # the edited prompt was the one sent


def test_submit_with_only_suspects_left_says_so_and_queues_nothing(tmp_path: Path) -> None:
    from speedslurm.api import submit

    n = 5
    prompts = prompts_file(tmp_path, n, poison=[1])
    out = tmp_path / "out.jsonl"
    run_killing_both(tmp_path, prompts, out)
    with StubServer(api_key=KEY) as stub:
        run(StaticSource(endpoint(stub.url, 0)), prompts, out)  # the others get their answers
    said: list[str] = []
    summary = submit("no-model-is-started", prompts, out, on_message=said.append)
    assert summary.suspected == ["q1"] and summary.suspected_skipped == 1
    assert len(said) == 1 and "Nothing to send" in said[0] and "q1" in said[0] and "--retry-suspected" in said[0]
