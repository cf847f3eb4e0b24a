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
from dataclasses import dataclass, field
from typing import Any

from safetynet.exceptions import BreakerOpen, ConfigurationError, Snooze

__all__ = ["Breaker", "BreakerOpen", "RetryBudget", "Ticket", "budgeted", "count_first_attempt", "enter_or_skip",
           "report", "breaker", "enter", "force", "leave", "outcome_of", "state_of"]

logger = logging.getLogger("safetynet")

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"


def _shown(number: float) -> str:
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


def _number(owner: str, value: Any, low: float, high: float, *, whole: bool = False) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or (
            whole and int(value) != value):
        kind = "a whole number" if whole else "a number"
        raise ConfigurationError(f"{owner} must be {kind} from {_shown(low)} to {_shown(high)}, got {value!r}")
    return value


@dataclass(frozen=True)
class Breaker:
    """How a breaker opens and closes; declared in ``SAFETYNET["BREAKERS"]`` under its name."""

    #: Open when this share of the calls in the window failed (0 < rate <= 1) …
    failure_rate: float = 0.5
    #: … over the last ``window`` seconds …
    window: float = 60.0
    #: … once at least this many calls were made in it.
    min_calls: int = 10
    #: Also open after this many failures in a row (None: only the rate).
    consecutive_failures: int | None = None
    #: Stay open this long; then the next call may probe (half-open).
    open_seconds: float = 30.0
    #: At most this many calls at once while half-open.
    half_open_probes: int = 1
    #: What counts as the upstream failing (matchers, as retry_on); None: network errors, timeouts,
    #: HTTP 408, 429 and 5xx.
    count_on: Any = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        owner = f"breaker {self.name!r}" if self.name else "Breaker"
        rate = _number(f"{owner}: failure_rate", self.failure_rate, 0.0, 1.0)
        if rate == 0:
            raise ConfigurationError(f"{owner}: failure_rate must be above 0 (0 would open on any call)")
        _number(f"{owner}: window", self.window, 1, 86_400)
        _number(f"{owner}: min_calls", self.min_calls, 1, 1_000_000, whole=True)
        if self.consecutive_failures is not None:
            _number(f"{owner}: consecutive_failures", self.consecutive_failures, 1, 1_000_000, whole=True)
        _number(f"{owner}: open_seconds", self.open_seconds, 0.1, 86_400)
        _number(f"{owner}: half_open_probes", self.half_open_probes, 1, 10_000, whole=True)
        from safetynet.core.classify import as_matchers

        as_matchers(self.count_on, name=f"{owner}: count_on")

    @property
    def bucket_seconds(self) -> float:
        """The window is counted in 12 buckets."""
        return self.window / 12

    def counts(self, exception: BaseException) -> bool:
        """True if ``exception`` is the upstream failing (not a permanent error, not this breaker refusing)."""
        from safetynet.core.classify import as_matchers, http_status, is_network_error
        from safetynet.exceptions import Permanent

        if isinstance(exception, (Permanent, Snooze)):
            return False
        from celery.exceptions import SoftTimeLimitExceeded, TimeLimitExceeded

        matchers = as_matchers(self.count_on, name="count_on") if self.count_on is not None else (
            is_network_error, http_status(408, 429, *range(500, 600)), SoftTimeLimitExceeded, TimeLimitExceeded)
        for matcher in matchers:
            if isinstance(matcher, type):
                if isinstance(exception, matcher):
                    return True
            elif matcher(exception):
                return True
        return False


@dataclass(frozen=True)
class RetryBudget:
    """Retries through a breaker: at most ``ratio`` of its first attempts over the last ``window``
    seconds, and always at least ``min_retries``; past it a retry waits longer (never dropped)."""

    ratio: float = 0.2
    min_retries: int = 3
    window: float = 60.0

    def __post_init__(self) -> None:
        _number("RETRY_BUDGET: ratio", self.ratio, 0.0, 100.0)
        _number("RETRY_BUDGET: min_retries", self.min_retries, 0, 1_000_000, whole=True)
        _number("RETRY_BUDGET: window", self.window, 1, 86_400)


def _budget_keys(scope: str, kind: str, now: float, window: float) -> list[str]:
    bucket = math.floor(now / (window / 12))
    return [f"budget:{scope}:{kind}:{number}" for number in range(bucket - 11, bucket + 1)]


def count_first_attempt(scope: str) -> None:
    """A first attempt went through ``scope`` (a breaker): it earns the retries of the budget."""
    from safetynet import conf, shared

    budget = conf.get().retry_budget
    if budget is not None:
        shared.incr(_budget_keys(scope, "first", time.time(), budget.window)[-1], ttl=budget.window * 2)


