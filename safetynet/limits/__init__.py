"""Shared limits: at most N calls at once and N per interval to an upstream, across every worker on every machine.

A limit has a name ("partner-api") and is declared in ``SAFETYNET["LIMITS"]`` (see
``safetynet.core.limits.Limit``). Its state lives in Redis (``REDIS_URL``, else a Redis broker),
one atomic script per check on Redis's own clock; else in the database (``LimitState`` rows under
a row lock). A call asks first (``acquire``): admitted, with a ticket, or refused with its turn
(``LimitReached``, a ``Snooze``). An admitted call holds a concurrency slot as a lease that the
heartbeat of its process renews every third of ``LIMIT_LEASE_SECONDS``; it gives the slot back
when it ends (``release``). A process killed while holding slots stops renewing them: they are
free again at most ``LIMIT_LEASE_SECONDS`` after its last renewal, so at most that long after it died.

In a task: the option ``limit="partner-api"`` (or a list of names; the body is not run until every
one admits it: the task is deferred, without using an attempt, until its turn), or
``with safetynet.limit("partner-api"):`` and ``@safetynet.limit("partner-api")`` around the calls.
"""

from __future__ import annotations

import contextlib
import functools
import inspect
import logging
import random
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

from celery.exceptions import Retry as CeleryRetry

from safetynet import conf, shared, signals
from safetynet.core import limits as core
from safetynet.core.classify import retry_after_of, status_of
from safetynet.core.limits import Limit
from safetynet.exceptions import ConfigurationError, LimitReached
from safetynet.limits import _leases, _store

__all__ = ["Limit", "LimitReached", "Ticket", "acquire", "acquire_or_skip", "declared", "finish", "limit",
           "partition_of", "pause", "readmit", "release", "spec", "state_of"]

logger = logging.getLogger("safetynet")


def declared() -> dict[str, Limit]:
    """The limits of ``SAFETYNET["LIMITS"]``, by name."""
    return conf.get().limits


def spec(name: str) -> Limit:
    """The declared limit ``name``; ConfigurationError naming the declared ones if there is none."""
    limits = declared()
    try:
        return limits[name]
    except KeyError:
        known = ", ".join(sorted(limits)) or "none"
        raise ConfigurationError(f"unknown limit {name!r}: declare it in SAFETYNET['LIMITS'] (declared: {known})"
                                 ) from None


@dataclass
class Ticket:
    """Calls the limits let through; give it back to ``release`` (``finish``)."""

    token: str
    #: "redis" or "database": where the slots are held (released and renewed there).
    store: str
    #: The limits (and partitions) that admitted the call.
    keys: tuple[_store.Keys, ...]
    #: Those of them with a concurrency slot held.
    held: tuple[_store.Keys, ...] = ()
    started: float = field(default_factory=time.perf_counter)
    #: ``time.perf_counter()`` when the check was sent (the call was admitted at most this long ago).
    asked: float = 0.0
    #: What was asked for: (name, partition) pairs.
    wanted: tuple[tuple[str, str], ...] = ()
    #: Seconds after ``asked`` past which the call is checked again before it starts (None: never; see
    #: ``Limit.recheck_after``).
    recheck_after: float | None = None

    def stale(self) -> bool:
        """True when the call was admitted so long ago that starting it now could go over a rate (``readmit``)."""
        return self.recheck_after is not None and time.perf_counter() - self.asked > self.recheck_after


# -- partitions ------------------------------------------------------------------------------------

@functools.lru_cache(maxsize=1024)
def _signature(function: Any) -> inspect.Signature | None:
    try:
        return inspect.signature(function)
    except (TypeError, ValueError):
        return None


def partition_of(config: Limit, args: Sequence[Any], kwargs: dict[str, Any], body: Any = None) -> str:
    """The partition a call with these arguments falls in ("" for a limit that is not partitioned).

    ``body`` is the task's ``run`` (a leading ``self`` is skipped), to find a positional argument by name.
    """
    by = config.partition_by
    if by is None:
        return ""
    if callable(by):
        return str(by(*args, **kwargs))
    if by in kwargs:
        return str(kwargs[by])
    signature = _signature(body) if body is not None else None
    if signature is not None:
        parameters = list(signature.parameters)
        if parameters and parameters[0] == "self":
            parameters = parameters[1:]
        if by in parameters:
            index = parameters.index(by)
            if index < len(args):
                return str(args[index])
            default = signature.parameters[by].default
            if default is not inspect.Parameter.empty:
                return str(default)
    raise ConfigurationError(f"limit {config.name!r} is partitioned by the argument {by!r}, which this call does "
                             "not pass")


