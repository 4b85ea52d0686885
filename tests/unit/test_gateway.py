"""The gateway in front of OpenAI-compatible stub servers: keys, routing, streaming, failover, limits, counts.

Each test runs a real gateway (``speedslurm.api.gateway.open_gateway``, its aiohttp server in a thread) on
127.0.0.1 with URL aliases pointing at stub servers, and talks to it with the real ``openai`` package or plain
HTTP; what the tests assert is what a user of the gateway sees.
"""

from __future__ import annotations

import json
import os
import re
import stat
import threading
import typing as tp
import urllib.error
import urllib.request
from pathlib import Path

import localhttp
import openai
import pytest
from gatewayproc import Gateway
from localhttp import get

from devtools.stubserver import StubServer
from speedslurm.api import gateway as gw
from speedslurm.errors import UsageError


def post(url: str, body: bytes | str, key: str | None, content_type: str = "application/json"
         ) -> tuple[int, dict[str, tp.Any], dict[str, str]]:
    status, text, headers = localhttp.post(url, body, key, {"Content-Type": content_type})
    return status, json.loads(text), headers


def chat(client: openai.OpenAI, text: str, model: str = "m", **kw: tp.Any) -> tp.Any:
    return client.chat.completions.create(model=model, messages=[{"role": "user", "content": text}], **kw)


# ----------------------------------------------------------------------------------------------- keys


def test_keys_are_stored_hashed_in_a_private_file_and_can_be_revoked(gsettings: tp.Any, tmp_path: Path) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    assert key.startswith("ssg-") and len(key) > 40
    path = tmp_path / "gw" / "keys.json"
    assert stat.S_IMODE(path.stat().st_mode) == 0o600
    assert stat.S_IMODE((tmp_path / "gw").stat().st_mode) == 0o700
    assert key not in path.read_text()
    assert [k["name"] for k in gw.list_keys(s)] == ["alice"]
    with pytest.raises(UsageError, match="has a key already"):
        gw.add_key("alice", s)
    with pytest.raises(UsageError, match="not a valid key name"):
        gw.add_key("bad name\n", s)
    gw.revoke_key("alice", s)
    assert gw.list_keys(s) == []
    with pytest.raises(UsageError, match="no key is named 'alice'"):
        gw.revoke_key("alice", s)


# ----------------------------------------------------------------------------------------------- serving


def test_a_request_with_a_key_is_answered_and_a_wrong_key_gets_401(gsettings: tp.Any) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    with StubServer(api_key="backend-secret") as stub, \
            gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0",
                            settings=gsettings(f"gateway.models.m.api_key_file={_key_file(s, 'backend-secret')}")) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0)
        answer = chat(client, "hello gateway")
        assert answer.choices[0].message.content == "echo: hello gateway"
        assert answer.usage is not None and answer.usage.completion_tokens > 0
        with pytest.raises(openai.AuthenticationError):
            chat(openai.OpenAI(base_url=g.url + "/v1", api_key="ssg-wrong", max_retries=0), "x")
        with pytest.raises(openai.AuthenticationError):
            chat(openai.OpenAI(base_url=g.url + "/v1", api_key="backend-secret", max_retries=0), "x")
        # The model list names the aliases and their state.
        models = client.models.list()
        assert [m.id for m in models.data] == ["m"]
        assert models.data[0].model_extra["state"] == "ready"  # type: ignore[index]
        # An unknown model gets 404 naming the aliases.
        with pytest.raises(openai.NotFoundError, match="its models are: m"):
            chat(client, "x", model="gpt-4")


def _key_file(settings: tp.Any, key: str) -> Path:
    path = settings.gateway.root.parent / "backend.key"
    path.write_text(key + "\n")
    return path


