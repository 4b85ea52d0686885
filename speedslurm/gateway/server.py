"""The gateway's HTTP side (aiohttp): keys, limits, proxying with streaming, metrics, status, graceful stop.

Routes: ``POST /v1/chat/completions``, ``/v1/completions``, ``/v1/embeddings`` (proxied to a replica of the alias
that the body's ``"model"`` names); ``GET /v1/models`` (the aliases and their state); ``GET /health`` (no key);
``GET /metrics`` (Prometheus text; any valid key); ``GET /gateway/status`` and ``/gateway/usage`` (the owner's
admin key from the gateway folder). Every other path is 404, every error a JSON body in OpenAI's shape.

A request's body is forwarded as it came (no re-encoding); the replica's own key replaces the user's, which never
leaves the gateway. A non-streamed request whose replica's connection broke is sent again to another replica
(at most twice: a request that two replicas died on is not sent a third time); a streamed one that broke after
its first chunk ends with an error event. A client that sends its body slower than ``gateway.client_timeout_s``
is cut off, and so is one that takes none of its answer's bytes for that long (its connection is aborted: a
write to it would wait for ever); a client that leaves cancels its request on the replica. A
connection that has not sent a whole request head within ``gateway.client_timeout_s`` of connecting or of its
previous answer is closed (silent clients, or one header byte every few seconds, would hold it for ever).
"""

from __future__ import annotations

import asyncio
import contextlib
import errno
import json
import logging
import os
import re
import signal
import socket
import struct
import sys
import time
import typing as tp

import aiohttp
from aiohttp import web

from ..errors import UsageError
from .keys import KeyStore, digest
from .metrics import Usage, prometheus
from .pool import Pool, Replica, Unavailable, _line
from .state import Folder

if tp.TYPE_CHECKING:
    from ..settings.settings import Settings
    from .pool import AliasSpec

log = logging.getLogger("speedslurm.gateway")
PROXIED = ("/v1/chat/completions", "/v1/completions", "/v1/embeddings")
MAX_DEATHS = 2
SAVE_EVERY_S = 5.0
CONNECT_TIMEOUT_S = 10.0  # a replica that does not take the connection in this long is lost (its node is gone)
TAIL_BYTES = 64 * 1024  # how much of a stream's end is kept to read its usage from (the last event fits)
LARGE_ANSWER = 1 << 20  # a non-streamed answer larger than this is not parsed whole for its usage (see _usage_of)
USAGE_WINDOW = 64 * 1024  # how much of a large answer's start and end is looked at for its usage
CUT_S = 1.0  # after the drain: how long the requests still in flight, once cut, and aiohttp's own shutdown get
LOGGED_PATH_MOST = 512  # a longer request path is cut in the access log (a client without a key could fill it)
NO_HANDLES = (errno.EMFILE, errno.ENFILE)  # the process (or the system) has no file handle left for a connection
NO_HANDLES_LOG_S = 60.0  # the warning that says so, at most this often


def _bearer(request: web.Request) -> str:
    """The key of a request's ``Authorization: Bearer KEY`` header; "" without one."""
    header = request.headers.get("Authorization", "")
    return header[7:].strip() if header[:7].lower() == "bearer " else ""


def _error(status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
           retry_after: int | None = None) -> web.Response:
    headers = {"Retry-After": str(retry_after)} if retry_after is not None else None
    return web.json_response({"error": {"message": message, "type": kind, "code": code}}, status=status,
                             headers=headers)


def _depth_ok(value: tp.Any, most: int) -> bool:
    """``value`` nests at most ``most`` levels of lists and objects (without recursion)."""
    stack = [(value, 1)]
    while stack:
        item, depth = stack.pop()
        if isinstance(item, (dict, list)):
            if depth > most:
                return False
            children = item.values() if isinstance(item, dict) else item
            stack.extend((c, depth + 1) for c in children if isinstance(c, (dict, list)))
    return True


def _tokens(usage: tp.Any) -> tuple[int, int]:
    if not isinstance(usage, dict):
        return 0, 0

    def number(v: tp.Any) -> int:
        return v if isinstance(v, int) and not isinstance(v, bool) and v >= 0 else 0

    return number(usage.get("prompt_tokens")), number(usage.get("completion_tokens"))


def _stream_tokens(tail: bytes) -> tuple[int, int] | None:
    """The tokens a stream's end reports: the last whole event's ``usage``, else llama-server's ``timings``
    (prompt_n, predicted_n). ``tail`` is the stream's last bytes: a cut first line is skipped."""
    for line in reversed(tail.replace(b"\r\n", b"\n").split(b"\n")):
        if not line.startswith(b"data:") or (b'"usage"' not in line and b'"timings"' not in line):
            continue
        try:
            data = json.loads(line[5:])
        except ValueError:
            continue
        if isinstance(data, dict):
            if isinstance(data.get("usage"), dict):
                return _tokens(data["usage"])
            timings = data.get("timings")
            if isinstance(timings, dict):
                return _tokens({"prompt_tokens": timings.get("prompt_n"),
                                "completion_tokens": timings.get("predicted_n")})
    return None


def _abort(transport: asyncio.Transport) -> None:
    """Cut a client's connection at once: a reset, so that what it has not taken is dropped by the kernel too
    (a plain close would keep it queued, the socket waiting for the client to read)."""
    sock = transport.get_extra_info("socket")
    if sock is not None:
        with contextlib.suppress(OSError):
            sock.setsockopt(socket.SOL_SOCKET, socket.SO_LINGER, struct.pack("ii", 1, 0))
    transport.abort()


