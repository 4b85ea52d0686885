"""The gateway as a service that anyone on the network can reach: connections that never send a whole request,
a process short of file handles, clients that never read their answers, answers too large to read on the way,
a stop with requests that do not end, and an access log that is rotated or flooded.

Like ``test_gateway_hardening.py``: a real gateway (``open_gateway``, in a thread) on 127.0.0.1 with URL aliases
pointing at stub servers or small aiohttp apps; what the tests assert is what a client or the gateway's owner
sees. Every wait ends on an event; the time limits below only guard against a hang.
"""

from __future__ import annotations

import asyncio
import errno
import json
import os
import socket
import threading
import time
import typing as tp
from pathlib import Path

import pytest
from aiohttp import web
from localhttp import get, post
from test_gateway_hardening import CHAT, Backend, access_lines, deployments, until

from devtools.stubserver import StubServer
from speedslurm.api import gateway as gw

GUARD_S = 30.0  # against a hang only
ANSWER = {"id": "x", "object": "chat.completion", "created": 1, "model": "m",
          "choices": [{"index": 0, "message": {"role": "assistant", "content": "hi"}, "finish_reason": "stop"}],
          "usage": {"prompt_tokens": 3, "completion_tokens": 5, "total_tokens": 8}}


def connect(url: str) -> socket.socket:
    host, port = url.split("//")[1].split(":")
    return socket.create_connection((host, int(port)), timeout=GUARD_S)


def closed(sock: socket.socket) -> bool:
    """Reads what ``sock`` has; True once the other side has closed it (end of file, or reset)."""
    try:
        while sock.recv(65536):
            pass
    except (ConnectionResetError, BrokenPipeError):
        pass
    return True


def hung_up(sock: socket.socket) -> bool:
    """The other side closed or aborted ``sock`` (its TCP state is CLOSE or CLOSE-WAIT), whatever is still unread."""
    return sock.getsockopt(socket.IPPROTO_TCP, socket.TCP_INFO, 1)[0] in (7, 8)


def in_flight_bytes() -> int:
    """More bytes than a connection on 127.0.0.1 holds in flight (the sender's largest socket buffer, twice):
    an answer this large waits for its client to read."""
    try:
        most = int(Path("/proc/sys/net/ipv4/tcp_wmem").read_text().split()[2])
    except (OSError, ValueError, IndexError):
        most = 4 << 20
    return 2 * most + (1 << 20)


def request(path: str, key: str | None = None, body: str = "", method: str = "POST") -> bytes:
    auth = f"Authorization: Bearer {key}\r\n" if key else ""
    return (f"{method} {path} HTTP/1.1\r\nHost: x\r\n{auth}Content-Type: application/json\r\n"
            f"Content-Length: {len(body.encode())}\r\n\r\n{body}").encode()


# ----------------------------------------------------------------------------------------------- connections


def test_a_connection_that_sends_no_whole_request_head_is_closed(gsettings: tp.Any) -> None:
    """A client that connects and says nothing, one that sends a header byte at a time (faster than the limit,
    never the end of the head), and one idle after its answer: each is closed once
    ``gateway.client_timeout_s`` has passed without a whole request head. A request whose answer takes longer
    than that is not cut: its answer waits until a connection opened after it began has been closed."""
    release = threading.Event()
    began = threading.Event()

    async def chat(request: web.Request) -> web.Response:
        began.set()
        assert await asyncio.get_running_loop().run_in_executor(None, release.wait, GUARD_S)
        return web.json_response(ANSWER)

    s = gsettings("gateway.client_timeout_s=0.5", "gateway.models.m.slots=2")
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/chat/completions"): chat}) as be, \
            gw.open_gateway({"m": be.url}, listen="127.0.0.1:0", settings=s) as g:
        with connect(g.url) as silent:
            assert closed(silent)
        with connect(g.url) as trickle:
            trickle.sendall(b"POST /v1/chat/completions HTTP/1.1\r\nX-Slow: ")
            trickle.settimeout(0.1)
            for _ in range(int(GUARD_S / 0.1)):
                try:
                    if not trickle.recv(65536):
                        break
                except TimeoutError:
                    trickle.sendall(b"a")  # one more byte of a header that never ends
                except (ConnectionResetError, BrokenPipeError):
                    break
            else:
                raise AssertionError("the gateway kept a connection that never sent a whole request head")
        with connect(g.url) as idle:
            idle.sendall(request("/health", method="GET"))
            assert idle.recv(65536).startswith(b"HTTP/1.1 200")
            assert closed(idle)  # kept alive only as long as a new request head may take

        answers: list[tuple[int, bytes, dict[str, str]]] = []
        slow = threading.Thread(target=lambda: answers.append(post(g.url + "/v1/chat/completions", CHAT, key)))
        slow.start()
        try:
            assert began.wait(GUARD_S)
            with connect(g.url) as later:
                assert closed(later)  # client_timeout_s has passed since the slow request began
        finally:
            release.set()
            slow.join(GUARD_S)
        [(code, body, _)] = answers
        assert code == 200 and json.loads(body)["choices"][0]["message"]["content"] == "hi"


