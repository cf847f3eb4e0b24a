"""Run a task through its real policy on a virtual clock: no broker, no sleeping.

The simulator drives Celery's own eager tracer one attempt at a time and reads what the
runtime decided from the retry it asked Celery to publish, so the trace shows exactly
what a worker would do: the same wrapper, the same ``self.retry``, the same core.
"""

from __future__ import annotations

import random
import sys
from dataclasses import dataclass, field
from typing import IO, Any

from billiard.einfo import ExceptionInfo, ExceptionWithTraceback
from celery import states, uuid
from celery.app.trace import build_tracer
from celery.exceptions import Retry as CeleryRetry

from safetynet import signals
from safetynet.protocol.headers import HISTORY as HEADER
from safetynet.protocol.history import History
from safetynet.runtime import clock as runtime_clock

__all__ = ["SimulatedAttempt", "Simulator", "Trace", "VirtualClock", "simulate"]


class VirtualClock:
    """A clock that moves only when told to."""

    def __init__(self, start: float = 1_767_225_600.0) -> None:  # 2026-01-01T00:00:00Z
        self.start = float(start)
        self.current = float(start)

    def now(self) -> float:
        """The virtual time, in seconds since the epoch."""
        return self.current

    def advance(self, seconds: float) -> None:
        """Move the clock forward."""
        if seconds < 0:
            raise ValueError(f"a clock cannot go back ({seconds}s)")
        self.current += seconds

    @property
    def elapsed(self) -> float:
        """Seconds since the clock started."""
        return self.current - self.start

    def installed(self, rng: random.Random | None = None):  # noqa: ANN201 - a context manager
        """Make the runtime read this clock (and ``rng`` for jitter) inside the block."""
        return runtime_clock.using(self.now, rng or random.Random(0))


@dataclass(frozen=True)
class SimulatedAttempt:
    """One attempt of a simulated task."""

    number: int
    action: str  # "retry", "snooze", "dead" or "success"
    exception: BaseException | None
    retries: int  # Celery's request.retries during the attempt
    next_step: str
    delay: float | None
    state: str  # the Celery state the attempt left: RETRY, FAILURE or SUCCESS
    at: float  # seconds since the first attempt started


