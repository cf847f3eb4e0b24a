"""Signal receivers that run in the worker and write what happened to ``TaskEvent``.

They only record; run.py reads the rows back to print its report.
"""

import threading
import time

from celery.signals import task_prerun, task_success
from django.dispatch import receiver

from safetynet.signals import task_dead, task_retrying
from shop.models import TaskEvent

# When the running attempt started, per worker thread (the pool is threads).
_attempt = threading.local()


def _ours(task) -> bool:
    return getattr(task, "name", "").startswith("shop.")


def _describe(exception) -> str | None:
    return None if exception is None else f"{type(exception).__name__}: {exception}"


@task_prerun.connect
def remember_start(sender=None, task_id=None, **kwargs):
    _attempt.started = time.time()


@receiver(task_retrying)
def record_retrying(sender, task_id, attempt, delay, reason, exception, entry, **kwargs):
    if _ours(sender):
        TaskEvent.objects.create(
            task_id=task_id, task_name=sender.name, kind=TaskEvent.Kind.RETRYING, attempt=attempt,
            payload={"delay": delay, "reason": reason, "exception": _describe(exception), "entry": entry},
            recorded_at=time.time(),
        )


@receiver(task_dead)
def record_dead(sender, task_id, reason, detail, exception, history, omitted, args, kwargs, **extra):
    if _ours(sender):
        TaskEvent.objects.create(
            task_id=task_id, task_name=sender.name, kind=TaskEvent.Kind.DEAD,
            attempt=history[-1]["attempt"] if history else None,
            payload={"reason": reason, "detail": detail, "exception": _describe(exception), "history": history,
                     "omitted": omitted, "args": list(args or ()), "kwargs": dict(kwargs or {})},
            recorded_at=time.time(),
        )


@task_success.connect
def record_success(sender=None, result=None, **kwargs):
    if _ours(sender):
        now = time.time()
        TaskEvent.objects.create(
            task_id=sender.request.id, task_name=sender.name, kind=TaskEvent.Kind.SUCCESS, attempt=sender.attempt,
            payload={"result": repr(result)[:300], "started": getattr(_attempt, "started", None),
                     "worker": sender.request.hostname},
            recorded_at=now,
        )
