"""How one request reaches one replica: ``send(url, body) -> Reply`` or :class:`TransportError`.

Two interchangeable clients speak the same OpenAI HTTP API:

* :class:`OpenAITransport` — the ``openai`` package's ``AsyncOpenAI`` (its own retries off: the runner retries,
  possibly on another replica); the raw response is kept, not parsed into models;
* :class:`RawTransport` — a lean HTTP/1.1 keep-alive client on asyncio streams, for the hot loop: it has a
  fraction of the per-request CPU cost (see bench/bench_client.py), which matters at thousands of requests/s.

Why the default client is hand-written: measured against the libraries on P3 (100,000 prompts, one zero-latency
stub, 2 cores, same runner; ``python bench/bench_client.py --clients raw,aiohttp,httpx,openai --skip p5``), none
meets the goal of >= 2,000 requests/s within 150 MB. Medians of an interleaved run: this client 2,750 req/s,
227 us of client CPU per request; aiohttp 1,547 req/s, 453 us (1,940 req/s on a quieter repeat, where this
client did 5,645); httpx 400 req/s, 1,903 us; openai's AsyncOpenAI 282 req/s, 2,747 us; peak RSS 61-100 MB for
all. Details in docs/benchmarks.md (P3).
"""

from __future__ import annotations

import asyncio
import dataclasses
import json
import sys
import typing as tp
import urllib.parse

from ..rundir.records import Endpoint

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


@dataclasses.dataclass
class Reply:
    status: int
    body: bytes
    request_id: str | None = None
    retry_after: float | None = None


class TransportError(Exception):
    """No HTTP answer. ``kind`` is ``connect`` (refused, reset, closed) or ``timeout``; ``sent``: the request may
    have reached the server (False: no connection was made, e.g. refused)."""

    def __init__(self, kind: str, message: str, sent: bool = True) -> None:
        super().__init__(message)
        self.kind = kind
        self.sent = sent


class Transport(tp.Protocol):
    async def send(self, url: str, body: dict[str, tp.Any]) -> Reply: ...

    async def aclose(self) -> None: ...


PROBE_PATH = "/health"  # llama-server's (and vLLM's) liveness page; any other server answers it too, if only 404


def probe_verdict(status: int) -> str | None:
    """What an HTTP answer to a probe says: None (the server answers: it serves again), or why not yet (5xx: e.g.
    llama-server's 503 while it loads a model)."""
    return None if status < 500 else f"{PROBE_PATH} answered {status}"


def _retry_after(value: str | None) -> float | None:
    if not value:
        return None
    try:
        return max(0.0, float(value))
    except ValueError:
        return None


if sys.version_info >= (3, 11):
    _timeout = asyncio.timeout
else:  # pragma: no cover - Python 3.10
    import contextlib

    @contextlib.asynccontextmanager
    async def _timeout(delay: float) -> tp.AsyncIterator[None]:
        task = asyncio.current_task()
        assert task is not None
        handle = asyncio.get_running_loop().call_later(delay, task.cancel)
        try:
            yield
        except asyncio.CancelledError:
            if handle.when() <= asyncio.get_running_loop().time():
                raise TimeoutError from None
            raise
        finally:
            handle.cancel()


