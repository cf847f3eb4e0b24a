"""Reading the dashboard's numbers: a window's summaries per task and in all, and the series its charts draw."""

from __future__ import annotations

import math
from dataclasses import dataclass
from datetime import datetime, timedelta, timezone
from typing import Any

from safetynet.models import TaskStats
from safetynet.stats._counting import COUNTERS, RUNTIME_BUCKETS, sum_lists

__all__ = ["WINDOWS", "Overview", "TaskSummary", "human_duration", "overview", "percentile"]

WINDOWS: dict[str, int] = {"1h": 3600, "24h": 86_400, "7d": 7 * 86_400}

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
    #: Run time per step (seconds; None where nothing ran), from the step's histogram.
    p50s: list[float | None]
    p95s: list[float | None]


def human_duration(seconds: float | None) -> str:
    """A duration as people read it: 850 µs, 12 ms, 1.4 s, 3 min 20 s, 2 h 5 min (never "0.000 s")."""
    if seconds is None:
        return "–"
    if seconds < 0.001:
        return "under 1 ms" if seconds < 0.0005 else "1 ms"
    if seconds < 1:
        return f"{seconds * 1000:.0f} ms"
    if seconds < 10:
        return f"{seconds:.1f} s".replace(".0 s", " s")
    if seconds < 60:
        return f"{seconds:.0f} s"
    if seconds < 3600:
        minutes, rest = divmod(round(seconds), 60)
        return f"{minutes} min" + (f" {rest} s" if rest else "")
    if seconds < 86_400:
        hours, rest = divmod(round(seconds / 60), 60)
        return f"{hours} h" + (f" {rest} min" if rest else "")
    days, rest = divmod(round(seconds / 3600), 24)
    return f"{days} d" + (f" {rest} h" if rest else "")


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
        buckets = sum_lists(buckets, row["runtime_buckets"] or [])
    return TaskSummary(
        task_name=name, **{counter: sum(row[counter] for row in rows) for counter in COUNTERS},
        dead_by_reason=dict(sorted(reasons.items(), key=lambda item: -item[1])),
        p50=percentile(buckets, 0.5), p95=percentile(buckets, 0.95),
    )


def overview(window: int, *, now: datetime | None = None, task_name: str | None = None) -> Overview:
    """The window that ends with the current minute (1 h) or hour (24 h, 7 d): per task, in all, and per step."""
    step = TaskStats.MINUTE if window <= 3600 else TaskStats.HOUR
    now = now or datetime.now(tz=timezone.utc)
    epoch = now.timestamp()
    end = datetime.fromtimestamp(epoch // step * step + step, tz=timezone.utc)
    start = end - timedelta(seconds=window)
    rows = TaskStats.objects.filter(period=step, start__gte=start, start__lt=end)
    if task_name:
        rows = rows.filter(task_name=task_name)
    fetched = list(rows.values("task_name", "start", *COUNTERS, "dead_by_reason", "runtime_buckets"))
    by_task: dict[str, list[dict[str, Any]]] = {}
    for row in fetched:
        by_task.setdefault(row["task_name"], []).append(row)
    tasks = sorted((_summary(name, task_rows) for name, task_rows in by_task.items()),
                   key=lambda summary: (-summary.runs, summary.task_name))
    points = [start + timedelta(seconds=step * index) for index in range(window // step)]
    index_of = {point: index for index, point in enumerate(points)}
    series = {name: [0] * len(points) for name in ("successes", "retries", "dead")}
    histograms: list[list[int]] = [[] for _ in points]
    for row in fetched:
        index = index_of.get(row["start"])
        if index is not None:
            for name, values in series.items():
                values[index] += row[name]
            histograms[index] = sum_lists(histograms[index], row["runtime_buckets"] or [])
    return Overview(window=window, step=step, start=start, end=end, tasks=tasks, totals=_summary("", fetched),
                    points=points, p50s=[percentile(buckets, 0.5) for buckets in histograms],
                    p95s=[percentile(buckets, 0.95) for buckets in histograms], **series)
