"""Progress's part in a task's path: tracked when sent, then running, retrying, succeeded or failed.

A task that is not tracked costs nothing here: each hook returns after a header lookup.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Mapping
from datetime import datetime, timedelta, timezone
from typing import Any

from celery.utils import uuid as new_task_id
from django.db import router

from safetynet import conf
from safetynet.core.decision import Retry
from safetynet.exceptions import ConfigurationError
from safetynet.models import ScheduledMessage, TaskProgress
from safetynet.progress._store import owner_of, public_message, track, write
from safetynet.protocol import headers
from safetynet.protocol.attempt import Attempt, Outgoing, Plugin
from safetynet.protocol.events import TaskEnded
from safetynet.redaction import redact

__all__ = ["Progress", "on_task_ended", "report"]

logger = logging.getLogger("safetynet")

_NOTE = "progress"


def _is_tracked(attempt: Attempt) -> bool:
    return bool((attempt.request.headers or {}).get(headers.PROGRESS))


class Progress(Plugin):
    """``apply_async(..., progress_for=user)`` and the states the worker writes."""

    name = _NOTE
    options = frozenset({"progress_result"})
    #: The ``apply_async`` option it reads.
    send_options = frozenset({"progress_for"})
    run_headers = frozenset({headers.PROGRESS})

    def validate(self, options: Mapping[str, Any], where: str) -> None:
        shown = options.get("progress_result")
        if shown is not None and not isinstance(shown, bool):
            raise ConfigurationError(f"{where}: progress_result must be True or False, got {shown!r}")

    def before_send(self, message: Outgoing) -> None:
        user = message.notes.pop("progress_for", None)
        if user is None:
            return
        # Shown to that user: the row first (beside an outbox row, if any), then the message says it is tracked.
        message.task_id = message.task_id or new_task_id()
        track(message.task_id, message.task.name, owner_of(user),
              using=router.db_for_write(ScheduledMessage) or "default")
        message.headers[headers.PROGRESS] = 1

    def before_run(self, attempt: Attempt) -> None:
        if _is_tracked(attempt):
            attempt.notes.setdefault(_NOTE, {})
            write(attempt.request.id, attempt.task.name, state="running", attempt=attempt.number,
                  next_attempt_at=None)

    def after_success(self, attempt: Attempt, result: Any) -> None:
        if _NOTE in attempt.notes:  # tracked, or it reported progress
            _succeeded(attempt.request.id, attempt.task, attempt.number, result, attempt.notes)

    def on_retry(self, attempt: Attempt, retry: Retry, message: Outgoing) -> None:
        if _is_tracked(attempt) or _NOTE in attempt.notes:
            due = datetime.now(tz=timezone.utc) + timedelta(seconds=retry.delay)
            attempt_number = attempt.number + 1 if retry.consumes_attempt else attempt.number
            write(attempt.request.id, attempt.task.name, state="retrying", attempt=attempt_number,
                  next_attempt_at=due)

    def after_run(self, attempt: Attempt, error: BaseException | None) -> None:
        fields = _pending(attempt.notes)
        if fields:  # the retry or the give-up wrote the state: keep the last numbers reported
            fields.pop("state", None)
            write(attempt.request.id, attempt.task.name, **fields)


def _pending(notes: Mapping[str, Any]) -> dict[str, Any]:
    """The numbers ``self.progress()`` held back (throttled), taken."""
    state = notes.get(_NOTE)
    if not state or not state.get("pending"):
        return {}
    fields = dict(state["pending"])
    state["pending"] = None
    return fields


def report(attempt: Attempt | None, current: float, total: float | None = None, message: str = "") -> None:
    """``self.progress(...)``: validate, and write at most every PROGRESS_MIN_INTERVAL seconds per attempt."""
    for name, value in (("current", current), ("total", total)):
        if value is None and name == "total":
            continue
        if isinstance(value, bool) or not isinstance(value, (int, float)):
            raise TypeError(f"progress(): {name} must be a number, got {value!r}")
        if not value >= 0:
            raise ValueError(f"progress(): {name} must be 0 or more, got {value!r}")
    if total is not None and current > total:
        raise ValueError(f"progress(): current ({current!r}) is more than total ({total!r})")
    if not isinstance(message, str):
        raise TypeError(f"progress(): message must be a string, got {message!r}")
    if attempt is None:
        return  # a plain function call: nobody is watching
    fields = {"state": "running", "current": float(current), "total": None if total is None else float(total),
              "message": message[:255], "attempt": attempt.number, "next_attempt_at": None}
    state = attempt.notes.setdefault(_NOTE, {})
    now = time.monotonic()
    last = state.get("written")
    if last is not None and now - last < conf.get().progress_min_interval:
        state["pending"] = fields  # written with the next call, or when the attempt ends
        return
    state["written"] = now
    state["pending"] = None
    write(attempt.request.id, attempt.task.name, **fields)


def _shown_result(task: Any, value: Any) -> Any:
    if not getattr(task, "progress_result", False):
        return None
    _, redacted, _ = redact([], {"result": value})
    try:
        json.dumps(redacted["result"])
    except (TypeError, ValueError):
        logger.info("safetynet: the result of %s is not JSON; not shown", task.name, extra={"task_name": task.name})
        return None
    return redacted["result"]


def _succeeded(task_id: str, task: Any, attempts: int, result: Any, notes: Mapping[str, Any]) -> None:
    fields = _pending(notes)
    total = fields.get("total")
    if total is None:
        total = TaskProgress.objects.filter(task_id=task_id).values_list("total", flat=True).first()
    write(task_id, task.name, **{**fields, "state": "succeeded", "attempt": attempts,
                                 "current": total if total is not None else fields.get("current"),
                                 "total": total, "next_attempt_at": None, "result": _shown_result(task, result)})


def on_task_ended(event: TaskEnded) -> None:
    """The end, wherever it happened: succeeded (with the result if shown), or failed (a safe message). A success in
    the run's own path is written by ``Progress.after_success``; this consumer is registered for deaths."""
    if not (event.headers.get(headers.PROGRESS) or _NOTE in event.notes):
        return
    if not event.dead:
        _succeeded(event.task_id, event.task, event.attempts, event.result, event.notes)
        return
    error = public_message(event.exception) if event.exception is not None else conf.get().progress_error_message
    write(event.task_id, event.task_name, state="failed", error=error, next_attempt_at=None)
