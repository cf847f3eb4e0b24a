"""Signals safetynet sends: the task signals with ``sender`` the task object (None when the task ended
outside the process that ran it), the dead-letter signals with ``sender`` the ``DeadLetter`` model.

``task_ended``: a task ended, once, however it ended. kwargs: ``event``, a
    ``safetynet.typing.TaskEnded`` (outcome succeeded or dead, reason, detail, attempts, run time,
    exception, history, arguments, and for a death what the dead-letter store kept). Sent in the
    worker child for a success and for a death the core decided, in the worker's main process for a
    hard time limit, a lost worker or a crash loop, by the consumer for an unknown task or a message
    it cannot decode, and by the relay for a message no worker took.
``task_retrying``: an attempt failed and another is scheduled.
    kwargs: task_id, attempt, delay (seconds), reason, exception, entry (the history entry), args, kwargs
``task_dead``: a task was given up by the decision core; its original exception is what fails it.
    kwargs: task_id, reason (retries_exhausted, permanent_error, deadline_exceeded), detail,
    exception, history (every attempt kept, the last one included), omitted (attempts dropped
    from the bounded history), args, kwargs. Sent with ``task_ended``, for those deaths only.

``dead_letter_recorded``: a new DeadLetter row was stored. kwargs: dead_letter
``task_replayed``: a dead letter was sent again. kwargs: dead_letter, new_task_id, by
``dead_letters_evicted``: the store's cap deleted the oldest rows. kwargs: count, cap, oldest
``dead_letter_quarantined``: a record was moved to (or written in) the spool's quarantine folder and
    will never be stored. kwargs: path (where it is now), why, kind ("untrusted": a spool file that is
    not a regular file signed with this project's SECRET_KEY; "unstorable": a record the database
    refused even after it was made storable), task_name and task_id ("" when unknown), record (the
    redacted fields of an unstorable record; None for an untrusted file, whose content is never read out)

``breaker_changed``: a breaker changed state (sender None). kwargs: name, state ("open",
    "half_open", "closed"), at (seconds since the epoch), by_hand (forced by staff)
``breaker_refused``: a breaker refused a call (sender None). kwargs: name, state
``limit_deferred``: a limit refused a call, which waits for its turn (sender None). kwargs: name, partition
    ("" when not partitioned), reason ("concurrency", "rate", "paused"), wait (seconds)
``limit_paused``: a 429, or staff, paused a limit (sender None). kwargs: name, partition, seconds, by_hand
    (``safetynet limits pause``)

Receivers run where the event happens (mostly the worker); one that raises is logged and
does not change the outcome.

``consume(key, consumer, successes=True)`` hands every terminal event straight to ``consumer(event)``,
before ``task_ended``'s receivers and at a fraction of a signal's cost (one event is sent per task):
safetynet's stats, Prometheus, Sentry, alerts and progress consume this way. ``successes=False`` for a
consumer that wants deaths only; ``stop_consuming(key)`` undoes it.
"""

from __future__ import annotations

import atexit
import logging
import os
import threading
import time
from collections import deque
from collections.abc import Callable
from typing import TYPE_CHECKING, Any

from django.dispatch import Signal

from safetynet.background import Job, runner
from safetynet.protocol.events import TaskEnded
from safetynet.protocol import reasons

if TYPE_CHECKING:
    from safetynet.protocol.attempt import Attempt

__all__ = ["announce", "announce_success", "breaker_changed", "breaker_refused", "consume", "dead_letter_quarantined",
           "dead_letter_recorded", "dead_letters_evicted", "drain_successes", "limit_deferred", "limit_paused",
           "stop_consuming", "task_dead", "task_ended",
           "task_replayed", "task_retrying"]

logger = logging.getLogger("safetynet")

task_ended = Signal()
task_retrying = Signal()
task_dead = Signal()
dead_letter_recorded = Signal()
task_replayed = Signal()
dead_letters_evicted = Signal()
dead_letter_quarantined = Signal()
breaker_changed = Signal()
breaker_refused = Signal()
limit_deferred = Signal()
limit_paused = Signal()


#: A success as batch consumers get it: (task name, run time in seconds or None, when it ended).
_Success = tuple[str, float | None, float]

#: safetynet's own consumers of the terminal event (stats, Prometheus, Sentry, alerts, progress), by key:
#: called directly, in order, before ``task_ended``'s receivers (a Django signal costs several times more, and
#: one event is sent for every task).
_consumers: dict[str, tuple[Callable[[TaskEnded], object], bool, Callable[[list[_Success]], object] | None]] = {}
_for_successes: tuple[Callable[[TaskEnded], object], ...] = ()
_for_deaths: tuple[Callable[[TaskEnded], object], ...] = ()
_batches: tuple[Callable[[list[_Success]], object], ...] = ()