def test_a_streamed_answer_arrives_chunk_by_chunk(gsettings: tp.Any) -> None:
    """The stub holds every chunk after the first until the test has received the first one: a gateway that
    buffered the answer would never hand the first chunk over (the client's timeout ends the test then)."""
    s = gsettings()
    key = gw.add_key("alice", s)
    gate = threading.Event()
    with StubServer(stream_gate=gate, completion_tokens=6) as stub, \
            gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=20)
        stream = chat(client, "stream it", stream=True, max_tokens=6)
        parts = []
        for chunk in stream:
            if chunk.choices and chunk.choices[0].delta.content:
                parts.append(chunk.choices[0].delta.content)
                gate.set()  # only now may the stub send the rest
        assert parts == [f"tok{i} " for i in range(6)]
        usage = gw.usage(s)
        assert usage["keys"]["alice"]["completion_tokens"] == 6  # from the stream's last chunk


def test_a_client_that_leaves_mid_stream_costs_the_replica_nothing(gsettings: tp.Any) -> None:
    """The client's connection closing is not the replica's: the replica stays in the pool."""
    import socket

    s = gsettings()
    key = gw.add_key("alice", s)
    gate = threading.Event()
    with StubServer(stream_gate=gate, completion_tokens=50) as stub, \
            gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        host, port = g.url.split("//")[1].split(":")
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        try:
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                             f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}".encode())
                got = b""
                while b"data:" not in got:  # the first event: the stub holds the others
                    more = sock.recv(65536)
                    assert more, got
                    got += more
        finally:
            gate.set()  # the rest of the answer goes to a closed connection
        _until(lambda: gw.status(s)["aliases"][0]["in_flight"] == 0)
        [replica] = gw.status(s)["aliases"][0]["deployments"]
        assert replica["state"] == "READY", replica
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=20)
        assert chat(client, "next").choices[0].message.content == "echo: next"


def test_requests_go_to_the_replica_with_the_most_free_slots(gsettings: tp.Any) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    gate = threading.Event()
    with StubServer(stream_gate=gate, slots=2) as a, StubServer(stream_gate=gate, slots=2) as b, \
            gw.open_gateway({"m": f"{a.url},{b.url}"}, listen="127.0.0.1:0",
                            settings=gsettings("gateway.models.m.slots=2")) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=20)
        # Four streams held open after their first chunk fill both replicas' two slots.
        streams = [chat(client, f"s{i}", stream=True) for i in range(4)]
        for st in streams:
            next(iter(st))
        assert (a.stats.received, b.stats.received) == (2, 2)
        status = gw.status(s)
        [alias] = status["aliases"]
        assert alias["in_flight"] == 4
        gate.set()
        for st in streams:
            list(st)


def test_a_request_whose_replica_drops_it_is_answered_by_another(gsettings: tp.Any) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    with StubServer(drop_first=1) as a, StubServer() as b, \
            gw.open_gateway({"m": f"{a.url},{b.url}"}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0)
        answer = chat(client, "survive a drop")  # both are idle: the first replica listed gets it
        assert answer.choices[0].message.content == "echo: survive a drop"
        # The body reached both replicas once: the first dropped it, the second answered.
        assert (a.stats.received, b.stats.received) == (1, 1)
        assert (a.stats.completions, b.stats.completions) == (0, 1)


def test_a_request_that_kills_two_replicas_is_not_sent_a_third_time(gsettings: tp.Any) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    with StubServer(die_on="poison") as a, StubServer(die_on="poison") as b, StubServer(die_on="poison") as c, \
            gw.open_gateway({"m": f"{a.url},{b.url},{c.url}"}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0)
        with pytest.raises(openai.APIStatusError, match="in flight on 2 replicas") as err:
            chat(client, "poison pill")
        assert err.value.status_code == 502
        assert a.stats.received + b.stats.received + c.stats.received == 2
        # The third replica still serves other requests.
        assert chat(client, "fine").choices[0].message.content == "echo: fine"


