"""Signals safetynet sends, each with ``sender`` the task object.

``task_retrying``: an attempt failed and another is scheduled.
    kwargs: task_id, attempt, delay (seconds), reason, exception, entry (the history entry)
``task_dead``: a task was given up; its original exception is what fails it.
    kwargs: task_id, reason (retries_exhausted, permanent_error, deadline_exceeded), detail,
    exception, history (every attempt kept, the last one included), omitted (attempts dropped
    from the bounded history), args, kwargs

Receivers run in the worker; one that raises is logged and does not change the outcome.
"""

from django.dispatch import Signal

__all__ = ["task_dead", "task_retrying"]

task_retrying = Signal()
task_dead = Signal()
