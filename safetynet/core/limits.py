"""Limits on calls to an upstream, as declared, and the one admission decision (pure values and a pure function).

A limit has a name ("partner-api") and is declared in ``SAFETYNET["LIMITS"]``::

    concurrency   at most N calls at once (each holds a slot: a lease its worker's heartbeat renews)
    rate          at most N calls started in any window of the interval ("100/m", "20/s", "5000/h", "10/5s")
    partition_by  one limit per value of a task argument ("customer_id") or of a callable over the arguments

The rate is a **sliding window log**: a call is admitted when fewer than N calls were admitted in the
last interval (and ``margin``: 50 ms, or 2 % of the interval when that is more, at most a second, by
default), whatever the instant. That is the contract upstreams state ("100 a minute") and the one
an upstream counting on its side checks; a token bucket of the same rate lets up to twice N through in
one interval (a full bucket, then the refill), and a fixed window lets 2N through across its edge.
The log costs one entry per call in the interval, bounded by N. The margin is for the time between
the check and the call reaching the upstream, which varies (a process waits for a CPU, a connection
is made): without it, a call admitted the instant the oldest left the window can reach the upstream
sooner after it than a second, and the upstream counts N + 1.

``admit`` is the decision, shared by the Redis script (which mirrors it, line by line) and the
database fallback (which calls it): given a limit's state and the time, admit the call or give it a
turn. Refused calls wait in a **line**: each newcomer refused gets the turn after the last one given
out, ``gap`` seconds later (the interval over N, or the mean hold over the concurrency), so a backlog
comes back at the pace the limit lets through rather than all at once. A task coming back for its
turn (it is on the line) takes the capacity there is, or waits briefly for the next, never at the
back again. The limiter never leaves capacity unused while a call asks for it: a newcomer finding
capacity takes it even while others wait for their turn (a turn is a forecast, and its task may be
late: holding capacity for it would cost a deferral now and the capacity itself). Nothing here does I/O.
"""

from __future__ import annotations

import math
import re
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from safetynet.core.upstream import number_in_range
from safetynet.exceptions import ConfigurationError

__all__ = ["DEFAULT_HOLD", "TURN_GRACE", "Admission", "Limit", "Usage", "admit", "held_for",
           "parse_rate", "prune", "take"]

_UNITS = {"s": 1.0, "sec": 1.0, "second": 1.0, "m": 60.0, "min": 60.0, "minute": 60.0, "h": 3600.0,
          "hour": 3600.0, "d": 86_400.0, "day": 86_400.0}
_RATE = re.compile(r"^\s*(\d+)\s*/\s*(\d*(?:\.\d+)?)\s*([a-z]+)\s*$")

#: The hold a concurrency slot is assumed to last before any call has ended (seconds).
DEFAULT_HOLD = 1.0
#: How much each ended call moves the mean hold (an exponentially weighted mean).
HOLD_WEIGHT = 0.2
#: A turn not taken this long after it came is forgotten (its task was lost, revoked or expired).
TURN_GRACE = 600.0


def parse_rate(value: Any, owner: str = "rate") -> tuple[int, float]:
    """``"100/m"`` -> (100, 60.0): at most that many calls in any window of that many seconds."""
    if isinstance(value, (tuple, list)) and len(value) == 2:
        count, interval = value
    else:
        found = _RATE.match(value) if isinstance(value, str) else None
        unit = _UNITS.get(found.group(3)) if found else None
        if found is None or unit is None:
            raise ConfigurationError(
                f"{owner} must be 'N/s', 'N/m', 'N/h' or 'N/d' (or 'N/10s', '(N, seconds)'), got {value!r}")
        count, interval = int(found.group(1)), float(found.group(2) or 1) * unit
    number_in_range(f"{owner}: the count", count, 1, 1_000_000, whole=True)
    number_in_range(f"{owner}: the interval", interval, 0.001, 86_400 * 7)
    return int(count), float(interval)


