"""A fast, tiny OpenAI-compatible server that behaves like llama-server, for tests and benchmarks.

It answers ``/v1/chat/completions`` and ``/v1/completions`` with a short echo and token counts, ``/health``,
``/v1/models`` (both without a key) and ``/props`` (``total_slots``). Like llama-server it needs the API key when
one is set (401 without it), processes at most ``slots`` requests at once and queues the rest, and rejects a
prompt longer than its context with 400 ``exceed_context_size_error``. For error paths it can drop the
connection (``drop_first``) or answer ``fail_status`` (``fail_first``) for the first attempts of each distinct
request body.

Raw asyncio HTTP/1.1 (keep-alive, no dependencies) so that it is never the bottleneck of a client benchmark.

In-process (a thread with its own event loop)::

    with StubServer(latency=0.05, slots=4, api_key="k") as stub:
        stub.url  # http://127.0.0.1:PORT

As a process (standard library only, so the file also runs on its own as ``python devtools/stubserver.py``):
``python -m devtools.stubserver --port 0 --latency 0.05 --slots 4 --api-key k`` from the repository root prints
``listening on http://127.0.0.1:PORT`` on its first line.
"""

from __future__ import annotations

import argparse
import asyncio
import dataclasses
import json
import signal
import sys
import threading
import time
import typing as tp

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode
_REASONS = {200: "OK", 400: "Bad Request", 401: "Unauthorized", 404: "Not Found", 429: "Too Many Requests",
            500: "Internal Server Error", 503: "Service Unavailable"}


@dataclasses.dataclass
class StubConfig:
    latency: float = 0.0  # seconds each completion takes (holding one slot)
    slots: int = 4  # completions processed at once; more are queued (reported as /props total_slots)
    api_key: str | None = None
    model: str = "stub-model"
    completion_tokens: int = 8  # tokens per answer (capped by max_tokens)
    max_prompt_chars: int = 0  # 0: no limit; above it: 400 exceed_context_size_error
    fail_first: int = 0  # answer fail_status to the first attempts of each distinct body
    fail_status: int = 503
    drop_first: int = 0  # close the connection without answering on the first attempts of each body
    loading_s: float = 0.0  # /health answers 503 "Loading model" (and completions 503) this long after start
    # "stream": true answers as server-sent events, one chunk per token (chunked transfer encoding); with a
    # gate (a threading.Event), every chunk after the first waits until the gate is set
    stream_gate: tp.Any = None
    die_on: str | None = None  # a request whose text holds this closes every connection (a crashing server)


class _Stats:
    def __init__(self) -> None:
        self.completions = 0  # 200 answers to completion requests
        self.received = 0  # completion requests received (any outcome)
        self.rejected = 0
        self.attempts: dict[int, int] = {}
        self.active = 0  # completion requests being answered now (latency > 0)
        self.peak = 0  # the most answered at once


class _Conn(asyncio.Protocol):
    __slots__ = ("app", "transport", "buf", "busy")

    def __init__(self, app: _App) -> None:
        self.app = app
        self.buf = bytearray()
        self.busy = False
        self.transport: asyncio.Transport | None = None

    def connection_made(self, transport: asyncio.BaseTransport) -> None:
        self.transport = tp.cast(asyncio.Transport, transport)
        self.app.conns.add(self)

    def connection_lost(self, exc: Exception | None) -> None:
        self.app.conns.discard(self)
        self.transport = None

    def data_received(self, data: bytes) -> None:
        self.buf += data
        if not self.busy:
            self.process()

    def process(self) -> None:
        while self.transport is not None and not self.busy:
            buf = self.buf
            end = buf.find(b"\r\n\r\n")
            if end < 0:
                return
            lines = bytes(buf[:end]).split(b"\r\n")
            try:
                method, target, _ = lines[0].split(b" ", 2)
            except ValueError:
                self.transport.close()
                return
            length = 0
            auth = b""
            close = False
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    try:
                        length = int(value)
                    except ValueError:
                        self.transport.close()
                        return
                elif name == b"authorization":
                    auth = value.strip()
                elif name == b"connection":
                    close = b"close" in value.lower()
            need = end + 4 + length
            if len(buf) < need:
                return
            body = bytes(buf[end + 4:need])
            del buf[:need]
            self.app.handle(self, method.decode("latin-1"), target.decode("latin-1").split("?")[0], auth, body,
                            close)

    def send(self, status: int, payload: dict[str, tp.Any], close: bool = False) -> None:
        if self.transport is None:
            return
        data = _dumps(payload).encode()
        head = (f"HTTP/1.1 {status} {_REASONS.get(status, 'Error')}\r\nContent-Type: application/json\r\n"
                f"Content-Length: {len(data)}\r\n{'Connection: close' if close else 'Keep-Alive: timeout=5'}"
                "\r\n\r\n").encode()
        self.transport.write(head + data)
        if close:
            self.transport.close()


