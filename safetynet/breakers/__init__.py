"""Shared circuit breakers: when an upstream is down, tasks wait for it instead of pounding it.

A breaker has a name ("smtp") and is declared in ``SAFETYNET["BREAKERS"]``. Every worker on
every machine sees the same breaker: its state lives in Redis (``REDIS_URL``, else a Redis
broker), else in the database (``BreakerState`` rows, updated under a row lock)::

    closed ──(failure rate over the window >= failure_rate with >= min_calls calls,
              or consecutive_failures in a row)──▶ open
    open ──(open_seconds later, at the next call)──▶ half_open: at most half_open_probes calls at once
    half_open ──a probe succeeds──▶ closed        half_open ──a probe fails──▶ open again

A call asks first (``enter``): allowed, or refused with the time the breaker may half-open. It
then reports how it went (``leave``): only failures the breaker counts (``count_on``; by default
network errors, timeouts and HTTP 408/429/5xx) are failures; a permanent error is not the
upstream's fault and counts as a success for the breaker. A probe that never reports (its worker
died) stops holding its place after ``open_seconds``.

In a task: the option ``breaker="smtp"`` (the body is not run while the breaker is open: the task
is deferred, without using an attempt, until it may half-open), or ``with safetynet.breaker("smtp"):``
and ``@safetynet.breaker("smtp")`` around the calls to the upstream.
"""


from __future__ import annotations

import contextlib
import logging
import math
import random
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from typing import Any

from celery.exceptions import Ignore, Reject
from celery.exceptions import Retry as CeleryRetry

from safetynet import conf, shared, signals
from safetynet.breakers import _store
from safetynet.breakers._store import CLOSED, HALF_OPEN, OPEN
from safetynet.core.upstream import Breaker, RetryBudget
from safetynet.exceptions import BreakerOpen, ConfigurationError, Snooze
from safetynet.models import BreakerState

__all__ = ["CLOSED", "HALF_OPEN", "OPEN", "Breaker", "BreakerOpen", "RetryBudget", "Ticket", "breaker", "declared",
           "enter", "enter_or_skip", "force", "leave", "outcome_of", "report", "spec", "state_of"]

logger = logging.getLogger("safetynet")

def declared() -> dict[str, Breaker]:
    """The breakers of ``SAFETYNET["BREAKERS"]``, by name."""
    return conf.get().breakers


def spec(name: str) -> Breaker:
    """The declared breaker ``name``; ConfigurationError naming the declared ones if there is none."""
    breakers = declared()
    try:
        return breakers[name]
    except KeyError:
        known = ", ".join(sorted(breakers)) or "none"
        raise ConfigurationError(
            f"unknown breaker {name!r}: declare it in SAFETYNET['BREAKERS'] (declared: {known})"
        ) from None


@dataclass
class Ticket:
    """A call the breaker let through; give it back to ``leave``."""

    name: str
    state: str
    probe: str = ""
    started: float = 0.0


# -- the API -------------------------------------------------------------------------------------


def enter(name: str) -> Ticket:
    """Ask breaker ``name`` for one call: a Ticket, or BreakerOpen (with when it may half-open)."""
    config = spec(name)
    now = time.time()
    token = uuid.uuid4().hex[:12]
    client = shared.redis_client()
    result = None
    if client is not None:
        try:
            allowed, state, retry_at, probe, transition = _store.script(client, _store.ENTER)(
                keys=[_store.KEY + name, _store.KEY + name + ":probes"],
                args=[repr(now), config.half_open_probes, repr(config.open_seconds), token],
            )
            result = (bool(int(allowed)), _store.text(state), float(_store.text(retry_at)), _store.text(probe), _store.text(transition))
        except shared.redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); breaker %r read from the database", error, name)
    if result is None:
        result = _store.database_enter(name, config, now, token)
    allowed, state, retry_at, probe, transition = result
    if transition:
        _announce(name, HALF_OPEN, now)
    if not allowed:
        _refused(name, state)
        # Spread the deferred tasks over a little while: they must not all come back at one instant.
        delay = max(0.0, retry_at - now) + random.uniform(0, min(5.0, config.open_seconds / 10))
        raise BreakerOpen(name, delay, f"breaker {name!r} is open; it may half-open in {delay:.1f}s" if state == OPEN
                          else f"breaker {name!r} is half-open and busy probing; try again in {delay:.1f}s")
    return Ticket(name=name, state=state, probe=probe, started=now)


