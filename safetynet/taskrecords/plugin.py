"""The part of a ``django.tasks`` task's path that keeps its ``TaskRecord`` true: each attempt's end, the retry it
waits for, its death, its replay; a task's own ``backoff(exception, task_result)``; Django's task signals.

The body (``safetynet.runtime.django_tasks``) notes what it ran in ``attempt.notes["django_tasks"]``: the
``TaskResult`` it showed the function, the row's fields, the attempt's error. The hooks here write it.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from safetynet.core.decision import Dead, Retry
from safetynet.protocol.attempt import Attempt, Outgoing, Plugin
from safetynet.protocol.events import TaskEnded
from safetynet.protocol.reasons import Reason
from safetynet.redaction import redact_text
from safetynet.taskrecords import _compat, _store

__all__ = ["HEADER", "NOTE", "PREFIX", "DjangoTasks", "error_of", "on_task_ended", "on_task_replayed"]

logger = logging.getLogger("safetynet")

#: ``attempt.notes`` key of the run's state.
NOTE = "django_tasks"
#: The Celery task name of a ``django.tasks`` task: this prefix and its ``module_path``.
PREFIX = "django.tasks:"
#: The message header that says how a ``django.tasks`` task was enqueued (backend alias, queue, priority, time).
HEADER = "safetynet_django_task"


def error_of(exception: BaseException, traceback_text: str | None = None, *,
             clean: Callable[[str], str] = redact_text) -> dict[str, str]:
    """A ``TaskError``'s fields: the exception's class path and its traceback, redacted like a dead letter's
    (``clean``: the task's own cleaner, which also blanks the values of its sensitive arguments)."""
    import traceback

    klass = type(exception)
    text = traceback_text if traceback_text is not None else "".join(traceback.format_exception(exception))
    return {"exception_class_path": f"{klass.__module__}.{klass.__qualname__}", "traceback": clean(text)}


def _set(result: Any, **fields: Any) -> None:
    for name, value in fields.items():  # TaskResult is frozen: Django's own backends write it so
        object.__setattr__(result, name, value)


def _send(signal_name: str, state: Mapping[str, Any]) -> None:
    signal = getattr(_compat.signals, signal_name)
    for receiver, response in signal.send_robust(sender=state["backend_class"], task_result=state["result"]):
        if isinstance(response, Exception):
            logger.error("safetynet: %s receiver %r failed: %r", signal_name, receiver, response)


class DjangoTasks(Plugin):
    """A ``django.tasks`` task run by the Celery backend: its record, its ``backoff``, Django's signals."""

    name = NOTE

    def takes_part(self, task: Any) -> bool:
        return getattr(task, "_django_task", None) is not None

    def adjust(self, attempt: Attempt, retry: Retry) -> Retry | Dead:
        state = attempt.notes.get(NOTE)
        backoff = state.get("backoff") if state else None
        if backoff is None or attempt.settled is None:
            return retry
        result = state["result"]
        if state.get("error"):
            result.errors.append(_compat.TaskError(**state["error"]))
        try:
            delay = backoff(attempt.settled, result)
        except Exception as error:  # the user's function failed: the policy's retry stands, and it says so
            logger.exception("safetynet: backoff() of %s failed (%r); the retry policy decides",
                             attempt.task.name, error)
            return retry
        finally:
            if state.get("error"):
                result.errors.pop()
        if delay is None:
            return Dead(Reason.PERMANENT_ERROR, f"backoff() returned None after attempt {attempt.number}")
        if isinstance(delay, bool) or not isinstance(delay, (int, float)) or delay < 0:
            logger.error("safetynet: backoff() of %s returned %r, not a number of seconds >= 0 or None; the retry "
                         "policy decides", attempt.task.name, delay)
            return retry
        return Retry(float(delay), f"backoff() after attempt {attempt.number}")

    def around_body(self, attempt: Attempt, call: Callable[[], Any]) -> Any:
        result = call()
        if not attempt.ran and NOTE not in attempt.notes:  # a later plug-in answered for the body
            _answered_without_running(attempt, result)
        return result

    def on_retry(self, attempt: Attempt, retry: Retry, message: Outgoing) -> None:
        state = attempt.notes.get(NOTE)
        if state is None or not retry.consumes_attempt:
            return  # a deferral ran no attempt: the row still waits
        _write_end(attempt.request.id, state, _compat.TaskResultStatus.READY, finished=None)

    def after_success(self, attempt: Attempt, result: Any) -> None:
        state = attempt.notes[NOTE]
        finished = time.time()
        _write_end(attempt.request.id, state, _compat.TaskResultStatus.SUCCESSFUL, finished=finished,
                   return_value=state.get("return_value"))
        _set(state["result"], status=_compat.TaskResultStatus.SUCCESSFUL, finished_at=_store.moment(finished),
             _return_value=state.get("return_value"))
        _send("task_finished", state)


def _answered_without_running(attempt: Attempt, result: Any) -> None:
    """The run returned without running the function: an idempotency key that already succeeded gave its stored
    result. The record says so: ``SUCCESSFUL`` with that value (the attempt ran on this worker)."""
    request = attempt.request
    meta = (request.headers or {}).get(HEADER) or {}
    module_path = str(getattr(attempt.task, "_django_task", "") or "")
    now = time.time()
    fields = {"backend": str(meta.get("backend") or "default"), "module_path": module_path,
              "queue_name": str(meta.get("queue") or "default"), "priority": int(meta.get("priority") or 0),
              "run_after": _store.moment(meta.get("run_after")), "args": list(attempt.args),
              "kwargs": dict(attempt.kwargs), "enqueued_at": _store.moment(meta.get("enqueued_at"))}
    try:
        value = _compat.normalize_json(result)
        _store.attempt_ended(request.id, fields, attempt=attempt.number, started=now,
                             worker_id=str(request.hostname or ""), status=str(_compat.TaskResultStatus.SUCCESSFUL),
                             finished=now, return_value=value)
    except Exception:  # the record must not change the task's outcome
        logger.exception("safetynet: could not write the result of %s[%s]", module_path, request.id)


def _write_end(result_id: str, state: Mapping[str, Any], status: str, *, finished: float | None,
               return_value: Any = None) -> None:
    try:
        _store.attempt_ended(result_id, state["fields"], attempt=state["attempt"], started=state["started"],
                             worker_id=state["worker_id"], status=str(status), error=state.get("error"),
                             finished=finished, return_value=return_value)
    except Exception:  # the record must not change the task's outcome
        logger.exception("safetynet: could not write the result of %s[%s]", state["fields"]["module_path"],
                         result_id)


def on_task_ended(event: TaskEnded) -> None:
    """A death (the terminal event's consumer): the row is ``FAILED``, with its dead letter."""
    if not event.task_name.startswith(PREFIX):
        return
    state = event.notes.get(NOTE)
    error = state.get("error") if state else None
    if error is None and event.exception is not None:
        traceback_text = event.dead_letter.traceback if event.dead_letter is not None else None
        error = error_of(event.exception, traceback_text)
    finished = time.time()
    try:
        _store.dead(event.task_id, event.dead_letter.id if event.dead_letter is not None else None, error,
                    attempt=state["attempt"] if state else event.attempts,
                    worker_id=state["worker_id"] if state else "", finished=finished)
    except Exception:
        logger.exception("safetynet: could not write the failure of %s[%s]", event.task_name, event.task_id)
        return
    if state is not None:
        if error is not None:
            state["result"].errors.append(_compat.TaskError(**error))
        _set(state["result"], status=_compat.TaskResultStatus.FAILED, finished_at=_store.moment(finished))
        _send("task_finished", state)


def on_task_replayed(sender: Any = None, dead_letter: Any = None, new_task_id: str = "", **_: Any) -> None:
    """``task_replayed``: a dead letter of a ``django.tasks`` task was sent again; its new result waits, linked."""
    if dead_letter is None or not str(dead_letter.task_name).startswith(PREFIX):
        return
    try:
        _store.replayed(dead_letter.task_id, new_task_id, time.time())
    except Exception:
        logger.exception("safetynet: could not write the result of the replay %s of %s", new_task_id,
                         dead_letter.task_id)