def _error(code: int, message: str, kind: str, **extra: tp.Any) -> dict[str, tp.Any]:
    return {"error": {"code": code, "message": message, "type": kind, **extra}}


class _App:
    def __init__(self, config: StubConfig) -> None:
        self.config = config
        self.stats = _Stats()
        self.conns: set[_Conn] = set()
        self.started = time.monotonic()
        self.sem: asyncio.Semaphore | None = None
        self.counter = 0

    def loading(self) -> bool:
        return self.config.loading_s > 0 and time.monotonic() - self.started < self.config.loading_s

    def handle(self, conn: _Conn, method: str, path: str, auth: bytes, body: bytes, close: bool) -> None:
        cfg = self.config
        if path in ("/health", "/v1/health"):
            if self.loading():
                conn.send(503, _error(503, "Loading model", "unavailable_error"), close)
            else:
                conn.send(200, {"status": "ok"}, close)
            return
        if path == "/stats":  # for benchmarks: what this stub answered
            st = self.stats
            conn.send(200, {"completions": st.completions, "received": st.received, "peak": st.peak}, close)
            return
        if path in ("/v1/models", "/models"):
            conn.send(200, {"object": "list", "data": [{"id": cfg.model, "object": "model", "owned_by": "stub"}]},
                      close)
            return
        if cfg.api_key is not None and auth != b"Bearer " + cfg.api_key.encode():
            conn.send(401, _error(401, "Invalid API Key", "authentication_error"), close)
            return
        if path == "/props":
            conn.send(200, {"total_slots": cfg.slots, "model_path": cfg.model,
                            "default_generation_settings": {"n_ctx": cfg.max_prompt_chars or 4096}}, close)
            return
        if path not in ("/v1/chat/completions", "/v1/completions", "/chat/completions", "/completions"):
            conn.send(404, _error(404, "File Not Found", "not_found_error"), close)
            return
        if method != "POST":
            conn.send(404, _error(404, "File Not Found", "not_found_error"), close)
            return
        st = self.stats
        st.received += 1
        if self.loading():
            conn.send(503, _error(503, "Loading model", "unavailable_error"), close)
            return
        if cfg.fail_first or cfg.drop_first:
            key = hash(body)
            n = st.attempts[key] = st.attempts.get(key, 0) + 1
            if n <= cfg.drop_first:
                assert conn.transport is not None
                conn.transport.abort()
                return
            if n <= cfg.drop_first + cfg.fail_first:
                msg = "Loading model" if cfg.fail_status == 503 else "stub failure"
                conn.send(cfg.fail_status, _error(cfg.fail_status, msg, "server_error"), close)
                return
        try:
            req = json.loads(body)
            chat = "chat" in path
            if chat:
                text = " ".join(str(m.get("content", "")) for m in req["messages"])
            else:
                text = str(req["prompt"])
            max_tokens = req.get("max_tokens") or req.get("max_completion_tokens") or 16
            if isinstance(max_tokens, bool) or not isinstance(max_tokens, int | float):
                raise TypeError("max_tokens is not a number")  # llama-server answers 400 too
        except (ValueError, KeyError, TypeError, AttributeError):
            st.rejected += 1
            conn.send(400, _error(400, "invalid request body", "invalid_request_error"), close)
            return
        if cfg.max_prompt_chars and len(text) > cfg.max_prompt_chars:
            st.rejected += 1
            conn.send(400, _error(400, "the request exceeds the available context size, try increasing it",
                                  "exceed_context_size_error", n_prompt_tokens=len(text),
                                  n_ctx=cfg.max_prompt_chars), close)
            return
        if cfg.die_on and cfg.die_on in text:
            for other in list(self.conns):
                if other.transport is not None:
                    other.transport.abort()
            return
        if req.get("stream") is True:
            conn.busy = True
            asyncio.get_running_loop().create_task(self.streamed(conn, req, chat, text, close))
            return
        answer = self.answer(req, chat, text)
        if cfg.latency <= 0:
            st.completions += 1
            conn.send(200, answer, close)
            return
        conn.busy = True
        asyncio.get_running_loop().create_task(self.delayed(conn, answer, close))

    async def delayed(self, conn: _Conn, answer: dict[str, tp.Any], close: bool) -> None:
        if self.sem is None:
            self.sem = asyncio.Semaphore(max(1, self.config.slots))
        st = self.stats
        async with self.sem:  # beyond its slots llama-server queues requests; so do we
            st.active += 1
            st.peak = max(st.peak, st.active)
            try:
                await asyncio.sleep(self.config.latency)
            finally:
                st.active -= 1
        if conn.transport is None:
            return
        self.stats.completions += 1
        conn.send(200, answer, close)
        conn.busy = False
        conn.process()

    async def streamed(self, conn: _Conn, req: dict[str, tp.Any], chat: bool, text: str, close: bool) -> None:
        """The answer as server-sent events: one chunk per token, then one with the usage, then [DONE]."""
        answer = self.answer(req, chat, text)
        n = answer["usage"]["completion_tokens"]
        words = [f"tok{i} " for i in range(n)]
        transport = conn.transport
        if transport is None:
            return
        transport.write(b"HTTP/1.1 200 OK\r\nContent-Type: text/event-stream\r\nTransfer-Encoding: chunked\r\n"
                        + (b"Connection: close" if close else b"Keep-Alive: timeout=5") + b"\r\n\r\n")

        def event(data: dict[str, tp.Any] | str) -> bytes:
            payload = b"data: " + (data.encode() if isinstance(data, str) else _dumps(data).encode()) + b"\n\n"
            return f"{len(payload):x}\r\n".encode() + payload + b"\r\n"

        base = {"id": answer["id"], "created": answer["created"], "model": answer["model"],
                "object": "chat.completion.chunk" if chat else "text_completion"}
        gate = self.config.stream_gate
        for i, word in enumerate(words):
            if i == 1 and gate is not None:
                while not gate.is_set():
                    await asyncio.sleep(0.01)
            if conn.transport is None:
                return
            choice = ({"index": 0, "delta": {"content": word}, "finish_reason": None} if chat
                      else {"index": 0, "text": word, "finish_reason": None})
            conn.transport.write(event({**base, "choices": [choice]}))
            if self.config.latency > 0:
                await asyncio.sleep(self.config.latency / max(1, n))
        if conn.transport is None:
            return
        last = ({"index": 0, "delta": {}, "finish_reason": "stop"} if chat
                else {"index": 0, "text": "", "finish_reason": "stop"})
        conn.transport.write(event({**base, "choices": [last], "usage": answer["usage"]}) + event("[DONE]")
                             + b"0\r\n\r\n")
        self.stats.completions += 1
        if close:
            conn.transport.close()
            return
        conn.busy = False
        conn.process()

    def answer(self, req: dict[str, tp.Any], chat: bool, text: str) -> dict[str, tp.Any]:
        cfg = self.config
        self.counter += 1
        max_tokens = req.get("max_tokens") or req.get("max_completion_tokens") or 16
        n = max(1, min(int(max_tokens), cfg.completion_tokens))
        content = "echo: " + text[:48]
        usage = {"prompt_tokens": max(1, len(text) // 4), "completion_tokens": n,
                 "total_tokens": max(1, len(text) // 4) + n}
        common = {"id": f"{'chatcmpl' if chat else 'cmpl'}-stub{self.counter}", "created": int(time.time()),
                  "model": req.get("model") or cfg.model, "usage": usage}
        if chat:
            return {**common, "object": "chat.completion",
                    "choices": [{"index": 0, "finish_reason": "length" if n == max_tokens else "stop",
                                 "message": {"role": "assistant", "content": content}}]}
        return {**common, "object": "text_completion",
                "choices": [{"index": 0, "text": content, "finish_reason": "stop", "logprobs": None}]}


class StubServer:
    """The stub, run in a background thread (:meth:`start`/:meth:`stop`, or ``with``)."""

    def __init__(self, host: str = "127.0.0.1", port: int = 0, **config: tp.Any) -> None:
        self.host = host
        self.port = port
        self.config = StubConfig(**config)
        self.app = _App(self.config)
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._server: asyncio.base_events.Server | None = None

    @property
    def url(self) -> str:
        return f"http://{self.host}:{self.port}"

    @property
    def stats(self) -> _Stats:
        return self.app.stats

    async def start_async(self) -> None:
        """Listen inside the running event loop."""
        loop = asyncio.get_running_loop()
        self._server = await loop.create_server(lambda: _Conn(self.app), self.host, self.port, backlog=1024)
        self.port = self._server.sockets[0].getsockname()[1]
        self.app.started = time.monotonic()

    def close_now(self) -> None:
        """Stop listening and reset every open connection (what a crashed server looks like)."""
        if self._server is not None:
            self._server.close()
        for conn in list(self.app.conns):
            if conn.transport is not None:
                conn.transport.abort()

    def start(self) -> StubServer:
        ready = threading.Event()
        errors: list[BaseException] = []

        def main() -> None:
            loop = asyncio.new_event_loop()
            self._loop = loop
            try:
                loop.run_until_complete(self.start_async())
            except BaseException as exc:  # noqa: BLE001 - reported to the caller
                errors.append(exc)
                ready.set()
                return
            ready.set()
            loop.run_forever()
            loop.run_until_complete(loop.shutdown_asyncgens())
            loop.close()

        self._thread = threading.Thread(target=main, name=f"stubserver-{self.port}", daemon=True)
        self._thread.start()
        ready.wait()
        if errors:
            raise errors[0]
        return self

    def stop(self) -> None:
        """Close the server and its connections, and end the thread."""
        loop = self._loop
        if loop is None or self._thread is None:
            return

        def shut() -> None:
            self.close_now()
            for task in asyncio.all_tasks(loop):
                task.cancel()
            loop.call_later(0.01, loop.stop)

        loop.call_soon_threadsafe(shut)
        self._thread.join(timeout=5)
        self._loop = None

    def __enter__(self) -> StubServer:
        return self.start()

    def __exit__(self, *exc: object) -> None:
        self.stop()


def main(argv: list[str] | None = None) -> None:
    parser = argparse.ArgumentParser(prog="python -m devtools.stubserver", description=__doc__.split("\n")[0])
    parser.add_argument("--host", default="127.0.0.1")
    parser.add_argument("--port", type=int, default=0, help="0 picks a free port (printed on the first line)")
    for field in dataclasses.fields(StubConfig):
        flag = "--" + field.name.replace("_", "-")
        kind = {"float": float, "int": int}.get(str(field.type), str)
        parser.add_argument(flag, type=kind, default=field.default)
    args = parser.parse_args(argv)
    config = {f.name: getattr(args, f.name) for f in dataclasses.fields(StubConfig)}

    async def serve() -> None:
        stub = StubServer(args.host, args.port, **config)
        await stub.start_async()
        print(f"listening on {stub.url}", flush=True)
        stop = asyncio.Event()
        loop = asyncio.get_running_loop()
        for sig in (signal.SIGINT, signal.SIGTERM):
            loop.add_signal_handler(sig, stop.set)
        await stop.wait()
        stub.close_now()

    asyncio.run(serve())
    sys.exit(0)


if __name__ == "__main__":
    main()
