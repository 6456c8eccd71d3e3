"""Loopback servers for the fetch tests: an HTTP file server and a fault-injecting proxy.

Both listen on 127.0.0.1 (port chosen by the OS), record every request's path and Range
header, and can be told to answer the next requests for a path with an error status or by
dropping the connection half-way through the body (`DROP`). `FileServer` serves in-memory
files and honours `Range: bytes=a-` / `bytes=a-b`; `FaultProxy` forwards to an upstream
HTTP server (moto's S3) so storage faults can be put in front of a real S3 API.
Use them as context managers: the server stops on exit.
"""

from __future__ import annotations

import http.client
import re
import threading
import urllib.parse
from abc import ABC, abstractmethod
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from typing import Any

DROP = "drop"  # fault: send full headers, half the body, then close the connection
_HOP_HEADERS = {"connection", "transfer-encoding", "keep-alive", "content-length"}


class _Handler(BaseHTTPRequestHandler):
    server: _Server

    def log_message(self, format: str, *args: Any) -> None:
        """Silence the per-request log lines."""

    def key(self) -> str:
        """The request path without the leading slash and query, percent-decoded."""
        return urllib.parse.unquote(self.path.split("?", 1)[0].lstrip("/"))

    def send_body(self, status: int, headers: dict[str, str], body: bytes, fault: object) -> None:
        """Send a response; with DROP only half the body, then close the connection."""
        self.send_response(status)
        for key, value in headers.items():
            self.send_header(key, value)
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        if self.command == "HEAD":
            return
        if fault == DROP:
            self.wfile.write(body[: len(body) // 2])
            self.wfile.flush()
            self.close_connection = True
            return
        self.wfile.write(body)

    def _handle(self) -> None:
        fault = self.server.owner.record(self.key(), self.headers.get("Range"))
        if isinstance(fault, int):
            self.send_error(fault)
            return
        self.server.owner.respond(self, fault)

    do_GET = do_HEAD = do_PUT = do_POST = do_DELETE = _handle


class _Server(ThreadingHTTPServer):
    daemon_threads = True
    owner: _LoopbackServer


class _LoopbackServer(ABC):
    """Request log, scripted faults and lifecycle shared by the two servers."""

    def __init__(self) -> None:
        self.requests: list[tuple[str, str | None]] = []  # (path, Range header or None)
        self.faults: dict[str, list[int | str]] = {}  # path -> actions for its next requests
        self._lock = threading.Lock()
        self._httpd = _Server(("127.0.0.1", 0), _Handler)
        self._httpd.owner = self
        self._thread = threading.Thread(
            target=self._httpd.serve_forever, kwargs={"poll_interval": 0.02}, daemon=True
        )

    def record(self, path: str, rng: str | None) -> int | str | None:
        """Log one request and pop the next scripted fault for its path (None: serve)."""
        with self._lock:
            self.requests.append((path, rng))
            queue = self.faults.get(path)
            return queue.pop(0) if queue else None

    @abstractmethod
    def respond(self, handler: _Handler, fault: object) -> None:
        """Answer one request that drew no error status (`fault` is None or DROP)."""

    def url(self, path: str = "") -> str:
        host, port = self._httpd.server_address[:2]
        return f"http://{host!s}:{port}/{path}"

    def hits(self, path: str) -> list[str | None]:
        """Range headers of the requests made for `path`, in order."""
        with self._lock:
            return [rng for p, rng in self.requests if p == path]

    def __enter__(self) -> _LoopbackServer:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self._httpd.shutdown()
        self._httpd.server_close()
        self._thread.join(timeout=5)


class FileServer(_LoopbackServer):
    """Serves `files` ({path: bytes}) over GET with Range support; 404 for anything else."""

    def __init__(self, files: dict[str, bytes]) -> None:
        super().__init__()
        self.files = dict(files)

    def __enter__(self) -> FileServer:
        super().__enter__()
        return self

    def respond(self, handler: _Handler, fault: object) -> None:
        body = self.files.get(handler.key())
        if body is None:
            handler.send_error(404)
            return
        match = re.match(r"^bytes=(\d+)-(\d*)$", handler.headers.get("Range") or "")
        if not match:
            handler.send_body(200, {}, body, fault)
            return
        start = int(match.group(1))
        if start >= len(body):
            handler.send_body(416, {"Content-Range": f"bytes */{len(body)}"}, b"", None)
            return
        end = min(len(body) - 1, int(match.group(2))) if match.group(2) else len(body) - 1
        content_range = {"Content-Range": f"bytes {start}-{end}/{len(body)}"}
        handler.send_body(206, content_range, body[start:end + 1], fault)


class FaultProxy(_LoopbackServer):
    """Forwards every request to `upstream` (http://host:port), applying scripted faults."""

    def __init__(self, upstream: str) -> None:
        super().__init__()
        parts = urllib.parse.urlsplit(upstream)
        self._upstream = (parts.hostname or "127.0.0.1", parts.port or 80)

    def __enter__(self) -> FaultProxy:
        super().__enter__()
        return self

    def respond(self, handler: _Handler, fault: object) -> None:
        length = int(handler.headers.get("Content-Length") or 0)
        body = handler.rfile.read(length) if length else None
        conn = http.client.HTTPConnection(*self._upstream, timeout=10)
        try:
            headers = {k: v for k, v in handler.headers.items() if k.lower() not in _HOP_HEADERS}
            conn.request(handler.command, handler.path, body=body, headers=headers)
            response = conn.getresponse()
            data = response.read()
            back = {k: v for k, v in response.getheaders() if k.lower() not in _HOP_HEADERS}
        finally:
            conn.close()
        handler.send_body(response.status, back, data, fault)