def budgeted(scope: str, delay: float) -> tuple[float, bool]:
    """Spend one retry of ``scope``'s budget: (``delay``, True) within it, else (a longer delay, False)."""
    from safetynet import conf, shared

    budget = conf.get().retry_budget
    if budget is None:
        return delay, True
    now = time.time()
    firsts = sum(shared.counts(_budget_keys(scope, "first", now, budget.window)))
    retry_keys = _budget_keys(scope, "retry", now, budget.window)
    retries = sum(shared.counts(retry_keys))
    # Read, then counted: racing workers may overshoot by a few retries (as Envoy's budgets may).
    if retries < max(budget.min_retries, budget.ratio * firsts):
        shared.incr(retry_keys[-1], ttl=budget.window * 2)
        return delay, True
    return max(delay, budget.window / 4 + random.uniform(0, budget.window / 4)), False


def declared() -> dict[str, Breaker]:
    """The breakers of ``SAFETYNET["BREAKERS"]``, by name."""
    from safetynet import conf

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


# -- Redis ---------------------------------------------------------------------------------------

_KEY = "safetynet:breaker:"

# KEYS: state hash, probes zset. ARGV: now, half_open_probes, probe timeout, probe token.
# Returns {allowed, state, retry_at, probe token, transition}.
_ENTER = """
local state = redis.call('HGET', KEYS[1], 'state')
if not state or state == 'closed' then return {1, 'closed', '0', '', ''} end
local now = tonumber(ARGV[1])
local transition = ''
if state == 'open' then
  local reopen = tonumber(redis.call('HGET', KEYS[1], 'until') or '0')
  if now < reopen then return {0, 'open', tostring(reopen), '', ''} end
  redis.call('HSET', KEYS[1], 'state', 'half_open', 'changed', ARGV[1])
  redis.call('DEL', KEYS[2])
  transition = 'half_open'
end
redis.call('ZREMRANGEBYSCORE', KEYS[2], '-inf', ARGV[1])
if redis.call('ZCARD', KEYS[2]) < tonumber(ARGV[2]) then
  redis.call('ZADD', KEYS[2], now + tonumber(ARGV[3]), ARGV[4])
  return {1, 'half_open', '0', ARGV[4], transition}
end
-- Busy probing: come back soon (a probe usually ends well before its place expires).
local first = redis.call('ZRANGE', KEYS[2], 0, 0, 'WITHSCORES')
local soon = now + math.max(0.5, tonumber(ARGV[3]) / 10)
if first[2] and tonumber(first[2]) < soon then soon = tonumber(first[2]) end
return {0, 'half_open', tostring(soon), '', transition}
"""

# KEYS: state hash, window hash, probes zset. ARGV: now, ok (1/0), probe token, bucket seconds,
# buckets, min_calls, failure_rate, consecutive failures (0: none), open_seconds.
# Returns {state, transition}.
_LEAVE = """
local now = tonumber(ARGV[1])
local ok = ARGV[2] == '1'
local state = redis.call('HGET', KEYS[1], 'state') or 'closed'
if ARGV[3] ~= '' then
  local held = redis.call('ZREM', KEYS[3], ARGV[3])
  -- A probe that outlived its place (a hanging upstream) still reopens the breaker when it fails.
  if state ~= 'half_open' or (held == 0 and ok) then return {state, ''} end
  if ok then
    redis.call('HSET', KEYS[1], 'state', 'closed', 'changed', ARGV[1], 'consecutive', '0')
    redis.call('DEL', KEYS[2], KEYS[3])
    return {'closed', 'closed'}
  end
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', tostring(now + tonumber(ARGV[9])), 'changed', ARGV[1])
  redis.call('DEL', KEYS[3])
  return {'open', 'open'}
end
if state ~= 'closed' then return {state, ''} end
local bucket = math.floor(now / tonumber(ARGV[4]))
redis.call('HINCRBY', KEYS[2], 'c:' .. bucket, 1)
redis.call('PEXPIRE', KEYS[2], math.ceil(tonumber(ARGV[4]) * tonumber(ARGV[5]) * 2000))
if ok then
  redis.call('HSET', KEYS[1], 'consecutive', '0')
  -- The bucket that just left the window goes (failures prune them all below).
  local gone = bucket - tonumber(ARGV[5])
  redis.call('HDEL', KEYS[2], 'c:' .. gone, 'f:' .. gone)
  return {'closed', ''}
end
redis.call('HINCRBY', KEYS[2], 'f:' .. bucket, 1)
local consecutive = redis.call('HINCRBY', KEYS[1], 'consecutive', 1)
local oldest = bucket - tonumber(ARGV[5]) + 1
local calls, failures = 0, 0
local fields = redis.call('HGETALL', KEYS[2])
for i = 1, #fields, 2 do
  local kind, number = string.match(fields[i], '^(%a):(%-?%d+)$')
  if tonumber(number) < oldest then
    redis.call('HDEL', KEYS[2], fields[i])
  elseif kind == 'c' then
    calls = calls + tonumber(fields[i + 1])
  else
    failures = failures + tonumber(fields[i + 1])
  end
end
local limit = tonumber(ARGV[8])
if (calls >= tonumber(ARGV[6]) and failures >= tonumber(ARGV[7]) * calls) or (limit > 0 and consecutive >= limit) then
  redis.call('HSET', KEYS[1], 'state', 'open', 'until', tostring(now + tonumber(ARGV[9])), 'changed', ARGV[1],
             'consecutive', '0')
  redis.call('DEL', KEYS[2])
  return {'open', 'open'}
end
return {'closed', ''}
"""

