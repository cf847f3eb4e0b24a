"""Where a limit's state lives: Redis (one atomic script per check, on Redis's own clock), else the database
(``LimitState`` rows, the pure ``safetynet.core.limits.admit`` under a row lock, on this machine's clock).

Redis keys of a limit ``<base>`` = ``safetynet:limit:<name>`` (``…|<partition>`` for a partitioned one)::

    <base>          hash: line (the last turn given out), hold (mean seconds a slot is held), paused (until)
    <base>:leases   sorted set: concurrency slots held, token -> lease expiry
    <base>:log      sorted set: the calls in the rate's window, token -> when admitted
    <base>:turns    sorted set: tasks refused and waiting, task id -> their turn

and, for a partitioned limit, ``safetynet:limit:<name>:all-leases`` and ``…:all-log`` over every
partition (what the dashboard and the metrics read). Every key expires once the limit is idle.
"""

from __future__ import annotations

import hashlib
import re
import time
from dataclasses import dataclass
from typing import Any

from django.db import router, transaction

from safetynet.core import limits as core
from safetynet.core.limits import Limit, Usage
from safetynet.models import LimitState

__all__ = ["ACQUIRE", "FORGET", "PAUSE", "PREFIX", "RELEASE", "RENEW", "Keys", "database_acquire", "database_pause",
           "database_release", "database_renew", "keys_for", "script", "text"]

PREFIX = "safetynet:limit:"
_SAFE = re.compile(r"^[A-Za-z0-9_.:@-]{1,64}$")


@dataclass(frozen=True)
class Keys:
    """The keys of one limit (one partition of it)."""

    name: str
    partition: str
    base: str

    @property
    def leases(self) -> str:
        return self.base + ":leases"

    @property
    def log(self) -> str:
        return self.base + ":log"

    @property
    def turns(self) -> str:
        return self.base + ":turns"

    @property
    def all_leases(self) -> str:
        return PREFIX + self.name + ":all-leases" if self.partition else self.leases

    @property
    def all_log(self) -> str:
        return PREFIX + self.name + ":all-log" if self.partition else self.log

    @property
    def row(self) -> str:
        """The database row's key."""
        return self.name if not self.partition else f"{self.name}|{self.partition}"


def keys_for(name: str, partition: Any) -> Keys:
    """The keys of limit ``name``'s ``partition`` ("" or None: the limit is not partitioned)."""
    if partition is None or partition == "":
        return Keys(name, "", PREFIX + name)
    text_value = str(partition)
    if not _SAFE.match(text_value):  # a long or odd value: its digest (the key stays short and printable)
        text_value = "#" + hashlib.sha256(text_value.encode()).hexdigest()[:32]
    return Keys(name, text_value, f"{PREFIX}{name}|{text_value}")


# -- Redis ---------------------------------------------------------------------------------------

_NOW = """
local clock = redis.call('TIME')
local now = tonumber(clock[1]) + tonumber(clock[2]) / 1000000
local function extend(key, ms)
  if redis.call('PTTL', key) < ms then redis.call('PEXPIRE', key, ms) end
end
"""

