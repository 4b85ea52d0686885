"""The runner against in-process stub servers: retries, rejections, resume, replicas failing and appearing."""

from __future__ import annotations

import json
import threading
import time
import typing as tp
from pathlib import Path

import pytest
import records
from rich.console import Console

from devtools.stubserver import StubServer
from speedslurm.batch.results import final_view
from speedslurm.batch.runner import BatchFailed, BatchOptions, prepare_batch, run_batch
from speedslurm.batch.sources import RunDirSource, StaticSource, describe_failure
from speedslurm.batch.summary import Summary
from speedslurm.errors import SpeedslurmError, UsageError
from speedslurm.rundir.layout import RunDir
from speedslurm.rundir.records import Endpoint, write_json_atomic

KEY = "test-key"
FAST: dict[str, tp.Any] = dict(poll_interval=0.05, backoff_base=0.01, backoff_max=0.05, settle=0.3, quiet=True,
                               timeout=5.0)


def endpoint(url: str, replica: int = 0, parallel: int = 2, key: str = KEY) -> Endpoint:
    return Endpoint(url=url, api_key=key, model="stub-model", deployment_id="d", replica=replica, job_id="1",
                    leader_node="127.0.0.1", follower_nodes=[], rpc_servers=[], llama_version="stub",
                    parallel=parallel, ctx=4096, started_at=0.0, ready_at=0.0)


def prompts_file(tmp_path: Path, n: int, name: str = "p.jsonl", long_ids: tp.Iterable[int] = ()) -> Path:
    path = tmp_path / name
    long = set(long_ids)
    with open(path, "w") as fh:
        for i in range(n):
            text = "x" * 500 if i in long else f"question {i}"
            if i % 2:
                fh.write(json.dumps({"custom_id": f"q{i}", "messages": [{"role": "user", "content": text}]}) + "\n")
            else:
                fh.write(json.dumps({"custom_id": f"q{i}", "prompt": text}) + "\n")
    return path


def run(source: tp.Any, prompts: Path, out: Path | None = None, **kw: tp.Any) -> Summary:
    options = BatchOptions(**{**FAST, **kw})
    prepared = prepare_batch(prompts, out, options)
    try:
        return run_batch(source, prepared, options, Console(stderr=True, quiet=True))
    finally:
        prepared.close()


def lines(path: Path) -> list[dict[str, tp.Any]]:
    return [json.loads(x) for x in path.read_text().splitlines()]


def assert_exactly_once_ok(out: Path, n: int) -> None:
    recs = lines(out)
    ok = [r["custom_id"] for r in recs if r["response"] and r["response"]["status_code"] == 200]
    assert len(ok) == len(set(ok)), "a custom_id has two successful lines"
    assert set(ok) == {f"q{i}" for i in range(n)}


def test_basic_run_all_formats_and_summary(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 40)
    with StubServer(api_key=KEY, slots=4) as stub:
        source = StaticSource.probe(stub.url, KEY)
        assert source.endpoints[0].parallel == 4 and source.endpoints[0].model == "stub-model"
        s = run(source, prompts, max_tokens=5)
    out = tmp_path / "p.results.jsonl"
    assert out.stat().st_mode & 0o777 == 0o600
    assert_exactly_once_ok(out, 40)
    assert (s.ok, s.failed, s.skipped, s.total, s.status) == (40, 0, 0, 40, "completed")
    assert s.completion_tokens == 40 * 5 and s.prompt_tokens > 0
    assert s.per_replica == {0: 40} and len(s.latencies) == 40
    rec = lines(out)[0]
    assert rec["response"]["body"]["choices"][0]["text"].startswith("echo: question")


def test_openai_client_gives_the_same_results(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 10, long_ids=[3])
    with StubServer(api_key=KEY, fail_first=1, max_prompt_chars=100) as stub:
        s = run(StaticSource(endpoint(stub.url)), prompts, client="openai")
    assert (s.ok, s.failed, s.retries) == (9, 1, 10)  # the long prompt got a 503 first, then its 400
    view = final_view(tmp_path / "p.results.jsonl")
    assert view["q3"]["error"]["code"] == "http_400"
    assert view["q2"]["response"]["body"]["object"] == "text_completion"


def test_transient_errors_are_retried(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 20)
    with StubServer(api_key=KEY, fail_first=2, fail_status=503) as stub:
        s = run(StaticSource(endpoint(stub.url)), prompts)
        assert stub.stats.received == 60
    assert (s.ok, s.failed, s.retries) == (20, 0, 40)
    assert_exactly_once_ok(tmp_path / "p.results.jsonl", 20)
    assert len(lines(tmp_path / "p.results.jsonl")) == 20  # retried attempts leave no lines


