"""Why a task was given up: one ``StrEnum`` for the models, dead letters, signals, logs and metrics."""

from __future__ import annotations

from enum import StrEnum

from safetynet.core import decision

__all__ = ["DECIDED", "FROM_MESSAGE", "Reason"]


class Reason(StrEnum):
    """The reason a task ended as a dead letter; each member equals its stored text."""

    RETRIES_EXHAUSTED = decision.RETRIES_EXHAUSTED
    PERMANENT_ERROR = decision.PERMANENT_ERROR
    DEADLINE_EXCEEDED = decision.DEADLINE_EXCEEDED
    TIME_LIMIT = "time_limit"
    CRASH_LOOP = "crash_loop"
    UNKNOWN_TASK = "unknown_task"
    UNDECODABLE = "undecodable"
    MALFORMED = "malformed"
    REJECTED = "rejected"
    WORKER_LOST = "worker_lost"

    @property
    def label(self) -> str:
        """How a person reads it: "retries exhausted", "hard time limit"."""
        return _LABELS[self]


_LABELS = {
    Reason.RETRIES_EXHAUSTED: "retries exhausted",
    Reason.PERMANENT_ERROR: "permanent error",
    Reason.DEADLINE_EXCEEDED: "deadline exceeded",
    Reason.TIME_LIMIT: "hard time limit",
    Reason.CRASH_LOOP: "crash loop",
    Reason.UNKNOWN_TASK: "unknown task",
    Reason.UNDECODABLE: "undecodable message",
    Reason.MALFORMED: "malformed message",
    Reason.REJECTED: "rejected",
    Reason.WORKER_LOST: "worker lost",
}

#: The reasons the decision core gives (``core.decide``); the others are found by the worker itself.
DECIDED: frozenset[Reason] = frozenset({Reason.RETRIES_EXHAUSTED, Reason.PERMANENT_ERROR, Reason.DEADLINE_EXCEEDED})

#: The reasons found before any task ran: their task name is only what the message said (any text).
FROM_MESSAGE: frozenset[Reason] = frozenset({Reason.UNKNOWN_TASK, Reason.UNDECODABLE, Reason.MALFORMED})