# The mirror of safetynet.core.limits.admit and take over several limits, all admitted or none.
# KEYS: per limit, 6: hash, leases, log, turns, all-leases, all-log.
# ARGV: count of limits, token, task id ("" for none), lease seconds, turn grace, then per limit 4:
#       concurrency (0: none), rate count (0: none), rate interval, default hold.
# Returns {1, now} or {0, now, reason, index of the limit, turn, gap, returning (1/0)}.
ACQUIRE = _NOW + """
local n, token, task = tonumber(ARGV[1]), ARGV[2], ARGV[3]
local lease, grace = tonumber(ARGV[4]), tonumber(ARGV[5])
local worst, worst_reason, worst_index, worst_gap, worst_returning = nil, '', -1, 0, 0
for i = 0, n - 1 do
  local k, a = i * 6, 5 + i * 4
  local concurrency, count = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2])
  local interval, default_hold = tonumber(ARGV[a + 3]), tonumber(ARGV[a + 4])
  local state = redis.call('HMGET', KEYS[k + 1], 'line', 'hold', 'paused')
  local line = tonumber(state[1]) or 0
  local hold = tonumber(state[2]) or default_hold
  local paused = tonumber(state[3]) or 0
  redis.call('ZREMRANGEBYSCORE', KEYS[k + 4], '-inf', now - grace)
  local returning = task ~= '' and redis.call('ZSCORE', KEYS[k + 4], task) ~= false
  local earliest, reason, gap = now, '', 0
  if paused > now then earliest, reason = paused, 'paused' end
  if concurrency > 0 then
    gap = hold / concurrency
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 2], '-inf', now)
    if redis.call('ZCARD', KEYS[k + 2]) >= concurrency then
      earliest = math.max(earliest, now + hold / concurrency)
      if reason == '' then reason = 'concurrency' end
    end
  end
  if count > 0 then
    gap = math.max(gap, interval / count)
    redis.call('ZREMRANGEBYSCORE', KEYS[k + 3], '-inf', now - interval)
    local used = redis.call('ZCARD', KEYS[k + 3])
    if used >= count then
      local oldest = redis.call('ZRANGE', KEYS[k + 3], used - count, used - count, 'WITHSCORES')
      earliest = math.max(earliest, tonumber(oldest[2]) + interval + 0.000001)
      if reason == '' then reason = 'rate' end
    end
  end
  if reason ~= '' then
    local turn = earliest
    if not returning then
      if line > now then turn = math.max(earliest, line + gap) end
      if task ~= '' then redis.call('HSET', KEYS[k + 1], 'line', tostring(turn)) end
    end
    local keep = math.ceil((turn - now + grace) * 1000)
    extend(KEYS[k + 1], keep)
    if task ~= '' then
      redis.call('ZADD', KEYS[k + 4], turn, task)
      extend(KEYS[k + 4], keep)
    end
    if worst == nil or turn > worst then
      worst, worst_reason, worst_index, worst_gap = turn, reason, i, gap
      worst_returning = returning and 1 or 0
    end
  end
end
if worst ~= nil then
  return {0, tostring(now), worst_reason, worst_index, tostring(worst), tostring(worst_gap), worst_returning}
end
for i = 0, n - 1 do
  local k, a = i * 6, 5 + i * 4
  local concurrency, count, interval = tonumber(ARGV[a + 1]), tonumber(ARGV[a + 2]), tonumber(ARGV[a + 3])
  if concurrency > 0 then
    redis.call('ZADD', KEYS[k + 2], now + lease, token)
    extend(KEYS[k + 2], math.ceil(lease * 2000))
    if KEYS[k + 5] ~= KEYS[k + 2] then
      redis.call('ZREMRANGEBYSCORE', KEYS[k + 5], '-inf', now)
      redis.call('ZADD', KEYS[k + 5], now + lease, token)
      extend(KEYS[k + 5], math.ceil(lease * 2000))
    end
  end
  if count > 0 then
    redis.call('ZADD', KEYS[k + 3], now, token)
    extend(KEYS[k + 3], math.ceil(interval * 1000) + 1000)
    if KEYS[k + 6] ~= KEYS[k + 3] then
      redis.call('ZREMRANGEBYSCORE', KEYS[k + 6], '-inf', now - interval)
      redis.call('ZADD', KEYS[k + 6], now, token)
      extend(KEYS[k + 6], math.ceil(interval * 1000) + 1000)
    end
  end
  if task ~= '' then redis.call('ZREM', KEYS[k + 4], task) end
end
return {1, tostring(now)}
"""

# KEYS: per held limit, 3: hash, leases, all-leases. ARGV: token, seconds held (-1: unknown), hold weight.
RELEASE = _NOW + """
local seconds, weight = tonumber(ARGV[2]), tonumber(ARGV[3])
for i = 0, #KEYS / 3 - 1 do
  local k = i * 3
  redis.call('ZREM', KEYS[k + 2], ARGV[1])
  if KEYS[k + 3] ~= KEYS[k + 2] then redis.call('ZREM', KEYS[k + 3], ARGV[1]) end
  if seconds >= 0 then
    local hold = tonumber(redis.call('HGET', KEYS[k + 1], 'hold') or '')
    if hold == nil then hold = seconds else hold = hold * (1 - weight) + seconds * weight end
    redis.call('HSET', KEYS[k + 1], 'hold', tostring(hold))
    extend(KEYS[k + 1], 3600000)
  end
end
return tostring(now)
"""

# KEYS: the sorted sets a call's token is in (its slots, its entries in the rate's log). ARGV: the token.
# What an admission took, taken back (before it is asked for again: ``limits.readmit``).
FORGET = """
for i = 1, #KEYS do redis.call('ZREM', KEYS[i], ARGV[1]) end
return 1
"""

# KEYS: leases sets (each with its token in ARGV, after the lease seconds). A slot whose lease ran out is
# not taken back (another call may hold it now).
RENEW = _NOW + """
local lease = tonumber(ARGV[1])
local renewed = 0
for i = 1, #KEYS do
  renewed = renewed + redis.call('ZADD', KEYS[i], 'XX', 'CH', now + lease, ARGV[i + 1])
  extend(KEYS[i], math.ceil(lease * 2000))
end
return renewed
"""