def test_dropped_connections_are_retried(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 12)
    with StubServer(api_key=KEY, drop_first=1) as stub:
        s = run(StaticSource(endpoint(stub.url)), prompts, down_after=1000)
        assert stub.stats.received == 24  # each request dropped once, then answered
    assert (s.ok, s.failed) == (12, 0)
    # a drop on a reused keep-alive connection looks like the server closing an idle one: resent at once
    assert s.retries <= 12


def test_retries_are_bounded_then_an_error_line(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 4)
    with StubServer(api_key=KEY, fail_first=100, fail_status=500) as stub:
        s = run(StaticSource(endpoint(stub.url)), prompts, retries=2)
        assert stub.stats.received == 4 * 3
    assert (s.ok, s.failed, s.errors) == (0, 4, {"http_500": 4})
    err = lines(tmp_path / "p.results.jsonl")[0]["error"]
    assert err["code"] == "http_500" and "gave up after 3 attempts" in err["message"]


def test_context_overflow_gets_an_error_line_and_the_batch_goes_on(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 10, long_ids=[2, 7])
    with StubServer(api_key=KEY, max_prompt_chars=100) as stub:
        s = run(StaticSource(endpoint(stub.url)), prompts)
        assert stub.stats.rejected == 2  # not retried
    assert (s.ok, s.failed, s.errors) == (8, 2, {"http_400": 2})
    view = final_view(tmp_path / "p.results.jsonl")
    assert view["q2"]["response"] is None
    assert "exceeds the available context size" in view["q2"]["error"]["message"]


def test_resume_retries_failures_and_skips_successes(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 10, long_ids=[4])
    out = tmp_path / "out.jsonl"
    with StubServer(api_key=KEY, max_prompt_chars=100) as stub:
        first = run(StaticSource(endpoint(stub.url)), prompts, out)
    assert (first.ok, first.failed) == (9, 1)
    with StubServer(api_key=KEY) as stub:  # the context is big enough now
        second = run(StaticSource(endpoint(stub.url)), prompts, out)
        assert stub.stats.received == 1
    assert (second.ok, second.failed, second.skipped) == (1, 0, 9)
    assert_exactly_once_ok(out, 10)
    recs = [r for r in lines(out) if r["custom_id"] == "q4"]
    assert [r["error"] and r["error"]["code"] for r in recs] == ["http_400", None]  # error line, then success
    with StubServer(api_key=KEY) as stub:
        third = run(StaticSource(endpoint(stub.url)), prompts, out)
        assert stub.stats.received == 0
    assert (third.ok, third.skipped, third.per_replica) == (0, 10, {})


def test_resume_after_a_partial_last_line(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 6)
    out = tmp_path / "out.jsonl"
    with StubServer(api_key=KEY) as stub:
        run(StaticSource(endpoint(stub.url)), prompts, out)
        data = out.read_bytes()
        cut = data[: len(data) - 30]  # the run was killed in the middle of writing its last line
        out.write_bytes(cut)
        options = BatchOptions(**FAST)
        prepared = prepare_batch(prompts, out, options)
        assert any("removed a partial last line" in n for n in prepared.results.previous.notices)
        try:
            s = run_batch(StaticSource(endpoint(stub.url)), prepared, options, Console(quiet=True))
        finally:
            prepared.close()
    assert (s.ok, s.skipped) == (1, 5)
    assert out.read_bytes().endswith(b"\n")
    assert_exactly_once_ok(out, 6)


def test_wrong_api_key_stops_the_run(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 5)
    with StubServer(api_key=KEY) as stub:
        with pytest.raises(UsageError, match="rejected the API key"):
            StaticSource.probe(stub.url, "wrong")
        with pytest.raises(BatchFailed, match=r"replica r0 at .* rejected the API key \(401\)") as info:
            run(StaticSource(endpoint(stub.url, key="wrong")), prompts)
    assert info.value.exit_code == 1 and info.value.summary.ok == 0
    assert (tmp_path / "p.results.jsonl").read_bytes() == b""  # no error lines for a config mistake


def test_unreachable_base_url() -> None:
    with StubServer() as stub:
        url = stub.url
    with pytest.raises(SpeedslurmError, match=f"cannot reach the server at {url}"):
        StaticSource.probe(url, None, timeout=2)