def test_a_replica_that_dropped_connections_rejoins_once_it_answers(gsettings: tp.Any) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    with StubServer(drop_first=1) as a, gw.open_gateway({"m": a.url}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=60)
        # Its only replica drops the first attempt: the gateway probes it, it answers, the request is sent again.
        assert chat(client, "again").choices[0].message.content == "echo: again"
        assert a.stats.received == 2


# ----------------------------------------------------------------------------------------------- limits


def test_bad_requests_get_a_clear_4xx_and_never_a_traceback(gsettings: tp.Any) -> None:
    s = gsettings("gateway.max_body_bytes=300000")
    key = gw.add_key("alice", s)
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        url = g.url + "/v1/chat/completions"
        cases: list[tuple[bytes | str, int, str]] = [
            ("{not json", 400, "not JSON"),
            ("[1, 2]", 400, "must be a JSON object"),
            ('{"messages": []}', 400, "names no model"),
            ('{"model": 5}', 400, "names no model"),
            ('{"model": "nope", "messages": []}', 404, "its models are: m"),
            ('{"model": "m", "x": ' + "[" * 100_000 + "]" * 100_000 + "}", 400, "nests more than 64"),
            ('{"model": "m", "x": ' + "[" * 70 + "]" * 70 + "}", 400, "nests more than 64"),
            ('{"model": "m", "x": "' + "a" * 400_000 + '"}', 413, "larger than 300000 bytes"),
            (b'{"model": "m", "x": "\xff"}', 400, "not JSON"),
        ]
        for body, status, words in cases:
            code, data, _ = post(url, body, key)
            assert code == status, (body[:60], code, data)
            assert words in data["error"]["message"], data
        code, data, _ = post(url, '{"model": "m"}', None)
        assert code == 401 and "valid API key" in data["error"]["message"]
        code, body_bytes = get(g.url + "/v1/nothing", key)
        assert code == 404
        # The stub saw none of these.
        assert stub.stats.received == 0


def test_a_full_queue_gets_503_with_retry_after(gsettings: tp.Any) -> None:
    s = gsettings("gateway.max_queue=1", "gateway.models.m.slots=1")
    key = gw.add_key("alice", s)
    gate = threading.Event()
    with StubServer(stream_gate=gate, slots=1) as stub, \
            gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=60)
        held = chat(client, "hold the slot", stream=True)
        next(iter(held))
        results: list[tp.Any] = []
        waiter = threading.Thread(target=lambda: results.append(post(g.url + "/v1/completions",
                                                                      '{"model": "m", "prompt": "w"}', key)))
        waiter.start()
        _until(lambda: gw.status(s)["aliases"][0]["queue"] == 1)
        code, data, headers = post(g.url + "/v1/completions", '{"model": "m", "prompt": "x"}', key)
        assert code == 503 and "wait already" in data["error"]["message"] and headers["Retry-After"] == "5"
        gate.set()  # the held stream ends: its slot goes to the waiting request
        list(held)
        waiter.join()
        code, data, _ = results[0]
        assert code == 200 and data["choices"][0]["text"] == "echo: w"


def test_a_request_that_waits_too_long_gets_503_saying_why(gsettings: tp.Any) -> None:
    s = gsettings("gateway.max_wait_s=0.5", "gateway.models.m.slots=1")
    key = gw.add_key("alice", s)
    gate = threading.Event()
    with StubServer(stream_gate=gate, slots=1) as stub, \
            gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=60)
        held = chat(client, "hold the slot", stream=True)
        next(iter(held))
        code, data, headers = post(g.url + "/v1/completions", '{"model": "m", "prompt": "w"}', key)
        assert code == 503 and "could take the request in 0.5 s: every replica is busy" in data["error"]["message"]
        assert headers["Retry-After"] == "30"
        gate.set()
        list(held)


def _until(check: tp.Callable[[], bool], limit: float = 30) -> None:
    import time

    end = time.monotonic() + limit
    while not check():
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)


# ----------------------------------------------------------------------------------------------- counts


