"""Signals safetynet sends: the task signals with ``sender`` the task object, the dead-letter
signals with ``sender`` the ``DeadLetter`` model.

``task_retrying``: an attempt failed and another is scheduled.
    kwargs: task_id, attempt, delay (seconds), reason, exception, entry (the history entry), args, kwargs
``task_dead``: a task was given up; its original exception is what fails it.
    kwargs: task_id, reason (retries_exhausted, permanent_error, deadline_exceeded), detail,
    exception, history (every attempt kept, the last one included), omitted (attempts dropped
    from the bounded history), args, kwargs

``dead_letter_recorded``: a new DeadLetter row was stored. kwargs: dead_letter
``task_replayed``: a dead letter was sent again. kwargs: dead_letter, new_task_id, by
``dead_letters_evicted``: the store's cap deleted the oldest rows. kwargs: count, cap, oldest

``breaker_changed``: a breaker changed state (sender None). kwargs: name, state ("open",
    "half_open", "closed"), at (seconds since the epoch), by_hand (forced by staff)
``breaker_refused``: a breaker refused a call (sender None). kwargs: name, state

Receivers run where the event happens (mostly the worker); one that raises is logged and
does not change the outcome.
"""

from django.dispatch import Signal

__all__ = ["breaker_changed", "breaker_refused", "dead_letter_recorded", "dead_letters_evicted", "task_dead",
           "task_replayed", "task_retrying"]

task_retrying = Signal()
task_dead = Signal()
dead_letter_recorded = Signal()
task_replayed = Signal()
dead_letters_evicted = Signal()
breaker_changed = Signal()
breaker_refused = Signal()
