"""``speedslurm run`` with a library HTTP client in place of the built-in one, for P3 in bench_client.py.

    python bench/lib_transports.py httpx run --base-url URL --prompts P.jsonl ...
    python bench/lib_transports.py aiohttp run ...

The same runner, the same replica workers (one per slot, so the same requests in flight) and the same
retry/timeout handling; only ``transport.CLIENTS["raw"]`` is replaced by one of the two classes below, which
keep the transport's contract: a ``Reply`` for every HTTP answer, ``TransportError("timeout" | "connect")``
when there is none. aiohttp is not a dependency of speedslurm: install it to measure it.
"""

from __future__ import annotations

import asyncio
import json
import sys
import typing as tp

from speedslurm.batch import transport
from speedslurm.batch.transport import Reply, TransportError, _retry_after
from speedslurm.rundir.records import Endpoint

_dumps = json.JSONEncoder(ensure_ascii=False, separators=(",", ":")).encode


def _headers(endpoint: Endpoint) -> dict[str, str]:
    auth = {"Authorization": f"Bearer {endpoint.api_key}"} if endpoint.api_key else {}
    return {**auth, "Content-Type": "application/json", "Accept": "application/json"}


class HttpxTransport:
    """httpx (``httpx2``, the line openai >= 3 uses): one ``AsyncClient`` per replica, keep-alive pool."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        import httpx2

        self._httpx = httpx2
        self.timeout = timeout
        self.client = httpx2.AsyncClient(
            base_url=endpoint.url.rstrip("/"), headers=_headers(endpoint), timeout=timeout,
            limits=httpx2.Limits(max_connections=None, max_keepalive_connections=None))

    async def send(self, url: str, body: dict[str, tp.Any]) -> Reply:
        httpx = self._httpx
        try:
            r = await self.client.post(url, content=_dumps(body).encode())
        except httpx.TimeoutException:
            raise TransportError("timeout", f"no answer within {self.timeout:g} s") from None
        except httpx.TransportError as exc:
            raise TransportError("connect", str(exc) or type(exc).__name__) from None
        return Reply(r.status_code, r.content, r.headers.get("x-request-id"),
                     _retry_after(r.headers.get("retry-after")))

    async def aclose(self) -> None:
        await self.client.aclose()


class AiohttpTransport:
    """aiohttp: one ``ClientSession`` per replica (made on first use, inside the event loop), keep-alive pool."""

    def __init__(self, endpoint: Endpoint, timeout: float) -> None:
        import aiohttp

        self._aiohttp = aiohttp
        self.base = endpoint.url.rstrip("/")
        self.headers = _headers(endpoint)
        self.timeout = timeout
        self.session: tp.Any = None

    async def send(self, url: str, body: dict[str, tp.Any]) -> Reply:
        aiohttp = self._aiohttp
        if self.session is None:
            self.session = aiohttp.ClientSession(headers=self.headers, timeout=aiohttp.ClientTimeout(total=self.timeout),
                                                 connector=aiohttp.TCPConnector(limit=0))
        try:
            async with self.session.post(self.base + url, data=_dumps(body).encode()) as r:
                data = await r.read()
        except asyncio.TimeoutError:
            raise TransportError("timeout", f"no answer within {self.timeout:g} s") from None
        except (aiohttp.ClientError, OSError) as exc:
            raise TransportError("connect", str(exc) or type(exc).__name__) from None
        return Reply(r.status, data, r.headers.get("x-request-id"), _retry_after(r.headers.get("retry-after")))

    async def aclose(self) -> None:
        if self.session is not None:
            await self.session.close()


LIBRARIES: dict[str, tp.Callable[[Endpoint, float], transport.Transport]] = {
    "httpx": HttpxTransport, "aiohttp": AiohttpTransport}


def main() -> None:
    name, args = sys.argv[1], sys.argv[2:]
    transport.CLIENTS["raw"] = LIBRARIES[name]
    from speedslurm.cli import main as cli

    cli(args)


if __name__ == "__main__":
    main()