def test_the_gateway_lifts_its_open_files_limit_to_the_hard_limit(gsettings: tp.Any) -> None:
    """Every client connection holds a file handle: the gateway raises its soft limit (often 1024) to the hard
    one when it starts."""
    import resource

    soft, hard = resource.getrlimit(resource.RLIMIT_NOFILE)
    if hard != resource.RLIM_INFINITY and hard <= 256:
        pytest.skip(f"the hard limit on open files is {hard}: no room to lower the soft one below it")
    s = gsettings()
    resource.setrlimit(resource.RLIMIT_NOFILE, (256, hard))
    try:
        with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s):
            now = resource.getrlimit(resource.RLIMIT_NOFILE)
    finally:
        resource.setrlimit(resource.RLIMIT_NOFILE, (soft, hard))
    assert now[0] == (hard if hard != resource.RLIM_INFINITY else 1 << 20) and now[1] == hard


class NoHandlesLeft(socket.socket):
    """A socket that cannot be made in the gateway's thread while ``armed`` is set: the process is out of file
    handles (EMFILE) when it connects to a replica. Accepted sockets (made from a handle) are not refused."""

    armed = threading.Event()

    def __init__(self, family: int = -1, type: int = -1, proto: int = -1, fileno: int | None = None) -> None:  # noqa: A002
        if fileno is None and self.armed.is_set() and threading.current_thread().name == "speedslurm-gateway":
            raise OSError(errno.EMFILE, os.strerror(errno.EMFILE))
        super().__init__(family, type, proto, fileno)


def test_a_gateway_out_of_file_handles_answers_503_and_keeps_its_replica(gsettings: tp.Any, tmp_path: tp.Any,
                                                                         monkeypatch: pytest.MonkeyPatch) -> None:
    """The connection to the replica fails with EMFILE (too many connections open in the gateway): the client
    gets 503 saying so, with Retry-After; the replica did nothing wrong and stays READY; once handles are free
    again the next request is answered at once."""
    log = tmp_path / "access.log"
    s = gsettings(f"gateway.access_log={log}", "gateway.models.m.slots=2", "gateway.max_wait_s=2")
    key = gw.add_key("alice", s)
    monkeypatch.setattr(socket, "socket", NoHandlesLeft)
    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        NoHandlesLeft.armed.set()
        try:
            code, body, headers = post(g.url + "/v1/chat/completions", CHAT, key)
        finally:
            NoHandlesLeft.armed.clear()
        assert code == 503 and "out of file handles" in json.loads(body)["error"]["message"], body
        assert headers.get("Retry-After") == "1"
        assert deployments(s) == {stub.url: "READY"}
        code, body, _ = post(g.url + "/v1/chat/completions", CHAT, key)
        assert code == 200, body
        until(lambda: len(access_lines(log)) == 2)
        assert [(x["status"], x.get("error")) for x in access_lines(log)] == [
            (503, "the gateway is out of file handles"), (200, None)]


# ----------------------------------------------------------------------------------------------- slow readers