# A JSON text's strings and brackets; a lone quote: a string cut by the window's edge (the scan stops there).
_TOKENS = re.compile(rb'"(?:[^"\\]|\\.)*"|[{}\[\]]|"')
# The same in the reversed text, where a quote followed by an odd run of backslashes is one inside its string.
_ODD_BACKSLASHES = rb"(?:\\\\)*\\(?!\\)"
_TOKENS_REVERSED = re.compile(rb'"(?:[^"]|"(?=' + _ODD_BACKSLASHES + rb'))*"(?!' + _ODD_BACKSLASHES + rb')|[{}\[\]]|"')
_COLON = re.compile(rb"\s*:\s*")


def _usage_at(text: bytes, key_end: int) -> tp.Any:
    """The value after the key that ends at ``key_end`` (None if it cannot be read from ``text``)."""
    colon = _COLON.match(text, key_end)
    if colon is None:
        return None
    try:
        return json.JSONDecoder().raw_decode(text[colon.end():].decode("utf-8", "replace"))[0]
    except ValueError:
        return None


def _key_at_top(text: bytes, tokens: re.Pattern[bytes], opening: tuple[bytes, ...], key: bytes
                ) -> tp.Iterator[re.Match[bytes]]:
    """The string tokens ``key`` directly inside ``text``'s outermost brackets (``opening``: the brackets that
    open a level in the order ``tokens`` reads), until the scan leaves them or reaches a cut string."""
    depth = 0
    for m in tokens.finditer(text):
        token = m.group()
        if token in opening:
            depth += 1
        elif token in (b"{", b"}", b"[", b"]"):
            depth -= 1
        elif token == b'"':
            return
        elif depth == 1 and token == key:
            yield m
        if depth <= 0:
            return


def _usage_of(body: bytes) -> tuple[bool, tp.Any]:
    """The top-level ``usage`` of a large JSON answer, read from its first or last ``USAGE_WINDOW`` bytes only:
    (True, value) where found, (False, None) where neither holds it. llama-server puts an embeddings answer's
    usage before its data, OpenAI-style servers put it at the end. Parsing the whole answer instead would hold
    the gateway's event loop (in a thread too: the JSON parser keeps the interpreter's lock) long enough to
    stall every other request."""
    head = body[:USAGE_WINDOW]
    for m in _key_at_top(head, _TOKENS, (b"{", b"["), b'"usage"'):
        value = _usage_at(head, m.end())
        if value is not None:
            return True, value
    tail = body[-USAGE_WINDOW:]
    for m in _key_at_top(tail[::-1], _TOKENS_REVERSED, (b"}", b"]"), b'"egasu"'):
        start = len(tail) - m.end()  # where the key starts in the text as it is; a backslash before it (or the
        if start == 0 or tail[start - 1] == 0x5C:  # window's edge) would make it part of a longer string
            break
        value = _usage_at(tail, len(tail) - m.start())
        if value is not None:
            return True, value
    return False, None


def _error_event(message: str, code: str) -> bytes:
    """The event that ends a stream the gateway could not finish (as OpenAI's API sends its errors)."""
    return f"data: {json.dumps({'error': {'message': message, 'type': 'server_error', 'code': code}})}\n\n".encode()


def _parsed(body: bytes) -> tp.Any:
    try:
        return json.loads(body)
    except ValueError:
        return None


def _fits(request: web.Request, size: int) -> bool:
    """A write of ``size`` bytes to ``request``'s client goes into its transport's buffer at once (under the
    high-water mark, and the transport open): it does not wait on the client."""
    transport = request.transport
    return transport is not None and not transport.is_closing() \
        and not getattr(request.protocol, "writing_paused", True) \
        and transport.get_write_buffer_size() + size + 16384 <= transport.get_write_buffer_limits()[1]


class Broken(Exception):
    """The replica's connection broke (or it answered that it is loading) before the client got anything."""


class NoHandles(Exception):
    """The gateway could not open a connection to the replica: it is out of file handles (nothing the replica
    did)."""


def _no_handles(exc: BaseException) -> bool:
    """``exc`` (an OSError, or aiohttp's ClientConnectorError that wraps one) says that no file handle was left."""
    return isinstance(exc, OSError) and exc.errno in NO_HANDLES


def open_files_limits() -> tuple[int, int] | None:
    """The process's (soft, hard) limits on open files; None where there are none to read (not POSIX)."""
    try:
        import resource
    except ImportError:
        return None
    return resource.getrlimit(resource.RLIMIT_NOFILE)


def raise_open_files_limit() -> None:
    """Lift the process's soft limit on open files to its hard limit: every client connection and every
    connection to a replica holds a file handle, and the soft limit is often 1024."""
    limits = open_files_limits()
    if limits is None:
        return
    import resource

    soft, hard = limits
    most = hard if hard != resource.RLIM_INFINITY else 1 << 20  # unlimited: the kernel's usual nr_open
    if soft != resource.RLIM_INFINITY and soft < most:
        try:
            resource.setrlimit(resource.RLIMIT_NOFILE, (most, hard))
        except (ValueError, OSError) as exc:
            log.warning("could not raise the limit on open files from %d to %d: %s", soft, most, exc)