@dataclass(frozen=True)
class Limit:
    """How many calls to an upstream may run at once and start per interval; declared under its name."""

    #: At most this many calls at once (None: no concurrency limit).
    concurrency: int | None = None
    #: At most N calls started in any window of the interval: "100/m", "20/s", "5000/h", "10/5s" (None: no rate).
    rate: Any = None
    #: One limit per partition: the name of a task argument, or a callable taking the task's arguments
    #: (``*args, **kwargs``) and returning the partition (None: one limit for every call).
    partition_by: str | Callable[..., Any] | None = None
    #: A failure that is an HTTP 429 pauses the limit (every worker) for its Retry-After, at most
    #: ``max_pause`` seconds; a 429 without one pauses it this many seconds (False: a 429 changes nothing).
    tighten_on_429: bool | float = False
    #: The longest pause a Retry-After may ask for.
    max_pause: float = 300.0
    #: Seconds added to the rate's interval, for the varying time from the check to the upstream (None: 50 ms or
    #: 2 % of the interval, whichever is more, at most 1 s; 0: the exact interval).
    margin: float | None = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        owner = f"limit {self.name!r}" if self.name else "Limit"
        if self.concurrency is None and self.rate is None:
            raise ConfigurationError(f"{owner} needs a concurrency, a rate or both (e.g. concurrency=5, "
                                     "rate='100/m')")
        if self.concurrency is not None:
            number_in_range(f"{owner}: concurrency", self.concurrency, 1, 100_000, whole=True)
        if self.rate is not None:
            parse_rate(self.rate, f"{owner}: rate")
        partition = self.partition_by
        if partition is not None and not callable(partition) and not (
                isinstance(partition, str) and partition.isidentifier()):
            raise ConfigurationError(f"{owner}: partition_by must be the name of a task argument, a callable "
                                     f"taking the task's arguments or a dotted path to one, got {partition!r}")
        tighten = self.tighten_on_429
        if not isinstance(tighten, bool):
            number_in_range(f"{owner}: tighten_on_429 (seconds to pause without a Retry-After)", tighten, 0.1,
                            86_400)
        number_in_range(f"{owner}: max_pause", self.max_pause, 0.1, 86_400)
        if self.margin is not None:
            number_in_range(f"{owner}: margin", self.margin, 0, 3600)

    @property
    def rate_count(self) -> int | None:
        """N of the rate (None without one)."""
        return None if self.rate is None else parse_rate(self.rate)[0]

    @property
    def rate_interval(self) -> float | None:
        """The interval of the rate, in seconds (None without one)."""
        return None if self.rate is None else parse_rate(self.rate)[1]

    @property
    def window(self) -> float | None:
        """The window the rate is counted over: the interval and its margin (None without a rate)."""
        interval = self.rate_interval
        if interval is None:
            return None
        return interval + (min(max(0.05, 0.02 * interval), 1.0) if self.margin is None else self.margin)

    @property
    def recheck_after(self) -> float | None:
        """Seconds after its check past which an admitted call is checked again before it starts: half the
        margin, so that the other half covers the way from the task's body to the upstream (None: no rate, or no
        margin)."""
        window, interval = self.window, self.rate_interval
        if window is None or interval is None or window <= interval:
            return None
        return (window - interval) / 2

    @property
    def partitioned(self) -> bool:
        """Whether each partition has a limit of its own."""
        return self.partition_by is not None

    def pause_for(self, retry_after: float | None) -> float | None:
        """How long a 429 (with this Retry-After, if any) pauses the limit; None: it does not."""
        if self.tighten_on_429 is False:
            return None
        if retry_after is None:
            retry_after = 1.0 if self.tighten_on_429 is True else float(self.tighten_on_429)
        return min(max(0.0, retry_after), self.max_pause)

    def gap(self, hold: float) -> float:
        """Seconds between two turns on the line: what the limit lets through, one call at a time."""
        spacing = 0.0
        if self.concurrency is not None:
            spacing = hold / self.concurrency
        if self.rate is not None:
            spacing = max(spacing, (self.window or 0.0) / (self.rate_count or 1))
        return spacing

    def describe(self) -> str:
        """One line for ``explain``, the dashboard and logs."""
        parts = []
        if self.concurrency is not None:
            parts.append(f"{self.concurrency} at once")
        if self.rate is not None:
            count, interval = parse_rate(self.rate)
            parts.append(f"{count} per {_span(interval)}")
        if self.partition_by is not None:
            by = self.partition_by if isinstance(self.partition_by, str) else getattr(
                self.partition_by, "__qualname__", repr(self.partition_by))
            parts.append(f"per {by}")
        if self.tighten_on_429 is not False:
            parts.append(f"a 429 pauses it (Retry-After, at most {self.max_pause:g}s)")
        return ", ".join(parts)


