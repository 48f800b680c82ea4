"""A tiny HTTP file server on 127.0.0.1 for download tests: the real download code of pytorchcv,
huggingface_hub and torchvision runs against it, never against the internet.

Each route serves bytes with optional extra headers; a route can declare a longer Content-Length
than it sends and then close the connection, which is what a download cut off mid-way looks like.
Every request is recorded, so a test can tell that a cached file was read without one.
"""

from __future__ import annotations

import threading
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import urlsplit


@dataclass
class Route:
    """What one path answers.

    Args:
        body: the bytes a GET sends.
        status: the HTTP status.
        headers: extra response headers (a HEAD gets them too).
        declared: the Content-Length announced; more than len(body) cuts the download off.
    """

    body: bytes = b""
    status: int = 200
    headers: dict[str, str] = field(default_factory=dict)
    declared: int | None = None


class LocalServer:
    """Routes by path; anything else is a 404. `requests` lists (method, path) as received."""

    def __init__(self) -> None:
        self.routes: dict[str, Route] = {}
        self.requests: list[tuple[str, str]] = []
        self.not_found_headers: dict[str, str] = {}
        server = self

        class Handler(BaseHTTPRequestHandler):
            def log_message(self, *args: object) -> None:  # keep pytest's output clean
                pass

            def _answer(self, send_body: bool) -> None:
                path = urlsplit(self.path).path
                server.requests.append((self.command, path))
                route = server.routes.get(path) or Route(
                    b"not found", 404, dict(server.not_found_headers)
                )
                self.send_response(route.status)
                for key, value in route.headers.items():
                    self.send_header(key, value)
                self.send_header("Content-Length", str(route.declared or len(route.body)))
                self.send_header("Connection", "close")
                self.end_headers()
                if send_body:
                    self.wfile.write(route.body)
                    self.wfile.flush()
                self.close_connection = True

            def do_GET(self) -> None:
                self._answer(send_body=True)

            def do_HEAD(self) -> None:
                self._answer(send_body=False)

        self.httpd = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.httpd.server_address[1]}"

    def count(self, method: str = "GET") -> int:
        return sum(1 for m, _ in self.requests if m == method)


@contextmanager
def local_server() -> Iterator[LocalServer]:
    """A LocalServer running in a thread for the duration of the block."""
    server = LocalServer()
    thread = threading.Thread(target=server.httpd.serve_forever, daemon=True)
    thread.start()
    try:
        yield server
    finally:
        server.httpd.shutdown()
        server.httpd.server_close()
        thread.join()


def closed_port_url() -> str:
    """An http URL on 127.0.0.1 where nothing listens: what offline looks like to a client."""
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port = sock.getsockname()[1]
    return f"http://127.0.0.1:{port}"