def test_usage_and_metrics_count_per_key(gsettings: tp.Any) -> None:
    s = gsettings()
    alice, bob = gw.add_key("alice", s), gw.add_key("bob", s)
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        for key, n in ((alice, 3), (bob, 2)):
            client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0)
            for i in range(n):
                chat(client, f"q{i}", max_tokens=4)
        post(g.url + "/v1/chat/completions", '{"model": "zzz"}', bob)
        usage = gw.usage(s)
        assert usage["keys"]["alice"]["requests"] == 3 and usage["keys"]["bob"]["requests"] == 2
        assert usage["keys"]["alice"]["completion_tokens"] == 12 and usage["keys"]["bob"]["completion_tokens"] == 8
        code, text = get(g.url + "/metrics", alice)
        assert code == 200
        metrics = text.decode()
        assert 'speedslurm_gateway_requests_total{alias="m",key="alice",code="200"} 3' in metrics
        assert 'speedslurm_gateway_tokens_total{alias="m",key="bob",kind="completion"} 8' in metrics
        assert 'speedslurm_gateway_latency_seconds_count{alias="m"} 5' in metrics
        assert get(g.url + "/metrics", None)[0] == 401
        # Status and usage need the owner's admin key, not a user's.
        assert get(g.url + "/gateway/usage", alice)[0] == 401
    # Saved on exit: usage reads the counts without a gateway.
    saved = gw.usage(s)
    assert saved["saved"] and saved["keys"]["alice"]["requests"] == 3


def test_an_alias_needs_a_model_and_a_good_url(gsettings: tp.Any) -> None:
    s = gsettings()
    with pytest.raises(UsageError, match="no model to serve"):
        gw.open_gateway({}, listen="127.0.0.1:0", settings=s)
    with pytest.raises(UsageError, match="not ALIAS=MODEL"):
        gw.open_gateway(["justamodel"], listen="127.0.0.1:0", settings=s)
    with pytest.raises(UsageError, match="not a server's base URL"):
        gw.open_gateway({"m": "http://127.0.0.1:8080/some/path"}, listen="127.0.0.1:0", settings=s)
    with pytest.raises(UsageError, match="unknown model 'nosuch'"):
        gw.open_gateway({"m": "nosuch"}, listen="127.0.0.1:0", settings=s)
    with pytest.raises(UsageError, match="not HOST:PORT"):
        gw.open_gateway({"m": "http://127.0.0.1:1"}, listen="127.0.0.1:99999", settings=s)


def test_status_and_usage_without_a_gateway_say_so(gsettings: tp.Any) -> None:
    s = gsettings()
    with pytest.raises(UsageError, match="no gateway runs from"):
        gw.status(s)
    assert gw.usage(s)["keys"] == {}


def test_the_folder_is_private(gsettings: tp.Any, tmp_path: Path) -> None:
    s = gsettings()
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s):
        for name in ("admin_key", "gateway.json"):
            assert stat.S_IMODE((tmp_path / "gw" / name).stat().st_mode) == 0o600
    assert not (tmp_path / "gw" / "admin_key").exists()
    assert os.stat(tmp_path / "gw").st_uid == os.getuid()


# ----------------------------------------------------------------------------------------------- clients and life


def test_run_base_url_sends_a_batch_through_the_gateway_with_a_key_file(gsettings: tp.Any, tmp_path: Path,
                                                                        user_config: Path) -> None:
    import subprocess
    import sys

    s = gsettings()
    key = gw.add_key("batcher", s)
    keyfile = tmp_path / "my.key"
    keyfile.write_text(key + "\n")
    prompts = tmp_path / "p.jsonl"
    prompts.write_text("".join(json.dumps({"custom_id": f"c{i}", "prompt": f"line {i}"}) + "\n" for i in range(20)))
    out = tmp_path / "results.jsonl"
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        res = subprocess.run([sys.executable, "-m", "speedslurm", "run", "--base-url", g.url, "--api-key-file",
                              str(keyfile), "--prompts", str(prompts), "--out", str(out)], capture_output=True,
                             text=True, timeout=120, stdin=subprocess.DEVNULL)
        assert res.returncode == 0, res.stderr
        lines = [json.loads(line) for line in out.read_text().splitlines()]
        assert sorted(x["custom_id"] for x in lines) == sorted(f"c{i}" for i in range(20))
        assert all(x["response"]["status_code"] == 200 for x in lines)
        assert gw.usage(s)["keys"]["batcher"]["requests"] == 20


