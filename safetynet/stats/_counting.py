"""Counting: per task and minute, in memory in each process; added to ``TaskStats`` in batches.

A task run costs a lock and a few dict updates here; nothing is written while it runs. A background
job in each process (added by the first count, again after a fork) adds the pending counts to
``TaskStats`` every ``STATS_FLUSH_SECONDS``, and at worker shutdown and process exit, in one
transaction: the minute's row and the hour's row of each task get the same counts, so long windows
read hourly rows. Rows are locked while they are added to, so flushes from many processes add up
exactly; a flush the database refuses keeps its counts for the next one.
"""

from __future__ import annotations

import atexit
import bisect
import logging
import math
import os
import threading
import time
from collections.abc import Iterable
from dataclasses import dataclass, field
from datetime import datetime, timedelta, timezone
from typing import Any

from django.db import close_old_connections, transaction
from django.db.models import Q

from safetynet import conf, signals
from safetynet.background import Job, runner
from safetynet.models import TaskStats

__all__ = ["COUNTERS", "OUTCOMES", "RUNTIME_BUCKETS", "count_successes", "flush", "flush_safely", "prune", "record", "sum_lists"]

logger = logging.getLogger("safetynet")

#: Upper bounds (seconds) of the run-time histogram: 1 ms to about 1.6 h, a factor √2 apart, then +inf.
RUNTIME_BUCKETS: tuple[float, ...] = tuple(0.001 * math.sqrt(2) ** index for index in range(44)) + (math.inf,)
OUTCOMES = ("success", "retry", "snooze", "dead")
COUNTERS = ("runs", "successes", "retries", "snoozes", "dead")
_FIELD_OF = {"success": "successes", "retry": "retries", "snooze": "snoozes", "dead": "dead"}


@dataclass
class _Counts:
    runs: int = 0
    successes: int = 0
    retries: int = 0
    snoozes: int = 0
    dead: int = 0
    dead_by_reason: dict[str, int] = field(default_factory=dict)
    runtime_sum: float = 0.0
    runtime_buckets: list[int] = field(default_factory=lambda: [0] * len(RUNTIME_BUCKETS))

    def add(self, other: _Counts) -> None:
        _add_into(self, other)


def _add_into(target: Any, counts: _Counts) -> None:
    """Add ``counts`` to ``target``: another _Counts, or a TaskStats row (the same field names)."""
    for name in COUNTERS:
        setattr(target, name, getattr(target, name) + getattr(counts, name))
    reasons = dict(target.dead_by_reason or {})
    for reason, count in counts.dead_by_reason.items():
        reasons[reason] = reasons.get(reason, 0) + count
    target.dead_by_reason = reasons
    target.runtime_sum += counts.runtime_sum
    target.runtime_buckets = sum_lists(list(target.runtime_buckets or []), counts.runtime_buckets)


def sum_lists(left: list[int], right: list[int]) -> list[int]:
    """Two histograms added bucket by bucket."""
    size = max(len(left), len(right))
    return [(left[i] if i < len(left) else 0) + (right[i] if i < len(right) else 0) for i in range(size)]


_lock = threading.Lock()
#: Held for a whole flush: the flush at exit waits for one the job has under way (its counts are taken).
_flushing = threading.Lock()
#: (minute start as epoch seconds, task name) -> counts not yet in the database.
_pending: dict[tuple[int, str], _Counts] = {}
#: True once this process's flush job runs (a forked child starts with False).
_flushing_job = False


