"""How upstreams are protected, as declared: circuit breakers and retry budgets (pure values).

``SAFETYNET["BREAKERS"]`` holds ``Breaker`` values by name and ``SAFETYNET["RETRY_BUDGET"]`` a
``RetryBudget``; ``safetynet.breakers`` keeps their shared state. Nothing here does I/O.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any

from safetynet.core.classify import (
    Matcher,
    as_matchers,
    http_status,
    is_network_error,
    is_time_limit,
)
from safetynet.exceptions import ConfigurationError, Permanent, Snooze

__all__ = ["Breaker", "RetryBudget", "number_in_range"]


def _shown(number: float) -> str:
    return f"{int(number):,}" if float(number).is_integer() else f"{number:g}"


def number_in_range(owner: str, value: Any, low: float, high: float, *, whole: bool = False) -> float:
    """``value`` if it is a number from ``low`` to ``high`` (a whole one if asked); else ConfigurationError."""
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high or (
            whole and int(value) != value):
        kind = "a whole number" if whole else "a number"
        raise ConfigurationError(f"{owner} must be {kind} from {_shown(low)} to {_shown(high)}, got {value!r}")
    return float(value)


#: What a breaker counts as its upstream failing unless told otherwise: network errors, timeouts,
#: HTTP 408, 429 and 5xx, and time limits.
DEFAULT_COUNT_ON: tuple[Matcher, ...] = (is_network_error, http_status(408, 429, *range(500, 600)), is_time_limit)


@dataclass(frozen=True)
class Breaker:
    """How a breaker opens and closes; declared in ``SAFETYNET["BREAKERS"]`` under its name."""

    #: Open when this share of the calls in the window failed (0 < rate <= 1) …
    failure_rate: float = 0.5
    #: … over the last ``window`` seconds …
    window: float = 60.0
    #: … once at least this many calls were made in it.
    min_calls: int = 10
    #: Also open after this many failures in a row (None: only the rate).
    consecutive_failures: int | None = None
    #: Stay open this long; then the next call may probe (half-open).
    open_seconds: float = 30.0
    #: At most this many calls at once while half-open.
    half_open_probes: int = 1
    #: What counts as the upstream failing (matchers, as retry_on); None: network errors, timeouts,
    #: HTTP 408, 429 and 5xx.
    count_on: Any = None
    name: str = field(default="", compare=False)

    def __post_init__(self) -> None:
        owner = f"breaker {self.name!r}" if self.name else "Breaker"
        rate = number_in_range(f"{owner}: failure_rate", self.failure_rate, 0.0, 1.0)
        if rate == 0:
            raise ConfigurationError(f"{owner}: failure_rate must be above 0 (0 would open on any call)")
        number_in_range(f"{owner}: window", self.window, 1, 86_400)
        number_in_range(f"{owner}: min_calls", self.min_calls, 1, 1_000_000, whole=True)
        if self.consecutive_failures is not None:
            number_in_range(f"{owner}: consecutive_failures", self.consecutive_failures, 1, 1_000_000, whole=True)
        number_in_range(f"{owner}: open_seconds", self.open_seconds, 0.1, 86_400)
        number_in_range(f"{owner}: half_open_probes", self.half_open_probes, 1, 10_000, whole=True)
        as_matchers(self.count_on, name=f"{owner}: count_on")

    @property
    def bucket_seconds(self) -> float:
        """The window is counted in 12 buckets."""
        return self.window / 12

    def counts(self, exception: BaseException) -> bool:
        """True if ``exception`` is the upstream failing (not a permanent error, not this breaker refusing)."""
        if isinstance(exception, (Permanent, Snooze)):
            return False
        matchers = DEFAULT_COUNT_ON if self.count_on is None else as_matchers(self.count_on, name="count_on")
        for matcher in matchers:
            if isinstance(matcher, type):
                if isinstance(exception, matcher):
                    return True
            elif matcher(exception):
                return True
        return False


@dataclass(frozen=True)
class RetryBudget:
    """Retries through a breaker: at most ``ratio`` of its first attempts over the last ``window``
    seconds, and always at least ``min_retries``; past it a retry waits longer (never dropped)."""

    ratio: float = 0.2
    min_retries: int = 3
    window: float = 60.0

    def __post_init__(self) -> None:
        number_in_range("RETRY_BUDGET: ratio", self.ratio, 0.0, 100.0)
        number_in_range("RETRY_BUDGET: min_retries", self.min_retries, 0, 1_000_000, whole=True)
        number_in_range("RETRY_BUDGET: window", self.window, 1, 86_400)