def outcome_of(name: str, exception: BaseException) -> bool | None:
    """What a call that raised ``exception`` tells breaker ``name``: False (the upstream failed), True
    (it did its part; the error is not its fault) or None (no call was made: a deferral, Ignore, Reject)."""
    if isinstance(exception, CeleryRetry):
        exception = exception.exc if isinstance(exception.exc, BaseException) else None
        if exception is None:
            return None
    if isinstance(exception, (Snooze, Ignore, Reject)) or not isinstance(exception, Exception):
        return None
    return not spec(name).counts(exception)


def leave(ticket: Ticket, *, ok: bool | None) -> str:
    """Report how the call of ``ticket`` went (``ok``: the upstream did its part; None: no call was made,
    which only frees a probe's place); return the state."""
    config = spec(ticket.name)
    if ok is None:
        if ticket.probe:
            _free_probe(ticket)
        return ticket.state
    now = time.time()
    client = shared.redis_client()
    result = None
    if client is not None:
        try:
            state, transition = _store.script(client, _store.LEAVE)(
                keys=[_store.KEY + ticket.name, _store.KEY + ticket.name + ":window", _store.KEY + ticket.name + ":probes"],
                args=[repr(now), "1" if ok else "0", ticket.probe, repr(config.bucket_seconds), 12,
                      config.min_calls, repr(config.failure_rate), config.consecutive_failures or 0,
                      repr(config.open_seconds)],
            )
            result = (_store.text(state), _store.text(transition))
        except shared.redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); breaker %r written to the database", error,
                           ticket.name)
    if result is None:
        result = _store.database_leave(ticket.name, config, now, ok, ticket.probe)
    state, transition = result
    if transition:
        _announce(ticket.name, transition, now)
    return state


def _free_probe(ticket: Ticket) -> None:
    client = shared.redis_client()
    if client is not None:
        try:
            client.zrem(_store.KEY + ticket.name + ":probes", ticket.probe)
            return
        except shared.redis_errors():
            pass

    def change(row: Any) -> None:
        row.probes = {key: until for key, until in (row.probes or {}).items() if key != ticket.probe}

    _store.database_apply(ticket.name, change)


def enter_or_skip(name: str) -> Ticket | None:
    """``enter``, or None (with a warning) when neither Redis nor the database answers: the call then
    goes through unguarded. BreakerOpen is raised as by ``enter``."""
    try:
        return enter(name)
    except BreakerOpen:
        raise
    except Exception as error:
        logger.warning("safetynet: breaker %r not consulted (%r); calling without it", name, error,
                       extra={"breaker": name})
        return None


@contextlib.contextmanager
def _guarded(name: str) -> Iterator[Ticket | None]:
    ticket = enter_or_skip(name)
    try:
        yield ticket
    except BaseException as exc:
        report(ticket, exc)
        raise
    report(ticket, True)


def report(ticket: Ticket | None, outcome: bool | BaseException | None) -> None:
    """``leave`` with True, the exception the call raised, or None (no call made), without letting the
    store (or a count_on that raises) change the call's own outcome."""
    if ticket is None:
        return
    try:
        leave(ticket, ok=outcome_of(ticket.name, outcome) if isinstance(outcome, BaseException) else outcome)
    except Exception as error:
        logger.warning("safetynet: could not report to breaker %r: %r", ticket.name, error)