@dataclass
class Trace:
    """What happened to one simulated task."""

    attempts: list[SimulatedAttempt] = field(default_factory=list)
    state: str = states.PENDING
    exception: BaseException | None = None
    result: Any = None
    history: list[dict[str, Any]] = field(default_factory=list)

    @property
    def delays(self) -> list[float]:
        """The wait before each retry, in seconds."""
        return [attempt.delay for attempt in self.attempts if attempt.delay is not None]

    @property
    def elapsed(self) -> float:
        """Virtual seconds from the first attempt's start to the last one's."""
        return self.attempts[-1].at if self.attempts else 0.0

    def table(self, file: IO[str] | None | object = ...) -> str:
        """Print (to ``file``, standard output by default; None prints nothing) and return the attempt table."""
        if file is ...:
            file = sys.stdout
        header = ("attempt", "at", "action", "exception raised", "retries", "next step", "delay", "state")
        rows = [header]
        for attempt in self.attempts:
            raised = "-" if attempt.exception is None else _short(attempt.exception)
            delay = "-" if attempt.delay is None else f"{attempt.delay:g}s"
            rows.append((str(attempt.number), f"+{attempt.at:g}s", attempt.action, raised, str(attempt.retries),
                         attempt.next_step, delay, attempt.state))
        widths = [max(len(row[i]) for row in rows) for i in range(len(header))]
        lines = ["  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=True)).rstrip() for row in rows]
        text = "\n".join(lines) + "\n"
        if file is not None:
            file.write(text)  # type: ignore[union-attr]
        return text

    def __str__(self) -> str:
        return self.table(file=None)


def _short(exception: BaseException, limit: int = 60) -> str:
    text = f"{type(exception).__name__}: {exception}" if str(exception) else type(exception).__name__
    return text if len(text) <= limit else text[: limit - 1] + "…"


def _unwrap(retval: Any) -> BaseException | Any:
    if isinstance(retval, ExceptionInfo):
        retval = retval.exception
    if isinstance(retval, ExceptionWithTraceback):
        retval = retval.exc
    return retval


class Simulator:
    """Runs tasks on a virtual clock with a seeded random source."""

    def __init__(self, *, seed: int = 0, start: float | None = None, limit: int = 1_000) -> None:
        self.seed = seed
        self.start = start
        self.limit = limit

    def run(self, task: Any, *args: Any, **kwargs: Any) -> Trace:
        """Run ``task(*args, **kwargs)`` attempt after attempt until it succeeds or is given up."""
        task = getattr(task, "_get_current_object", lambda: task)()  # shared_task proxies
        clock = VirtualClock() if self.start is None else VirtualClock(self.start)
        trace = Trace()
        task_id = uuid()
        headers: dict[str, Any] | None = None
        retries = 0
        dead_history: list[list[dict[str, Any]]] = []

        def on_dead(sender: Any, task_id: str | None = None, history: Any = None, **_: Any) -> None:
            if task_id == current_id:
                dead_history.append(list(history or []))

        current_id = task_id
        tracer = build_tracer(task.name, task, eager=True, propagate=False, app=task._get_app())
        signals.task_dead.connect(on_dead, weak=False)
        try:
            with clock.installed(random.Random(self.seed)):
                for _ in range(self.limit):
                    at = clock.elapsed
                    request = {
                        "id": task_id, "task": task.name, "args": list(args), "kwargs": dict(kwargs),
                        "retries": retries, "is_eager": True, "headers": headers, "hostname": "simulator",
                        "delivery_info": {"is_eager": True}, "called_directly": False,
                    }
                    outcome = tracer(task_id, list(args), dict(kwargs), request)
                    retval = _unwrap(outcome.retval)
                    state = states.SUCCESS if outcome.info is None else outcome.info.state
                    if isinstance(retval, CeleryRetry) and retval.sig is not None:
                        options = retval.sig.options
                        header = (options.get("headers") or {}).get(HEADER) or {}
                        entry = (header.get("history") or [{}])[-1]
                        delay = float(entry.get("delay") or 0.0)
                        trace.history.append(entry)
                        trace.attempts.append(SimulatedAttempt(
                            number=int(entry.get("attempt", len(trace.attempts) + 1)), action=entry.get("action", "retry"),
                            exception=retval.exc, retries=retries, next_step="retry" if entry.get("action") != "snooze"
                            else "snooze", delay=delay, state=states.RETRY, at=at,
                        ))
                        args, kwargs = tuple(retval.sig.args), dict(retval.sig.kwargs)
                        headers, retries = options.get("headers"), int(options.get("retries", retries + 1))
                        clock.advance(delay)
                        continue
                    number = History.from_headers(headers, 0.0).attempt
                    if state == states.SUCCESS:
                        trace.attempts.append(SimulatedAttempt(number, "success", None, retries, "done", None, state, at))
                        trace.result = retval
                    elif state in (states.IGNORED, states.REJECTED):  # Celery's Ignore / Reject: no decision
                        trace.attempts.append(SimulatedAttempt(
                            number, state.lower(), retval, retries, f"stop ({type(retval).__name__})", None, state, at,
                        ))
                        trace.exception = retval
                    else:
                        entry = dead_history[-1][-1] if dead_history else {}
                        reason = entry.get("reason", "failed") if entry else "failed (not decided by safetynet)"
                        if entry:
                            trace.history.append(entry)
                        trace.attempts.append(SimulatedAttempt(
                            number, "dead", retval, retries, f"give up: {reason}", None, state, at,
                        ))
                        trace.exception = retval
                    trace.state = state
                    return trace
            raise RuntimeError(f"simulation of {task.name} stopped after {self.limit} attempts without an end")
        finally:
            signals.task_dead.disconnect(on_dead)


def simulate(task: Any, *args: Any, **kwargs: Any) -> Trace:
    """Run ``task(*args, **kwargs)`` through its real policy on a virtual clock (seed 0)."""
    return Simulator().run(task, *args, **kwargs)

