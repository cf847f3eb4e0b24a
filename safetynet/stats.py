"""The dashboard's numbers: per task and minute, counted in memory by each process, added to the database in batches.

A task run costs a lock and a few dict updates here; nothing is written while it runs. A thread in
each process (started by the first count, again after a fork) adds the pending counts to
``TaskStats`` every ``STATS_FLUSH_SECONDS``, and at worker shutdown and process exit, in one
transaction: the minute's row and the hour's row of each task get the same counts, so long
windows read hourly rows. Rows are locked while they are added to, so flushes from many
processes add up exactly; a flush the database refuses keeps its counts for the next one.

Where the counts come from (the same signals as ``contrib.prometheus``, so both agree):

- Celery ``task_prerun``/``task_postrun`` of safetynet tasks: the run time of every attempt, and a
  ``success`` when it ended in state SUCCESS;
- ``signals.task_retrying``: a ``retry`` or a ``snooze`` (a deferral that used no attempt);
- ``signals.task_dead``: a task given up (retries_exhausted, permanent_error, deadline_exceeded);
  ``signals.dead_letter_recorded`` adds the reasons no ``task_dead`` is sent for (time_limit,
  crash_loop, worker_lost, rejected, unknown_task, undecodable), so each give-up counts once.

Run times go into a histogram of ``RUNTIME_BUCKETS`` (bounds a factor √2 apart); p50 and p95 are
read from it by interpolating inside the bucket, so they are within a factor √2 (about ±41 %)
of the true value, and usually much closer.
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

from safetynet import conf

__all__ = ["RUNTIME_BUCKETS", "WINDOWS", "Overview", "TaskSummary", "connect", "flush", "overview", "prune",
           "record"]

logger = logging.getLogger("safetynet")

WINDOWS: dict[str, int] = {"1h": 3600, "24h": 86_400, "7d": 7 * 86_400}
#: Upper bounds (seconds) of the run-time histogram: 1 ms to about 1.6 h, a factor √2 apart, then +inf.
RUNTIME_BUCKETS: tuple[float, ...] = tuple(0.001 * math.sqrt(2) ** index for index in range(44)) + (math.inf,)
OUTCOMES = ("success", "retry", "snooze", "dead")
#: The reasons ``task_dead`` is sent for; other reasons are counted from ``dead_letter_recorded``.
TASK_DEAD_REASONS = frozenset({"retries_exhausted", "permanent_error", "deadline_exceeded"})
_COUNTERS = ("runs", "successes", "retries", "snoozes", "dead")
_FIELD_OF = {"success": "successes", "retry": "retries", "snooze": "snoozes", "dead": "dead"}


# -- counting, in memory ------------------------------------------------------------------------

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
    for name in _COUNTERS:
        setattr(target, name, getattr(target, name) + getattr(counts, name))
    reasons = dict(target.dead_by_reason or {})
    for reason, count in counts.dead_by_reason.items():
        reasons[reason] = reasons.get(reason, 0) + count
    target.dead_by_reason = reasons
    target.runtime_sum += counts.runtime_sum
    target.runtime_buckets = _sum_lists(list(target.runtime_buckets or []), counts.runtime_buckets)


def _sum_lists(left: list[int], right: list[int]) -> list[int]:
    size = max(len(left), len(right))
    return [(left[i] if i < len(left) else 0) + (right[i] if i < len(right) else 0) for i in range(size)]


_lock = threading.Lock()
#: Held for a whole flush: the flush at exit waits for one the thread has under way (its counts are taken).
_flushing = threading.Lock()
#: (minute start as epoch seconds, task name) -> counts not yet in the database.
_pending: dict[tuple[int, str], _Counts] = {}
_thread: threading.Thread | None = None
_thread_pid = 0


def record(task_name: str, outcome: str, *, runtime: float | None = None, reason: str | None = None,
           at: float | None = None) -> None:
    """Count one outcome of ``task_name`` (success, retry, snooze, dead) in this process."""
    if outcome not in OUTCOMES:
        raise ValueError(f"outcome must be one of {', '.join(OUTCOMES)}, got {outcome!r}")
    if not conf.get().stats:
        return
    minute = int((time.time() if at is None else at) // 60 * 60)
    with _lock:
        counts = _pending.get((minute, task_name))
        if counts is None:
            counts = _pending[(minute, task_name)] = _Counts()
        setattr(counts, _FIELD_OF[outcome], getattr(counts, _FIELD_OF[outcome]) + 1)
        if outcome != "snooze" or runtime is not None:
            counts.runs += 1
        if outcome == "dead":
            key = reason or "unknown"
            counts.dead_by_reason[key] = counts.dead_by_reason.get(key, 0) + 1
        if runtime is not None:
            counts.runtime_sum += runtime
            counts.runtime_buckets[bisect.bisect_left(RUNTIME_BUCKETS, max(0.0, runtime))] += 1
    if _thread_pid != os.getpid() or _thread is None or not _thread.is_alive():
        _start_flusher()


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
    with _flushing:
        return _flush()


def _flush() -> int:
    from django.db import transaction

    from safetynet.models import TaskStats

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
            TaskStats.objects.bulk_update(rows, [*_COUNTERS, "dead_by_reason", "runtime_sum", "runtime_buckets"])
            if len(rows) < len(by_row):  # a prune deleted a row between the insert and the lock: count it next time
                raise _RowsVanished(sorted(set(by_row) - {(row.period, row.start, row.task_name) for row in rows}))
    except Exception:
        _put_back(taken)
        raise
    return len(rows)


class _RowsVanished(RuntimeError):
    """Rows inserted for this flush were gone when it locked them; the flush is undone and tried again."""


def _rows_matching(keys: Iterable[tuple[int, datetime, str]]) -> Any:
    from django.db.models import Q

    condition = Q(pk__in=[])
    by_start: dict[tuple[int, datetime], list[str]] = {}
    for period, start, name in keys:
        by_start.setdefault((period, start), []).append(name)
    for (period, start), names in by_start.items():
        condition |= Q(period=period, start=start, task_name__in=names)
    return condition


def prune(*, now: datetime | None = None) -> int:
    """Delete minute rows older than STATS_MINUTE_KEEP_SECONDS and hour rows older than STATS_HOUR_KEEP_SECONDS."""
    from safetynet.models import TaskStats

    settings = conf.get()
    now = now or datetime.now(tz=timezone.utc)
    minutes, _ = TaskStats.objects.filter(
        period=TaskStats.MINUTE, start__lt=now - timedelta(seconds=settings.stats_minute_keep_seconds)).delete()
    hours, _ = TaskStats.objects.filter(
        period=TaskStats.HOUR, start__lt=now - timedelta(seconds=settings.stats_hour_keep_seconds)).delete()
    return minutes + hours


def _housekeeping() -> None:
    """Once an hour in each worker process: drop old stats rows and old progress rows."""
    from django.db import close_old_connections

    from safetynet import progress

    for name, job in (("stats prune", prune), ("progress purge", progress.purge)):
        try:
            job()
        except Exception as error:  # the database may be away: the next hour tries again
            logger.info("safetynet: %s postponed: %r", name, error)
    close_old_connections()


def _flush_safely(why: str) -> None:
    from django.db import close_old_connections

    try:
        flush()
    except Exception as error:  # the database may be away: the counts stay pending
        logger.info("safetynet: stats flush (%s) postponed: %r", why, error)
    finally:
        close_old_connections()


def _start_flusher() -> None:
    """One flushing thread per process (a forked child starts its own)."""
    global _thread, _thread_pid
    with _lock:
        if _thread_pid == os.getpid() and _thread is not None and _thread.is_alive():
            return
        _thread_pid = os.getpid()

        def loop() -> None:
            pruned = 0.0
            while True:
                try:
                    time.sleep(conf.get().stats_flush_seconds)
                    _flush_safely("periodic")
                    if time.time() - pruned > 3600:
                        pruned = time.time()
                        _housekeeping()
                except Exception as error:  # never let the thread die: counts would pile up unwritten
                    logger.warning("safetynet: stats flusher: %r", error)
                    time.sleep(1)

        _thread = threading.Thread(target=loop, name="safetynet-stats-flusher", daemon=True)
        _thread.start()


def _forget_parent_counts() -> None:
    """In a forked child: the parent's pending counts are the parent's to write."""
    global _pending, _lock, _flushing, _thread
    _lock = threading.Lock()
    _flushing = threading.Lock()
    _pending = {}
    _thread = None


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_parent_counts)
atexit.register(lambda: _flush_safely("exit"))


# -- receivers ---------------------------------------------------------------------------------

_STARTED = "_safetynet_stats_started"


def _is_safety_task(sender: Any) -> bool:
    from safetynet.runtime.task import SafetyTask

    return isinstance(sender, SafetyTask)


def _runtime(task: Any) -> float | None:
    started = getattr(getattr(task, "request", None), _STARTED, None)
    return None if started is None else time.perf_counter() - started


def _on_prerun(sender: Any = None, **_: Any) -> None:
    if _is_safety_task(sender):
        setattr(sender.request, _STARTED, time.perf_counter())


def _on_postrun(sender: Any = None, state: str | None = None, **_: Any) -> None:
    if state == "SUCCESS" and _is_safety_task(sender):
        record(sender.name, "success", runtime=_runtime(sender))


def _on_retrying(sender: Any = None, entry: dict[str, Any] | None = None, **_: Any) -> None:
    name = getattr(sender, "name", None)
    if name:
        snooze = (entry or {}).get("action") == "snooze"
        record(name, "snooze" if snooze else "retry", runtime=None if snooze else _runtime(sender))


def _on_dead(sender: Any = None, reason: str | None = None, **_: Any) -> None:
    name = getattr(sender, "name", None)
    if name:
        record(name, "dead", reason=reason, runtime=_runtime(sender))


def _on_dead_letter(dead_letter: Any = None, **_: Any) -> None:
    if dead_letter is not None and dead_letter.reason not in TASK_DEAD_REASONS:
        record(dead_letter.task_name, "dead", reason=dead_letter.reason)


def _on_worker_stopping(**_: Any) -> None:
    _flush_safely("shutdown")


def connect() -> None:
    """Connect the receivers (from the AppConfig); each checks ``STATS`` when it counts."""
    from celery import signals as celery_signals

    from safetynet import signals

    celery_signals.task_prerun.connect(_on_prerun, dispatch_uid="safetynet.stats.prerun", weak=False)
    celery_signals.task_postrun.connect(_on_postrun, dispatch_uid="safetynet.stats.postrun", weak=False)
    celery_signals.worker_process_shutdown.connect(_on_worker_stopping, dispatch_uid="safetynet.stats.child",
                                                   weak=False)
    celery_signals.worker_shutdown.connect(_on_worker_stopping, dispatch_uid="safetynet.stats.worker", weak=False)
    signals.task_retrying.connect(_on_retrying, dispatch_uid="safetynet.stats.retrying", weak=False)
    signals.task_dead.connect(_on_dead, dispatch_uid="safetynet.stats.dead", weak=False)
    signals.dead_letter_recorded.connect(_on_dead_letter, dispatch_uid="safetynet.stats.dead_letter", weak=False)


# -- reading them ------------------------------------------------------------------------------

@dataclass(frozen=True)
class TaskSummary:
    """What one task (or, with an empty name, every task) did over a window."""

    task_name: str
    runs: int
    successes: int
    retries: int
    snoozes: int
    dead: int
    dead_by_reason: dict[str, int]
    p50: float | None
    p95: float | None

    @property
    def success_rate(self) -> float | None:
        """Of the tasks that ended (succeeded or given up), the share that succeeded."""
        ended = self.successes + self.dead
        return self.successes / ended if ended else None


@dataclass(frozen=True)
class Overview:
    """A window's summaries per task and in all, and the series its charts draw."""

    window: int
    step: int
    start: datetime
    end: datetime
    tasks: list[TaskSummary]
    totals: TaskSummary
    points: list[datetime]
    successes: list[int]
    retries: list[int]
    dead: list[int]