_scripts: dict[tuple[int, str], Any] = {}


def _script(client: Any, source: str) -> Any:
    script = _scripts.get((id(client), source))
    if script is None:
        script = _scripts[(id(client), source)] = client.register_script(source)
    return script


def _text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the database fallback -----------------------------------------------------------------------


def _database_apply(name: str, change: Any) -> Any:
    """Run ``change(row)`` on the breaker's row under its lock, save it, return what it returned."""
    from django.db import router, transaction

    from safetynet.models import BreakerState

    using = router.db_for_write(BreakerState) or "default"
    with transaction.atomic(using=using):
        BreakerState.objects.using(using).get_or_create(name=name, defaults={"changed": time.time()})
        row = BreakerState.objects.using(using).select_for_update().get(name=name)
        outcome = change(row)
        row.save(using=using)
    return outcome


def _database_enter(name: str, config: Breaker, now: float, token: str) -> tuple[bool, str, float, str, str]:
    from safetynet.models import BreakerState

    state = BreakerState.objects.filter(name=name).values_list("state", flat=True).first()
    if state in (None, CLOSED):  # the common case: one read, no lock
        return True, CLOSED, 0.0, "", ""

    def change(row: Any) -> tuple[bool, str, float, str, str]:
        transition = ""
        if row.state == CLOSED:
            return True, CLOSED, 0.0, "", ""
        if row.state == OPEN:
            if now < row.until:
                return False, OPEN, row.until, "", ""
            row.state, row.changed, row.probes, transition = HALF_OPEN, now, {}, HALF_OPEN
        probes = {key: until for key, until in (row.probes or {}).items() if until > now}
        if len(probes) < config.half_open_probes:
            probes[token] = now + config.open_seconds
            row.probes = probes
            return True, HALF_OPEN, 0.0, token, transition
        row.probes = probes
        # Busy probing: come back soon (a probe usually ends well before its place expires).
        return False, HALF_OPEN, min(*probes.values(), now + max(0.5, config.open_seconds / 10)), "", transition

    return _database_apply(name, change)


def _database_leave(name: str, config: Breaker, now: float, ok: bool, probe: str) -> tuple[str, str]:
    def change(row: Any) -> tuple[str, str]:
        if probe:
            probes = dict(row.probes or {})
            held = probes.pop(probe, None)
            row.probes = probes
            # A probe that outlived its place (a hanging upstream) still reopens the breaker when it fails.
            if row.state != HALF_OPEN or (held is None and ok):
                return row.state, ""
            row.probes, row.window, row.consecutive, row.changed = {}, {}, 0, now
            if ok:
                row.state = CLOSED
                return CLOSED, CLOSED
            row.state, row.until = OPEN, now + config.open_seconds
            return OPEN, OPEN
        if row.state != CLOSED:
            return row.state, ""
        bucket = math.floor(now / config.bucket_seconds)
        oldest = bucket - 11
        window = {key: value for key, value in (row.window or {}).items() if int(key) >= oldest}
        calls, failures = window.get(str(bucket), [0, 0])
        window[str(bucket)] = [calls + 1, failures + (0 if ok else 1)]
        row.window = window
        if ok:
            row.consecutive = 0
            return CLOSED, ""
        row.consecutive += 1
        total = sum(value[0] for value in window.values())
        failed = sum(value[1] for value in window.values())
        if (total >= config.min_calls and failed >= config.failure_rate * total) or (
                config.consecutive_failures and row.consecutive >= config.consecutive_failures):
            row.state, row.until, row.changed, row.consecutive, row.window = OPEN, now + config.open_seconds, now, 0, {}
            return OPEN, OPEN
        return CLOSED, ""

    return _database_apply(name, change)


