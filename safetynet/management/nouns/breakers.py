"""``safetynet breakers list|open|close``: the shared state of circuit breakers."""

from __future__ import annotations

import time
from typing import Any

from django.core.management.base import CommandError

from safetynet import breakers, conf
from safetynet.exceptions import ConfigurationError
from safetynet.management.nouns._text import Noun, columns, seconds

__all__ = ["Breakers"]


class Breakers(Noun):
    """List the breakers; open or close one by hand."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
        """``breakers list|open|close``."""
        parser = commands.add_parser("breakers", help="list circuit breakers; open or close one by hand",
                                     description="List the breakers of SAFETYNET['BREAKERS'] with their shared "
                                                 "state; open or close one by hand.")
        actions = parser.add_subparsers(dest="breakers_command", metavar="action", required=True)
        listing = actions.add_parser("list", help="every declared breaker and its state")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead")
        opening = actions.add_parser("open", help="open a breaker by hand: tasks through it wait",
                                     description="Open a breaker by hand: tasks through it are deferred until it "
                                                 "may half-open (after --for seconds, default its open_seconds).")
        opening.add_argument("name")
        opening.add_argument("--for", dest="seconds", type=float, default=None, metavar="SECONDS",
                             help="how long it stays open before a probe (default: its open_seconds)")
        closing = actions.add_parser("close", help="close a breaker by hand: calls go through again")
        closing.add_argument("name")

    def handle(self, options: dict[str, Any]) -> None:
        getattr(self, options["breakers_command"])(options)

    def list(self, options: dict[str, Any]) -> None:
        """Print every declared breaker's shared state."""
        names = sorted(conf.get().breakers)
        now = time.time()
        states = [breakers.state_of(name) for name in names]
        if options["json"]:
            self.write_json(states)
            return
        if not states:
            self.stdout.write("No breakers: declare them in SAFETYNET['BREAKERS'].")
            return
        rows = [("breaker", "state", "calls", "failures", "failure rate", "half-open in", "probes")]
        for state, name in zip(states, names, strict=True):
            config = conf.get().breakers[name]
            rate = f"{state['failures'] / state['calls']:.0%}" if state["calls"] else "-"
            rows.append((name, state["state"].replace("_", "-"), str(state["calls"]), str(state["failures"]),
                         f"{rate} (opens at {config.failure_rate:.0%} of >= {config.min_calls})",
                         seconds(max(0.0, state["until"] - now)) if state["state"] == "open" else "-",
                         f"{state['probes']}/{config.half_open_probes}" if state["state"] == "half_open" else "-"))
        for line in columns(rows):
            self.stdout.write(line)

    def _breaker_name(self, name: str) -> str:
        try:
            breakers.spec(name)
        except ConfigurationError as error:
            raise CommandError(str(error)) from None
        return name

    def open(self, options: dict[str, Any]) -> None:
        name = self._breaker_name(options["name"])
        seconds = options["seconds"]
        if seconds is not None and not 0 < seconds <= 86_400:
            raise CommandError("--for must be from 0 to 86400 seconds")
        breakers.force(name, "open", seconds=seconds)
        self.stdout.write(f"Breaker {name!r} is open; tasks through it wait until it may half-open.")

    def close(self, options: dict[str, Any]) -> None:
        name = self._breaker_name(options["name"])
        breakers.force(name, "closed")
        self.stdout.write(f"Breaker {name!r} is closed; calls go through again.")
