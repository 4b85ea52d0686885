"""A small HTTP server on 127.0.0.1 for tests that stand in for llama-server's pages (/metrics, /slots)."""

from __future__ import annotations

import contextlib
import http.server
import threading
import typing as tp


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