# -- the API -------------------------------------------------------------------------------------


def enter(name: str) -> Ticket:
    """Ask breaker ``name`` for one call: a Ticket, or BreakerOpen (with when it may half-open)."""
    from safetynet import shared

    config = spec(name)
    now = time.time()
    token = uuid.uuid4().hex[:12]
    client = shared.redis_client()
    result = None
    if client is not None:
        try:
            allowed, state, retry_at, probe, transition = _script(client, _ENTER)(
                keys=[_KEY + name, _KEY + name + ":probes"],
                args=[repr(now), config.half_open_probes, repr(config.open_seconds), token],
            )
            result = (bool(int(allowed)), _text(state), float(_text(retry_at)), _text(probe), _text(transition))
        except shared.redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); breaker %r read from the database", error, name)
    if result is None:
        result = _database_enter(name, config, now, token)
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
    from celery.exceptions import Ignore, Reject
    from celery.exceptions import Retry as CeleryRetry

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
    from safetynet import shared

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
            state, transition = _script(client, _LEAVE)(
                keys=[_KEY + ticket.name, _KEY + ticket.name + ":window", _KEY + ticket.name + ":probes"],
                args=[repr(now), "1" if ok else "0", ticket.probe, repr(config.bucket_seconds), 12,
                      config.min_calls, repr(config.failure_rate), config.consecutive_failures or 0,
                      repr(config.open_seconds)],
            )
            result = (_text(state), _text(transition))
        except shared.redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); breaker %r written to the database", error,
                           ticket.name)
    if result is None:
        result = _database_leave(ticket.name, config, now, ok, ticket.probe)
    state, transition = result
    if transition:
        _announce(ticket.name, transition, now)
    return state


def _free_probe(ticket: Ticket) -> None:
    from safetynet import shared

    client = shared.redis_client()
    if client is not None:
        try:
            client.zrem(_KEY + ticket.name + ":probes", ticket.probe)
            return
        except shared.redis_errors():
            pass

    def change(row: Any) -> None:
        row.probes = {key: until for key, until in (row.probes or {}).items() if key != ticket.probe}

    _database_apply(ticket.name, change)


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
    from safetynet import shared

    config = spec(name)
    now = time.time()
    client = shared.redis_client()
    if client is not None:
        try:
            fields = {_text(k): _text(v) for k, v in client.hgetall(_KEY + name).items()}
            window = {_text(k): int(v) for k, v in client.hgetall(_KEY + name + ":window").items()}
            oldest = math.floor(now / config.bucket_seconds) - 11
            calls = sum(v for k, v in window.items() if k.startswith("c:") and int(k[2:]) >= oldest)
            failures = sum(v for k, v in window.items() if k.startswith("f:") and int(k[2:]) >= oldest)
            probes = client.zcount(_KEY + name + ":probes", now, "+inf")
            return {"name": name, "state": fields.get("state", CLOSED), "until": float(fields.get("until", 0)),
                    "calls": calls, "failures": failures, "probes": int(probes),
                    "changed": float(fields.get("changed", 0))}
        except shared.redis_errors():
            pass
    from safetynet.models import BreakerState

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
    from safetynet import shared

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
                pipe.hset(_KEY + name, mapping={"state": state, "until": repr(until), "changed": repr(now),
                                                "consecutive": "0"})
                pipe.delete(_KEY + name + ":window", _KEY + name + ":probes")
                pipe.execute()
            written = True
        except shared.redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); breaker %r forced in the database", error, name)
    if not written:
        def change(row: Any) -> None:
            row.state, row.until, row.changed, row.consecutive, row.window, row.probes = (
                state, until, now, 0, {}, {})

        _database_apply(name, change)
    _announce(name, state, now, by_hand=True)


def _announce(name: str, state: str, now: float, *, by_hand: bool = False) -> None:
    """A state change: one log line, a signal, a metric."""
    from safetynet import signals

    level = logging.WARNING if state == OPEN else logging.INFO
    logger.log(level, "safetynet: breaker %r is %s%s", name, state.replace("_", "-"), " (by hand)" if by_hand else "",
               extra={"breaker": name, "state": state, "by_hand": by_hand})
    signals.breaker_changed.send_robust(sender=None, name=name, state=state, at=now, by_hand=by_hand)


def _refused(name: str, state: str) -> None:
    from safetynet import signals

    signals.breaker_refused.send_robust(sender=None, name=name, state=state)
