"""Retry policies: how long to wait before each retry and when to stop.

Pure: no Django, no Celery, no I/O. Randomness comes from a ``random.Random`` the caller
passes in, so a seeded source makes every schedule reproducible.

Numbering: attempt 1 is the first run. ``delay_for(n)`` is the wait after attempt ``n``
failed, before attempt ``n + 1``. Celery's ``request.retries`` is ``n - 1`` at that point.
"""

from __future__ import annotations

import difflib
import math
import random
from dataclasses import dataclass, field, replace
from typing import Any, Protocol, runtime_checkable

from safetynet.core.durations import duration
from safetynet.exceptions import ConfigurationError

__all__ = [
    "JITTERS",
    "Backoff",
    "CeleryBackoff",
    "Exponential",
    "Fixed",
    "RetryPolicy",
]

JITTERS = ("none", "full", "equal", "decorrelated")


@runtime_checkable
class Backoff(Protocol):
    """A backoff kind: the un-jittered, un-capped delay after attempt ``attempt`` failed."""

    def base_delay(self, attempt: int) -> float: ...


def _check_seconds(owner: str, name: str, value: object, *, allow_none: bool = False) -> None:
    if value is None and allow_none:
        return
    if isinstance(value, bool) or not isinstance(value, (int, float)) or math.isnan(value) or value < 0:
        allowed = "a number of seconds >= 0" + (" or None" if allow_none else "")
        raise ConfigurationError(f"{owner}.{name} must be {allowed}, got {value!r}")


@dataclass(frozen=True)
class Fixed:
    """The same delay before every retry."""

    delay: float

    def __post_init__(self) -> None:
        _check_seconds("Fixed", "delay", self.delay)

    def base_delay(self, attempt: int) -> float:
        """The delay after attempt ``attempt`` failed."""
        return float(self.delay)


@dataclass(frozen=True)
class Exponential:
    """``base * factor ** (attempt - 1)``: 1, 2, 4, 8 … seconds with the defaults."""

    base: float = 1.0
    factor: float = 2.0

    def __post_init__(self) -> None:
        _check_seconds("Exponential", "base", self.base)
        if isinstance(self.factor, bool) or not isinstance(self.factor, (int, float)) or not self.factor >= 1:
            raise ConfigurationError(f"Exponential.factor must be a number >= 1, got {self.factor!r}")

    def base_delay(self, attempt: int) -> float:
        """The delay after attempt ``attempt`` failed."""
        if self.base == 0:
            return 0.0
        try:
            return self.base * self.factor ** (attempt - 1)
        except OverflowError:
            return math.inf


@dataclass(frozen=True)
class CeleryBackoff:
    """Celery's ``retry_backoff``: ``factor * 2 ** retries`` in whole seconds."""

    factor: int = 1

    def __post_init__(self) -> None:
        if isinstance(self.factor, bool) or not isinstance(self.factor, int) or self.factor < 1:
            raise ConfigurationError(f"CeleryBackoff.factor must be a whole number >= 1, got {self.factor!r}")

    def base_delay(self, attempt: int) -> float:
        """The delay after attempt ``attempt`` failed (Celery's ``retries`` is ``attempt - 1``)."""
        # The integer is exact, but past about 2**1024 it no longer fits a float: that is
        # infinity, which max_delay then caps as Celery's min(retry_backoff_max, ...) does.
        if attempt > 1100:
            return math.inf
        try:
            return float(self.factor * 2 ** (attempt - 1))
        except OverflowError:
            return math.inf


def _as_backoff(value: object) -> Backoff:
    if isinstance(value, (Fixed, Exponential, CeleryBackoff)) or (
        not isinstance(value, (int, float, str)) and isinstance(value, Backoff)
    ):
        return value
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        return Fixed(value)
    if value == "exponential":
        return Exponential()
    if value == "celery":
        return CeleryBackoff()
    raise ConfigurationError(
        "RetryPolicy.backoff must be Fixed(seconds), Exponential(base, factor), CeleryBackoff(factor), "
        f"a number of seconds, 'exponential' or 'celery'; got {value!r}"
    )


#: How ``describe`` names each jitter.
_JITTER_WORDS = {"none": "no jitter", "full": "full jitter", "equal": "equal jitter",
                 "decorrelated": "decorrelated jitter"}