def record(task_name: str, outcome: str, *, runtime: float | None = None, reason: str | None = None,
           at: float | None = None) -> None:
    """Count one outcome of ``task_name`` (success, retry, snooze, dead) in this process."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    if conf.get().stats:
        count(task_name, _FIELD_OF[outcome], runtime, reason, time.time() if at is None else at)


def count(task_name: str, counter: str, runtime: float | None, reason: str | None, at: float) -> None:
    """``record`` without its checks: ``counter`` is one of "successes", "retries", "snoozes", "dead" (every
    task that ends in a worker comes here: it is kept short)."""
    minute = int(at // 60 * 60)
    with _lock:
        counts = _pending.get((minute, task_name))
        if counts is None:
            counts = _pending[(minute, task_name)] = _Counts()
        setattr(counts, counter, getattr(counts, counter) + 1)
        if counter != "snoozes" or runtime is not None:
            counts.runs += 1
        if counter == "dead":
            key = reason or "unknown"
            counts.dead_by_reason[key] = counts.dead_by_reason.get(key, 0) + 1
        if runtime is not None:
            counts.runtime_sum += runtime
            counts.runtime_buckets[bisect.bisect_left(RUNTIME_BUCKETS, max(0.0, runtime))] += 1
    if not _flushing_job:
        _add_flushing_job()


def count_successes(batch: list[tuple[str, float | None, float]]) -> None:
    """Count a batch of successes, each ``(task_name, runtime, at)`` (handed over by ``signals``)."""
    # Grouped by minute and task first (a batch is a second or so of one worker's successes: a few groups), so
    # the lock is taken once and each success costs an append and a bisect.
    grouped: dict[tuple[int, str], list[float | None]] = {}
    for task_name, runtime, at in batch:
        key = (int(at // 60 * 60), task_name)
        runtimes = grouped.get(key)
        if runtimes is None:
            runtimes = grouped[key] = []
        runtimes.append(runtime)
    buckets, find = RUNTIME_BUCKETS, bisect.bisect_left
    with _lock:
        pending = _pending
        for key, runtimes in grouped.items():
            counts = pending.get(key)
            if counts is None:
                counts = pending[key] = _Counts()
            counts.successes += len(runtimes)
            counts.runs += len(runtimes)
            tally = counts.runtime_buckets
            for runtime in runtimes:
                if runtime is not None:
                    counts.runtime_sum += runtime
                    tally[find(buckets, runtime if runtime > 0.0 else 0.0)] += 1
    if not _flushing_job:
        _add_flushing_job()


def _add_flushing_job() -> None:
    global _flushing_job
    _flushing_job = True
    runner.add(Job("stats flush", lambda: flush_safely("periodic"), lambda: conf.get().stats_flush_seconds,
                   at_start=False))


def _take_pending() -> dict[tuple[int, str], _Counts]:
    global _pending
    with _lock:
        taken, _pending = _pending, {}
    return taken


def _put_back(taken: dict[tuple[int, str], _Counts]) -> None:
    with _lock:
        for key, counts in taken.items():
            mine = _pending.get(key)
            if mine is None:
                _pending[key] = counts
            else:
                mine.add(counts)


# -- writing them ----------------------------------------------------------------------------

def flush() -> int:
    """Add this process's pending counts to the database now; return the rows written.

    If the database refuses, the counts stay pending (merged with newer ones) for the next flush.
    """
    signals.drain_successes()  # the successes still waiting for their batch
    with _flushing:
        return _flush()


def _flush() -> int:
    taken = _take_pending()
    if not taken:
        return 0
    by_row: dict[tuple[int, datetime, str], _Counts] = {}
    for (minute, task_name), counts in taken.items():
        for period in (TaskStats.MINUTE, TaskStats.HOUR):
            start = datetime.fromtimestamp(minute // period * period, tz=timezone.utc)
            merged = by_row.setdefault((period, start, task_name), _Counts())
            merged.add(counts)
    try:
        with transaction.atomic():
            # Inserted and locked in one order, so two flushes never wait for each other in a circle.
            TaskStats.objects.bulk_create(
                [TaskStats(period=period, start=start, task_name=name, dead_by_reason={}, runtime_buckets=[])
                 for period, start, name in sorted(by_row)], ignore_conflicts=True)
            condition = _rows_matching(by_row)
            rows = list(TaskStats.objects.select_for_update().filter(condition).order_by("period", "start",
                                                                                           "task_name"))
            for row in rows:  # the condition matches exactly the rows of by_row
                _add_into(row, by_row[(row.period, row.start, row.task_name)])
            TaskStats.objects.bulk_update(rows, [*COUNTERS, "dead_by_reason", "runtime_sum", "runtime_buckets"])
            if len(rows) < len(by_row):  # a prune deleted a row between the insert and the lock: count it next time
                raise _RowsVanished(sorted(set(by_row) - {(row.period, row.start, row.task_name) for row in rows}))
    except Exception:
        _put_back(taken)
        raise
    return len(rows)


class _RowsVanished(RuntimeError):
    """Rows inserted for this flush were gone when it locked them; the flush is undone and tried again."""


def _rows_matching(keys: Iterable[tuple[int, datetime, str]]) -> Any:
    condition = Q(pk__in=[])
    by_start: dict[tuple[int, datetime], list[str]] = {}
    for period, start, name in keys:
        by_start.setdefault((period, start), []).append(name)
    for (period, start), names in by_start.items():
        condition |= Q(period=period, start=start, task_name__in=names)
    return condition


def prune(*, now: datetime | None = None) -> int:
    """Delete minute rows older than STATS_MINUTE_KEEP_SECONDS and hour rows older than STATS_HOUR_KEEP_SECONDS."""
    settings = conf.get()
    now = now or datetime.now(tz=timezone.utc)
    minutes, _ = TaskStats.objects.filter(
        period=TaskStats.MINUTE, start__lt=now - timedelta(seconds=settings.stats_minute_keep_seconds)).delete()
    hours, _ = TaskStats.objects.filter(
        period=TaskStats.HOUR, start__lt=now - timedelta(seconds=settings.stats_hour_keep_seconds)).delete()
    return minutes + hours


def flush_safely(why: str) -> None:
    """``flush``, logging (not raising) a database that refuses; its counts stay pending."""
    try:
        flush()
    except Exception as error:  # the database may be away: the counts stay pending
        logger.info("safetynet: stats flush (%s) postponed: %r", why, error)
    finally:
        close_old_connections()


def _forget_parent_counts() -> None:
    """In a forked child: the parent's pending counts are the parent's to write (and its flush job did not come
    along)."""
    global _pending, _lock, _flushing, _flushing_job
    _lock = threading.Lock()
    _flushing = threading.Lock()
    _pending = {}
    _flushing_job = False


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_counts)
atexit.register(lambda: flush_safely("exit"))
