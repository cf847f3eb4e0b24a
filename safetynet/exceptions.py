"""Every exception safetynet defines.

The hierarchy::

    SafetynetError
     ├── ConfigurationError          a setting, task option or policy value is wrong
     ├── IdempotencyKeyError         a task's arguments make no valid idempotency key (also a ValueError)
     ├── KeyInProgress               an eager run met a key another run holds
     ├── CrashLoop                   the task killed its worker max_deliveries times: dead-lettered
     └── TaskSignal                  raised by task code to tell safetynet what to do next
          ├── Transient              try again (optionally not before ``retry_after`` seconds)
          │    └── ClaimLost         another run took this run's idempotency claim over; its writes rolled back
          ├── Permanent              do not try again: dead-letter now
          └── Snooze                 try again after ``delay`` without using up an attempt
               ├── BreakerOpen       the upstream's breaker is open: not before it may half-open
               └── LimitReached      the upstream's limit (concurrency, rate) is reached: not before its turn

This module imports nothing, so the pure decision core can depend on it.
"""

from __future__ import annotations

__all__ = [
    "BreakerOpen",
    "ClaimLost",
    "ConfigurationError",
    "CrashLoop",
    "IdempotencyKeyError",
    "KeyInProgress",
    "LimitReached",
    "Permanent",
    "SafetynetError",
    "Snooze",
    "TaskSignal",
    "Transient",
]


def _seconds(owner: str, value: object) -> float:
    """``value`` as seconds, or ConfigurationError: booleans, NaN and negatives are refused."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not value >= 0:
        raise ConfigurationError(f"{owner} must be a number of seconds >= 0, got {value!r}")
    return float(value)


class SafetynetError(Exception):
    """Base class of every exception safetynet defines."""


class ConfigurationError(SafetynetError, ValueError):
    """A setting, task option or policy value is invalid; the message says what to change."""


class TaskSignal(SafetynetError):
    """Raised by task code to classify its own failure."""

    def __init__(self, message: str = "") -> None:
        super().__init__(message)
        self.message = message

    def __str__(self) -> str:
        return self.message


class Transient(TaskSignal):
    """A failure worth retrying; ``retry_after`` (seconds) is a lower bound on the wait."""

    def __init__(self, message: str = "", retry_after: float | None = None) -> None:
        super().__init__(message)
        self.retry_after = None if retry_after is None else _seconds("Transient.retry_after", retry_after)

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:  # keep retry_after across pickling
        return (type(self), (self.message, self.retry_after))


class Permanent(TaskSignal):
    """A failure that no retry can fix (bad data, a deleted row): the task is dead at once."""

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.message,))


class Snooze(TaskSignal):
    """Not a failure: try again after ``delay`` seconds without using up an attempt."""

    def __init__(self, delay: float, message: str = "") -> None:
        self.delay = _seconds("Snooze.delay", delay)
        super().__init__(message or f"snoozed for {self.delay:g}s")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.delay, self.message))


class IdempotencyKeyError(SafetynetError, ValueError):
    """A task's arguments do not make a valid idempotency key (missing, empty or too long)."""


class KeyInProgress(SafetynetError):
    """An eager run met a key another run holds (an eager run cannot be deferred)."""


class CrashLoop(SafetynetError):
    """The task killed its worker ``max_deliveries`` times: it is dead-lettered instead of run again."""


class ClaimLost(Transient):
    """Another run took the idempotency claim over while this one worked; this run's database writes were rolled back."""

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.message, self.retry_after))


class BreakerOpen(Snooze):
    """The breaker ``name`` is open: not now. In a task this defers it, without using an attempt,
    for ``delay`` seconds (until it may half-open)."""

    def __init__(self, name: str, delay: float, message: str = "") -> None:
        self.name = name
        super().__init__(delay, message or f"breaker {name!r} is open; it may half-open in {max(0.0, delay):.1f}s")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.name, self.delay, self.message))


class LimitReached(Snooze):
    """The limit ``name`` lets no more calls through now (``reason``: "concurrency", "rate", or "paused" after a
    429). In a task this defers it, without using an attempt, for ``delay`` seconds (until its turn)."""

    def __init__(self, name: str, delay: float, reason: str = "", message: str = "") -> None:
        self.name = name
        self.reason = reason
        super().__init__(delay, message or f"limit {name!r} reached ({reason or 'full'}); "
                                           f"next turn in {max(0.0, delay):.2f}s")

    def __reduce__(self) -> tuple[type, tuple[object, ...]]:
        return (type(self), (self.name, self.delay, self.reason, self.message))
