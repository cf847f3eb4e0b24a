"""The payment gateway stub of ``bench/chaos.py``: an HTTP server in the benchmark's process.

``POST /charge`` with a JSON body ``{"order_id": …, "amount": …}`` and, optionally, an
``Idempotency-Key`` header. The contract is the one real gateways (Stripe, Adyen) offer:

- a key it has seen: the charge made under that key is returned, nothing is charged again;
- otherwise a new charge is made, and then, for a fixed fraction of charges, the reply stalls
  longer than the client waits: the client sees a timeout although the card was charged.

Which charges stall is decided by a hash of (seed, order id, how many charges the order has
had so far), not by the order requests happen to arrive in, so both systems of a run meet the
same faults: the first charge of order 17 stalls in both, or in neither.
"""

from __future__ import annotations

import hashlib
import json
import threading
import time
from collections import defaultdict
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer


class Gateway:
    """The stub's state and its server thread."""

    def __init__(self, *, seed: int, fault_rate: float, stall_seconds: float) -> None:
        self.seed, self.fault_rate, self.stall_seconds = seed, fault_rate, stall_seconds
        self.lock = threading.Lock()
        self.charges: dict[int, list[str]] = defaultdict(list)
        self.by_key: dict[str, str] = {}
        self.requests = self.replays = self.stalls = 0
        gateway = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:  # noqa: N802 - the http.server API
                length = int(self.headers.get("Content-Length") or 0)
                try:
                    body = json.loads(self.rfile.read(length) or b"{}")
                    order_id = int(body["order_id"])
                except (ValueError, KeyError, TypeError):
                    self._reply(400, {"error": "bad request"})
                    return
                charge_id, stall = gateway.charge(order_id, self.headers.get("Idempotency-Key"))
                if stall:
                    time.sleep(gateway.stall_seconds)  # the client has given up by now
                self._reply(200, {"charge_id": charge_id, "order_id": order_id})

            def _reply(self, status: int, payload: dict) -> None:
                data = json.dumps(payload).encode()
                try:
                    self.send_response(status)
                    self.send_header("Content-Type", "application/json")
                    self.send_header("Content-Length", str(len(data)))
                    self.end_headers()
                    self.wfile.write(data)
                except OSError:  # the client timed out and closed the connection
                    pass

            def log_message(self, format: str, *args: object) -> None:  # noqa: A002
                pass

        class Server(ThreadingHTTPServer):
            daemon_threads = True
            request_queue_size = 256  # the default 5 would refuse connections under load

        self.server = Server(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}"
        self.thread = threading.Thread(target=self.server.serve_forever, name="chaos-gateway", daemon=True)

    def _faulty(self, order_id: int, charge_number: int) -> bool:
        digest = hashlib.sha256(f"{self.seed}:{order_id}:{charge_number}".encode()).digest()
        return int.from_bytes(digest[:8], "big") / 2**64 < self.fault_rate

    def charge(self, order_id: int, key: str | None) -> tuple[str, bool]:
        """Charge (or replay a keyed charge); return the charge id and whether to stall the reply."""
        with self.lock:
            self.requests += 1
            if key is not None and key in self.by_key:
                self.replays += 1
                return self.by_key[key], False
            charges = self.charges[order_id]
            charge_id = f"ch_{order_id}_{len(charges) + 1}"
            stall = self._faulty(order_id, len(charges))
            charges.append(charge_id)
            if key is not None:
                self.by_key[key] = charge_id
            if stall:
                self.stalls += 1
            return charge_id, stall

    def start(self) -> Gateway:
        self.thread.start()
        return self

    def stop(self) -> None:
        self.server.shutdown()
        self.server.server_close()

    def figures(self) -> dict[str, int]:
        """Charges made, orders charged, duplicate charges (the sum over orders of charges beyond one)."""
        with self.lock:
            counts = {order: len(charges) for order, charges in self.charges.items()}
            return {
                "requests": self.requests,
                "charges": sum(counts.values()),
                "orders_charged": sum(1 for count in counts.values() if count),
                "duplicate_charges": sum(max(0, count - 1) for count in counts.values()),
                "replays": self.replays,
                "stalls": self.stalls,
            }

    def charged_orders(self) -> set[int]:
        with self.lock:
            return {order for order, charges in self.charges.items() if charges}
