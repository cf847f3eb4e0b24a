"""The upstream of ``bench/limits.py``: an HTTP server in the benchmark's process that records every call.

``GET /call?n=N&system=S`` answers 200 after ``latency`` seconds (``GET /warm`` answers at once, unrecorded: each
worker process calls it once when it starts). Each request is recorded with
its start (when its connection was accepted, ``time.time()``: the clock the workers' records use
too; stamped by the server's loop before the request's thread is started, so that starting a
thread on a busy machine does not move it), its end
(just before the answer is written), its task number, its system, and how many calls were in
progress when it started, itself included.
"""

from __future__ import annotations

import threading
import time
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from urllib.parse import parse_qs, urlsplit


@dataclass
class Call:
    start: float
    end: float
    n: int
    system: str
    concurrent: int


class Upstream:
    """The stub's records and its server thread."""

    def __init__(self, *, latency: float = 0.05) -> None:
        self.latency = latency
        self.lock = threading.Lock()
        self.calls: list[Call] = []
        self.in_progress = 0
        #: When each connection was accepted, by its socket's id (read by its handler).
        self.accepted: dict[int, float] = {}
        upstream = self

        class Handler(BaseHTTPRequestHandler):
            protocol_version = "HTTP/1.0"

            def do_GET(self) -> None:  # noqa: N802 - the http.server API
                if urlsplit(self.path).path == "/warm":  # a worker process warming its client: not a call
                    upstream.accepted.pop(id(self.request), None)
                    self.send_response(204)
                    self.end_headers()
                    return
                query = parse_qs(urlsplit(self.path).query)
                try:
                    n = int(query.get("n", ["-1"])[0])
                except ValueError:
                    n = -1
                call = upstream.begin(n, query.get("system", ["?"])[0],
                                      upstream.accepted.pop(id(self.request), None))
                time.sleep(upstream.latency)
                upstream.end(call)
                body = b'{"ok": true}'
                try:
                    self.send_response(200)
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

            def process_request(self, request, client_address):  # type: ignore[no-untyped-def]
                upstream.accepted[id(request)] = time.time()
                super().process_request(request, client_address)

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="limits-upstream", daemon=True)

    def begin(self, n: int, system: str, accepted: float | None = None) -> Call:
        with self.lock:
            self.in_progress += 1
            call = Call(accepted if accepted is not None else time.time(), 0.0, n, system, self.in_progress)
            self.calls.append(call)
            return call

    def end(self, call: Call) -> None:
        with self.lock:
            self.in_progress -= 1
            call.end = time.time()

    def snapshot(self) -> list[Call]:
        with self.lock:
            return list(self.calls)

    def start(self) -> Upstream:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()