#: Successes not yet handed to the batch consumers (appending to a deque is safe from any thread).
_successes: deque[_Success] = deque()
#: Seconds between two batches; past this many successes waiting, the batch is handed over at once.
_BATCH_SECONDS = 1.0
_BATCH_MOST = 50_000
_draining = threading.Lock()
_job_added = False


def consume(key: str, consumer: Callable[[TaskEnded], object], *, successes: bool = True,
            on_successes: Callable[[list[_Success]], object] | None = None) -> None:
    """Hand every terminal event to ``consumer`` (deaths only when ``successes`` is False); once per ``key``.

    ``on_successes(batch)``, if given, takes the successes instead of ``consumer``: a list of
    ``(task_name, runtime, at)``, handed over every ``_BATCH_SECONDS`` from a background thread (and by
    ``drain_successes()``, which a reader calls first). A counter needs no more, a success then costs one
    append, and no event is made for a success unless another consumer or a receiver wants it whole.
    """
    _consumers[key] = (consumer, successes, on_successes)
    _rebuild()


def stop_consuming(key: str) -> None:
    """Undo ``consume(key, ...)`` (the successes already waiting are handed to it first)."""
    if key in _consumers:
        drain_successes()
    _consumers.pop(key, None)
    _rebuild()


def _rebuild() -> None:
    global _for_successes, _for_deaths, _batches
    _for_successes = tuple(found for found, wants, batch in _consumers.values() if wants and batch is None)
    _for_deaths = tuple(found for found, _, _ in _consumers.values())
    _batches = tuple(batch for _, wants, batch in _consumers.values() if wants and batch is not None)


def _failed(consumer: object, error: Exception) -> None:
    logger.error("safetynet: terminal-event consumer %r failed: %r", consumer, error,
                 exc_info=(type(error), error, error.__traceback__))


def announce_success(attempt: Attempt, result: Any, runtime: float) -> None:
    """A run succeeded: count it, and make its event only if a consumer or a ``task_ended`` receiver wants it
    whole (one success is announced per run: the caller's duty)."""
    if _batches:  # _count(), inline: one is counted per task
        _successes.append((attempt.task.name, runtime, time.time()))
        if not _job_added or len(_successes) >= _BATCH_MOST:
            _count_slowly()
    if _for_successes or task_ended.receivers:
        _deliver(TaskEnded.succeeded(attempt, result, runtime), _for_successes)


def _count(task_name: str, runtime: float | None) -> None:
    _successes.append((task_name, runtime, time.time()))
    if not _job_added or len(_successes) >= _BATCH_MOST:
        _count_slowly()


def _count_slowly() -> None:
    """The first success of a process starts its batch job; past ``_BATCH_MOST`` waiting (the background thread
    is behind), this thread hands them over itself."""
    global _job_added
    if not _job_added:
        _job_added = True
        runner.add(Job("success batches", drain_successes, _BATCH_SECONDS, at_start=False))
    if len(_successes) >= _BATCH_MOST:
        drain_successes()


def drain_successes() -> None:
    """Hand the successes waiting to the batch consumers now (a reader of their counts calls this first)."""
    with _draining:
        waiting = len(_successes)
        if not waiting:
            return
        batch = [_successes.popleft() for _ in range(waiting)]
        for consumer in _batches:
            try:
                consumer(batch)
            except Exception as error:  # a consumer must not stop the others
                _failed(consumer, error)


def _forget_parent() -> None:
    """In a forked child: the parent's waiting successes and its background job are not this process's."""
    global _draining, _job_added
    _successes.clear()
    _draining = threading.Lock()
    _job_added = False


os.register_at_fork(after_in_child=_forget_parent)
atexit.register(drain_successes)


def announce(event: TaskEnded) -> None:
    """Send the terminal event (once per task: the caller's duty): to safetynet's consumers, to the receivers of
    ``task_ended``, and, for a death the core decided, ``task_dead``."""
    if event.dead:
        _deliver(event, _for_deaths)
        return
    if _batches:
        _count(event.task_name, event.runtime)
    _deliver(event, _for_successes)


def _deliver(event: TaskEnded, consumers: tuple[Callable[[TaskEnded], object], ...]) -> None:
    for consumer in consumers:
        try:
            consumer(event)
        except Exception as error:  # a consumer must not change the task's outcome
            _failed(consumer, error)
    if task_ended.receivers:
        for receiver, response in task_ended.send_robust(sender=event.task, event=event):
            if isinstance(response, Exception):
                logger.error("safetynet: task_ended receiver %r failed: %r", receiver, response,
                             exc_info=(type(response), response, response.__traceback__))
    if event.dead and event.task is not None and event.reason in reasons.DECIDED:
        for receiver, response in task_dead.send_robust(
            sender=event.task, task_id=event.task_id, reason=str(event.reason), detail=event.detail,
            exception=event.exception, history=list(event.history), omitted=event.omitted, args=event.args,
            kwargs=event.kwargs,
        ):
            if isinstance(response, Exception):
                logger.error("safetynet: task_dead receiver %r failed: %r", receiver, response)