@pytest.mark.parametrize("stream", [False, True])
def test_a_client_that_never_reads_its_answer_is_cut_off(gsettings: tp.Any, tmp_path: Path, stream: bool) -> None:
    """A client that sends its request and reads nothing: once none of the answer's bytes have left for
    ``gateway.client_timeout_s``, the gateway aborts the connection (it would otherwise hold it, and the answer,
    for ever) and logs 408."""
    size = in_flight_bytes()

    async def chat(request: web.Request) -> web.StreamResponse:
        if not (await request.json()).get("stream"):
            return web.json_response({**ANSWER, "pad": "y" * size})
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        piece = b"data: " + json.dumps({"choices": [{"index": 0, "delta": {"content": "x" * 4000}}]}).encode()
        try:
            for _ in range(2 * size // len(piece)):  # more than the connections hold: the gateway stops taking
                await out.write(piece + b"\n\n")
        except (ConnectionError, RuntimeError):
            pass
        return out

    log = tmp_path / "access.log"
    s = gsettings(f"gateway.access_log={log}", "gateway.client_timeout_s=0.5", "gateway.models.m.slots=2")
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/chat/completions"): chat}) as be, \
            gw.open_gateway({"m": be.url}, listen="127.0.0.1:0", settings=s) as g:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 4096)
        sock.settimeout(GUARD_S)
        with sock:
            host, port = g.url.split("//")[1].split(":")
            sock.connect((host, int(port)))
            body = json.dumps({"model": "m", "stream": stream, "messages": [{"role": "user", "content": "x"}]})
            sock.sendall(request("/v1/chat/completions", key, body))
            until(lambda: access_lines(log), GUARD_S)
            assert [(x["status"], x.get("error")) for x in access_lines(log)] == [(408, "the client read too slowly")]
            until(lambda: hung_up(sock), GUARD_S)
        until(lambda: g.gateway is not None and g.gateway.in_flight == 0, GUARD_S)


def test_a_client_that_reads_a_large_answer_slowly_gets_all_of_it(gsettings: tp.Any) -> None:
    """The limit is on a client that takes nothing: one that reads, however long the whole answer takes (here
    several times ``gateway.client_timeout_s``, by the pauses between its reads), gets all of it."""
    size = in_flight_bytes()
    answer = json.dumps({**ANSWER, "pad": "y" * size}).encode()

    async def chat(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    s = gsettings("gateway.client_timeout_s=1", "gateway.models.m.slots=2")
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/chat/completions"): chat}) as be, \
            gw.open_gateway({"m": be.url}, listen="127.0.0.1:0", settings=s) as g:
        sock = socket.socket()
        sock.setsockopt(socket.SOL_SOCKET, socket.SO_RCVBUF, 65536)
        sock.settimeout(GUARD_S)
        with sock:
            host, port = g.url.split("//")[1].split(":")
            sock.connect((host, int(port)))
            sock.sendall(request("/v1/chat/completions", key, CHAT))
            got = b""
            reads = 0
            while not got.endswith(answer[-100:]):
                more = sock.recv(65536)
                assert more, f"the gateway closed the connection after {len(got)} bytes"
                got += more
                reads += 1
                time.sleep(0.02)
        assert got.startswith(b"HTTP/1.1 200") and answer in got
        assert reads * 0.02 > 2 * s.gateway.client_timeout_s  # the reading took longer than the limit


# ----------------------------------------------------------------------------------------------- large answers


@pytest.mark.parametrize("where", ["first", "last", "middle"])
def test_a_large_answer_does_not_hold_up_the_other_requests(gsettings: tp.Any, monkeypatch: pytest.MonkeyPatch,
                                                            where: str) -> None:
    """A non-streamed answer of megabytes (embeddings): the gateway reads its usage (first, as llama-server
    puts it, or last, as OpenAI does) without parsing the whole answer, and parses the whole only where neither
    end holds it, off its event loop. By construction: a parse of the whole answer does not end until a
    /health request sent meanwhile has been answered."""
    usage = {"prompt_tokens": 7, "total_tokens": 7}
    data = [{"object": "embedding", "index": i, "embedding": [0.25] * 1000} for i in range(400)]
    body = {"first": {"object": "list", "model": "m", "usage": usage, "data": data},
            "last": {"object": "list", "model": "m", "data": data, "usage": usage},
            "middle": {"object": "list", "data": data, "usage": usage, "more": data}}[where]
    answer = json.dumps(body).encode()
    assert len(answer) > (1 << 20) + 2 * 64 * 1024

    async def embeddings(request: web.Request) -> web.Response:
        return web.Response(body=answer, content_type="application/json")

    real_loads = json.loads
    parsing, answered = threading.Event(), threading.Event()

    def loads(text: tp.Any, *args: tp.Any, **kw: tp.Any) -> tp.Any:
        if len(text) > 1 << 20:  # the whole answer: as slow as it takes /health to be answered
            parsing.set()
            assert answered.wait(2 * GUARD_S)
        return real_loads(text, *args, **kw)

    s = gsettings("gateway.models.m.slots=2")
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/embeddings"): embeddings}) as be, \
            gw.open_gateway({"m": be.url}, listen="127.0.0.1:0", settings=s) as g:
        monkeypatch.setattr(json, "loads", loads)
        got: list[tuple[int, bytes, dict[str, str]]] = []
        big = threading.Thread(target=lambda: got.append(post(g.url + "/v1/embeddings",
                                                               '{"model": "m", "input": "x"}', key)))
        big.start()
        health: list[int] = []
        try:
            until(lambda: parsing.is_set() or got, GUARD_S)
            asker = threading.Thread(target=lambda: health.append(get(g.url + "/health", None)[0]), daemon=True)
            asker.start()
            asker.join(GUARD_S)
            assert health == [200], "/health was not answered while the large answer was read"
        finally:
            answered.set()
            big.join(GUARD_S)
        monkeypatch.setattr(json, "loads", real_loads)
        [(code, out, _)] = got
        assert code == 200 and out == answer
        assert parsing.is_set() == (where == "middle")  # the usage at either end is read without a parse
        until(lambda: gw.usage(s)["keys"]["alice"]["requests"] == 1)
        assert gw.usage(s)["keys"]["alice"]["prompt_tokens"] == 7


def test_the_usage_read_from_an_answers_ends_is_the_one_a_whole_parse_finds(monkeypatch: pytest.MonkeyPatch) -> None:
    """Answers whose strings hold quotes, backslashes, brackets and the word "usage" itself, with a usage at
    the top, deeper down or none, cut by the windows anywhere: what is read from the ends is always what
    ``json.loads`` finds, and a usage within a window is always found."""
    import random

    from speedslurm.gateway import server

    window = 300
    monkeypatch.setattr(server, "USAGE_WINDOW", window)
    rnd = random.Random(7)
    pieces = ["a", '"', "\\", "{", "}", "[", "]", ":", ",", "usage", '"usage": {', "\u00e9", "\n", " "]

    def text() -> str:
        return "".join(rnd.choice(pieces) for _ in range(rnd.randint(0, 8)))

    def value(depth: int = 0) -> tp.Any:
        r = rnd.random()
        if depth > 3 or r < 0.3:
            return rnd.choice([1, 2.5, None, True, text()])
        if r < 0.6:
            return [value(depth + 1) for _ in range(rnd.randint(0, 4))]
        return {rnd.choice([text(), "usage"]): value(depth + 1) for _ in range(rnd.randint(0, 4))}

    for _ in range(3000):
        usage = {"prompt_tokens": rnd.randint(0, 9), "completion_tokens": rnd.randint(0, 9)}
        items = [(text(), value()) for _ in range(rnd.randint(0, 5))]
        items = [(k, v) for k, v in items if k != "usage"]
        where = rnd.choice(["first", "last", "middle", "none"])
        pad = ("pad", "x" * rnd.randint(0, 2 * window))
        items = {"first": [("usage", usage), pad, *items], "last": [*items, pad, ("usage", usage)],
                 "middle": [pad, *items, ("usage", usage), ("more", pad[1])], "none": [pad, *items]}[where]
        answer = json.dumps(dict(items), ensure_ascii=rnd.random() < 0.5, indent=rnd.choice([None, 1])).encode()
        found, got = server._usage_of(answer)
        if found:
            assert got == json.loads(answer).get("usage"), answer
        assert found or where in ("middle", "none"), answer
    # A window's edge anywhere in a key or a string that holds "usage": {...} after a quote: never a usage.
    for answer in (json.dumps({"pad": "x" * 50, 'a"usage': {"prompt_tokens": 5}}).encode(),
                   json.dumps({"pad": "x" * 50, "s": 'b"usage": {"prompt_tokens": 5}, "c": 1'}).encode(),
                   json.dumps({'x\\"usage': {"prompt_tokens": 5}, "pad": "x" * 50}).encode()):
        for window in range(1, len(answer) + 1):
            monkeypatch.setattr(server, "USAGE_WINDOW", window)
            assert server._usage_of(answer) == (False, None), (window, answer)


# ----------------------------------------------------------------------------------------------- stop


def test_a_stop_waits_the_drain_once_and_the_requests_it_cuts_are_told_and_logged_503(gsettings: tp.Any,
                                                                                       tmp_path: Path) -> None:
    """A stop with two requests in flight that never end (a replica still working): the gateway waits
    ``gateway.drain_s`` for them once (not once more in aiohttp's shutdown), then cuts them: the non-streamed
    client gets 503, the streamed one an error event, and the access log says 503 "the gateway stopped", not
    499 (the clients did not leave). The drain is long by construction: 3 s against a stop's own work."""
    drain = 3.0
    began: list[bool] = []

    async def chat(request: web.Request) -> web.StreamResponse:
        stream = bool((await request.json()).get("stream"))
        began.append(stream)
        if not stream:
            await asyncio.sleep(3600)
        out = web.StreamResponse(headers={"Content-Type": "text/event-stream"})
        await out.prepare(request)
        await out.write(b'data: {"choices": [{"index": 0, "delta": {"content": "t0 "}}]}\n\n')
        await asyncio.sleep(3600)
        return out

    log = tmp_path / "access.log"
    s = gsettings(f"gateway.access_log={log}", f"gateway.drain_s={drain}", "gateway.models.m.slots=4")
    key = gw.add_key("alice", s)
    with Backend({("POST", "/v1/chat/completions"): chat}) as be:
        g = gw.open_gateway({"m": be.url}, listen="127.0.0.1:0", settings=s)
        try:
            plain: list[tuple[int, bytes, dict[str, str]]] = []
            waiter = threading.Thread(target=lambda: plain.append(post(g.url + "/v1/chat/completions", CHAT, key)))
            waiter.start()
            streamed = connect(g.url)
            body = json.dumps({"model": "m", "stream": True, "messages": [{"role": "user", "content": "x"}]})
            streamed.sendall(request("/v1/chat/completions", key, body))
            seen = b""
            while b"t0 " not in seen:
                more = streamed.recv(65536)
                assert more, seen
                seen += more
            until(lambda: len(began) == 2, GUARD_S)
            t0 = time.monotonic()
        finally:
            g.close()
        took = time.monotonic() - t0
        waiter.join(GUARD_S)
        with streamed:
            while more := streamed.recv(65536):
                seen += more
    assert drain <= took < 2.5 * drain, f"the stop took {took:.1f} s with gateway.drain_s = {drain:g}"
    [(code, answer, _)] = plain
    assert code == 503 and "the gateway stopped" in json.loads(answer)["error"]["message"]
    assert b"the gateway stopped" in seen.split(b"t0 ", 1)[1]
    assert seen.endswith(b"\r\n0\r\n\r\n"), seen[-80:]  # the stream's last chunk: a whole answer, not a cut
    assert sorted((x["stream"], x["status"], x.get("error")) for x in access_lines(log)) == [
        (False, 503, "the gateway stopped"), (True, 503, "the gateway stopped")]


# ----------------------------------------------------------------------------------------------- access log


def test_the_access_log_can_be_rotated_and_a_long_path_is_cut(gsettings: tp.Any, tmp_path: Path) -> None:
    """logrotate moves the access log away (and may make a new empty one), or someone removes it: the next
    lines go to a file at the log's path, not to the moved or removed one. A request path is logged up to 512
    characters: a client without a key cannot write 8 KB of log per request."""
    log = tmp_path / "access.log"
    s = gsettings(f"gateway.access_log={log}", "gateway.models.m.slots=2")
    key = gw.add_key("alice", s)

    def refused(path: str = "/v1/models/x") -> None:
        assert get(g.url + path, None)[0] == 401  # logged, without a key

    with StubServer() as stub, gw.open_gateway({"m": stub.url}, listen="127.0.0.1:0", settings=s) as g:
        assert post(g.url + "/v1/chat/completions", CHAT, key)[0] == 200
        until(lambda: len(access_lines(log)) == 1)
        log.rename(tmp_path / "access.log.1")  # moved, no new file (logrotate without create)
        refused()
        until(lambda: len(access_lines(log)) == 1)
        log.rename(tmp_path / "access.log.2")  # moved, and a new empty file made (logrotate's create)
        log.touch()
        refused()
        refused()
        until(lambda: len(access_lines(log)) == 2)
        log.unlink()
        refused("/v1/models/" + "A" * 8000)
        until(lambda: access_lines(log))
        [long] = access_lines(log)
        assert len(long["path"]) == 513 and long["path"] == ("/v1/models/" + "A" * 8000)[:512] + "\u2026"
    assert [x["status"] for x in access_lines(tmp_path / "access.log.1")] == [200]
    assert [x["status"] for x in access_lines(tmp_path / "access.log.2")] == [401]
