"""``safetynet limits list|pause``: the shared state of limits, and a pause by hand."""

from __future__ import annotations

import argparse
import math
import time
from typing import Any

from django.core.management.base import CommandError

from safetynet import limits
from safetynet.core.limits import Limit, parse_rate
from safetynet.exceptions import ConfigurationError
from safetynet.management.nouns._text import Noun, columns, seconds

__all__ = ["Limits"]

#: The longest pause by hand: a day (a longer outage is a change of settings, not a pause).
LONGEST_PAUSE = 86_400


def pause_seconds(text: str) -> float:
    """An argparse type: a number of seconds above 0 and at most a day."""
    try:
        value = float(text)
    except ValueError:
        value = math.nan
    if not 0 < value <= LONGEST_PAUSE:  # also refuses nan and inf
        raise argparse.ArgumentTypeError(
            f"must be a number of seconds above 0 and at most {LONGEST_PAUSE} (a day), got {text!r}")
    return value


def declared_rate(config: Limit) -> str:
    """The rate as declared ("100/m"; a pair as "N/<seconds>s"), or "-" without one."""
    if config.rate is None:
        return "-"
    if isinstance(config.rate, str):
        return config.rate.strip()
    count, interval = parse_rate(config.rate)
    return f"{count}/{interval:g}s"


def partitioned_by(config: Limit) -> str:
    """What a limit is partitioned by ("no" when it is one limit for every call)."""
    by = config.partition_by
    if by is None:
        return "no"
    return f"by {by if isinstance(by, str) else getattr(by, '__qualname__', repr(by))}"


class Limits(Noun):
    """List the limits; pause one by hand."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
        """``limits list|pause``."""
        parser = commands.add_parser("limits", help="list rate and concurrency limits; pause one by hand",
                                     description="List the limits of SAFETYNET['LIMITS'] with their shared state; "
                                                 "pause one by hand.")
        actions = parser.add_subparsers(dest="limits_command", metavar="action", required=True)
        listing = actions.add_parser("list", help="every declared limit and its use now")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead")
        pausing = actions.add_parser(
            "pause", help="let no call through a limit for a while",
            description="Pause a limit by hand, for every worker: every call through it is refused and its task "
                        "deferred (no attempt used) until the pause ends. A longer pause already there stays. "
                        "A partitioned limit is paused one partition at a time (--partition).")
        pausing.add_argument("name")
        pausing.add_argument("--partition", metavar="P", default=None,
                             help="the partition to pause (required for a partitioned limit)")
        pausing.add_argument("--for", dest="seconds", type=pause_seconds, required=True, metavar="SECONDS",
                             help=f"how long no call goes through (above 0, at most {LONGEST_PAUSE})")

    def handle(self, options: dict[str, Any]) -> None:
        getattr(self, options["limits_command"])(options)

    def list(self, options: dict[str, Any]) -> None:
        """Print every declared limit's shared state."""
        declared = limits.declared()
        names = sorted(declared)
        states = [limits.state_of(name) for name in names]
        if options["json"]:
            self.write_json([{**state, "concurrency": declared[name].concurrency,
                              "rate": None if declared[name].rate is None else declared_rate(declared[name]),
                              "rule": declared[name].describe()}
                             for state, name in zip(states, names, strict=True)])
            return
        if not states:
            self.stdout.write("No limits: declare them in SAFETYNET['LIMITS'].")
            return
        rows = [("limit", "concurrency", "rate", "partitioned", "slots in use", "calls in window", "waiting",
                 "line ends in", "paused for")]
        for state, name in zip(states, names, strict=True):
            config = declared[name]
            own = not state["partitioned"]  # a partitioned limit's line and pause are each partition's own
            rows.append((
                name, "-" if config.concurrency is None else str(config.concurrency), declared_rate(config),
                partitioned_by(config),
                "-" if config.concurrency is None else f"{state['in_use']}/{config.concurrency}",
                "-" if config.rate is None else f"{state['calls']}/{config.rate_count}",
                str(state["waiting"]) if own else "-",
                seconds(state["line_in"]) if own and state["line_in"] > 0 else "-",
                seconds(state["paused_in"]) if own and state["paused_in"] > 0 else "-"))
        for line in columns(rows):
            self.stdout.write(line)
        if any(state["partitioned"] for state in states):
            self.stdout.write("A partitioned limit: slots and calls are counted over all its partitions; each "
                              "partition waits on a line of its own and is paused on its own (not shown).")

    def pause(self, options: dict[str, Any]) -> None:
        """Pause a limit (one partition of it) for --for seconds."""
        name, partition, pause_for = options["name"], options["partition"], options["seconds"]
        try:
            config = limits.spec(name)
        except ConfigurationError as error:
            raise CommandError(str(error)) from None
        if config.partitioned and not partition:
            raise CommandError(f"limit {name!r} is partitioned ({partitioned_by(config)}): say which partition to "
                               "pause with --partition P")
        if not config.partitioned and partition is not None:
            raise CommandError(f"limit {name!r} is not partitioned: pause it without --partition")
        until = limits.pause(name, partition or "", pause_for, by_hand=True)
        which = f"Limit {name!r}" + (f" (partition {partition!r})" if partition else "")
        left = until - time.time()
        longer = " (a longer pause was already there: it stays)" if left > pause_for + 1 else ""
        self.stdout.write(f"{which} is paused for {seconds(max(left, 0.0))}{longer}: every call through it is "
                          "refused and its task deferred until then.")