def test_the_access_log_names_the_key_never_the_key_or_the_prompt(gsettings: tp.Any, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    s = gsettings(f"gateway.access_log={log}")
    key = gw.add_key("alice", s)
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        chat(openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0), "a very private prompt")
        post(g.url + "/v1/chat/completions", '{"model": "m"}', "ssg-not-a-key")
    text = log.read_text()
    [line] = [json.loads(x) for x in text.splitlines() if '"alice"' in x]
    assert line["status"] == 200 and line["alias"] == "m" and line["completion_tokens"] > 0
    assert key not in text and "ssg-not-a-key" not in text and "private prompt" not in text


def test_a_client_that_never_sends_its_body_is_cut_off(gsettings: tp.Any) -> None:
    import socket

    s = gsettings("gateway.client_timeout_s=0.5")
    key = gw.add_key("alice", s)
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        host, port = g.url.split("//")[1].split(":")
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                         "Content-Type: application/json\r\nContent-Length: 100\r\n\r\n{".encode())
            answer = sock.recv(65536).decode()
        assert answer.startswith("HTTP/1.1 408") and "did not arrive within 0.5 s" in answer
        assert stub.stats.received == 0


def test_sigterm_finishes_the_requests_in_flight_and_refuses_new_ones(gsettings: tp.Any, tmp_path: Path) -> None:
    import signal

    s = gsettings()
    key = gw.add_key("alice", s)
    gate = threading.Event()
    env = {**os.environ, "SPEEDSLURM_GATEWAY__DIR": str(s.gateway.root)}
    with StubServer(stream_gate=gate, completion_tokens=4) as stub:
        g = Gateway(env, ["gateway", "--listen", "127.0.0.1:0", "--model", f"m={stub.url}"])
        try:
            client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=60)
            stream = iter(chat(client, "in flight", stream=True))
            first = next(stream)
            g.proc.send_signal(signal.SIGTERM)
            _until(lambda: post(g.url + "/v1/chat/completions", '{"model": "m"}', key)[0] == 503)
            code, data, _ = post(g.url + "/v1/chat/completions", '{"model": "m", "messages": []}', key)
            assert code == 503 and "shutting down" in data["error"]["message"]
            gate.set()
            rest = [c.choices[0].delta.content for c in stream if c.choices and c.choices[0].delta.content]
            assert [first.choices[0].delta.content, *rest] == [f"tok{i} " for i in range(4)]
            assert g.output.wait(60) == 0
        finally:
            g.kill()


