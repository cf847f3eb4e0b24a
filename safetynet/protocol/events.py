"""The terminal event: one for every way a task ends, sent exactly once.

Success (in the process that ran it) and every death (decided by the core, found by the worker's
main process, by the consumer for a message no task can run, or by the relay for a message no
worker took) produce one ``TaskEnded``. Stats, Prometheus, Sentry, alerts and progress consume it
through ``safetynet.signals.task_ended``; none of them re-derives "count once".
"""

from __future__ import annotations

from collections.abc import Mapping
from dataclasses import dataclass, field
from enum import StrEnum
from typing import TYPE_CHECKING, Any

from safetynet.protocol.history import HistoryEntry
from safetynet.protocol.reasons import Reason

if TYPE_CHECKING:
    from safetynet.protocol.attempt import Attempt

#: An empty mapping shared by events that have no headers (read-only by contract).
_NONE: Mapping[str, Any] = {}

__all__ = ["DeadLetterFacts", "Outcome", "TaskEnded"]


class Outcome(StrEnum):
    """How a task ended."""

    SUCCEEDED = "succeeded"
    DEAD = "dead"


@dataclass(frozen=True)
class DeadLetterFacts:
    """What the dead-letter store kept of a death, redacted (``id`` is None unless it was stored)."""

    id: int | None
    fingerprint: str
    exception_type: str
    exception_message: str
    traceback: str
    detail: str
    queue: str
    worker: str
    #: Where values were replaced by "[redacted]" (``kwargs.card_token``).
    redacted: tuple[str, ...] = ()
    headers: Mapping[str, Any] = field(default_factory=dict)
    #: Where the record is: "database" (a row, ``id``), "spool" (the database did not answer: moved in later),
    #: "quarantine" (the database refused it even made storable: a file in the spool's quarantine folder),
    #: "log" (neither the database nor the spool could take it: the whole record is in an ERROR log line).
    kept_in: str = "database"


@dataclass(slots=True)
class TaskEnded:
    """A task ended: it succeeded, or it was given up (and recorded as a dead letter).

    Read-only by contract (it is not frozen only because a frozen dataclass costs three times as
    much to make, and one is made for every task).
    """

    task_name: str
    task_id: str
    outcome: Outcome
    #: Why it was given up (None for a success).
    reason: Reason | None = None
    #: The decision's or the worker's words about it.
    detail: str = ""
    #: The number of the attempt that ended it (1 for the first).
    attempts: int = 1
    #: How long its last attempt ran in this process, in seconds (None: it did not run here).
    runtime: float | None = None
    #: The exception that ended it, live when it ended in the process that ran it (None otherwise).
    exception: BaseException | None = None
    #: Every attempt kept, the last one included.
    history: tuple[HistoryEntry, ...] = ()
    #: Attempts dropped from the bounded history.
    omitted: int = 0
    args: tuple[Any, ...] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: The message's custom headers.
    headers: Mapping[str, Any] = field(default_factory=dict)
    #: The task object, when it ended in the process that ran it.
    task: Any = None
    #: The return value (a success).
    result: Any = None
    #: The dead letter stored for it (a death that was recorded).
    dead_letter: DeadLetterFacts | None = None
    #: What the plug-ins kept of the run (``Attempt.notes``), by plug-in name.
    notes: Mapping[str, Any] = field(default_factory=dict)
    #: True for a run in eager mode (``task_always_eager``, the simulator): nothing is recorded.
    eager: bool = False

    @property
    def dead(self) -> bool:
        """True if the task was given up."""
        return self.outcome is Outcome.DEAD

    @classmethod
    def succeeded(cls, attempt: Attempt, result: Any, runtime: float) -> TaskEnded:
        """The event of a run that succeeded."""
        request = attempt.request
        return cls(attempt.task.name, request.id, Outcome.SUCCEEDED, None, "", attempt.number, runtime, None, (), 0,
                   attempt.args, attempt.kwargs, request.headers or _NONE, attempt.task, result, None, attempt.notes,
                   attempt.eager)