def percentile(buckets: list[int], share: float) -> float | None:
    """The run time below which ``share`` of the runs fall, read from a histogram of RUNTIME_BUCKETS."""
    total = sum(buckets)
    if not total:
        return None
    wanted = share * total
    seen = 0
    for index, count in enumerate(buckets):
        if count and seen + count >= wanted:
            low = RUNTIME_BUCKETS[index - 1] if index else 0.0
            high = RUNTIME_BUCKETS[index] if index < len(RUNTIME_BUCKETS) else math.inf
            if math.isinf(high):
                return low
            return low + (high - low) * (wanted - seen) / count
        seen += count
    return RUNTIME_BUCKETS[-2]


def _summary(name: str, rows: list[dict[str, Any]]) -> TaskSummary:
    reasons: dict[str, int] = {}
    buckets: list[int] = []
    for row in rows:
        for reason, count in (row["dead_by_reason"] or {}).items():
            reasons[reason] = reasons.get(reason, 0) + count
        buckets = _sum_lists(buckets, row["runtime_buckets"] or [])
    return TaskSummary(
        task_name=name, **{counter: sum(row[counter] for row in rows) for counter in _COUNTERS},
        dead_by_reason=dict(sorted(reasons.items(), key=lambda item: -item[1])),
        p50=percentile(buckets, 0.5), p95=percentile(buckets, 0.95),
    )


