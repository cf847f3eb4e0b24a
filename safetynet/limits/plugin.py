"""Limits' part in a task's path: the body does not run until every limit the task names admits it; the task
waits for its turn deferred (a snooze, no attempt used), not in a worker slot."""

from __future__ import annotations

import functools
from collections.abc import Callable, Mapping
from typing import Any, TypeVar

from safetynet import limits
from safetynet.exceptions import ConfigurationError, LimitReached, Transient
from safetynet.protocol.attempt import Attempt, Plugin

__all__ = ["LimitGuard", "limit_names"]

_T = TypeVar("_T")


def limit_names(value: Any) -> tuple[str, ...]:
    """The ``limit`` option as a tuple of names (a name, or a list of them)."""
    if value is None:
        return ()
    if isinstance(value, str):
        return (value,)
    return tuple(value)


class LimitGuard(Plugin):
    """The option ``limit="partner-api"`` (or a list of names): admitted by every limit, or deferred until its
    turn; the concurrency slots are held while the body runs and given back as soon as it ended."""

    name = "limit"
    options = frozenset({"limit"})

    def validate(self, options: Mapping[str, Any], where: str) -> None:
        value = options.get("limit")
        if value is None:
            return
        names = [value] if isinstance(value, str) else value
        if not isinstance(names, (list, tuple)) or not names or not all(
                isinstance(name, str) and name for name in names):
            raise ConfigurationError(f"{where}: limit must be the name of a limit in SAFETYNET['LIMITS'] or a list "
                                     f"of them, got {value!r}")
        if len(set(names)) != len(names):
            raise ConfigurationError(f"{where}: limit names a limit twice: {value!r}")

    def takes_part(self, task: Any) -> bool:
        return bool(getattr(task, "limit", None))

    def before_run(self, attempt: Attempt) -> None:
        task = attempt.task
        body = type(task).run
        try:
            wanted = [(name, limits.partition_of(limits.spec(name), attempt.args, attempt.kwargs, body))
                      for name in limit_names(task.limit)]
        except ConfigurationError as error:
            raise ConfigurationError(f"task {task.name}: {error}") from None
        ticket = _asked(attempt, lambda task_id: limits.acquire_or_skip(wanted, task_id=task_id))
        if ticket is not None:
            attempt.notes[self.name] = ticket

    def around_body(self, attempt: Attempt, body: Callable[[], Any]) -> Any:
        # The slots are given back as soon as the body (and the plug-ins inside it) ended: the next call may
        # start while this run's end is still being recorded.
        ticket = attempt.notes.get(self.name)
        if ticket is not None and ticket.stale():  # admitted too long ago to start now without a second look
            attempt.notes[self.name] = None
            ticket = _asked(attempt, functools.partial(limits.readmit, ticket))
            attempt.notes[self.name] = ticket
        try:
            result = body()
        except BaseException as error:
            attempt.notes[self.name] = None
            limits.finish(ticket, error if attempt.ran else None)
            raise
        attempt.notes[self.name] = None
        limits.finish(ticket, None)
        return result

    def after_run(self, attempt: Attempt, error: BaseException | None) -> None:
        # Only when the body never started (a later guard refused the run): the slots are given back here.
        limits.finish(attempt.notes.get(self.name), error)


def _asked(attempt: Attempt, ask: Callable[..., _T]) -> _T:
    """``ask(task_id=…)`` the limits for this run; refused, a worker run is deferred until its turn (a Snooze, no
    attempt used), an eager run fails (it cannot wait: its retry would run at once, again and again)."""
    try:
        return ask(task_id=str(attempt.request.id or ""))
    except LimitReached as refused:
        if attempt.eager:
            raise Transient(f"{refused}; an eager run cannot wait for it") from None
        raise