def test_the_cli_makes_keys_and_shows_a_running_gateway(gsettings: tp.Any, tmp_path: Path) -> None:
    import subprocess
    import sys

    env = {**os.environ, "SPEEDSLURM_GATEWAY__DIR": str(tmp_path / "gw")}

    def cli(*args: str, check: bool = True) -> subprocess.CompletedProcess[str]:
        res = subprocess.run([sys.executable, "-m", "speedslurm", "gateway", *args], capture_output=True, text=True,
                             env=env, timeout=60, stdin=subprocess.DEVNULL)
        assert not check or res.returncode == 0, res.stderr
        return res

    key = cli("keys", "add", "carol").stdout.strip()
    assert key.startswith("ssg-") and "not shown again" in cli("keys", "add", "dave").stderr
    again = cli("keys", "add", "carol", check=False)
    assert again.returncode == 2 and "Error: 'carol' has a key already" in again.stderr and "Traceback" not in again.stderr
    assert [r["name"] for r in json.loads(cli("keys", "list", "--json").stdout)] == ["carol", "dave"]
    none = cli("status", check=False)
    assert none.returncode == 2 and "no gateway runs from" in none.stderr
    s = gsettings()
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        chat(openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0), "hi")
        shown = cli("status").stdout
        assert g.url in shown and "READY" in shown and stub.url in shown
        usage = cli("usage").stdout
        assert re.search(r"carol\s+1\s+\d+\s+\d+\s+0", usage), usage
        assert json.loads(cli("status", "--json").stdout)["aliases"][0]["alias"] == "m"
    cli("keys", "revoke", "dave")
    assert [r["name"] for r in json.loads(cli("keys", "list", "--json").stdout)] == ["carol"]
    bad = subprocess.run([sys.executable, "-m", "speedslurm", "gateway", "--listen", "nonsense", "--model", "m=x"],
                         capture_output=True, text=True, env=env, timeout=60, stdin=subprocess.DEVNULL)
    assert bad.returncode == 2 and "not HOST:PORT" in bad.stderr


def test_a_url_replica_takes_as_many_requests_as_its_server_has_slots(gsettings: tp.Any) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    gate = threading.Event()
    with StubServer(stream_gate=gate, slots=3) as stub, \
            gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        try:
            client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=60)
            held = [chat(client, f"s{i}", stream=True) for i in range(3)]
            for st in held:
                next(iter(st))
            [replica] = gw.status(s)["aliases"][0]["deployments"]
            assert replica["slots"] == 3 and replica["in_flight"] == 3  # from the server's /props
            waiting = threading.Thread(target=lambda: post(g.url + "/v1/completions", '{"model": "m", "prompt": "w"}',
                                                           key))
            waiting.start()
            _until(lambda: gw.status(s)["aliases"][0]["queue"] == 1)
        finally:
            gate.set()
        for st in held:
            list(st)
        waiting.join()


def test_generated_hostile_bodies_get_an_answer_or_a_clear_4xx(gsettings: tp.Any) -> None:
    """Bytes and JSON of every shape thrown at the gateway: each gets a 200 answer or a 4xx with a JSON error that
    says what is wrong; never a 5xx, never a traceback, and the gateway serves on."""
    from hypothesis import HealthCheck, given, settings
    from hypothesis import strategies as st

    s = gsettings("gateway.max_body_bytes=20000")
    key = gw.add_key("alice", s)
    json_values = st.recursive(st.none() | st.booleans() | st.integers() | st.floats(allow_nan=False) | st.text(),
                               lambda inner: st.lists(inner, max_size=4) | st.dictionaries(st.text(), inner,
                                                                                           max_size=4), max_leaves=20)
    bodies = st.one_of(
        st.binary(max_size=300),
        json_values.map(lambda v: json.dumps(v).encode()),
        st.fixed_dictionaries({"model": st.one_of(st.just("m"), st.text(max_size=20), st.integers()),
                               "messages": json_values, "stream": st.one_of(st.booleans(), json_values)},
                              optional={"max_tokens": json_values}).map(lambda v: json.dumps(v).encode()),
    )
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        url = g.url + "/v1/chat/completions"

        @settings(max_examples=150, deadline=None, suppress_health_check=list(HealthCheck))
        @given(body=bodies)
        def check(body: bytes) -> None:
            req = urllib.request.Request(url, data=body, method="POST", headers={
                "Authorization": f"Bearer {key}", "Content-Type": "application/json"})
            try:
                with urllib.request.urlopen(req, timeout=30) as resp:
                    status, text = resp.status, resp.read()
            except urllib.error.HTTPError as exc:
                status, text = exc.code, exc.read()
            assert status == 200 or 400 <= status < 500, (status, text[:300])
            if status != 200:
                assert json.loads(text)["error"]["message"], text[:300]
            assert b"Traceback" not in text

        check()
        assert chat(openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0), "still").choices