class HeadTimer:
    """Closes a client connection that has sent no whole request head within ``limit`` s of connecting or of
    its previous answer. aiohttp waits for one without end: a client that connects and says nothing, or sends
    a header byte every few seconds, would hold its connection (and a file handle) for ever, and enough of
    them leave the gateway no handle to reach a replica with.

    Hooked on an aiohttp web ``Server``'s connection events; :meth:`busy` (a request began) stops a connection's
    clock, :meth:`idle` (its answer went out) starts it again."""

    def __init__(self, server: web.Server, limit: float) -> None:
        self.limit = limit
        self._loop = asyncio.get_running_loop()
        self._timers: dict[tp.Any, asyncio.TimerHandle] = {}
        made, lost = server.connection_made, server.connection_lost

        def connection_made(handler: tp.Any, transport: asyncio.Transport) -> None:
            made(handler, transport)
            self.idle(handler)

        def connection_lost(handler: tp.Any, exc: BaseException | None = None) -> None:
            self.busy(handler)
            lost(handler, exc)

        server.connection_made = connection_made  # type: ignore[method-assign]
        server.connection_lost = connection_lost  # type: ignore[method-assign]

    def idle(self, conn: tp.Any) -> None:
        """``conn`` waits for its next request head: it has ``limit`` s to send it."""
        self.busy(conn)
        if conn.transport is not None:
            self._timers[conn] = self._loop.call_later(self.limit, self._late, conn)

    def busy(self, conn: tp.Any) -> None:
        """``conn`` sent a request head (or closed): no clock runs for it."""
        timer = self._timers.pop(conn, None)
        if timer is not None:
            timer.cancel()

    def _late(self, conn: tp.Any) -> None:
        self._timers.pop(conn, None)
        conn.force_close()