# KEYS: hash. ARGV: seconds. Paused until now + seconds (a longer pause already there stays).
PAUSE = _NOW + """
local ends = now + tonumber(ARGV[1])
local paused = tonumber(redis.call('HGET', KEYS[1], 'paused') or '0')
if ends > paused then
  redis.call('HSET', KEYS[1], 'paused', tostring(ends))
  extend(KEYS[1], math.ceil((ends - now) * 1000) + 3600000)
  return tostring(ends)
end
return tostring(paused)
"""

_scripts_cache: dict[tuple[int, str], Any] = {}


def script(client: Any, source: str) -> Any:
    found = _scripts_cache.get((id(client), source))
    if found is None:
        found = _scripts_cache[(id(client), source)] = client.register_script(source)
    return found


def text(value: Any) -> str:
    return value.decode() if isinstance(value, bytes) else str(value)


# -- the database fallback -----------------------------------------------------------------------


def _using() -> str:
    return router.db_for_write(LimitState) or "default"


def _usage(row: LimitState) -> Usage:
    return Usage(leases=dict(row.leases or {}), log=list(row.log or []), line=row.line, hold=row.hold,
                 paused=row.paused, turns=dict(row.turns or {}))


def _store(row: LimitState, usage: Usage, now: float, using: str) -> None:
    row.leases, row.log, row.line, row.hold = usage.leases, usage.log, usage.line, usage.hold
    row.paused, row.turns, row.updated = usage.paused, usage.turns, now
    row.save(using=using)


def _locked(keys: list[Keys], using: str) -> dict[str, LimitState]:
    """The rows of ``keys``, made if missing, locked (in key order: two checks never wait on each other)."""
    rows = {}
    for key in sorted({key.row: key for key in keys}.values(), key=lambda key: key.row):
        LimitState.objects.using(using).get_or_create(key=key.row, defaults={"name": key.name})
        rows[key.row] = LimitState.objects.using(using).select_for_update().get(key=key.row)
    return rows


def database_acquire(wanted: list[tuple[Limit, Keys]], token: str, task_id: str, lease: float
                     ) -> tuple[bool, float, str, int, float, float, bool]:
    """``ACQUIRE`` on the database: (admitted, now, reason, index, turn, gap, returning)."""
    using = _using()
    now = time.time()
    with transaction.atomic(using=using):
        rows = _locked([keys for _, keys in wanted], using)
        usages = {row_key: _usage(row) for row_key, row in rows.items()}
        worst: tuple[float, str, int, float, bool] | None = None
        for index, (limit, keys) in enumerate(wanted):
            admission = core.admit(limit, usages[keys.row], now, task_id)
            if not admission.admitted and (worst is None or admission.turn > worst[0]):
                worst = (admission.turn, admission.reason, index, admission.gap, admission.returning)
        if worst is None:
            for limit, keys in wanted:
                core.take(limit, usages[keys.row], now, token, lease, task_id)
        for row_key, row in rows.items():
            _store(row, usages[row_key], now, using)
    if worst is None:
        return True, now, "", -1, 0.0, 0.0, False
    return False, now, worst[1], worst[2], worst[0], worst[3], worst[4]


def database_release(held: list[Keys], token: str, seconds: float) -> None:
    using = _using()
    now = time.time()
    with transaction.atomic(using=using):
        for row in _locked(held, using).values():
            usage = _usage(row)
            usage.leases.pop(token, None)
            if seconds >= 0:
                core.held_for(usage, seconds)
            _store(row, usage, now, using)


def database_renew(held: list[tuple[Keys, str]], lease: float) -> int:
    using = _using()
    now = time.time()
    renewed = 0
    with transaction.atomic(using=using):
        rows = _locked([keys for keys, _ in held], using)
        for keys, token in held:
            row = rows[keys.row]
            leases = dict(row.leases or {})
            if token in leases:
                leases[token] = now + lease
                row.leases = leases
                renewed += 1
        for row in rows.values():
            row.save(using=using, update_fields=["leases"])
    return renewed


def database_pause(keys: Keys, seconds: float) -> float:
    using = _using()
    now = time.time()
    with transaction.atomic(using=using):
        row = _locked([keys], using)[keys.row]
        row.paused = max(row.paused, now + seconds)
        row.updated = now
        row.save(using=using, update_fields=["paused", "updated"])
        return row.paused
