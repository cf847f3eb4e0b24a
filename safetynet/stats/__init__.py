"""The dashboard's numbers: per task and minute, counted in memory by each process, added to the database in batches.

Where the counts come from (the same events as ``contrib.prometheus``, so both agree):

- ``signals.task_ended``: a ``success`` (with its run time), or a task given up (``dead``, by
  reason), whichever process found it (so each ending counts once);
- ``signals.task_retrying``: a ``retry`` (with its run time) or a ``snooze`` (a deferral that used
  no attempt).

An outcome is counted under its task's name, except a death found before any task ran (an unknown
task, an undecodable or malformed message: ``reasons.FROM_MESSAGE``) whose name no registered task
has: those count under ``UNREGISTERED`` (``counted_name``), so that names from the broker cannot grow
the stats table or Prometheus' labels without bound.

Run times go into a histogram of ``RUNTIME_BUCKETS`` (bounds a factor √2 apart); p50 and p95 are
read from it by interpolating inside the bucket, so they are within a factor √2 (about ±41 %)
of the true value, and usually much closer.
"""

from __future__ import annotations

import time
from typing import Any

from celery import current_app
from celery import signals as celery_signals

from safetynet import conf, signals
from safetynet.protocol.events import TaskEnded
from safetynet.protocol.reasons import FROM_MESSAGE
from safetynet.stats._counting import (
    OUTCOMES,
    RUNTIME_BUCKETS,
    count,
    count_successes,
    flush,
    flush_safely,
    prune,
    record,
)
from safetynet.stats._reading import (
    WINDOWS,
    Overview,
    TaskSummary,
    human_duration,
    overview,
    percentile,
)

__all__ = ["OUTCOMES", "RUNTIME_BUCKETS", "UNREGISTERED", "WINDOWS", "Overview", "TaskSummary", "connect",
           "counted_name", "flush", "human_duration", "overview", "percentile", "prune", "record"]

#: The task name a death is counted under when only its message named the task, and no task of that name is
#: registered in the process that counts it.
UNREGISTERED = "(unregistered)"


def counted_name(task_name: str, reason: str | None = None) -> str:
    """The task name to count an outcome under (stats rows, metric labels): ``task_name``, or ``UNREGISTERED``
    for a death found before any task ran whose name no task registered here has."""
    if reason not in FROM_MESSAGE:
        return task_name
    try:
        registered = task_name in current_app._get_current_object().tasks
    except Exception:  # an app that cannot list its tasks: the name is not trusted
        registered = False
    return task_name if registered else UNREGISTERED


def _on_task_ended(event: TaskEnded) -> None:
    if conf.get().stats:
        count(counted_name(event.task_name, event.reason), "dead" if event.dead else "successes", event.runtime,
              str(event.reason) if event.dead else None, time.time())


def _on_successes(batch: list[tuple[str, float | None, float]]) -> None:
    if conf.get().stats:
        count_successes(batch)


def _on_retrying(sender: Any = None, entry: dict[str, Any] | None = None, **_: Any) -> None:
    name = getattr(sender, "name", None)
    if name:
        snooze = (entry or {}).get("action") == "snooze"
        duration = (entry or {}).get("duration")
        runtime = None if snooze or not isinstance(duration, (int, float)) else float(duration)
        record(name, "snooze" if snooze else "retry", runtime=runtime)


def _on_worker_stopping(**_: Any) -> None:
    flush_safely("shutdown")


def connect() -> None:
    """Connect the receivers (from the AppConfig); each checks ``STATS`` when it counts."""
    celery_signals.worker_process_shutdown.connect(_on_worker_stopping, dispatch_uid="safetynet.stats.child",
                                                   weak=False)
    celery_signals.worker_shutdown.connect(_on_worker_stopping, dispatch_uid="safetynet.stats.worker", weak=False)
    signals.consume("safetynet.stats", _on_task_ended, on_successes=_on_successes)
    signals.task_retrying.connect(_on_retrying, dispatch_uid="safetynet.stats.retrying", weak=False)
