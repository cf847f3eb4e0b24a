"""Progress rows: who may see a task, what it shows them, and housekeeping."""

from __future__ import annotations

import logging
from datetime import datetime, timedelta, timezone
from typing import Any

from safetynet import conf
from safetynet.models import DeadLetter, TaskProgress

__all__ = ["as_json", "can_see", "carry_over", "owner_of", "public_message", "purge", "replayed_as", "status_of",
           "track", "write"]

logger = logging.getLogger("safetynet")


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
    TaskProgress.objects.using(using).update_or_create(
        task_id=task_id, defaults={"task_name": task_name, "owner": owner, "state": TaskProgress.State.QUEUED})


def carry_over(old_task_id: str, new_task_id: str, task_name: str) -> None:
    """A replay of ``old_task_id`` (a dead letter) is shown to the same owner (before its message is sent)."""
    owner = TaskProgress.objects.filter(task_id=old_task_id).values_list("owner", flat=True).first()
    if owner:
        track(new_task_id, task_name, owner)


def write(task_id: str, task_name: str, **fields: Any) -> None:
    """Change a task's row (made if it is not there); never raising: progress must not change the outcome."""
    try:
        updated = TaskProgress.objects.filter(task_id=task_id).update(**fields,
                                                                      updated_at=datetime.now(tz=timezone.utc))
        if not updated:
            TaskProgress.objects.update_or_create(task_id=task_id, defaults={"task_name": task_name, **fields})
    except Exception as error:
        logger.warning("safetynet: progress of %s[%s] not written: %r", task_name, task_id, error,
                       extra={"task_name": task_name, "task_id": task_id})


def public_message(exception: Any) -> str:
    """What a user is told about a failure: the exception's ``public_message``, else PROGRESS_ERROR_MESSAGE."""
    shown = getattr(exception, "public_message", None)
    if isinstance(shown, str) and shown.strip():
        return shown[:500]
    return conf.get().progress_error_message


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


def replayed_as(progress: Any) -> Any:
    """The progress row of the replay of a failed task (its dead letter replayed, the replay tracked), or None.

    A replay carries the owner over (``carry_over``): a user who watched the first run follows it here.
    Asked only of a failed row, so a running task costs nothing.
    """
    if progress.state != TaskProgress.State.FAILED:
        return None
    new_id = (DeadLetter.objects.filter(task_id=progress.task_id).exclude(replayed_task_id="")
              .values_list("replayed_task_id", flat=True).first())
    return TaskProgress.objects.filter(task_id=new_id).first() if new_id else None


def status_of(task_id: str) -> dict[str, Any] | None:
    """The endpoint's answer for ``task_id``, for a server-rendered page (no access check: do your own).

    A failed task whose dead letter was replayed says so: ``replayed_as`` is the new task id.
    """
    progress = TaskProgress.objects.filter(task_id=task_id).first()
    if progress is None:
        return None
    shown = as_json(progress)
    replay = replayed_as(progress)
    if replay is not None:
        shown["replayed_as"] = replay.task_id
    return shown


def purge(older_than: datetime | None = None) -> int:
    """Delete progress rows not changed since ``older_than`` (default: PROGRESS_KEEP_SECONDS ago); return how many.

    Workers call it once an hour (housekeeping); ``manage.py safetynet progress purge`` too.
    """
    if older_than is None:
        older_than = datetime.now(tz=timezone.utc) - timedelta(seconds=conf.get().progress_keep_seconds)
    deleted, _ = TaskProgress.objects.filter(updated_at__lt=older_than).delete()
    return int(deleted)
