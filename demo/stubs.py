"""Tiny real servers on 127.0.0.1, each in a thread, that fail (or count) the way real ones do.

- ``SMTPStub``: speaks enough SMTP for ``smtplib``; answers ``421 try again later`` to the
  first ``refusals`` attempts to mail a recipient (and hangs up), then accepts the message.
- ``RateLimitedAPI``: an HTTP server that answers ``429`` with ``Retry-After`` to the first
  request for a path, then ``200`` with JSON.

- ``PaymentGateway``: dedupes charges by ``Idempotency-Key`` and answers the first one too late.
- ``QuotesAPI``: answers every request after ``hold`` seconds and records when each call started and
  ended, so the report can say how many were in progress at once and started in any second.

Each keeps a log of what it saw, so the report can show the servers' side too.
"""

from __future__ import annotations

import json
import socketserver
import threading
import time
from collections import Counter
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer

__all__ = ["PaymentGateway", "QuotesAPI", "RateLimitedAPI", "SMTPStub"]


class _SMTPHandler(socketserver.StreamRequestHandler):
    timeout = 10

    def reply(self, line: str) -> None:
        self.wfile.write(line.encode() + b"\r\n")
        self.wfile.flush()

    def handle(self) -> None:
        stub: SMTPStub = self.server.stub  # type: ignore[attr-defined]
        self.reply("220 smtp.stub ESMTP safetynet demo")
        recipients: list[str] = []
        while True:
            raw = self.rfile.readline()
            if not raw:
                return
            command = raw.decode("ascii", "replace").strip()
            verb = command.split(" ", 1)[0].split(":", 1)[0].upper()
            if verb == "EHLO":
                self.reply("250-smtp.stub")
                self.reply("250 8BITMIME")
            elif verb == "HELO":
                self.reply("250 smtp.stub")
            elif verb == "MAIL":
                recipients = []
                self.reply("250 2.1.0 OK")
            elif verb == "RCPT":
                address = command.partition(":")[2].strip().split(" ")[0].strip("<>")
                if stub.admit(address):
                    recipients.append(address)
                    self.reply("250 2.1.5 OK")
                else:
                    self.reply("421 4.3.2 try again later")
                    return  # 421 means the server closes the connection
            elif verb == "DATA":
                self.reply("354 end data with <CR><LF>.<CR><LF>")
                lines = []
                while (line := self.rfile.readline()) not in (b".\r\n", b".\n", b""):
                    lines.append(line)
                stub.deliver(recipients, b"".join(lines))
                self.reply("250 2.0.0 OK queued")
            elif verb in ("RSET", "NOOP"):
                self.reply("250 OK")
            elif verb == "QUIT":
                self.reply("221 2.0.0 bye")
                return
            else:
                self.reply("502 5.5.2 command not implemented")


class _Server(socketserver.ThreadingTCPServer):
    daemon_threads = True
    allow_reuse_address = True