def _span(seconds: float) -> str:
    for unit, size in (("d", 86_400.0), ("h", 3600.0), ("min", 60.0)):
        if seconds >= size and seconds % size == 0:
            count = seconds / size
            return unit if count == 1 else f"{count:g} {unit}"
    return "s" if seconds == 1 else f"{seconds:g} s"


@dataclass
class Usage:
    """The shared state of one limit (one partition of it), as the database fallback keeps it."""

    #: Concurrency slots held: {token: lease expires at}.
    leases: dict[str, float] = field(default_factory=dict)
    #: When each call in the rate's window was admitted (oldest first).
    log: list[float] = field(default_factory=list)
    #: The last turn given out: the end of the line.
    line: float = 0.0
    #: The mean time a slot is held (seconds; None before any call ended).
    hold: float | None = None
    #: Paused (a 429) until then.
    paused: float = 0.0
    #: Tasks refused and waiting for their turn: {task id: turn}.
    turns: dict[str, float] = field(default_factory=dict)


@dataclass(frozen=True)
class Admission:
    """What ``admit`` decided: admitted, or the turn (seconds since the epoch) and why not now."""

    admitted: bool
    #: "", or why not: "paused", "concurrency" or "rate".
    reason: str = ""
    turn: float = 0.0
    #: Seconds between turns (a returning task refused again waits up to this much more: jitter).
    gap: float = 0.0
    #: The call is a task back for its turn (it kept its place on the line).
    returning: bool = False


def prune(limit: Limit, state: Usage, now: float) -> None:
    """Forget expired leases, calls out of the window and turns long past."""
    state.leases = {token: until for token, until in state.leases.items() if until > now}
    window = limit.window
    if window is not None:
        state.log = [at for at in state.log if at > now - window]
    state.turns = {task: turn for task, turn in state.turns.items() if turn > now - TURN_GRACE}


def admit(limit: Limit, state: Usage, now: float, task_id: str = "") -> Admission:
    """Admit one call now or give it a turn; ``state`` is pruned and, for a refusal, its line moved on
    (an admission is written by ``take``, once every limit of the call admitted it)."""
    prune(limit, state, now)
    returning = bool(task_id) and task_id in state.turns
    earliest, reason = now, ""
    if state.paused > now:
        earliest, reason = state.paused, "paused"
    hold = DEFAULT_HOLD if state.hold is None else state.hold
    gap = limit.gap(hold)
    if limit.concurrency is not None and len(state.leases) >= limit.concurrency:
        earliest = max(earliest, now + hold / limit.concurrency)
        reason = reason or "concurrency"
    count, interval = limit.rate_count, limit.window
    if count is not None and interval is not None and len(state.log) >= count:
        # A microsecond past the moment the oldest call leaves the window (floating point must not keep it in).
        earliest = max(earliest, state.log[len(state.log) - count] + interval + 1e-6)
        reason = reason or "rate"
    if not reason:
        return Admission(True, gap=gap)
    if returning:
        turn = earliest
    else:
        turn = max(earliest, state.line + gap) if state.line > now else earliest
        if task_id:  # a call that is no task (or not a deferred one) waits behind the line without joining it
            state.line = turn
    if task_id:
        state.turns[task_id] = turn
    return Admission(False, reason, turn, gap, returning)


def take(limit: Limit, state: Usage, now: float, token: str, lease: float, task_id: str = "") -> None:
    """Write an admitted call: a slot held until ``now + lease``, its start in the rate's log."""
    if limit.concurrency is not None:
        state.leases[token] = now + lease
    if limit.rate is not None:
        state.log.append(now)
    state.turns.pop(task_id, None)


def held_for(state: Usage, seconds: float) -> None:
    """A slot was given back after ``seconds``: the mean hold moves towards it."""
    if not math.isfinite(seconds) or seconds < 0:
        return
    state.hold = seconds if state.hold is None else state.hold * (1 - HOLD_WEIGHT) + seconds * HOLD_WEIGHT
