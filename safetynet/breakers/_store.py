"""Where a breaker's state lives: Redis (one atomic script per call), else the database under a row lock."""

from __future__ import annotations

import math
import time
from typing import Any

from django.db import router, transaction

from safetynet.core.upstream import Breaker
from safetynet.models import BreakerState

CLOSED, OPEN, HALF_OPEN = "closed", "open", "half_open"

__all__ = ["CLOSED", "ENTER", "HALF_OPEN", "KEY", "LEAVE", "OPEN", "database_apply", "database_enter",
           "database_leave", "script", "text"]


# -- Redis ---------------------------------------------------------------------------------------

KEY = "safetynet:breaker:"

# KEYS: state hash, probes zset. ARGV: now, half_open_probes, probe timeout, probe token.
# Returns {allowed, state, retry_at, probe token, transition}.
ENTER = """
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
LEAVE = """
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

_scripts_cache: dict[tuple[int, str], Any] = {}


def script(client: Any, source: str) -> Any:
    script = _scripts_cache.get((id(client), source))
    if script is None:
        script = _scripts_cache[(id(client), source)] = client.register_script(source)
    return script


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the database fallback -----------------------------------------------------------------------


def database_apply(name: str, change: Any) -> Any:
    """Run ``change(row)`` on the breaker's row under its lock, save it, return what it returned."""
    using = router.db_for_write(BreakerState) or "default"
    with transaction.atomic(using=using):
        BreakerState.objects.using(using).get_or_create(name=name, defaults={"changed": time.time()})
        row = BreakerState.objects.using(using).select_for_update().get(name=name)
        outcome = change(row)
        row.save(using=using)
    return outcome


def database_enter(name: str, config: Breaker, now: float, token: str) -> tuple[bool, str, float, str, str]:
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

    return database_apply(name, change)


def database_leave(name: str, config: Breaker, now: float, ok: bool, probe: str) -> tuple[str, str]:
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

    return database_apply(name, change)

