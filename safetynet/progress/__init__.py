"""User-facing progress: what a task shows the person who started it, and nothing more.

Sending a task with ``progress_for=request.user`` writes a ``TaskProgress`` row (queued, owned by
that user) and adds the header ``safetynet_progress`` to the message, so the worker knows the
task is tracked without a database read; the header travels with every retry. While it runs, a
bound task calls ``self.progress(current, total, message=...)``; the worker writes its state
(running, retrying, succeeded, failed). The progress endpoint (``safetynet.progress.urls``) and
the ``{% progress_widget %}`` tag read it.

What a user is shown is only what is safe to show: the state, the numbers and message the task
reported, the attempt, when the next one is due; on success the return value if the task
declared ``progress_result=True`` (dict values under ``REDACT_KEYS`` redacted); on failure the
exception's ``public_message`` (a str attribute you set), else ``PROGRESS_ERROR_MESSAGE``. Never
the exception's text, a traceback, or the arguments.

A task that is not tracked costs nothing here: each receiver returns after a header lookup.
"""

from __future__ import annotations

import json
import logging
import time
from datetime import datetime, timedelta, timezone
from typing import Any

from safetynet import conf

__all__ = ["HEADER", "as_json", "can_see", "carry_over", "connect", "owner_of", "purge", "report", "status_of", "track"]

logger = logging.getLogger("safetynet")

#: The message header that marks a tracked task.
HEADER = "safetynet_progress"
_PENDING = "_safetynet_progress_pending"
_WRITTEN = "_safetynet_progress_written"


def owner_of(user: Any) -> str:
    """The ``owner`` stored for ``progress_for``: a user (authenticated) or a user's primary key."""
    if isinstance(user, (int, str)) and not isinstance(user, bool):
        if str(user) == "":
            raise ValueError("progress_for: a user id must not be empty")
        return f"user:{user}"
    if getattr(user, "is_authenticated", False) and getattr(user, "pk", None) is not None:
        return f"user:{user.pk}"
    raise ValueError(f"progress_for takes a logged-in user or a user id, got {user!r} "
                     "(an anonymous user cannot be the only one allowed to see a task)")


def track(task_id: str, task_name: str, owner: str, *, using: str | None = None) -> None:
    """Record that ``task_id`` is shown to ``owner`` (before its message is sent)."""
    from safetynet.models import TaskProgress

    TaskProgress.objects.using(using).update_or_create(
        task_id=task_id, defaults={"task_name": task_name, "owner": owner, "state": TaskProgress.State.QUEUED})


def carry_over(old_task_id: str, new_task_id: str, task_name: str) -> None:
    """A replay of ``old_task_id`` (a dead letter) is shown to the same owner (before its message is sent)."""
    from safetynet.models import TaskProgress

    owner = TaskProgress.objects.filter(task_id=old_task_id).values_list("owner", flat=True).first()
    if owner:
        track(new_task_id, task_name, owner)


def _is_tracked(request: Any) -> bool:
    return bool((getattr(request, "headers", None) or {}).get(HEADER))


def _attempt_of(task: Any) -> int:
    try:
        return int(task.attempt)
    except Exception:  # a plain Celery request without safetynet headers
        return int(getattr(task.request, "retries", 0) or 0) + 1


def _write(task_id: str, task_name: str, **fields: Any) -> None:
    from safetynet.models import TaskProgress

    updated = TaskProgress.objects.filter(task_id=task_id).update(**fields, updated_at=datetime.now(tz=timezone.utc))
    if not updated:
        TaskProgress.objects.update_or_create(task_id=task_id, defaults={"task_name": task_name, **fields})


def _write_safely(task: Any, **fields: Any) -> None:
    """A progress write never changes the task's outcome: a database that refuses is logged."""
    request = task.request
    try:
        _write(request.id, task.name, **fields)
    except Exception as error:
        logger.warning("safetynet: progress of %s[%s] not written: %r", task.name, request.id, error,
                       extra={"task_name": task.name, "task_id": request.id})


def report(task: Any, current: float, total: float | None = None, message: str = "") -> None:
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
    request = task.request
    if request.called_directly:
        return  # a plain function call: nobody is watching
    fields = {"state": "running", "current": float(current), "total": None if total is None else float(total),
              "message": message[:255], "attempt": _attempt_of(task), "next_attempt_at": None}
    now = time.monotonic()
    last = getattr(request, _WRITTEN, None)
    if last is not None and now - last < conf.get().progress_min_interval:
        setattr(request, _PENDING, fields)  # written with the next call, or when the attempt ends
        return
    setattr(request, _WRITTEN, now)
    setattr(request, _PENDING, None)
    _write_safely(task, **fields)


def _pending_fields(request: Any) -> dict[str, Any]:
    fields = getattr(request, _PENDING, None) or {}
    setattr(request, _PENDING, None)
    return fields


def _reported(request: Any) -> bool:
    return getattr(request, _WRITTEN, None) is not None


# -- the outcome, from the worker ------------------------------------------------------------

def _on_prerun(sender: Any = None, **_: Any) -> None:
    request = getattr(sender, "request", None)
    if request is not None and _is_tracked(request) and not request.called_directly:
        _write_safely(sender, state="running", attempt=_attempt_of(sender), next_attempt_at=None)


def _shown_result(task: Any, value: Any) -> Any:
    if not getattr(task, "progress_result", False):
        return None
    from safetynet import deadletter

    _, redacted, _ = deadletter.redact([], {"result": value})
    try:
        json.dumps(redacted["result"])
    except (TypeError, ValueError):
        logger.info("safetynet: the result of %s is not JSON; not shown", task.name, extra={"task_name": task.name})
        return None
    return redacted["result"]


