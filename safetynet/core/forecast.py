"""What a policy will do, attempt by attempt, before anything runs: the data behind ``explain``.

Pure: it reads ``RetryPolicy.delay_range``, the same code ``decide`` draws delays from.
"""

from __future__ import annotations

from dataclasses import dataclass

from safetynet.core.policy import RetryPolicy

__all__ = ["Step", "forecast"]


@dataclass(frozen=True)
class Step:
    """One attempt of a schedule where every attempt fails with a retryable error.

    ``starts`` is when the attempt starts, in seconds after the first one started (a range
    because of jitter, and of how long the attempts before it ran); ``delay`` is the wait after
    it fails, or None when it is the last.
    ``outcome`` is "retry", "gives up: retries exhausted", "gives up: deadline" or
    "may give up: deadline" (jitter decides).
    """

    attempt: int
    starts: tuple[float, float]
    delay: tuple[float, float] | None
    outcome: str


def forecast(policy: RetryPolicy, *, limit: int = 50, run_time: float = 0.0) -> list[Step]:
    """The attempts ``policy`` allows when every attempt fails, at most ``limit`` of them.

    Each attempt runs from 0 to ``run_time`` seconds before it fails (the task's time limit; 0 leaves run time
    out). The deadline counts from the first attempt's start, run time included, as ``decide`` counts it.
    """
    steps: list[Step] = []
    low = high = 0.0
    attempt = 1
    while attempt <= limit:
        if policy.max_attempts is not None and attempt >= policy.max_attempts:
            steps.append(Step(attempt, (low, high), None, "gives up: retries exhausted"))
            return steps
        delay = policy.delay_range(attempt)
        next_low, next_high = low + delay[0], high + run_time + delay[1]
        if policy.deadline is not None and next_low > policy.deadline:
            steps.append(Step(attempt, (low, high), None, "gives up: deadline"))
            return steps
        outcome = "retry"
        if policy.deadline is not None and next_high > policy.deadline:
            outcome = "may give up: deadline"
        steps.append(Step(attempt, (low, high), delay, outcome))
        low, high = next_low, min(next_high, policy.deadline) if policy.deadline is not None else next_high
        attempt += 1
    return steps
