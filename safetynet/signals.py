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

``breaker_changed``: a breaker changed state (sender None). kwargs: name, state ("open",
    "half_open", "closed"), at (seconds since the epoch), by_hand (forced by staff)
``breaker_refused``: a breaker refused a call (sender None). kwargs: name, state

Receivers run where the event happens (mostly the worker); one that raises is logged and
does not change the outcome.

``consume(key, consumer, successes=True)`` hands every terminal event straight to ``consumer(event)``,
before ``task_ended``'s receivers and at a fraction of a signal's cost (one event is sent per task):
safetynet's stats, Prometheus, Sentry, alerts and progress consume this way. ``successes=False`` for a
consumer that wants deaths only; ``stop_consuming(key)`` undoes it.
"""

from __future__ import annotations

import logging

from collections.abc import Callable

from django.dispatch import Signal

from safetynet.protocol.events import TaskEnded
from safetynet.protocol import reasons

__all__ = ["announce", "breaker_changed", "breaker_refused", "consume", "dead_letter_recorded", "dead_letters_evicted",
           "stop_consuming", "task_dead", "task_ended", "task_replayed", "task_retrying"]

logger = logging.getLogger("safetynet")

task_ended = Signal()
task_retrying = Signal()
task_dead = Signal()
dead_letter_recorded = Signal()
task_replayed = Signal()
dead_letters_evicted = Signal()
breaker_changed = Signal()
breaker_refused = Signal()


#: safetynet's own consumers of the terminal event (stats, Prometheus, Sentry, alerts, progress), by key:
#: called directly, in order, before ``task_ended``'s receivers (a Django signal costs several times more, and
#: one event is sent for every task).
_consumers: dict[str, tuple[Callable[[TaskEnded], object], bool]] = {}
_for_successes: tuple[Callable[[TaskEnded], object], ...] = ()
_for_deaths: tuple[Callable[[TaskEnded], object], ...] = ()


def consume(key: str, consumer: Callable[[TaskEnded], object], *, successes: bool = True) -> None:
    """Hand every terminal event to ``consumer`` (deaths only when ``successes`` is False); once per ``key``."""
    _consumers[key] = (consumer, successes)
    _rebuild()


def stop_consuming(key: str) -> None:
    """Undo ``consume(key, ...)``."""
    _consumers.pop(key, None)
    _rebuild()


def _rebuild() -> None:
    global _for_successes, _for_deaths
    _for_successes = tuple(found for found, wants in _consumers.values() if wants)
    _for_deaths = tuple(found for found, _ in _consumers.values())


def announce(event: TaskEnded) -> None:
    """Send the terminal event (once per task: the caller's duty): to safetynet's consumers, to the receivers of
    ``task_ended``, and, for a death the core decided, ``task_dead``."""
    for consumer in _for_deaths if event.dead else _for_successes:
        try:
            consumer(event)
        except Exception as error:  # a consumer must not change the task's outcome
            logger.error("safetynet: terminal-event consumer %r failed: %r", consumer, error,
                         exc_info=(type(error), error, error.__traceback__))
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
