"""The upstream of ``bench/outage.py``: an HTTP server in the benchmark's process that can be taken down.

``GET /call?n=N`` answers 200 after ``latency`` seconds while the upstream is up, and 503 at
once (no ``Retry-After``, so neither system is told how long to wait) while it is down. Every
request is recorded with its time (``time.time()``, the clock the workers' records use too),
its task number and the status it got.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass(frozen=True)
class Call:
    at: float
    n: int
    status: int


class Upstream:
    """The stub's state and its server thread."""

    def __init__(self, *, latency: float = 0.01) -> None:
        self.latency = latency
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.down = False
        self.went_down: float | None = None
        self.came_back: float | None = None
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                try:
                    n = int(parse_qs(urlsplit(self.path).query).get("n", ["-1"])[0])
                except ValueError:
                    n = -1
                status = upstream.record(n)
                if status == 200:
                    time.sleep(upstream.latency)
                body = b'{"ok": true}' if status == 200 else b'{"error": "unavailable"}'
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(body)))
                    self.end_headers()
                    self.wfile.write(body)
                except OSError:
                    pass

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="outage-upstream", daemon=True)

    def record(self, n: int) -> int:
        """Count one request; the status it gets (the state is read under the same lock)."""
        with self.lock:
            status = 503 if self.down else 200
            self.calls.append(Call(time.time(), n, status))
            return status

    def set_down(self, down: bool) -> float:
        """Take the upstream down (or bring it back); return the time it happened."""
        with self.lock:
            self.down = down
            now = time.time()
            if down:
                self.went_down = now
            else:
                self.came_back = now
            return now

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def start(self) -> Upstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