@dataclass(frozen=True)
class RetryPolicy:
    """How many attempts, how long between them, and when to give up.

    ``max_attempts`` counts runs, the first included (``None``: no limit, so give a
    ``deadline``). ``max_delay`` caps every delay, Retry-After included. ``deadline`` is
    the most seconds from the first attempt's start to the start of any later attempt.
    ``whole_seconds`` rounds like Celery (integer delays, integer full jitter).
    """

    max_attempts: int | None = 5
    backoff: Backoff = field(default_factory=Exponential)
    jitter: str = "full"
    max_delay: float | None = 600.0
    deadline: float | None = None
    whole_seconds: bool = False

    def __post_init__(self) -> None:
        if self.max_attempts is not None and (
            isinstance(self.max_attempts, bool) or not isinstance(self.max_attempts, int) or self.max_attempts < 1
        ):
            raise ConfigurationError(
                "RetryPolicy.max_attempts must be a whole number >= 1 (1 means never retry) "
                f"or None (no limit), got {self.max_attempts!r}"
            )
        object.__setattr__(self, "backoff", _as_backoff(self.backoff))
        if self.jitter not in JITTERS:
            close = difflib.get_close_matches(str(self.jitter), JITTERS, n=1)
            hint = f" (did you mean {close[0]!r}?)" if close else ""
            raise ConfigurationError(
                f"RetryPolicy.jitter must be one of {', '.join(map(repr, JITTERS))}, got {self.jitter!r}{hint}"
            )
        _check_seconds("RetryPolicy", "max_delay", self.max_delay, allow_none=True)
        _check_seconds("RetryPolicy", "deadline", self.deadline, allow_none=True)
        if self.deadline == 0:
            raise ConfigurationError("RetryPolicy.deadline must be > 0 seconds or None, got 0")

    @classmethod
    def from_celery(
        cls,
        *,
        max_retries: int | None = 3,
        retry_backoff: bool | int | float = False,
        retry_backoff_max: int = 600,
        retry_jitter: bool = True,
        default_retry_delay: float = 180,
    ) -> RetryPolicy:
        """The policy Celery's own autoretry options describe, mapped exactly."""
        if max_retries is not None and (isinstance(max_retries, bool) or not isinstance(max_retries, int) or max_retries < 0):
            raise ConfigurationError(f"max_retries must be a whole number >= 0 or None, got {max_retries!r}")
        max_attempts = None if max_retries is None else max_retries + 1
        if retry_backoff:
            # Celery: factor=int(max(1.0, retry_backoff)), countdown=min(max, factor * 2**retries),
            # then full jitter as random.randrange(countdown + 1).
            return cls(
                max_attempts=max_attempts,
                backoff=CeleryBackoff(int(max(1.0, float(retry_backoff)))),
                jitter="full" if retry_jitter else "none",
                max_delay=int(retry_backoff_max),
                whole_seconds=True,
            )
        return cls(max_attempts=max_attempts, backoff=Fixed(default_retry_delay), jitter="none", max_delay=None)

    def replace(self, **changes: Any) -> RetryPolicy:
        """A copy with some fields changed (validated again)."""
        return replace(self, **changes)

    def capped(self, delay: float) -> float:
        """``delay`` limited by ``max_delay``."""
        if self.max_delay is not None and delay > self.max_delay:
            return float(self.max_delay)
        return delay

    def _capped_base(self, attempt: int) -> float:
        delay = self.capped(self.backoff.base_delay(attempt))
        return float(math.floor(delay)) if self.whole_seconds and math.isfinite(delay) else delay

    def delay_for(self, attempt: int, *, previous: float | None = None, rng: random.Random | None = None) -> float:
        """The wait in seconds after attempt ``attempt`` failed; jitter drawn from ``rng``."""
        source: random.Random | Any = rng or random  # the module draws from its shared generator
        delay = self._capped_base(attempt)
        if self.jitter == "none":
            return delay
        if self.jitter == "full":
            if self.whole_seconds and math.isfinite(delay):
                return float(source.randrange(int(delay) + 1))
            return source.uniform(0, delay)
        if self.jitter == "equal":
            half = delay / 2
            value = min(delay, half + source.uniform(0, half))  # rounding (tiny delays) never goes past it
            return float(math.floor(value)) if self.whole_seconds and math.isfinite(value) else value
        # decorrelated (AWS): min(cap, uniform(base, previous * 3)), starting from the base delay.
        base = self._capped_base(1)
        upper = max(base, (previous if previous is not None else base) * 3)
        value = self.capped(source.uniform(base, upper))
        return float(math.floor(value)) if self.whole_seconds and math.isfinite(value) else value

    def delay_range(self, attempt: int) -> tuple[float, float]:
        """The least and the most ``delay_for(attempt)`` can return, jitter included."""
        delay = self._capped_base(attempt)
        if self.jitter == "none":
            return delay, delay
        if self.jitter == "full":
            return 0.0, delay
        if self.jitter == "equal":
            low = delay / 2
            return (float(math.floor(low)) if self.whole_seconds else low), delay
        base = self._capped_base(1)
        try:
            upper = base * 3 ** attempt
        except OverflowError:
            upper = math.inf
        return base, self.capped(max(base, upper))

    def describe(self) -> str:
        """One line a person can read: ``5 attempts, exponential backoff from 1 s (×2), full jitter, waits at most
        10 min``."""
        attempts = ("unlimited attempts" if self.max_attempts is None
                    else "1 attempt (no retry)" if self.max_attempts == 1 else f"{self.max_attempts} attempts")
        backoff = self.backoff
        if isinstance(backoff, Fixed):
            shape = f"a fixed {duration(backoff.delay)} between them"
        elif isinstance(backoff, Exponential):
            shape = f"exponential backoff from {duration(backoff.base)} (×{backoff.factor:g})"
        elif isinstance(backoff, CeleryBackoff):
            shape = f"Celery's retry_backoff ({duration(backoff.factor)}, ×2)"
        else:
            shape = repr(backoff)
        parts = [attempts, shape, _JITTER_WORDS.get(self.jitter, f"{self.jitter} jitter")]
        if self.max_delay is not None:
            parts.append(f"waits at most {duration(self.max_delay)}")
        if self.deadline is not None:
            parts.append(f"deadline {duration(self.deadline)} after the first attempt started")
        return ", ".join(parts)