def test_concurrency_override(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 30)
    # each answer takes a second: the 10 sent at once are all being answered together
    with StubServer(api_key=KEY, latency=1.0, slots=100) as stub:
        s = run(StaticSource(endpoint(stub.url, parallel=1)), prompts, concurrency=10)
        peak = stub.stats.peak
    assert s.ok == 30
    assert peak == 10  # not the endpoint's 1 slot: --concurrency's 10 in flight, and never more


def test_replica_failing_mid_batch_moves_its_requests(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 80)
    a = StubServer(api_key=KEY, latency=0.02, slots=2).start()
    b = StubServer(api_key=KEY, latency=0.02, slots=2).start()

    def kill_a() -> None:
        _wait_for(lambda: a.stats.completions >= 10)
        a.stop()

    killer = threading.Thread(target=kill_a)
    killer.start()
    try:
        s = run(StaticSource([endpoint(a.url, 0), endpoint(b.url, 1)]), prompts, outage=30)
    finally:
        killer.join()
        b.stop()
    assert s.ok == 80 and s.failed == 0
    # the requests it dropped went to b after a moment, not after the outage: the batch ended while a was probed
    assert s.failed_replicas[0].endswith("(still probed when the run ended)"), s.failed_replicas
    assert s.per_replica[0] >= 10 and s.per_replica[1] > 0
    assert s.per_replica[0] + s.per_replica[1] == 80
    assert "unreachable" in s.failed_replicas[0] and 1 not in s.failed_replicas
    assert_exactly_once_ok(tmp_path / "p.results.jsonl", 80)


def _wait_for(cond: tp.Callable[[], bool], timeout: float = 20) -> None:
    end = time.monotonic() + timeout
    while not cond():
        if time.monotonic() > end:
            raise TimeoutError
        time.sleep(0.005)


def write_endpoint(rd: RunDir, ep: Endpoint) -> None:
    rd.replica_dir(ep.replica).mkdir(parents=True, exist_ok=True)
    write_json_atomic(rd.endpoint_path(ep.replica), ep.to_json())


def test_run_dir_replica_appears_late_and_one_fails_with_its_reason(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 120)
    rd = RunDir(tmp_path / "dep")
    a = StubServer(api_key=KEY, latency=0.02, slots=2).start()
    b = StubServer(api_key=KEY, latency=0.02, slots=2).start()
    write_endpoint(rd, endpoint(a.url, 0))

    def script() -> None:
        _wait_for(lambda: a.stats.completions >= 10)
        write_endpoint(rd, endpoint(b.url, 1))  # replica 1 becomes READY mid-batch
        _wait_for(lambda: b.stats.completions >= 10)
        write_json_atomic(rd.failed_path(0), records.failed(role="follower", rank=1, node="n2", exit_code=-9,
                                                            reason="rpc-server was killed"))
        a.stop()

    t = threading.Thread(target=script)
    t.start()
    try:
        s = run(RunDirSource(rd, 2), prompts)
    finally:
        t.join()
        b.stop()
    assert s.ok == 120 and s.per_replica[0] >= 10 and s.per_replica[1] >= 10
    assert s.failed_replicas == {0: "follower 1 on n2: rpc-server was killed (exit code -9)"}
    assert_exactly_once_ok(tmp_path / "p.results.jsonl", 120)


def test_every_replica_failed_stops_with_the_reason_and_a_valid_file(tmp_path: Path) -> None:
    prompts = prompts_file(tmp_path, 200)
    rd = RunDir(tmp_path / "dep")
    a = StubServer(api_key=KEY, latency=0.02, slots=2).start()
    write_endpoint(rd, endpoint(a.url, 0))

    def script() -> None:
        _wait_for(lambda: a.stats.completions >= 10)
        a.stop()
        write_json_atomic(rd.failed_path(0), records.failed(role="leader", node="n1", exit_code=134,
                                                            reason="llama-server aborted"))

    t = threading.Thread(target=script)
    t.start()
    try:
        with pytest.raises(BatchFailed) as info:
            run(RunDirSource(rd, 1), prompts, out=tmp_path / "out.jsonl")
    finally:
        t.join()
    err = info.value
    assert "every replica failed (replica r0: leader on n1: llama-server aborted (exit code 134))" in err.message
    assert "run the same command" in (err.fix or "")
    assert err.summary.status == "failed" and err.summary.ok >= 10
    recs = lines(tmp_path / "out.jsonl")  # every line complete and valid JSON
    # the requests in flight when it died got a line saying so (the next run counts the death); at most its slots
    died = [r for r in recs if r["error"] and r["error"]["code"] == "replica_died"]
    assert len(recs) == err.summary.ok + err.summary.failed + len(died) and len(died) <= 2
    assert all("in flight on 1 replica that died (r0: leader on n1: llama-server aborted" in r["error"]["message"]
               for r in died)
    b = StubServer(api_key=KEY).start()
    try:
        s = run(StaticSource(endpoint(b.url)), prompts, out=tmp_path / "out.jsonl")
    finally:
        b.stop()
    assert s.skipped == err.summary.ok and s.ok == 200 - err.summary.ok
    assert_exactly_once_ok(tmp_path / "out.jsonl", 200)