def _on_postrun(sender: Any = None, state: str | None = None, retval: Any = None, **_: Any) -> None:
    request = getattr(sender, "request", None)
    if request is None or not (_is_tracked(request) or _reported(request)):
        return
    fields = _pending_fields(request)
    if state == "SUCCESS":
        total = fields.get("total")
        from safetynet.models import TaskProgress

        if total is None:
            total = TaskProgress.objects.filter(task_id=request.id).values_list("total", flat=True).first()
        _write_safely(sender, **{**fields, "state": "succeeded", "attempt": _attempt_of(sender),
                                 "current": total if total is not None else fields.get("current"), "total": total,
                                 "next_attempt_at": None, "result": _shown_result(sender, retval)})
    elif fields:
        fields.pop("state", None)  # the retry or give-up wrote the state; keep the last numbers
        _write_safely(sender, **fields)


def _on_retrying(sender: Any = None, delay: float | None = None, attempt: int | None = None, **_: Any) -> None:
    request = getattr(sender, "request", None)
    if request is None or not (_is_tracked(request) or _reported(request)) or request.called_directly:
        return
    due = None if delay is None else datetime.now(tz=timezone.utc) + timedelta(seconds=delay)
    _write_safely(sender, state="retrying", attempt=(attempt or _attempt_of(sender)) + 1, next_attempt_at=due)


def public_message(exception: Any) -> str:
    """What a user is told about a failure: the exception's ``public_message``, else PROGRESS_ERROR_MESSAGE."""
    shown = getattr(exception, "public_message", None)
    if isinstance(shown, str) and shown.strip():
        return shown[:500]
    return conf.get().progress_error_message


def _on_dead(sender: Any = None, exception: Any = None, **_: Any) -> None:
    request = getattr(sender, "request", None)
    if request is None or not (_is_tracked(request) or _reported(request)) or request.called_directly:
        return
    _write_safely(sender, state="failed", error=public_message(exception), next_attempt_at=None)


def _on_dead_letter(dead_letter: Any = None, **_: Any) -> None:
    """Deaths the worker's main process records (time limit, crash loop, lost worker) end the progress too."""
    if dead_letter is None or not (dead_letter.headers or {}).get(HEADER):
        return
    from safetynet.models import TaskProgress

    try:
        TaskProgress.objects.filter(task_id=dead_letter.task_id).exclude(state=TaskProgress.State.FAILED).update(
            state=TaskProgress.State.FAILED, error=conf.get().progress_error_message, next_attempt_at=None,
            updated_at=datetime.now(tz=timezone.utc))
    except Exception as error:
        logger.warning("safetynet: progress of %s not marked failed: %r", dead_letter.task_id, error)


def connect() -> None:
    """Connect the worker-side receivers (from the AppConfig)."""
    from celery import signals as celery_signals

    from safetynet import signals

    celery_signals.task_prerun.connect(_on_prerun, dispatch_uid="safetynet.progress.prerun", weak=False)
    celery_signals.task_postrun.connect(_on_postrun, dispatch_uid="safetynet.progress.postrun", weak=False)
    signals.task_retrying.connect(_on_retrying, dispatch_uid="safetynet.progress.retrying", weak=False)
    signals.task_dead.connect(_on_dead, dispatch_uid="safetynet.progress.dead", weak=False)
    signals.dead_letter_recorded.connect(_on_dead_letter, dispatch_uid="safetynet.progress.dead_letter", weak=False)


# -- reading it ---------------------------------------------------------------------------------

def as_json(progress: Any) -> dict[str, Any]:
    """What the endpoint answers for a row: only what a user may see."""
    percent = None
    if progress.total and progress.current is not None:
        percent = round(min(100.0, 100.0 * progress.current / progress.total), 1)
    shown: dict[str, Any] = {
        "task_id": progress.task_id, "state": progress.state, "current": progress.current, "total": progress.total,
        "percent": 100.0 if progress.state == "succeeded" and progress.total else percent,
        "message": progress.message, "attempt": progress.attempt,
        "next_attempt_at": progress.next_attempt_at.isoformat() if progress.next_attempt_at else None,
        "done": progress.state in ("succeeded", "failed"),
    }
    if progress.state == "succeeded" and progress.result is not None:
        shown["result"] = progress.result
    if progress.state == "failed":
        shown["error"] = progress.error or conf.get().progress_error_message
    return shown


def can_see(request: Any, progress: Any) -> bool:
    """PROGRESS_ACCESS, else: its owner, or active staff with safetynet.view_taskprogress."""
    check = conf.get().progress_access
    if check is not None:
        return bool(check(request, progress))
    user = request.user
    if not user.is_authenticated:
        return False
    if progress.owner and progress.owner == f"user:{user.pk}":
        return True
    return bool(user.is_active and user.is_staff and user.has_perm("safetynet.view_taskprogress"))


def status_of(task_id: str) -> dict[str, Any] | None:
    """The endpoint's answer for ``task_id``, for a server-rendered page (no access check: do your own)."""
    from safetynet.models import TaskProgress

    progress = TaskProgress.objects.filter(task_id=task_id).first()
    return None if progress is None else as_json(progress)


def purge(older_than: datetime | None = None) -> int:
    """Delete progress rows not changed since ``older_than`` (default: PROGRESS_KEEP_SECONDS ago); return how many.

    Workers call it once an hour (with the stats flush); ``manage.py safetynet progress purge`` too.
    """
    from safetynet.models import TaskProgress

    if older_than is None:
        older_than = datetime.now(tz=timezone.utc) - timedelta(seconds=conf.get().progress_keep_seconds)
    deleted, _ = TaskProgress.objects.filter(updated_at__lt=older_than).delete()
    return deleted