def overview(window: int, *, now: datetime | None = None, task_name: str | None = None) -> Overview:
    """The window that ends with the current minute (1 h) or hour (24 h, 7 d): per task, in all, and per step."""
    from safetynet.models import TaskStats

    step = TaskStats.MINUTE if window <= 3600 else TaskStats.HOUR
    now = now or datetime.now(tz=timezone.utc)
    epoch = now.timestamp()
    end = datetime.fromtimestamp(epoch // step * step + step, tz=timezone.utc)
    start = end - timedelta(seconds=window)
    rows = TaskStats.objects.filter(period=step, start__gte=start, start__lt=end)
    if task_name:
        rows = rows.filter(task_name=task_name)
    fetched = list(rows.values("task_name", "start", *_COUNTERS, "dead_by_reason", "runtime_buckets"))
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in fetched:
        by_task.setdefault(row["task_name"], []).append(row)
    tasks = sorted((_summary(name, task_rows) for name, task_rows in by_task.items()),
                   key=lambda summary: (-summary.runs, summary.task_name))
    points = [start + timedelta(seconds=step * index) for index in range(window // step)]
    index_of = {point: index for index, point in enumerate(points)}
    series = {name: [0] * len(points) for name in ("successes", "retries", "dead")}
    for row in fetched:
        index = index_of.get(row["start"])
        if index is not None:
            for name, values in series.items():
                values[index] += row[name]
    return Overview(window=window, step=step, start=start, end=end, tasks=tasks, totals=_summary("", fetched),
                    points=points, **series)