class Gateway:
    """A running gateway: its aiohttp application, its pool and counters."""

    def __init__(self, settings: Settings, specs: tp.Sequence[AliasSpec], folder: Folder) -> None:
        self.settings = settings
        self.g = settings.gateway
        self.folder = folder
        self.keys = KeyStore(folder.root)
        self.usage = Usage.load(folder.usage())
        self.pool = Pool(settings, specs, folder, self.usage)
        self.admin_key = ""
        self.url = ""
        self.started = time.time()
        self.in_flight = 0
        self.idle = asyncio.Event()
        self.access: tp.TextIO | None = None
        self._access_path: str | None = None
        self._access_file: tuple[int, int] = (0, 0)  # the open access log's device and inode
        self._access_problem = ""  # why it could not be opened again (said once)
        self.runner: web.AppRunner | None = None
        self.heads: HeadTimer | None = None
        self._background: list[asyncio.Task[tp.Any]] = []
        self._requests: set[asyncio.Task[tp.Any]] = set()  # the proxied requests in flight
        self._cutting = False  # the drain is over: the requests still in flight are cut
        self._no_handles_logged = -NO_HANDLES_LOG_S

    # ------------------------------------------------------------------------------------------ app

    def app(self) -> web.Application:
        app = web.Application(client_max_size=self.g.max_body_bytes, middlewares=[self._guard])
        for path in PROXIED:
            app.router.add_post(path, self.proxy)
        app.router.add_get("/v1/models", self.models)
        app.router.add_get("/v1/models/{model}", self.model)
        app.router.add_get("/health", self.health)
        app.router.add_get("/metrics", self.metrics)
        app.router.add_get("/gateway/status", self.status)
        app.router.add_get("/gateway/usage", self.usage_view)
        return app

    @web.middleware
    async def _guard(self, request: web.Request, handler: tp.Callable[[web.Request], tp.Awaitable[web.StreamResponse]]
                     ) -> web.StreamResponse:
        """No traceback reaches a client: aiohttp's own HTTP errors keep their status, anything else is a 500.
        The connection's clock for its next request head stops while a request is handled."""
        conn = request.protocol
        if self.heads is not None:
            self.heads.busy(conn)
        try:
            resp = await self._guarded(request, handler)
            if not resp.prepared:  # written here, within the client's time (aiohttp's own write has none)
                with contextlib.suppress(ConnectionError):
                    await self._written(request, self._finish(request, resp))
            return resp
        finally:
            if self.heads is not None:
                self.heads.idle(conn)

    async def _guarded(self, request: web.Request,
                       handler: tp.Callable[[web.Request], tp.Awaitable[web.StreamResponse]]) -> web.StreamResponse:
        try:
            return await handler(request)
        except web.HTTPException as exc:
            if exc.status == 413:
                return _error(413, f"the request body is larger than {self.g.max_body_bytes} bytes "
                                   "(gateway.max_body_bytes)")
            if exc.status >= 400:
                return _error(exc.status, exc.reason or "error", code=str(exc.status))
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            raise
        except Exception:  # noqa: BLE001 - logged with its traceback, the client gets a plain 500
            log.exception("gateway request %s %s", request.method, request.path)
            return _error(500, "the gateway failed on this request (see its log)", kind="server_error")

    def _who(self, request: web.Request) -> str | None:
        return self.keys.check(_bearer(request))

    def _is_admin(self, request: web.Request) -> bool:
        """The request bears the admin key. Digests are compared: a header of any bytes is just a wrong key."""
        import hmac

        return bool(self.admin_key) and hmac.compare_digest(digest(_bearer(request)), digest(self.admin_key))

    def _unauthorized(self, request: web.Request, response: web.Response | None = None) -> web.Response:
        """401 (counted, and one line in the access log: no key name, never the key that was sent)."""
        self.usage.unauthorized += 1
        self._access({"key": None, "path": request.path}, 401, 0.0)
        return response or _error(401, "a valid API key is needed: ask the gateway's owner for one "
                                       "(`speedslurm gateway keys add NAME`)", code="invalid_api_key")

    # ------------------------------------------------------------------------------------------ views

    async def health(self, request: web.Request) -> web.Response:
        return web.json_response({"status": "ok" if not self.pool.closing else "stopping"},
                                 status=200 if not self.pool.closing else 503)

    def _model_entry(self, name: str) -> dict[str, tp.Any]:
        a = self.pool.aliases[name].to_json()
        return {"id": name, "object": "model", "created": int(self.started), "owned_by": "speedslurm",
                "state": a["state"], "why": a["why"], "replicas": a["replicas"]}

    async def models(self, request: web.Request) -> web.Response:
        if self._who(request) is None and not self._is_admin(request):
            return self._unauthorized(request)
        return web.json_response({"object": "list", "data": [self._model_entry(n) for n in self.pool.names()]})

    async def model(self, request: web.Request) -> web.Response:
        """``GET /v1/models/{model}`` (``client.models.retrieve``): the alias's entry, or 404 naming the models."""
        if self._who(request) is None and not self._is_admin(request):
            return self._unauthorized(request)
        try:
            alias = self.pool.alias(request.match_info["model"])
        except Unavailable as exc:
            return _error(exc.status, exc.reason, code="model_not_found")
        return web.json_response(self._model_entry(alias.name))

    async def metrics(self, request: web.Request) -> web.Response:
        if self._who(request) is None and not self._is_admin(request):
            return self._unauthorized(request)
        return web.Response(text=prometheus(self.usage, self.pool.gauges()),
                            content_type="text/plain", charset="utf-8", headers={"X-Format": "prometheus-0.0.4"})

    def status_json(self) -> dict[str, tp.Any]:
        return {"url": self.url, "pid": __import__("os").getpid(), "started_at": self.started,
                "uptime_s": round(time.time() - self.started, 1), "stopping": self.pool.closing,
                "in_flight": self.in_flight, "keys": self.keys.count(), "keys_problem": self.keys.problem,
                "aliases": [self.pool.aliases[n].to_json() for n in self.pool.names()],
                "decisions": list(self.pool.decisions)}

    def usage_json(self) -> dict[str, tp.Any]:
        return {"keys": self.usage.per_key(), "aliases": self.usage.per_alias(),
                "by": self.usage.to_json()["by"], "unauthorized": self.usage.unauthorized}

    async def status(self, request: web.Request) -> web.Response:
        if not self._is_admin(request):
            return self._unauthorized(request, _error(
                401, "gateway status needs the gateway's admin key (`speedslurm gateway status` reads it from the "
                     "gateway's folder)", code="invalid_api_key"))
        return web.json_response(self.status_json())

    async def usage_view(self, request: web.Request) -> web.Response:
        if not self._is_admin(request):
            return self._unauthorized(request, _error(
                401, "gateway usage needs the gateway's admin key (`speedslurm gateway usage` reads it from the "
                     "gateway's folder)", code="invalid_api_key"))
        return web.json_response(self.usage_json())

    # ------------------------------------------------------------------------------------------ proxy

    async def proxy(self, request: web.Request) -> web.StreamResponse:
        t0 = time.monotonic()
        who = self._who(request)
        if who is None:
            return self._unauthorized(request)
        self.in_flight += 1
        self.idle.clear()
        task = asyncio.current_task()
        if task is not None:
            self._requests.add(task)
        record: dict[str, tp.Any] = {"key": who, "path": request.path, "alias": None, "stream": False}
        status = 500
        counted = False
        try:
            resp = await self._proxy(request, who, record, t0)
            # A stream that did not end well says how (502, 504: the replica; 499, 408: the client).
            status = record.get("status", resp.status)
            body = getattr(resp, "body", None)
            if not resp.prepared and isinstance(body, bytes) and _fits(request, len(body)):
                # The whole answer goes to the transport at once, without waiting on the client: it is counted
                # and logged first, so that the log has its line by the time the client has its answer.
                counted = True
                self._count(record, who, status, t0)
                with contextlib.suppress(ConnectionError):
                    await self._finish(request, resp)
            elif not resp.prepared:  # written here, within the client's time, so that the log says how it went
                try:
                    if not await self._written(request, self._finish(request, resp)):
                        status, record["error"] = 408, "the client read too slowly"
                except ConnectionError:
                    status, record["error"] = 499, "the client left"
            return resp
        except web.HTTPException as exc:
            status = exc.status  # e.g. 413: the middleware answers it
            raise
        except (asyncio.CancelledError, ConnectionResetError):
            if record.get("ended"):
                status = 200  # the client left once it had the stream's end: it has its whole answer
                record.pop("error", None)
            elif self._cutting and request.transport is not None and not request.transport.is_closing():
                status, record["error"] = 503, "the gateway stopped"  # its client is still there: it is told
                await self._tell_stopped(request, record.get("out"))
            else:  # the client left (before its whole body came, or while its answer was made), or was cut off
                status = record.get("status", 499)
                record.setdefault("error", "the client left")
            raise
        finally:
            if task is not None:
                self._requests.discard(task)
            if not counted:
                self._count(record, who, status, t0)

    async def _tell_stopped(self, request: web.Request, out: web.StreamResponse | None) -> None:
        """The gateway stops with ``request`` unanswered: its client gets a 503, or an error event ending the
        stream it has, where that goes at once (nothing here may wait: the request is being cut)."""
        message = "the gateway stopped before this request was answered (gateway.drain_s); send it again"
        with contextlib.suppress(ConnectionError, RuntimeError):
            if out is None:
                resp = _error(503, message, kind="server_error", code="unavailable")
                if isinstance(resp.body, bytes) and _fits(request, len(resp.body)):
                    await self._finish(request, resp)
            else:
                data = _error_event(message, "unavailable")
                if _fits(request, len(data) + 5):
                    await out.write(data)
                    await out.write_eof()  # the stream's end (its last chunk): the client sees a whole answer

    def _count(self, record: dict[str, tp.Any], who: str, status: int, t0: float) -> None:
        """A proxied request has ended: out of the requests in flight, into the counts and the access log."""
        self.in_flight -= 1
        if self.in_flight == 0:
            self.idle.set()
        for private in ("status", "ended", "out"):
            record.pop(private, None)
        alias = record["alias"]
        latency = time.monotonic() - t0
        if alias is not None:
            self.usage.count(alias, who, status, record.get("prompt_tokens", 0),
                             record.get("completion_tokens", 0), record.get("wait_s"), latency,
                             record.get("replica"))
        self._access(record, status, latency)

    async def _proxy(self, request: web.Request, who: str, record: dict[str, tp.Any], t0: float
                     ) -> web.StreamResponse:
        try:
            raw = await asyncio.wait_for(request.read(), self.g.client_timeout_s)
        except asyncio.TimeoutError:
            return _error(408, f"the request body did not arrive within {self.g.client_timeout_s:g} s "
                               "(gateway.client_timeout_s)")
        except web.RequestPayloadError as exc:  # e.g. Content-Encoding: gzip on a body that is not gzip
            cause = exc.__cause__ or exc
            why = getattr(cause, "message", None) or str(cause)
            return _error(400, f"the request body could not be read: {str(why)[:200]}")
        try:
            data = json.loads(raw)
        except RecursionError:
            return _error(400, f"the request body nests more than {self.g.max_json_depth} levels")
        except (ValueError, UnicodeDecodeError) as exc:
            return _error(400, f"the request body is not JSON: {str(exc)[:200]}")
        if not isinstance(data, dict):
            return _error(400, "the request body must be a JSON object")
        if not _depth_ok(data, self.g.max_json_depth):
            return _error(400, f"the request body nests more than {self.g.max_json_depth} levels "
                               "(gateway.max_json_depth)")
        model = data.get("model")
        if not isinstance(model, str) or not model:
            return _error(400, f"the request names no model: set \"model\" to one of {', '.join(self.pool.names())}",
                          code="model_not_found")
        try:
            alias = self.pool.alias(model)
        except Unavailable as exc:
            return _error(exc.status, exc.reason, code="model_not_found")
        record["alias"] = alias.name
        stream = data.get("stream") is True
        record["stream"] = stream
        deaths: list[str] = []  # the replicas that stopped answering while they had it
        waited = 0.0
        while True:
            w0 = time.monotonic()
            try:
                replica = await self.pool.acquire(alias)
            except Unavailable as exc:
                record["error"] = exc.reason
                return _error(exc.status, exc.reason, kind="server_error", code="unavailable",
                              retry_after=exc.retry_after)
            finally:  # a wait that ended in 503 (or the client leaving) is a wait too
                waited += time.monotonic() - w0
                record["wait_s"] = waited
            record["replica"] = replica.name
            try:
                if stream:
                    return await self._stream(request, replica, raw, record)
                return await self._once(replica, request.path, raw, record)
            except NoHandles:
                record["error"] = "the gateway is out of file handles"
                return self._no_handles_answer()
            except Broken as exc:
                self.pool.lost(replica, str(exc))
                deaths.append(replica.name)
                if len(deaths) >= MAX_DEATHS:
                    where = (f"{len(deaths)} replicas" if len(set(deaths)) == len(deaths)
                             else f"replica {replica.name}, {len(deaths)} times,")
                    record["error"] = f"in flight on {where} that stopped answering"
                    return _error(502, f"the request was in flight on {where} that stopped answering ({exc}); it "
                                       "is not sent again", kind="server_error", code="replica_failed")
            finally:
                self.pool.release(replica)

    def _no_handles_answer(self) -> web.Response:
        """503 for a request whose replica could not be reached because the gateway has no file handle left:
        the replica stays in the pool. The owner is told (at most once a minute) what limit to raise."""
        now = time.monotonic()
        if now - self._no_handles_logged >= NO_HANDLES_LOG_S:
            self._no_handles_logged = now
            limits = open_files_limits()
            log.warning("the gateway is out of file handles (open files limit %s): requests get 503 until "
                        "connections close; raise the limit (LimitNOFILE= in its systemd unit, ulimit -n)",
                        limits[0] if limits else "unknown")
        return _error(503, "the gateway is out of file handles (too many connections at once); try again shortly",
                      kind="server_error", code="unavailable", retry_after=1)

    def _headers(self, replica: Replica) -> dict[str, str]:
        # identity: the answer is forwarded as it comes, and read for its tokens.
        headers = {"Content-Type": "application/json", "Accept-Encoding": "identity"}
        if replica.api_key:
            headers["Authorization"] = f"Bearer {replica.api_key}"
        return headers

    def _timeout(self) -> aiohttp.ClientTimeout:
        return aiohttp.ClientTimeout(total=None, sock_connect=CONNECT_TIMEOUT_S, sock_read=self.g.backend_timeout_s)

    def _replica_timeout(self, record: dict[str, tp.Any]) -> web.Response:
        record["error"] = "replica timeout"
        return _error(504, f"the replica sent nothing for {self.g.backend_timeout_s:g} s "
                           "(gateway.backend_timeout_s)", kind="server_error", code="timeout")

    async def _once(self, replica: Replica, path: str, raw: bytes, record: dict[str, tp.Any]) -> web.Response:
        assert self.pool.session is not None
        try:
            async with self.pool.session.post(replica.url + path, data=raw, headers=self._headers(replica),
                                              timeout=self._timeout()) as resp:
                body = await resp.read()
                status, ctype = resp.status, resp.content_type
                encoding = resp.headers.get("Content-Encoding")
        except aiohttp.ConnectionTimeoutError:
            raise Broken(f"{replica.name} took no connection in {CONNECT_TIMEOUT_S:g} s") from None
        except asyncio.TimeoutError:
            return self._replica_timeout(record)
        except (aiohttp.ClientError, OSError) as exc:  # a broken connection, or an answer that is not HTTP
            if _no_handles(exc):
                raise NoHandles from None
            raise Broken(f"connection to {replica.name} broke: {type(exc).__name__}") from None
        if status == 503 and b"oading" in body:
            raise Broken(f"{replica.name} is loading its model again")
        replica.served += 1
        if status == 200:
            found, usage = (False, None) if len(body) <= LARGE_ANSWER else _usage_of(body)
            if not found:  # a large answer with its usage in neither end is parsed in a thread
                parsed = _parsed(body) if len(body) <= LARGE_ANSWER else await asyncio.to_thread(_parsed, body)
                usage = parsed.get("usage") if isinstance(parsed, dict) else None
            record["prompt_tokens"], record["completion_tokens"] = _tokens(usage)
        headers = {"Content-Encoding": encoding} if encoding and encoding != "identity" else None
        return web.Response(body=body, status=status, content_type=ctype or "application/json", headers=headers)

    async def _stream(self, request: web.Request, replica: Replica, raw: bytes, record: dict[str, tp.Any]
                      ) -> web.StreamResponse:
        assert self.pool.session is not None
        out: web.StreamResponse | None = None
        try:
            async with self.pool.session.post(replica.url + request.path, data=raw, headers=self._headers(replica),
                                              timeout=self._timeout()) as resp:
                if resp.status != 200 or "text/event-stream" not in resp.headers.get("Content-Type", ""):
                    body = await resp.read()
                    if resp.status == 503 and b"oading" in body:
                        raise Broken(f"{replica.name} is loading its model again")
                    return web.Response(body=body, status=resp.status,
                                        content_type=resp.content_type or "application/json")
                out = web.StreamResponse(status=200, headers={"Content-Type": "text/event-stream",
                                                              "Cache-Control": "no-cache"})
                try:
                    await out.prepare(request)
                except (ConnectionError, RuntimeError):
                    record["error"], record["status"] = "the client left", 499
                    return out
                record["out"] = out  # what a stop that cuts the stream ends it with an error on
                tail = bytearray()  # the stream's last bytes: its usage event, however the reads cut it
                async for chunk in resp.content.iter_any():
                    tail += chunk
                    if len(tail) > 2 * TAIL_BYTES:
                        del tail[:-TAIL_BYTES]
                    if not record.get("ended") and b"data: [DONE]" in tail[-len(chunk) - 12:]:
                        # The stream's end goes to the client now: a client that closes as soon as it reads it
                        # (the openai client does) can make this write or a later one fail, or cancel the
                        # request; it has its whole answer all the same.
                        record["ended"] = True
                        self._stream_counts(record, tail)
                    if not await self._send(request, out, chunk, record):
                        if not record.get("ended"):
                            return out  # leaving the block closes the replica's connection: its slot is freed
                        record.pop("error", None)
                        record.pop("status", None)
                        break
                replica.served += 1
                if not record.get("ended"):
                    self._stream_counts(record, tail)  # a stream without [DONE]: its last event says
                with contextlib.suppress(ConnectionError, RuntimeError):  # a client that left after the last event
                    if not await self._written(request, out.write_eof()) and not record.get("ended"):
                        record["error"], record["status"] = "the client read too slowly", 408
                return out
        except aiohttp.ConnectionTimeoutError:
            raise Broken(f"{replica.name} took no connection in {CONNECT_TIMEOUT_S:g} s") from None
        except asyncio.TimeoutError:
            if out is None:
                return self._replica_timeout(record)
            record["error"], record["status"] = "replica timeout mid-stream", 504
            await self._end_stream(request, out, f"the replica sent nothing for {self.g.backend_timeout_s:g} s")
            return out
        except (aiohttp.ClientError, OSError) as exc:  # a broken connection, or an answer that is not HTTP
            if out is None and _no_handles(exc):
                raise NoHandles from None
            if out is None:
                raise Broken(f"connection to {replica.name} broke: {type(exc).__name__}") from None
            self.pool.lost(replica, f"connection broke mid-stream: {type(exc).__name__}")
            record["error"], record["status"] = "replica failed mid-stream", 502
            await self._end_stream(request, out, f"the replica serving this request failed ({type(exc).__name__}); "
                                        "the answer is incomplete")
            return out

    @staticmethod
    def _stream_counts(record: dict[str, tp.Any], tail: bytearray) -> None:
        found = _stream_tokens(bytes(tail[-TAIL_BYTES:]))
        if found is not None:
            record["prompt_tokens"], record["completion_tokens"] = found

    async def _send(self, request: web.Request, out: web.StreamResponse, chunk: bytes, record: dict[str, tp.Any]
                    ) -> bool:
        """Write a chunk to the client; False when it left or reads too slowly (the request ends there)."""
        try:
            if await self._written(request, out.write(chunk), len(chunk)):
                return True
            record["error"], record["status"] = "the client read too slowly", 408
        except (ConnectionError, RuntimeError):
            record["error"], record["status"] = "the client left", 499
        return False

    async def _end_stream(self, request: web.Request, out: web.StreamResponse, message: str) -> None:
        with contextlib.suppress(ConnectionError, RuntimeError):
            if await self._written(request, out.write(_error_event(message, "replica_failed"))):
                await self._written(request, out.write_eof())

    @staticmethod
    async def _finish(request: web.Request, resp: web.StreamResponse) -> None:
        await resp.prepare(request)
        await resp.write_eof()

    async def _written(self, request: web.Request, write: tp.Coroutine[tp.Any, tp.Any, tp.Any],
                       size: int | None = None) -> bool:
        """Await ``write`` (a write to ``request``'s client, of ``size`` bytes if known); True once it is done.
        False when the client took none of the bytes waiting for it for ``gateway.client_timeout_s``: its
        connection is aborted then, as aiohttp's write would wait on it for ever, holding the answer and the
        connection. A client that reads, however slowly, is not cut off. What the write raises (ConnectionError:
        the client left) is raised."""
        if size is not None and _fits(request, size):
            await write
            return True
        transport = request.transport
        task = asyncio.ensure_future(write)
        try:
            await asyncio.sleep(0)  # the write hands its bytes to the transport, then waits for them to leave
            waiting = transport.get_write_buffer_size() if transport is not None else 0
            while True:
                done, _ = await asyncio.wait((task,), timeout=self.g.client_timeout_s)
                if done:
                    task.result()
                    return True
                if transport is None or transport.is_closing():
                    break
                now = transport.get_write_buffer_size()
                if now == waiting:
                    break  # not a byte taken
                waiting = now
        except BaseException:
            task.cancel()
            raise
        task.cancel()
        task.add_done_callback(lambda t: t.cancelled() or t.exception())
        if transport is not None:
            _abort(transport)
        return False

    # ------------------------------------------------------------------------------------------ log

    def _access(self, record: dict[str, tp.Any], status: int, latency: float) -> None:
        line = {"time": round(time.time(), 3), "event": "request", **record, "status": status,
                "ms": round(latency * 1000, 2)}
        if "wait_s" in line:
            line["wait_ms"] = round(line.pop("wait_s") * 1000, 2)
        path = line.get("path")
        if isinstance(path, str) and len(path) > LOGGED_PATH_MOST:
            line["path"] = path[:LOGGED_PATH_MOST] + "\u2026"
        text = json.dumps(line, default=str) + "\n"
        if self.access is not None and self._access_path is not None:
            self._follow_access_log()
        target = self.access or sys.stderr
        try:
            target.write(text)
            target.flush()
        except (OSError, ValueError):
            pass

    def _open_access_log(self, path: str) -> None:
        access = open(path, "a", buffering=1, encoding="utf-8")  # noqa: SIM115 - open for the run
        st = os.fstat(access.fileno())
        old, self.access, self._access_file = self.access, access, (st.st_dev, st.st_ino)
        if old is not None:
            with contextlib.suppress(OSError):
                old.close()

    def _follow_access_log(self) -> None:
        """The access log is written to the file at its path: once that is another file (logrotate moved it
        and made a new one) or none (moved or removed), it is opened (made) again."""
        path = self._access_path
        assert path is not None
        try:
            st = os.stat(path)
            if (st.st_dev, st.st_ino) == self._access_file:
                return
        except OSError:
            pass
        try:
            self._open_access_log(path)
            self._access_problem = ""
        except OSError as exc:  # the lines go on to the file open until it can be
            if str(exc) != self._access_problem:
                self._access_problem = str(exc)
                log.warning("cannot open the access log %s again: %s", path, exc.strerror or exc)

    # ------------------------------------------------------------------------------------------ life

    async def start(self, host: str, port: int) -> str:
        """Serve on ``host:port`` (0: a free port); returns the URL. Re-attaches to recorded deployments.
        :class:`UsageError` when the access log cannot be opened or the port taken; nothing is left open then."""
        if self.g.access_log:
            from pathlib import Path

            path = Path(self.g.access_log).expanduser()
            try:
                self._open_access_log(str(path))
                self._access_path = str(path)
            except OSError as exc:
                raise UsageError(f"cannot open the access log {path} (gateway.access_log): {exc.strerror or exc}",
                                 fix="make its folder, or set gateway.access_log to a file that can be written "
                                     "(empty: stderr)") from None
        try:
            return await self._start(host, port)
        except BaseException:
            if self.runner is not None:
                await self.runner.cleanup()
            if self.pool.session is not None:
                await self.pool.session.close()
            if self.access is not None:
                self.access.close()
            raise

    async def _start(self, host: str, port: int) -> str:
        connector = aiohttp.TCPConnector(limit=0, keepalive_timeout=30)
        # identity: the answers are forwarded as they come (auto_decompress off), and read for their tokens.
        self.pool.session = aiohttp.ClientSession(connector=connector, auto_decompress=False,
                                                  headers={"Accept-Encoding": "identity"})
        self.pool.add_urls()
        await self.pool.size_urls()
        attached = await asyncio.to_thread(self.pool.attach)
        # The drain is the gateway's own (stop): aiohttp's shutdown only closes what is left.
        self.runner = web.AppRunner(self.app(), handler_cancellation=True, access_log=None, shutdown_timeout=CUT_S)
        await self.runner.setup()
        assert self.runner.server is not None
        self.heads = HeadTimer(self.runner.server, self.g.client_timeout_s)
        site = web.TCPSite(self.runner, host, port, reuse_address=True)
        shown = f"[{host}]" if ":" in host else host
        try:
            await site.start()
        except OSError as exc:
            raise UsageError(f"cannot listen on {shown}:{port}: {exc.strerror or exc}",
                             fix="pick another port with --listen HOST:PORT (or stop what uses it)") from None
        sockets = getattr(site._server, "sockets", None) or []  # noqa: SLF001 - the bound port (0: chosen)
        bound = sockets[0].getsockname()[1] if sockets else port
        self.url = f"http://{shown}:{bound}"
        self.admin_key = self.folder.announce(self.url)
        self._background = [asyncio.get_running_loop().create_task(self.pool.watch()),
                            asyncio.get_running_loop().create_task(self._save_usage())]
        self.pool._record()  # noqa: SLF001 - the record now holds what was re-attached, nothing else
        log.info("%s", _line("gateway_started", url=self.url, aliases=self.pool.names(), reattached=attached))
        return self.url

    async def _save_usage(self) -> None:
        while True:
            await asyncio.sleep(SAVE_EVERY_S)
            with contextlib.suppress(OSError):
                self.folder.write_usage(self.usage.to_json())

    async def stop(self) -> list[str]:
        """Stop taking requests, let those in flight finish (at most ``gateway.drain_s``; those still in flight
        then are cut, their clients told, and logged 503), then stop or leave the deployments as
        ``gateway.on_exit`` says. Returns the deployments stopped."""
        self.pool.closing = True
        if self.in_flight:
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), self.g.drain_s)
        if self.in_flight:
            self._cutting = True
            for task in list(self._requests):
                task.cancel()
            with contextlib.suppress(asyncio.TimeoutError):
                await asyncio.wait_for(self.idle.wait(), CUT_S)
        for task in self._background:
            task.cancel()
        stopped = await self.pool.close(stop=self.g.on_exit == "stop")
        if self.runner is not None:
            await self.runner.cleanup()
        if self.pool.session is not None:
            await self.pool.session.close()
        with contextlib.suppress(OSError):
            self.folder.write_usage(self.usage.to_json())
        if self.g.on_exit == "stop":
            self.pool._record()  # noqa: SLF001
        self.folder.retire()
        log.info("%s", _line("gateway_stopped", stopped=stopped, left=self.g.on_exit == "leave",
                             cancel_failed=self.pool.not_stopped))
        for dep_id in self.pool.not_stopped:
            log.warning("could not cancel deployment %s: it may still hold nodes; start the gateway again (it "
                        "re-attaches and cancels it when idle) or run `speedslurm down %s`", dep_id, dep_id)
        self._access_path = None  # closed for good: not opened again
        if self.access is not None:
            self.access.close()
        return stopped


