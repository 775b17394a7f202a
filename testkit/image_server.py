"""``ImageServer``: a throwaway HTTP server on 127.0.0.1 serving registered routes, plus routes
for hostile upstream behaviour, and recording every request it receives (path and headers)."""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass, field
from email.message import Message
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Route:
    body: bytes = b""
    status: int = 200
    content_type: str = "image/jpeg"
    headers: dict = field(default_factory=dict)


@dataclass(frozen=True)
class Received:
    """One request as it arrived: its path (with the query) and its headers (case-insensitive
    ``get``; ``get_all`` for repeated ones)."""

    path: str
    headers: Message


class _Handler(BaseHTTPRequestHandler):
    """Registered routes, and these special ones (query parameters in brackets):

    - ``/redirect?to=URL[&status=302]``: a redirect to ``to``;
    - ``/loop``: a redirect to itself;
    - ``/slow?delay=5``: the ``/img/jpeg`` route's body after ``delay`` seconds;
    - ``/drip?every=0.3&max=30``: headers at once, then one byte every ``every`` seconds;
    - ``/endless?mb=64``: a body without Content-Length, closed after ``mb`` megabytes;
    - ``/big-header``: declares a huge Content-Length and sends nothing.
    """

    protocol_version = "HTTP/1.1"
    server: _Server

    def log_message(self, *args):  # keep test output clean
        pass

    def do_GET(self):
        self.server.received.append(Received(self.path, self.headers))
        parts = urlsplit(self.path)
        query = {key: values[0] for key, values in parse_qs(parts.query).items()}
        special = getattr(self, "_route_" + parts.path.strip("/").replace("-", "_"), None)
        if special is not None:
            return special(query)
        route = self.server.routes.get(parts.path)
        if route is None:
            return self._send(404, b"not found", "text/plain")
        return self._send(route.status, route.body, route.content_type, route.headers)

    def _send(self, status, body, content_type, headers=None):
        self.send_response(status)
        self.send_header("Content-Type", content_type)
        self.send_header("Content-Length", str(len(body)))
        for name, value in (headers or {}).items():
            self.send_header(name, value)
        self.end_headers()
        self.wfile.write(body)

    def _route_redirect(self, query):
        self.send_response(int(query.get("status", 302)))
        self.send_header("Location", query["to"])
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route_loop(self, query):
        self.send_response(302)
        self.send_header("Location", "/loop")
        self.send_header("Content-Length", "0")
        self.end_headers()

    def _route_slow(self, query):
        """Answer only after ``delay`` seconds."""
        time.sleep(float(query.get("delay", 5)))
        self._send(200, self.server.routes["/img/jpeg"].body, "image/jpeg")

    def _route_drip(self, query):
        """Headers at once, then one byte every ``every`` seconds (each read well within any timeout)."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", "100000")
        self.end_headers()
        deadline = time.monotonic() + float(query.get("max", 30))
        try:
            while time.monotonic() < deadline:
                self.wfile.write(b"\xff")
                self.wfile.flush()
                time.sleep(float(query.get("every", 0.3)))
        except OSError:
            pass

    def _route_endless(self, query):
        """A body with no Content-Length, closed only after ``mb`` megabytes."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Connection", "close")
        self.end_headers()
        chunk = b"\xff" * 65536
        try:
            for _ in range(int(float(query.get("mb", 64)) * 16)):
                self.wfile.write(chunk)
        except OSError:
            pass
        self.close_connection = True

    def _route_big_header(self, query):
        """Declares a huge Content-Length but sends nothing."""
        self.send_response(200)
        self.send_header("Content-Type", "image/jpeg")
        self.send_header("Content-Length", str(10 ** 10))
        self.end_headers()
        self.close_connection = True


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    allow_reuse_address = True

    def handle_error(self, request, client_address):
        pass  # clients (the service under test) hang up on purpose: caps, timeouts


class ImageServer:
    """A throwaway HTTP server on 127.0.0.1 that serves registered routes and records requests."""

    def __init__(self, port: int = 0):
        self._server = _Server(("127.0.0.1", port), _Handler)
        self._server.routes = {}
        self._server.received = []
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()

    @property
    def port(self) -> int:
        return self._server.server_address[1]

    @property
    def received(self) -> list[Received]:
        """Every request received so far, in order of arrival."""
        return self._server.received

    @property
    def hits(self) -> list[str]:
        """The paths (with queries) of every request received so far, in order of arrival."""
        return [request.path for request in self._server.received]

    def requests_for(self, path: str) -> list[Received]:
        """The requests received for ``path`` (with its query, if any)."""
        return [request for request in self._server.received if request.path == path]

    def add(self, path: str, body: bytes, content_type: str = "image/jpeg", status: int = 200,
            headers: dict | None = None) -> str:
        """Serve ``body`` at ``path``; its URL."""
        self._server.routes[path] = Route(body, status, content_type, headers or {})
        return self.url(path)

    def url(self, path: str) -> str:
        return f"http://127.0.0.1:{self.port}{path}"

    def close(self) -> None:
        self._server.shutdown()
        self._server.server_close()
