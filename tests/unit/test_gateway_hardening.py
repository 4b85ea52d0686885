"""The gateway against replicas, clients and files that misbehave: answers that are not HTTP, replicas that take
no connection, servers that compress, streams cut anywhere, keys that are not UTF-8, hand-edited keys files,
bodies that are not what they claim, nohup, and what the counts, the access log and ``gateway usage`` say then.

Like ``test_gateway.py``: a real gateway (``open_gateway``, in a thread) on 127.0.0.1 with URL aliases pointing
at stub servers (``devtools.stubserver``, or a small aiohttp app here when a test needs a behaviour of its own);
what the tests assert is what a user of the gateway sees.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import os
import signal
import socket
import threading
import time
import typing as tp
from pathlib import Path

import openai
import pytest
from aiohttp import web
from gatewayproc import Gateway
from inprocess import speedslurm
from localhttp import get, post

from devtools.stubserver import StubServer
from speedslurm.api import gateway as gw
from speedslurm.errors import SpeedslurmError, UsageError
from speedslurm.gateway import server

CHAT = '{"model": "m", "messages": [{"role": "user", "content": "x"}]}'


def raw(url: str, data: bytes, *, shut: bool = False) -> bytes:
    """Send ``data`` as it is to the gateway at ``url``; what came back until it closed the connection."""
    host, port = url.split("//")[1].split(":")
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(data)
        if shut:
            sock.shutdown(socket.SHUT_WR)
        got = b""
        while more := sock.recv(65536):
            got += more
        return got


def until(check: tp.Callable[[], tp.Any], limit: float = 30) -> tp.Any:
    end = time.monotonic() + limit
    while not (value := check()):
        assert time.monotonic() < end, "condition not reached"
        time.sleep(0.02)
    return value


def access_lines(path: Path) -> list[dict[str, tp.Any]]:
    return [json.loads(line) for line in path.read_text().splitlines()] if path.exists() else []


def deployments(s: tp.Any) -> dict[str, str]:
    return {d["url"]: d["state"] for d in gw.status(s)["aliases"][0]["deployments"]}


class Backend:
    """A small aiohttp server in its own thread: ``routes`` maps (method, path) to a handler."""

    def __init__(self, routes: dict[tuple[str, str], tp.Callable[[web.Request], tp.Awaitable[web.StreamResponse]]]
                 ) -> None:
        self.routes = routes
        self.url = ""
        self._ready = threading.Event()
        self._loop: asyncio.AbstractEventLoop | None = None
        self._stop: asyncio.Event | None = None
        self._thread = threading.Thread(target=lambda: asyncio.run(self._main()), daemon=True)

    async def _main(self) -> None:
        self._loop, self._stop = asyncio.get_running_loop(), asyncio.Event()
        app = web.Application()
        for (method, path), handler in self.routes.items():
            app.router.add_route(method, path, handler)
        runner = web.AppRunner(app, shutdown_timeout=1)
        await runner.setup()
        site = web.TCPSite(runner, "127.0.0.1", 0)
        await site.start()
        self.url = f"http://127.0.0.1:{site._server.sockets[0].getsockname()[1]}"  # type: ignore[union-attr]
        self._ready.set()
        await self._stop.wait()
        await runner.cleanup()

    def __enter__(self) -> Backend:
        self._thread.start()
        assert self._ready.wait(30)
        return self

    def __exit__(self, *exc: object) -> None:
        assert self._loop is not None and self._stop is not None
        self._loop.call_soon_threadsafe(self._stop.set)
        self._thread.join(30)


def event(data: dict[str, tp.Any]) -> bytes:
    return b"data: " + json.dumps(data).encode() + b"\n\n"


CHUNK = {"id": "c", "object": "chat.completion.chunk", "created": 1, "model": "m"}


def token(text: str) -> bytes:
    return event({**CHUNK, "choices": [{"index": 0, "delta": {"content": text}, "finish_reason": None}]})


# ----------------------------------------------------------------------------------------------- replicas


class Garbage:
    """A server that answers every connection with bytes that are not HTTP, then closes it."""

    def __init__(self) -> None:
        self.sock = socket.socket()
        self.sock.bind(("127.0.0.1", 0))
        self.sock.listen(16)
        self.url = f"http://127.0.0.1:{self.sock.getsockname()[1]}"
        self.accepted = 0
        threading.Thread(target=self._serve, daemon=True).start()

    def _serve(self) -> None:
        while True:
            try:
                conn, _ = self.sock.accept()
            except OSError:
                return
            self.accepted += 1
            with conn:
                with contextlib.suppress(OSError):
                    conn.recv(65536)
                    conn.sendall(b"\x15\x03\x01\x00\x02\x02\x46garbage, not HTTP\r\n\r\n")

    def close(self) -> None:
        self.sock.close()


@pytest.mark.parametrize("stream", [False, True])
def test_a_replica_that_answers_garbage_is_lost_and_the_request_goes_to_another(gsettings: tp.Any,
                                                                                stream: bool) -> None:
    s = gsettings("gateway.models.m.slots=2")
    key = gw.add_key("alice", s)
    bad = Garbage()
    try:
        with StubServer() as good, gw.open_gateway({"m": f"{bad.url},{good.url}"}, listen="127.0.0.1:0",
                                                   settings=s) as g:
            # Both are idle: the first listed (the garbage one) gets the request first.
            body = json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "x"}]})
            code, out, _ = post(g.url + "/v1/chat/completions", body, key)
            assert code == 200, out
            assert b"echo: x" in out or b"tok0" in out
            assert bad.accepted == 1 and good.stats.received == 1
            assert deployments(s) == {bad.url: "DOWN", good.url: "READY"}
    finally:
        bad.close()


def test_a_replica_that_takes_no_connection_is_lost_and_the_request_goes_to_another(
        gsettings: tp.Any, monkeypatch: pytest.MonkeyPatch) -> None:
    """A replica's node that stops answering (down, cut off): its connection is never taken. The request goes
    to another replica after the connect timeout, not after ``gateway.backend_timeout_s``."""
    monkeypatch.setattr(server, "CONNECT_TIMEOUT_S", 0.5, raising=False)
    s = gsettings("gateway.models.m.slots=2", "gateway.backend_timeout_s=600")
    key = gw.add_key("alice", s)
    hole = socket.socket()
    hole.bind(("127.0.0.1", 0))
    hole.listen(0)
    port = hole.getsockname()[1]
    fillers = []  # the listen queue is full: the kernel drops new connections' SYNs (no answer at all)
    for _ in range(3):
        c = socket.socket()
        c.setblocking(False)
        c.connect_ex(("127.0.0.1", port))
        fillers.append(c)
    try:
        with StubServer() as good, gw.open_gateway({"m": f"http://127.0.0.1:{port},{good.url}"},
                                                   listen="127.0.0.1:0", settings=s) as g:
            code, out, _ = post(g.url + "/v1/chat/completions", CHAT, key)
            assert code == 200, out
            assert json.loads(out)["choices"][0]["message"]["content"] == "echo: x"
            assert good.stats.received == 1
            [hung] = [d for d in gw.status(s)["aliases"][0]["deployments"] if str(port) in d["url"]]
            assert hung["state"] == "DOWN" and "took no connection in 0.5 s" in hung["why"]
    finally:
        for c in fillers:
            c.close()
        hole.close()


def test_answers_come_uncompressed_from_a_server_that_compresses(gsettings: tp.Any) -> None:
    """A server that compresses when asked to (nginx with gzip on, aiohttp's enable_compression): the gateway
    asks for none, so the client gets plain JSON and events, and the tokens are counted."""
    seen: list[str | None] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        seen.append(request.headers.get("Accept-Encoding"))
        if (await request.json()).get("stream"):
            out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
            out.enable_compression()
            await out.prepare(request)
            await out.write(token("t0 ") + event({**CHUNK, "choices": [], "usage": {"prompt_tokens": 2,
                                                                                    "completion_tokens": 1}}))
            await out.write(b"data: [DONE]\n\n")
            await out.write_eof()
            return out
        resp = web.json_response({"id": "x", "object": "chat.completion", "created": 1, "model": "m",
                                  "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"},
                                               "finish_reason": "stop"}],
                                  "usage": {"prompt_tokens": 3, "completion_tokens": 4, "total_tokens": 7}})
        resp.enable_compression()
        return resp

    s = gsettings("gateway.models.m.slots=2")
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/chat/completions"): chat}) as be, \
            gw.open_gateway({"m": be.url}, listen="127.0.0.1:0", settings=s) as g:
        code, out, headers = post(g.url + "/v1/chat/completions", CHAT, key)
        assert code == 200 and "Content-Encoding" not in headers
        assert json.loads(out)["choices"][0]["message"]["content"] == "hi"
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=30)
        chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                     stream=True))
        assert chunks[0].choices[0].delta.content == "t0 "
        assert seen == ["identity", "identity"]
        until(lambda: gw.usage(s)["keys"]["alice"]["requests"] == 2)
        row = gw.usage(s)["keys"]["alice"]
        assert (row["prompt_tokens"], row["completion_tokens"], row["errors"]) == (5, 5, 0)


# ----------------------------------------------------------------------------------------------- streams


def test_a_streams_usage_is_counted_when_its_last_event_comes_in_two_pieces(gsettings: tp.Any) -> None:
    """The last event (with the usage) reaches the gateway in two reads: the second half is sent only once the
    client has received the first."""
    first_half = threading.Event()
    last = event({**CHUNK, "choices": [{"index": 0, "delta": {}, "finish_reason": "stop"}],
                  "usage": {"prompt_tokens": 5, "completion_tokens": 3, "total_tokens": 8},
                  "timings": {"prompt_n": 5, "predicted_n": 3}})
    cut = last.index(b'"completion_tokens"')

    async def chat(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(token("t0 ") + token("t1 ") + token("t2 ") + last[:cut])
        assert await asyncio.get_running_loop().run_in_executor(None, first_half.wait, 30)
        await out.write(last[cut:] + b"data: [DONE]\n\n")
        await out.write_eof()
        return out

    s = gsettings("gateway.models.m.slots=2")
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/chat/completions"): chat}) as be, \
            gw.open_gateway({"m": be.url}, listen="127.0.0.1:0", settings=s) as g:
        host, port = g.url.split("//")[1].split(":")
        body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
        with socket.create_connection((host, int(port)), timeout=30) as sock:
            sock.sendall(f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                         f"Content-Type: application/json\r\nConnection: close\r\nContent-Length: {len(body)}"
                         f"\r\n\r\n{body}".encode())
            got = b""
            while last[:cut] not in got:
                more = sock.recv(65536)
                assert more, got
                got += more
            first_half.set()
            while more := sock.recv(65536):
                got += more
        assert b"[DONE]" in got
        until(lambda: gw.usage(s)["keys"].get("alice", {}).get("requests") == 1)
        row = gw.usage(s)["keys"]["alice"]
        assert (row["prompt_tokens"], row["completion_tokens"], row["errors"]) == (5, 3, 0)


def test_a_stream_cut_by_its_replica_or_its_client_is_not_counted_as_answered(gsettings: tp.Any,
                                                                             tmp_path: Path) -> None:
    """A replica that dies mid-stream: 502 and an error in the counts and the access log; a client that leaves
    mid-stream: 499; a client that stops reading: 408 (gateway.client_timeout_s)."""
    async def dies(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(token("t0 "))
        assert request.transport is not None
        request.transport.abort()
        return out

    async def endless(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        piece = token("x" * 4000)
        for _ in range(100_000):  # ~400 MB at most: far more than the sockets' buffers hold
            try:
                await out.write(piece)
            except (ConnectionError, RuntimeError):
                break
        return out

    log = tmp_path / "access.log"
    gate = threading.Event()
    s = gsettings(f"gateway.access_log={log}", "gateway.client_timeout_s=0.5", "gateway.models.d.slots=2",
                  "gateway.models.slow.slots=2", "gateway.models.m.slots=2")
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/chat/completions"): dies}) as dead, \
            Backend({("POST", "/v1/chat/completions"): endless}) as firehose, \
            StubServer(stream_gate=gate, completion_tokens=50) as stub, \
            gw.open_gateway({"d": dead.url, "slow": firehose.url, "m": stub.url}, listen="127.0.0.1:0",
                            settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=30)
        with pytest.raises(openai.APIError, match="the answer is incomplete"):
            list(client.chat.completions.create(model="d", messages=[{"role": "user", "content": "x"}],
                                                stream=True))
        host, port = g.url.split("//")[1].split(":")

        def stream_request(model: str) -> bytes:
            body = json.dumps({"model": model, "stream": True, "messages": [{"role": "user", "content": "x"}]})
            return (f"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\n"
                    f"Content-Type: application/json\r\nContent-Length: {len(body)}\r\n\r\n{body}").encode()

        # The client leaves after the first event.
        try:
            with socket.create_connection((host, int(port)), timeout=30) as sock:
                sock.sendall(stream_request("m"))
                got = b""
                while b"data:" not in got:
                    more = sock.recv(65536)
                    assert more, got
                    got += more
        finally:
            gate.set()
        # The client reads the first bytes, then nothing more.
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(30)
        try:
            sock.connect((host, int(port)))
            sock.sendall(stream_request("slow"))
            assert sock.recv(100)
            until(lambda: any(x.get("alias") == "slow" for x in access_lines(log)))
        finally:
            sock.close()
        until(lambda: len(access_lines(log)) == 3)
        statuses = {x["alias"]: (x["status"], x.get("error")) for x in access_lines(log)}
        assert statuses == {"d": (502, "replica failed mid-stream"), "m": (499, "the client left"),
                            "slow": (408, "the client read too slowly")}
        aliases = gw.usage(s)["aliases"]
        assert aliases["d"]["errors"] == 1
        code, text = get(g.url + "/metrics", key)
        assert 'speedslurm_gateway_requests_total{alias="d",key="alice",code="502"} 1' in text.decode()
        assert deployments(s)[dead.url] == "DOWN"


# ----------------------------------------------------------------------------------------------- waits


def test_a_request_that_waited_and_got_503_has_its_wait_counted(gsettings: tp.Any, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    s = gsettings(f"gateway.access_log={log}", "gateway.max_wait_s=0.3", "gateway.models.m.slots=1")
    key = gw.add_key("alice", s)
    gate = threading.Event()
    with StubServer(stream_gate=gate, slots=1) as stub, \
            gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=30)
        held = client.chat.completions.create(model="m", messages=[{"role": "user", "content": "h"}], stream=True)
        try:
            next(iter(held))
            code, _, _ = post(g.url + "/v1/completions", '{"model": "m", "prompt": "w"}', key)
            assert code == 503
            [line] = access_lines(log)
            assert line["status"] == 503 and line["wait_ms"] >= 300
            _, text = get(g.url + "/metrics", key)
            assert 'speedslurm_gateway_wait_seconds_count{alias="m"} 1' in text.decode()
        finally:
            gate.set()
        list(held)


# ----------------------------------------------------------------------------------------------- keys


def test_a_key_that_is_not_utf8_gets_401_everywhere(gsettings: tp.Any) -> None:
    s = gsettings()
    gw.add_key("alice", s)
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        for path in ("/v1/models", "/v1/models/m", "/metrics", "/gateway/status", "/gateway/usage"):
            got = raw(g.url, f"GET {path} HTTP/1.1\r\nHost: x\r\nConnection: close\r\n".encode()
                      + b"Authorization: Bearer \xff\xfe\xed\r\n\r\n")
            assert got.startswith(b"HTTP/1.1 401"), (path, got[:300])
            assert b'"invalid_api_key"' in got
        got = raw(g.url, b"POST /v1/chat/completions HTTP/1.1\r\nHost: x\r\nConnection: close\r\n"
                  b"Authorization: Bearer \xff\xfe\xed\r\nContent-Type: application/json\r\n"
                  + f"Content-Length: {len(CHAT)}\r\n\r\n{CHAT}".encode())
        assert got.startswith(b"HTTP/1.1 401"), got[:300]
        assert stub.stats.received == 0


def test_a_hand_edited_or_broken_keys_file_does_not_stop_the_gateway(gsettings: tp.Any, tmp_path: Path,
                                                                     capsys: pytest.CaptureFixture[str]) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    path = tmp_path / "gw" / "keys.json"
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        assert post(g.url + "/v1/chat/completions", CHAT, key)[0] == 200
        data = json.loads(path.read_text())
        data["keys"]["bob"] = "not-an-object"
        path.write_text(json.dumps(data))
        assert post(g.url + "/v1/chat/completions", CHAT, key)[0] == 200
        status = gw.status(s)
        assert status["keys"] == 1 and "'bob'" in status["keys_problem"] and "ignored" in status["keys_problem"]
        assert [k["name"] for k in gw.list_keys(s)] == ["alice", "bob"]
        code, out, err = speedslurm(["--set", f"gateway.dir={tmp_path / 'gw'}", "gateway", "status"], capsys)
        assert code == 0 and "'bob'" in " ".join(out.split()), out + err
        path.write_text("{broken")
        assert post(g.url + "/v1/chat/completions", CHAT, key)[0] == 200  # the keys read before go on
        status = gw.status(s)
        assert status["keys"] == 1 and "cannot read the gateway's keys" in status["keys_problem"]
        path.write_text(json.dumps(data))
        assert gw.status(s)["keys"] == 1


# ----------------------------------------------------------------------------------------------- start


def test_an_access_log_that_cannot_be_opened_is_named_and_nothing_is_left_open(gsettings: tp.Any,
                                                                               tmp_path: Path) -> None:
    from speedslurm.gateway.pool import alias_specs
    from speedslurm.gateway.state import Folder

    s = gsettings(f"gateway.access_log={tmp_path / 'no' / 'such' / 'access.log'}")
    with pytest.raises(UsageError, match=r"cannot open the access log .*\(gateway.access_log\)") as err:
        gw.open_gateway({"m": "http://127.0.0.1:1"}, listen="127.0.0.1:0", settings=s)
    assert "port" not in str(err.value) + (err.value.fix or "")

    # A port that is taken: "cannot listen", and the gateway's connections to the replicas are closed.
    s = gsettings("gateway.models.m.slots=1")
    taken = socket.socket()
    taken.bind(("127.0.0.1", 0))
    taken.listen(1)
    gateway = server.Gateway(s, alias_specs(s, ["m=http://127.0.0.1:1"]), Folder(s.gateway.root).open())

    async def start() -> None:
        await gateway.start("127.0.0.1", taken.getsockname()[1])

    try:
        with pytest.raises(UsageError, match="cannot listen on 127.0.0.1"):
            asyncio.run(start())
    finally:
        taken.close()
    assert gateway.pool.session is not None and gateway.pool.session.closed


def test_a_listen_port_that_is_not_plain_digits_is_a_clear_error(gsettings: tp.Any, tmp_path: Path,
                                                                 capsys: pytest.CaptureFixture[str]) -> None:
    for port in ("\u00b2", "\u0663", "８８"):
        with pytest.raises(UsageError, match="not HOST:PORT"):
            server.parse_listen(f"127.0.0.1:{port}")
    code, _, err = speedslurm(["--set", f"gateway.dir={tmp_path / 'gw'}", "gateway", "--listen", "127.0.0.1:\u00b2",
                               "--model", "m=http://127.0.0.1:1"], capsys)
    assert code == 2 and "not HOST:PORT" in err and "Traceback" not in err


def test_a_gateway_started_with_hangups_ignored_survives_a_hangup(gsettings: tp.Any, tmp_path: Path) -> None:
    """``nohup speedslurm gateway &``: logging out (SIGHUP) does not stop it."""
    s = gsettings()
    key = gw.add_key("alice", s)
    env = {**os.environ, "SPEEDSLURM_GATEWAY__DIR": str(s.gateway.root)}
    with StubServer() as stub:
        g = Gateway(env, ["gateway", "--listen", "127.0.0.1:0", "--model", f"m={stub.url}"],
                    preexec_fn=lambda: signal.signal(signal.SIGHUP, signal.SIG_IGN))
        try:
            status = Path(f"/proc/{g.proc.pid}/status")
            if status.exists():  # Linux: SIGHUP is still ignored, not caught
                fields = dict(line.split(":\t", 1) for line in status.read_text().splitlines() if ":\t" in line)
                assert int(fields["SigIgn"], 16) & 1 << (signal.SIGHUP - 1)
            g.proc.send_signal(signal.SIGHUP)
            code, out, _ = post(g.url + "/v1/chat/completions", CHAT, key)
            assert code == 200, out
            assert g.proc.poll() is None
            assert g.stop(signal.SIGTERM) == 0
        finally:
            g.kill()


# ----------------------------------------------------------------------------------------------- bodies and log


def test_a_body_that_is_not_what_it_says_gets_400_and_the_access_log_has_the_real_status(
        gsettings: tp.Any, tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    s = gsettings(f"gateway.access_log={log}", "gateway.max_body_bytes=1000")
    key = gw.add_key("alice", s)
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        head = f"POST /v1/completions HTTP/1.1\r\nHost: x\r\nAuthorization: Bearer {key}\r\nConnection: close\r\n"
        got = raw(g.url, (head + "Content-Encoding: gzip\r\nContent-Length: 5\r\n\r\nhello").encode())
        assert got.startswith(b"HTTP/1.1 400"), got[:300]
        message = json.loads(got.partition(b"\r\n\r\n")[2])["error"]["message"]
        assert "the request body could not be read" in message and "gzip" in message
        code, _, _ = post(g.url + "/v1/completions", '{"model": "m", "x": "' + "a" * 5000 + '"}', key)
        assert code == 413
        raw(g.url, (head + "Content-Length: 100\r\n\r\n{\"model\"").encode(), shut=True)  # then EOF
        until(lambda: len(access_lines(log)) == 3)
    assert [x["status"] for x in access_lines(log)] == [400, 413, 499]
    assert stub.stats.received == 0


def test_refused_requests_are_in_the_access_log_and_a_model_can_be_retrieved(gsettings: tp.Any,
                                                                             tmp_path: Path) -> None:
    log = tmp_path / "access.log"
    s = gsettings(f"gateway.access_log={log}")
    key = gw.add_key("alice", s)
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=30)
        model = client.models.retrieve("m")
        assert model.id == "m" and model.model_extra["state"] == "ready"  # type: ignore[index]
        with pytest.raises(openai.NotFoundError, match="its models are: m"):
            client.models.retrieve("gpt-4")
        assert post(g.url + "/v1/chat/completions", CHAT, "ssg-stolen-or-mistyped")[0] == 401
        assert get(g.url + "/v1/models", "ssg-stolen-or-mistyped")[0] == 401
        assert get(g.url + "/gateway/status", key)[0] == 401  # a user's key is not the admin key
    lines = access_lines(log)
    assert [(x["path"], x["status"], x["key"]) for x in lines] == [
        ("/v1/chat/completions", 401, None), ("/v1/models", 401, None), ("/gateway/status", 401, None)]
    assert "ssg-stolen-or-mistyped" not in log.read_text() and key not in log.read_text()


# ----------------------------------------------------------------------------------------------- usage


def test_usage_falls_back_to_the_saved_counts_only_when_no_gateway_answers(gsettings: tp.Any,
                                                                           tmp_path: Path) -> None:
    s = gsettings()
    key = gw.add_key("alice", s)
    folder = tmp_path / "gw"
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        for _ in range(3):
            assert post(g.url + "/v1/completions", '{"model": "m", "prompt": "x"}', key)[0] == 200
        assert gw.usage(s)["keys"]["alice"]["requests"] == 3
        os.chmod(folder / "admin_key", 0o640)
        with pytest.raises(UsageError, match="can be read by others"):
            gw.usage(s)
        admin = (folder / "admin_key").read_text()
        (folder / "admin_key").write_text("ssa-not-the-key")
        os.chmod(folder / "admin_key", 0o600)
        with pytest.raises(SpeedslurmError, match="answered 401"):
            gw.usage(s)
        (folder / "admin_key").write_text(admin)
    # A gateway recorded that is gone (kill -9): the counts it saved.
    dead = socket.socket()
    dead.bind(("127.0.0.1", 0))
    port = dead.getsockname()[1]
    dead.close()
    (folder / "gateway.json").write_text(json.dumps({"url": f"http://127.0.0.1:{port}", "pid": 1}))
    (folder / "admin_key").write_text("ssa-whatever")
    os.chmod(folder / "admin_key", 0o600)
    saved = gw.usage(s)
    assert saved["saved"] and saved["keys"]["alice"]["requests"] == 3


def test_a_key_revoked_by_a_rewrite_that_keeps_size_and_mtime_is_refused(tmp_path: Path) -> None:
    """keys.json rewritten in place to the same size with its mtime set back (a restore, a copy with -p, an NFS
    server's coarse clock): the gateway reads it again all the same, and a revoked key is refused at once."""
    import json
    import os

    from speedslurm.gateway.keys import KeyStore

    folder = tmp_path / "gw"
    folder.mkdir(mode=0o700)
    store = KeyStore(folder)
    key = store.add("alice")
    assert store.check(key) == "alice"
    path = folder / "keys.json"
    st = path.stat()
    data = json.loads(path.read_text())
    data["keys"]["alice"]["sha256"] = "0" * len(data["keys"]["alice"]["sha256"])
    text = json.dumps(data, indent=1, sort_keys=True) + "\n"
    assert len(text.encode()) == st.st_size
    with open(path, "r+") as fh:  # in place: the same inode
        fh.write(text)
    os.utime(path, ns=(st.st_atime_ns, st.st_mtime_ns))
    assert (path.stat().st_size, path.stat().st_mtime_ns) == (st.st_size, st.st_mtime_ns)
    assert store.check(key) is None


def test_a_client_that_leaves_once_it_has_the_stream_end_has_its_whole_answer(gsettings: tp.Any) -> None:
    """The openai client closes its connection as soon as it reads ``data: [DONE]``; a server that still writes
    after it (keep-alive comments) makes the gateway's next write fail. The request is answered, not "the client
    left": no error in the counts, and its tokens are counted."""
    async def chat(request: web.Request) -> web.StreamResponse:
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(token("t0 ") + event({**CHUNK, "choices": [], "usage": {"prompt_tokens": 2,
                                                                                "completion_tokens": 1}}))
        await out.write(b"data: [DONE]\n\n")
        with contextlib.suppress(ConnectionError, RuntimeError):
            for _ in range(100):  # until the gateway hangs up (it does once its client left)
                await asyncio.sleep(0.05)
                await out.write(b": keep-alive\n\n")
        return out

    s = gsettings()
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/chat/completions"): chat}) as be, \
            gw.open_gateway({"m": be.url}, listen="127.0.0.1:0", settings=s) as g:
        client = openai.OpenAI(base_url=g.url + "/v1", api_key=key, max_retries=0, timeout=30)
        chunks = list(client.chat.completions.create(model="m", messages=[{"role": "user", "content": "x"}],
                                                     stream=True))
        assert chunks[0].choices[0].delta.content == "t0 "
        until(lambda: gw.usage(s)["keys"]["alice"]["requests"] == 1)
        row = gw.usage(s)["keys"]["alice"]
        assert (row["prompt_tokens"], row["completion_tokens"], row["errors"]) == (2, 1, 0), row


def test_two_keys_added_at_once_are_both_kept(tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Two admins run `gateway keys add` at the same moment: each read of keys.json waits for the other's write,
    so neither key is lost. By construction: each add, once it has read the file, waits (up to a guard) for the
    other to have read it too, which only an add without the lock lets happen."""
    from speedslurm.gateway.keys import KeyStore

    both_read = threading.Barrier(2)
    real_read = KeyStore._read

    def read(self: KeyStore) -> dict[str, tp.Any]:
        keys = real_read(self)
        with contextlib.suppress(threading.BrokenBarrierError):
            both_read.wait(2)  # with the lock the other add cannot read now: the wait ends at the guard
        return keys

    monkeypatch.setattr(KeyStore, "_read", read)
    folder = tmp_path / "gw"
    got: dict[str, str] = {}
    threads = [threading.Thread(target=lambda n=n: got.update({n: KeyStore(folder).add(n)})) for n in ("ann", "bob")]
    for t in threads:
        t.start()
    for t in threads:
        t.join(30)
    monkeypatch.setattr(KeyStore, "_read", real_read)
    store = KeyStore(folder)
    assert sorted(n["name"] for n in store.names()) == ["ann", "bob"]
    assert store.check(got["ann"]) == "ann" and store.check(got["bob"]) == "bob"