class RawTransport:
    """HTTP/1.1 with a pool of keep-alive connections to one server (Content-Length and chunked replies)."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        parts = urllib.parse.urlsplit(endpoint.url)
        if parts.scheme != "http":
            raise ValueError(f"the lean client speaks plain http only, not {parts.scheme}")
        self.host = parts.hostname or "127.0.0.1"
        self.port = parts.port or 80
        self.prefix = parts.path.rstrip("/")
        self.timeout = timeout
        auth = f"Authorization: Bearer {endpoint.api_key}\r\n" if endpoint.api_key else ""
        self._head = (f"Host: {parts.netloc}\r\n{auth}Content-Type: application/json\r\n"
                      "Accept: application/json\r\nContent-Length: ").encode()
        self._idle: list[tuple[asyncio.StreamReader, asyncio.StreamWriter]] = []
        self._closed = False

    async def send(self, url: str, body: dict[str, tp.Any]) -> Reply:
        data = _dumps(body).encode()
        request = b"POST " + (self.prefix + url).encode() + b" HTTP/1.1\r\n" + self._head + \
            str(len(data)).encode() + b"\r\n\r\n" + data
        try:
            async with _timeout(self.timeout):
                written = False  # on a kept-alive connection that then closed: the server may have read it
                while self._idle:
                    conn = self._idle.pop()
                    try:
                        return await self._exchange(conn, request)
                    except _StaleConnection:
                        written = True
                        continue  # the server closed an idle connection: use another
                try:
                    conn = await asyncio.open_connection(self.host, self.port)
                except OSError as exc:
                    raise TransportError("connect", exc.strerror or str(exc) or type(exc).__name__,
                                         sent=written) from None
                try:
                    return await self._exchange(conn, request)
                except _StaleConnection as exc:
                    raise TransportError("connect", "the server closed the connection without answering") from exc
        except TimeoutError:
            raise TransportError("timeout", f"no answer within {self.timeout:g} s") from None
        except OSError as exc:
            raise TransportError("connect", exc.strerror or str(exc) or type(exc).__name__) from None

    async def _exchange(self, conn: tuple[asyncio.StreamReader, asyncio.StreamWriter], request: bytes) -> Reply:
        reader, writer = conn
        try:
            writer.write(request)
            try:
                head = await reader.readuntil(b"\r\n\r\n")
            except asyncio.IncompleteReadError as exc:
                if not exc.partial:
                    raise _StaleConnection from None
                raise ConnectionResetError("connection closed mid-reply") from None
            lines = head.split(b"\r\n")
            status = int(lines[0].split(b" ", 2)[1])
            length = -1
            chunked = False
            request_id = retry_after = None
            keep = True
            for line in lines[1:]:
                name, _, value = line.partition(b":")
                name = name.strip().lower()
                if name == b"content-length":
                    length = int(value)
                elif name == b"transfer-encoding":
                    chunked = b"chunked" in value.lower()
                elif name == b"connection":
                    keep = b"close" not in value.lower()
                elif name == b"x-request-id":
                    request_id = value.strip().decode("latin-1")
                elif name == b"retry-after":
                    retry_after = _retry_after(value.strip().decode("latin-1"))
            if chunked:
                body = await self._read_chunked(reader)
            elif length >= 0:
                body = await reader.readexactly(length)
            else:
                body = await reader.read()
                keep = False
            reply = Reply(status, body, request_id, retry_after)
        except BaseException as exc:
            writer.close()  # a half-read reply (error, timeout, cancel) would poison the connection
            if isinstance(exc, asyncio.IncompleteReadError):
                raise ConnectionResetError("connection closed mid-reply") from None
            if isinstance(exc, (ValueError, IndexError)):
                raise ConnectionResetError("malformed HTTP reply") from None
            raise
        if keep and not self._closed:
            self._idle.append(conn)
        else:
            writer.close()
        return reply

    @staticmethod
    async def _read_chunked(reader: asyncio.StreamReader) -> bytes:
        parts: list[bytes] = []
        while True:
            size = int((await reader.readuntil(b"\r\n")).split(b";")[0], 16)
            if size == 0:
                await reader.readuntil(b"\r\n")
                return b"".join(parts)
            parts.append(await reader.readexactly(size))
            await reader.readexactly(2)

    async def aclose(self) -> None:
        self._closed = True
        while self._idle:
            _, writer = self._idle.pop()
            writer.close()

    async def probe(self) -> str | None:
        """One GET of :data:`PROBE_PATH` on a new connection: None when the server answers, else why not."""
        request = (b"GET " + (self.prefix + PROBE_PATH).encode() + b" HTTP/1.1\r\n" +
                   self._head.split(b"Content-Type:")[0] + b"Connection: close\r\n\r\n")
        writer = None
        try:
            async with _timeout(self.timeout):
                reader, writer = await asyncio.open_connection(self.host, self.port)
                writer.write(request)
                head = await reader.readuntil(b"\r\n\r\n")
                return probe_verdict(int(head.split(b" ", 2)[1]))
        except TimeoutError:
            return f"no answer within {self.timeout:g} s"
        except asyncio.IncompleteReadError:
            return "the server closed the connection without answering"
        except OSError as exc:
            return exc.strerror or str(exc) or type(exc).__name__
        except (ValueError, IndexError, asyncio.LimitOverrunError):
            return "malformed HTTP reply"
        finally:
            if writer is not None:
                writer.close()


class _StaleConnection(Exception):
    pass


class OpenAITransport:
    """The ``openai`` package's ``AsyncOpenAI``, used for its HTTP plumbing only (no model parsing, no retries)."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        # openai >= 3 sends through httpx2 (its 2.x line used httpx): cast_to=httpx2.Response asks it for the
        # raw response, whatever the body holds.
        import httpx2
        import openai

        self._httpx = httpx2
        self._openai = openai
        self.client = openai.AsyncOpenAI(base_url=endpoint.openai_base_url, api_key=endpoint.api_key or "none",
                                         max_retries=0, timeout=timeout)
        self.timeout = timeout
        self._root = endpoint.url.rstrip("/")  # an absolute URL: the probe's page is not under /v1

    async def send(self, url: str, body: dict[str, tp.Any]) -> Reply:
        openai = self._openai
        path = url[3:] if url.startswith("/v1/") else url  # base_url already ends in /v1
        try:
            resp = await self.client.post(path, cast_to=self._httpx.Response, body=body)
        except openai.APIStatusError as exc:
            r = exc.response
            return Reply(r.status_code, r.content, r.headers.get("x-request-id"),
                         _retry_after(r.headers.get("retry-after")))
        except openai.APITimeoutError:
            raise TransportError("timeout", f"no answer within {self.timeout:g} s") from None
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            raise TransportError("connect", str(cause) if cause else str(exc),
                                 sent=not isinstance(cause, self._httpx.ConnectError)) from None
        return Reply(resp.status_code, resp.content, resp.headers.get("x-request-id"))

    async def probe(self) -> str | None:
        """One GET of :data:`PROBE_PATH`: None when the server answers, else why not."""
        openai = self._openai
        try:
            resp = await self.client.get(self._root + PROBE_PATH, cast_to=self._httpx.Response)
        except openai.APIStatusError as exc:
            return probe_verdict(exc.response.status_code)
        except openai.APITimeoutError:
            return f"no answer within {self.timeout:g} s"
        except openai.APIConnectionError as exc:
            cause = exc.__cause__
            return str(cause) if cause else str(exc)
        return probe_verdict(resp.status_code)

    async def aclose(self) -> None:
        await self.client.close()


CLIENTS: dict[str, tp.Callable[[Endpoint, float], Transport]] = {"raw": RawTransport, "openai": OpenAITransport}