class SMTPStub:
    """A local SMTP server that refuses each recipient ``refusals`` times with 421, then accepts."""

    def __init__(self, refusals: int = 2) -> None:
        self.refusals = refusals
        self.events: list[tuple[float, str, str]] = []  # (time, recipient, "421" | "250 delivered")
        self._attempts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = _Server(("127.0.0.1", 0), _SMTPHandler)
        self._server.stub = self  # type: ignore[attr-defined]
        self.port: int = self._server.server_address[1]

    def admit(self, recipient: str) -> bool:
        with self._lock:
            self._attempts[recipient] += 1
            admitted = self._attempts[recipient] > self.refusals
            if not admitted:
                self.events.append((time.time(), recipient, "421 try again later"))
            return admitted

    def deliver(self, recipients: list[str], data: bytes) -> None:
        with self._lock:
            for recipient in recipients:
                self.events.append((time.time(), recipient, f"250 delivered ({len(data)} bytes)"))

    def start(self) -> SMTPStub:
        threading.Thread(target=self._server.serve_forever, name="smtp-stub", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _APIHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet: the report shows the requests
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        api: RateLimitedAPI = self.server.api  # type: ignore[attr-defined]
        number = api.count(self.path)
        if number == 1:
            status, headers = 429, {"Retry-After": str(api.retry_after)}
            body = {"error": "rate limited"}
        elif self.path.startswith("/rates/"):
            currency = self.path.rstrip("/").rsplit("/", 1)[-1]
            status, headers = 200, {}
            body = {"currency": currency, "rate": 1.0842, "request": number}
        else:
            status, headers = 200, {}
            body = {"exported": self.path.rstrip("/").rsplit("/", 1)[-1], "request": number}
        api.events.append((time.time(), f"GET {self.path}", f"{status}" + (
            f" Retry-After: {headers['Retry-After']}" if "Retry-After" in headers else "")))
        data = json.dumps(body).encode()
        self.send_response(status)
        for name, value in headers.items():
            self.send_header(name, value)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class RateLimitedAPI:
    """A local HTTP API that answers 429 with ``Retry-After`` to the first request for a path
    (``/rates/<currency>``: an exchange rate; any other path: an export)."""

    def __init__(self, retry_after: int = 2) -> None:
        self.retry_after = retry_after
        self.events: list[tuple[float, str, str]] = []
        self._counts: Counter[str] = Counter()
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _APIHandler)
        self._server.daemon_threads = True
        self._server.api = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def count(self, path: str) -> int:
        with self._lock:
            self._counts[path] += 1
            return self._counts[path]

    def start(self) -> RateLimitedAPI:
        threading.Thread(target=self._server.serve_forever, name="api-stub", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _GatewayHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet: the report shows the requests
        pass

    def do_POST(self) -> None:  # noqa: N802 - http.server's naming
        gateway: PaymentGateway = self.server.gateway  # type: ignore[attr-defined]
        body = json.loads(self.rfile.read(int(self.headers.get("Content-Length") or 0)) or b"{}")
        key = self.headers.get("Idempotency-Key") or ""
        charge, new = gateway.charge(key, body)
        if new and gateway.stall_first:
            # The card is charged, then the answer is too late for the client: it sees a timeout.
            gateway.events.append((time.time(), key, f"charged {charge['id']}, then no answer for "
                                                     f"{gateway.stall_seconds:g}s"))
            time.sleep(gateway.stall_seconds)
        else:
            gateway.events.append((time.time(), key, f"{'charged' if new else 'key seen: returned'} {charge['id']}"
                                                     + ("" if new else ", no new charge")))
        data = json.dumps(charge).encode()
        try:
            self.send_response(200)
            self.send_header("Content-Type", "application/json")
            self.send_header("Content-Length", str(len(data)))
            self.end_headers()
            self.wfile.write(data)
        except OSError:  # the client gave up waiting
            pass


class PaymentGateway:
    """A local payment API that dedupes by ``Idempotency-Key`` and answers the first charge too late."""

    def __init__(self, stall_seconds: float = 2.0) -> None:
        self.stall_first = True
        self.stall_seconds = stall_seconds
        self.events: list[tuple[float, str, str]] = []
        self.charges: dict[str, dict] = {}
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _GatewayHandler)
        self._server.daemon_threads = True
        self._server.gateway = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def charge(self, key: str, body: dict) -> tuple[dict, bool]:
        """The charge for ``key`` and whether it was made now (a request without a key always charges)."""
        with self._lock:
            if key and key in self.charges:
                return self.charges[key], False
            charge = {"id": f"ch_{len(self.charges) + 1}", "amount_cents": body.get("amount_cents")}
            self.charges[key or f"no-key-{len(self.charges)}"] = charge
            return charge, True

    def start(self) -> PaymentGateway:
        threading.Thread(target=self._server.serve_forever, name="gateway-stub", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()


class _QuotesHandler(BaseHTTPRequestHandler):
    def log_message(self, format: str, *args: object) -> None:  # quiet: the report shows the calls
        pass

    def do_GET(self) -> None:  # noqa: N802 - http.server's naming
        api: QuotesAPI = self.server.api  # type: ignore[attr-defined]
        started, at_once = api.begin()
        time.sleep(api.hold)
        data = json.dumps({"quote": self.path.rstrip("/").rsplit("/", 1)[-1], "cents": 1299}).encode()
        api.end(self.path, started, at_once)
        self.send_response(200)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(data)))
        self.end_headers()
        self.wfile.write(data)


class QuotesAPI:
    """A local HTTP API that takes ``hold`` seconds per call and records each call: its start, its end and how
    many calls were in progress when it started (itself included)."""

    def __init__(self, hold: float = 0.2) -> None:
        self.hold = hold
        self.calls: list[tuple[float, float, str, int]] = []  # (started, ended, path, calls in progress)
        self._in_progress = 0
        self._lock = threading.Lock()
        self._server = ThreadingHTTPServer(("127.0.0.1", 0), _QuotesHandler)
        self._server.daemon_threads = True
        self._server.api = self  # type: ignore[attr-defined]
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}"

    def begin(self) -> tuple[float, int]:
        with self._lock:
            self._in_progress += 1
            return time.time(), self._in_progress

    def end(self, path: str, started: float, at_once: int) -> None:
        with self._lock:
            self._in_progress -= 1
            self.calls.append((started, time.time(), path, at_once))

    def most_at_once(self) -> int:
        """The most calls that were in progress at the same time."""
        return max((at_once for *_, at_once in self.calls), default=0)

    def busiest(self, seconds: float = 1.0) -> int:
        """The most calls started within any ``seconds`` (a sliding window, as the limit counts)."""
        starts = sorted(started for started, *_ in self.calls)
        return max((sum(1 for other in starts[index:] if other - start < seconds)
                    for index, start in enumerate(starts)), default=0)

    def start(self) -> QuotesAPI:
        threading.Thread(target=self._server.serve_forever, name="quotes-stub", daemon=True).start()
        return self

    def stop(self) -> None:
        self._server.shutdown()
        self._server.server_close()
