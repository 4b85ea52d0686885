"""A small HTTP server on 127.0.0.1 for tests that stand in for llama-server's pages (/metrics, /slots), and the
plain HTTP client calls (:func:`post`, :func:`get`) that tests send to the servers they start."""

from __future__ import annotations

import contextlib
import http.server
import threading
import typing as tp
import urllib.error
import urllib.request


class Handler(http.server.BaseHTTPRequestHandler):
    """A request handler that answers with :meth:`reply` and logs nothing."""

    def reply(self, code: int, body: bytes = b"") -> None:
        self.send_response(code)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: tp.Any) -> None:
        pass


@contextlib.contextmanager
def serving(handler: type[http.server.BaseHTTPRequestHandler]) -> tp.Iterator[str]:
    """Serve ``handler`` on a free port of 127.0.0.1 in a thread; yields the base URL."""
    server = http.server.ThreadingHTTPServer(("127.0.0.1", 0), handler)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}"
    finally:
        server.shutdown()
        server.server_close()


def post(url: str, body: bytes | str, key: str | None, headers: dict[str, str] | None = None
         ) -> tuple[int, bytes, dict[str, str]]:
    """POST ``body`` (JSON unless ``headers`` say otherwise) with ``key`` as its Bearer key: status, body,
    headers, whatever the status."""
    data = body.encode() if isinstance(body, str) else body
    h = {"Content-Type": "application/json", **(headers or {})}
    if key:
        h["Authorization"] = f"Bearer {key}"
    req = urllib.request.Request(url, data=data, headers=h, method="POST")
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the test's own server
            return resp.status, resp.read(), dict(resp.headers)
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read(), dict(exc.headers)


def get(url: str, key: str | None) -> tuple[int, bytes]:
    """GET ``url`` with ``key`` as its Bearer key: status and body, whatever the status."""
    req = urllib.request.Request(url, headers={"Authorization": f"Bearer {key}"} if key else {})
    try:
        with urllib.request.urlopen(req, timeout=30) as resp:  # noqa: S310 - the test's own server
            return resp.status, resp.read()
    except urllib.error.HTTPError as exc:
        return exc.code, exc.read()