# -- the API ----------------------------------------------------------------------------------------


def acquire(wanted: Sequence[tuple[str, str]], *, task_id: str = "") -> Ticket:
    """Ask the limits ``wanted`` ((name, partition) pairs) for one call: a Ticket once every one admits it,
    else LimitReached with the wait until its turn (nothing is held then). ``task_id`` puts a refused task on
    the limits' line: when it comes back it is not sent to the back again."""
    settings = conf.get()
    specs = [(spec(name), _store.keys_for(name, partition)) for name, partition in wanted]
    token = uuid.uuid4().hex
    lease = settings.limit_lease_seconds
    asked = time.perf_counter()
    client = shared.redis_client()
    result = None
    store = "redis"
    if client is not None:
        try:
            keys: list[str] = []
            args: list[Any] = [len(specs), token, task_id, repr(lease), repr(core.TURN_GRACE)]
            for config, limit_keys in specs:
                keys += [limit_keys.base, limit_keys.leases, limit_keys.log, limit_keys.turns, limit_keys.all_leases,
                         limit_keys.all_log]
                args += [config.concurrency or 0, config.rate_count or 0, repr(config.window or 0.0),
                         repr(core.DEFAULT_HOLD)]
            answer = _store.script(client, _store.ACQUIRE)(keys=keys, args=args)
            if int(answer[0]):
                result = (True, float(_store.text(answer[1])), "", -1, 0.0, 0.0, False)
            else:
                result = (False, float(_store.text(answer[1])), _store.text(answer[2]), int(answer[3]),
                          float(_store.text(answer[4])), float(_store.text(answer[5])), bool(int(answer[6])))
        except shared.redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); limits %s checked in the database", error,
                           ", ".join(name for name, _ in wanted))
    if result is None:
        store = "database"
        result = _store.database_acquire(specs, token, task_id, lease)
    admitted, now, reason, index, turn, gap, returning = result
    if not admitted:
        config, limit_keys = specs[index]
        delay = max(0.0, turn - now)
        if returning:
            # Back for its turn and refused again (others came first): the next free place, spread a little.
            delay += random.uniform(0, min(gap, 1.0))
        signals.limit_deferred.send_robust(sender=None, name=config.name, partition=limit_keys.partition,
                                           reason=reason, wait=delay)
        raise LimitReached(config.name, delay, reason)
    rechecks = [config.recheck_after for config, _ in specs if config.recheck_after is not None]
    ticket = Ticket(token=token, store=store, keys=tuple(keys for _, keys in specs),
                    held=tuple(keys for config, keys in specs if config.concurrency is not None), asked=asked,
                    wanted=tuple((name, partition) for name, partition in wanted),
                    recheck_after=min(rechecks) if rechecks and store == "redis" else None)
    if ticket.held:
        _leases.hold(ticket)
    return ticket


def acquire_or_skip(wanted: Sequence[tuple[str, str]], *, task_id: str = "") -> Ticket | None:
    """``acquire``, or None (with a warning) when neither Redis nor the database answers: the call then goes
    through unlimited. LimitReached and ConfigurationError are raised as by ``acquire``."""
    try:
        return acquire(wanted, task_id=task_id)
    except (LimitReached, ConfigurationError):
        raise
    except Exception as error:
        logger.warning("safetynet: limits %s not consulted (%r); calling without them",
                       ", ".join(name for name, _ in wanted), error, extra={"limits": [name for name, _ in wanted]})
        return None