def test_job_ended_fails_pending_replicas() -> None:
    alive = [True]
    calls = []
    now = [0.0]

    def job_alive() -> bool:
        calls.append(now[0])
        return alive[0]

    src = RunDirSource(RunDir(Path("/nonexistent/dep")), 2, job_alive=job_alive, alive_every=2.0,
                       clock=lambda: now[0])
    st = src.poll()
    assert (st.ready, st.failed, st.finished) == ([], {}, False)
    now[0] = 1.0
    src.poll()
    assert calls == [0.0]  # rate-limited
    alive[0] = False
    now[0] = 2.5
    st = src.poll()
    assert st.finished and set(st.failed) == {0, 1} and "the job ended" in st.failed[0]


def test_describe_failure_reads_the_failed_record_the_job_side_writes() -> None:
    from speedslurm.rundir.records import Failed

    assert describe_failure(Failed.from_json(records.failed(role="leader", node="n1", exit_code=134))) == \
        "leader on n1 (exit code 134)"
    assert describe_failure(Failed.from_json(records.failed(role="follower", rank=2, node="n3", exit_code=None,
                                                            reason="rpc-server did not listen"))) == \
        "follower 2 on n3: rpc-server did not listen"


def test_job_failures_mark_single_replicas(tmp_path: Path) -> None:
    rd = RunDir(tmp_path / "dep")
    write_endpoint(rd, endpoint("http://127.0.0.1:9", 0))
    write_endpoint(rd, endpoint("http://127.0.0.1:9", 1))
    ended: dict[int, str] = {}
    src = RunDirSource(rd, 2, job_failures=lambda: ended, alive_every=0.0)
    st = src.poll()
    assert [e.replica for e in st.ready] == [0, 1] and st.finished
    ended[1] = "job 12_1 ended (CANCELLED)"
    st = src.poll()
    assert [e.replica for e in st.ready] == [0] and st.failed == {1: "job 12_1 ended (CANCELLED)"}


def test_stub_server_behaves_like_llama_server() -> None:
    import urllib.error
    import urllib.request

    def get(url: str, key: str | None = None) -> tuple[int, dict[str, tp.Any]]:
        req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
        try:
            with urllib.request.urlopen(req, timeout=5) as resp:
                return resp.status, json.loads(resp.read())
        except urllib.error.HTTPError as exc:
            return exc.code, json.loads(exc.read())

    with StubServer(api_key=KEY, slots=3, loading_s=0.3) as stub:
        assert get(stub.url + "/health") == (503, {"error": {"code": 503, "message": "Loading model",
                                                             "type": "unavailable_error"}})
        time.sleep(0.35)
        assert get(stub.url + "/health") == (200, {"status": "ok"})
        assert get(stub.url + "/v1/models")[1]["data"][0]["id"] == "stub-model"  # no key needed
        assert get(stub.url + "/props")[0] == 401
        assert get(stub.url + "/props", KEY)[1]["total_slots"] == 3


def test_a_batch_started_with_hangups_ignored_goes_on_after_a_hangup(tmp_path: Path) -> None:
    """``nohup speedslurm submit ... &``: SIGHUP is ignored when it starts, so logging out (a SIGHUP during the
    batch) does not stop it; every prompt gets its answer."""
    import os
    import signal

    prompts = prompts_file(tmp_path, 40)
    before = signal.signal(signal.SIGHUP, signal.SIG_IGN)
    try:
        with StubServer(latency=0.05, slots=1, api_key=KEY) as stub:
            def hang_up() -> None:
                deadline = time.monotonic() + 60
                while stub.stats.completions < 1 and time.monotonic() < deadline:
                    time.sleep(0.01)
                os.kill(os.getpid(), signal.SIGHUP)  # with 39 answers to go (50 ms each, one at a time)

            t = threading.Thread(target=hang_up)
            t.start()
            s = run(StaticSource(endpoint(stub.url, parallel=1)), prompts)
            t.join()
        assert (s.ok, s.failed) == (40, 0)
        assert signal.getsignal(signal.SIGHUP) is signal.SIG_IGN  # left as it was
    finally:
        signal.signal(signal.SIGHUP, before)