def parse_listen(text: str) -> tuple[str, int]:
    """``HOST:PORT`` (``[::1]:PORT`` for IPv6) -> (host, port); :class:`UsageError` otherwise."""
    host, sep, port = text.rpartition(":")
    host = host.strip("[]")
    if not sep or not host or not (port.isascii() and port.isdigit()) or not 0 <= int(port) <= 65535:
        raise UsageError(f"--listen {text!r} is not HOST:PORT with a port from 0 to 65535",
                         fix="e.g. --listen 127.0.0.1:8800, or --listen 0.0.0.0:8800 for the whole network")
    return host, int(port)


async def serve(settings: Settings, specs: tp.Sequence[AliasSpec], listen: str,
                on_ready: tp.Callable[[Gateway], None] | None = None,
                stop: asyncio.Event | None = None) -> list[str]:
    """Run a gateway until SIGTERM, SIGINT or SIGHUP (or ``stop`` is set); returns the deployments it stopped."""
    host, port = parse_listen(listen)
    folder = Folder(settings.gateway.root).open()
    lock = folder.lock()
    gateway = Gateway(settings, specs, folder)
    stop = stop or asyncio.Event()
    loop = asyncio.get_running_loop()
    handled = []
    for sig in (signal.SIGTERM, signal.SIGINT, signal.SIGHUP):
        if sig == signal.SIGHUP and signal.getsignal(sig) == signal.SIG_IGN:
            continue  # started with nohup: logging out does not stop it
        with contextlib.suppress(NotImplementedError, RuntimeError, ValueError):  # not in the main thread
            loop.add_signal_handler(sig, stop.set)
            handled.append(sig)
    try:
        raise_open_files_limit()
        await asyncio.to_thread(gateway.pool.check_models)
        await gateway.start(host, port)
        if on_ready is not None:
            on_ready(gateway)
        await stop.wait()
        return await gateway.stop()
    finally:
        for sig in handled:
            loop.remove_signal_handler(sig)
        import os

        os.close(lock)