def readmit(ticket: Ticket, *, task_id: str = "") -> Ticket:
    """Check a call admitted a while ago (``ticket.stale()``) again, just before it starts: what ``ticket`` took
    is given back and asked for anew, as one call now. A new Ticket, else LimitReached with the wait until its
    turn (nothing held then).

    A rate's window has a margin for the time between the check and the call reaching the upstream; a worker
    that waited longer than half of it (for a CPU, a guard after the limit's, a connection) would start the
    call later than the limit counted it, and the busiest second could see one call too many. A ticket held in the
    database is returned as it is: its rate's log keeps no tokens to give back (``Ticket.stale`` is never true
    there)."""
    client = shared.redis_client() if ticket.store == "redis" else None
    if client is None:  # held in the database (whose log keeps no tokens to give back): checked once
        return ticket
    _leases.drop(ticket)
    keys: list[str] = []
    for limit_keys in ticket.keys:
        keys += sorted({limit_keys.leases, limit_keys.all_leases, limit_keys.log, limit_keys.all_log})
    try:
        _store.script(client, _store.FORGET)(keys=keys, args=[ticket.token])
    except shared.redis_errors() as error:  # its entries stay counted until they leave the window
        logger.warning("safetynet: Redis did not answer (%r) while limits %s were checked again", error,
                       ", ".join(name for name, _ in ticket.wanted))
    logger.debug("safetynet: limits %s checked again, %.1f ms after their check", ", ".join(
        name for name, _ in ticket.wanted), (time.perf_counter() - ticket.asked) * 1000)
    return acquire(ticket.wanted, task_id=task_id)


def release(ticket: Ticket) -> None:
    """Give back the concurrency slots of ``ticket`` (and tell the limits how long they were held)."""
    _leases.drop(ticket)
    if not ticket.held:
        return
    seconds = time.perf_counter() - ticket.started
    if ticket.store == "redis":
        client = shared.redis_client()
        if client is not None:
            try:
                keys: list[str] = []
                for held in ticket.held:
                    keys += [held.base, held.leases, held.all_leases]
                _store.script(client, _store.RELEASE)(keys=keys, args=[ticket.token, repr(seconds),
                                                                        repr(core.HOLD_WEIGHT)])
                return
            except shared.redis_errors() as error:
                logger.warning("safetynet: Redis did not answer (%r); the slots of %s free themselves when their "
                               "lease runs out", error, ", ".join(held.name for held in ticket.held))
                return
    _store.database_release(list(ticket.held), ticket.token, seconds)


def pause(name: str, partition: str = "", seconds: float = 1.0, *, by_hand: bool = False) -> float:
    """Let no call through limit ``name`` (its ``partition``) for ``seconds`` (a longer pause stays); return
    until when (seconds since the epoch). ``by_hand``: staff asked for it (the log says so), not a 429."""
    spec(name)
    keys = _store.keys_for(name, partition)
    client = shared.redis_client()
    until = None
    if client is not None:
        try:
            until = float(_store.text(_store.script(client, _store.PAUSE)(keys=[keys.base], args=[repr(seconds)])))
        except shared.redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); limit %r paused in the database", error, name)
    if until is None:
        until = _store.database_pause(keys, seconds)
    logger.warning("safetynet: limit %r%s paused for %.1fs (%s)", name,
                   f" [{keys.partition}]" if keys.partition else "", seconds,
                   "by hand" if by_hand else "the upstream answered 429",
                   extra={"limit": name, "partition": keys.partition, "seconds": seconds})
    signals.limit_paused.send_robust(sender=None, name=name, partition=keys.partition, seconds=seconds,
                                    by_hand=by_hand)
    return until


def _too_many_requests(error: BaseException | None) -> BaseException | None:
    """The HTTP 429 ``error`` is, or wraps (``self.retry(exc=…)``), else None."""
    if isinstance(error, CeleryRetry):
        error = error.exc if isinstance(error.exc, BaseException) else None
    if error is None or status_of(error) != 429:
        return None
    return error


def finish(ticket: Ticket | None, error: BaseException | None) -> None:
    """The call of ``ticket`` ended (``error``: what it raised): its slots given back, and a 429 tightens the
    limits that opted in. Never raises: a store that is away must not change the call's own outcome."""
    if ticket is None:
        return
    try:
        release(ticket)
    except Exception as problem:
        logger.warning("safetynet: could not give back the slots of %s: %r (they free themselves when their "
                       "lease runs out)", ", ".join(keys.name for keys in ticket.held), problem)
    refused = _too_many_requests(error)
    if refused is None:
        return
    for keys in ticket.keys:
        try:
            seconds = spec(keys.name).pause_for(retry_after_of(refused, time.time()))
            if seconds:
                pause(keys.name, keys.partition, seconds)
        except Exception as problem:
            logger.warning("safetynet: could not pause limit %r after a 429: %r", keys.name, problem)