class breaker(contextlib.ContextDecorator):  # noqa: N801 - used like a function: with safetynet.breaker("smtp")
    """``with safetynet.breaker("smtp"):`` or ``@safetynet.breaker("smtp")``: calls through breaker ``smtp``.

    Raises BreakerOpen when the breaker is open (in a task: the task is deferred, no attempt used).
    """

    def __init__(self, name: str) -> None:
        self.name = name
        self._active: list[Any] = []

    def __enter__(self) -> Ticket:
        context = _guarded(self.name)
        ticket = context.__enter__()
        self._active.append(context)
        return ticket

    def __exit__(self, *exc_info: Any) -> bool | None:
        return self._active.pop().__exit__(*exc_info)


def state_of(name: str) -> dict[str, Any]:
    """What the breaker looks like now: state, when it may half-open, calls and failures in the window."""
    config = spec(name)
    now = time.time()
    client = shared.redis_client()
    if client is not None:
        try:
            fields = {_store.text(k): _store.text(v) for k, v in client.hgetall(_store.KEY + name).items()}
            window = {_store.text(k): int(v) for k, v in client.hgetall(_store.KEY + name + ":window").items()}
            oldest = math.floor(now / config.bucket_seconds) - 11
            calls = sum(v for k, v in window.items() if k.startswith("c:") and int(k[2:]) >= oldest)
            failures = sum(v for k, v in window.items() if k.startswith("f:") and int(k[2:]) >= oldest)
            probes = client.zcount(_store.KEY + name + ":probes", now, "+inf")
            return {"name": name, "state": fields.get("state", CLOSED), "until": float(fields.get("until", 0)),
                    "calls": calls, "failures": failures, "probes": int(probes),
                    "changed": float(fields.get("changed", 0))}
        except shared.redis_errors():
            pass
    row = BreakerState.objects.filter(name=name).first()
    if row is None:
        return {"name": name, "state": CLOSED, "until": 0.0, "calls": 0, "failures": 0, "probes": 0, "changed": 0.0}
    oldest = math.floor(now / config.bucket_seconds) - 11
    window = {int(k): v for k, v in (row.window or {}).items() if int(k) >= oldest}
    return {"name": name, "state": row.state, "until": row.until, "calls": sum(v[0] for v in window.values()),
            "failures": sum(v[1] for v in window.values()),
            "probes": sum(1 for until in (row.probes or {}).values() if until > now), "changed": row.changed}


def force(name: str, state: str, *, seconds: float | None = None) -> None:
    """Open (for ``seconds``, default its ``open_seconds``) or close breaker ``name`` by hand."""
    config = spec(name)
    if state not in (OPEN, CLOSED):
        raise ConfigurationError(f"a breaker can be forced open or closed, not {state!r}")
    now = time.time()
    until = now + (config.open_seconds if seconds is None else seconds)
    client = shared.redis_client()
    written = False
    if client is not None:
        try:
            with client.pipeline() as pipe:
                pipe.hset(_store.KEY + name, mapping={"state": state, "until": repr(until), "changed": repr(now),
                                                "consecutive": "0"})
                pipe.delete(_store.KEY + name + ":window", _store.KEY + name + ":probes")
                pipe.execute()
            written = True
        except shared.redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); breaker %r forced in the database", error, name)
    if not written:
        def change(row: Any) -> None:
            row.state, row.until, row.changed, row.consecutive, row.window, row.probes = (
                state, until, now, 0, {}, {})

        _store.database_apply(name, change)
    _announce(name, state, now, by_hand=True)


def _announce(name: str, state: str, now: float, *, by_hand: bool = False) -> None:
    """A state change: one log line, a signal, a metric."""
    level = logging.WARNING if state == OPEN else logging.INFO
    logger.log(level, "safetynet: breaker %r is %s%s", name, state.replace("_", "-"), " (by hand)" if by_hand else "",
               extra={"breaker": name, "state": state, "by_hand": by_hand})
    signals.breaker_changed.send_robust(sender=None, name=name, state=state, at=now, by_hand=by_hand)


def _refused(name: str, state: str) -> None:
    signals.breaker_refused.send_robust(sender=None, name=name, state=state)