def _current_task_id() -> str:
    """The id of the Celery task running in this thread ("" outside one): a refused task waits on the line."""
    try:
        from celery import current_task

        request = current_task.request if current_task else None
        return "" if request is None or request.called_directly else str(request.id or "")
    except Exception:  # no Celery app at hand: outside a task
        return ""


class limit(contextlib.ContextDecorator):  # noqa: N801 - used like a function: with safetynet.limit("partner-api")
    """``with safetynet.limit("partner-api"):`` or ``@safetynet.limit("partner-api")``: calls within limit
    ``partner-api`` (``partition=`` for a partitioned one).

    Raises LimitReached when the limit lets no call through now (in a task: the task is deferred until its
    turn, no attempt used; elsewhere, ``delay`` says how long to wait).
    """

    def __init__(self, name: str, partition: Any = None) -> None:
        config = spec(name)
        if config.partitioned and partition is None:
            raise ConfigurationError(f"limit {name!r} is partitioned (partition_by={config.partition_by!r}): give "
                                     f"the partition, safetynet.limit({name!r}, partition=...)")
        self.name = name
        self.given = partition
        self.partition = "" if partition is None or not config.partitioned else str(partition)
        self._active: list[Ticket | None] = []

    def _recreate_cm(self) -> limit:
        # As a decorator, each call gets its own: calls in several threads must not share one stack of tickets.
        return type(self)(self.name, self.given)

    def __enter__(self) -> Ticket | None:
        ticket = acquire_or_skip([(self.name, self.partition)], task_id=_current_task_id())
        self._active.append(ticket)
        return ticket

    def __exit__(self, kind: Any, error: BaseException | None, traceback: Any) -> None:
        finish(self._active.pop(), error)


def state_of(name: str) -> dict[str, Any]:
    """What limit ``name`` looks like now, over all its partitions: slots in use, calls in the rate's window,
    and (not partitioned) tasks waiting, when the line ends, until when it is paused."""
    config = spec(name)
    keys = _store.keys_for(name, "")
    interval = config.rate_interval
    # Not partitioned: 0 waiting until a row says otherwise (the database has no row before the first call).
    found: dict[str, Any] = {"name": name, "in_use": 0, "calls": 0, "waiting": None if config.partitioned else 0,
                             "line_in": 0.0, "paused_in": 0.0, "hold": None, "partitioned": config.partitioned}
    client = shared.redis_client()
    if client is not None:
        try:
            seconds, micros = client.time()
            now = seconds + micros / 1_000_000
            with client.pipeline(transaction=False) as pipe:
                every = _store.keys_for(name, "any") if config.partitioned else keys
                pipe.zcount(every.all_leases, now, "+inf")
                pipe.zcount(every.all_log, now - (interval or 0), "+inf")
                pipe.zcount(keys.turns, now - core.TURN_GRACE, "+inf")
                pipe.hmget(keys.base, "line", "hold", "paused")
                in_use, calls, waiting, (line, hold, paused) = pipe.execute()
            found.update(in_use=int(in_use), calls=int(calls) if interval else 0)
            if not config.partitioned:
                found.update(waiting=int(waiting), line_in=max(0.0, float(line or 0) - now),
                             paused_in=max(0.0, float(paused or 0) - now),
                             hold=float(hold) if hold is not None else None)
            return found
        except shared.redis_errors():
            pass
    from safetynet.models import LimitState

    now = time.time()
    for row in LimitState.objects.filter(name=name):
        found["in_use"] += sum(1 for until in (row.leases or {}).values() if until > now)
        if interval:
            found["calls"] += sum(1 for at in (row.log or []) if at > now - interval)
        if row.key == name:
            found.update(waiting=sum(1 for turn in (row.turns or {}).values() if turn > now - core.TURN_GRACE),
                         line_in=max(0.0, row.line - now), paused_in=max(0.0, row.paused - now), hold=row.hold)
    return found

