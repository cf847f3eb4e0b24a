"""The one decision: after an attempt, retry (when), give up (why), or done.

Pure: the worker runtime, the simulator, ``explain`` and the docs all call ``decide``.
"""

from __future__ import annotations

import math
import random
from dataclasses import dataclass

from safetynet.core.classify import Rules
from safetynet.core.durations import duration
from safetynet.core.policy import RetryPolicy

__all__ = ["DONE", "Dead", "Decision", "Done", "Retry", "decide"]

#: Reasons a task is given up, as stored and reported.
RETRIES_EXHAUSTED = "retries_exhausted"
PERMANENT_ERROR = "permanent_error"
DEADLINE_EXCEEDED = "deadline_exceeded"


@dataclass(frozen=True)
class Retry:
    """Run again after ``delay`` seconds; a snooze does not use up an attempt."""

    delay: float
    reason: str
    consumes_attempt: bool = True


@dataclass(frozen=True)
class Dead:
    """Give up: ``reason`` is one of retries_exhausted, permanent_error, deadline_exceeded."""

    reason: str
    detail: str = ""


@dataclass(frozen=True)
class Done:
    """The attempt succeeded."""


DONE = Done()
Decision = Retry | Dead | Done


def decide(
    policy: RetryPolicy,
    rules: Rules,
    attempt: int,
    exception: BaseException | None,
    started_at: float,
    now: float,
    *,
    previous_delay: float | None = None,
    rng: random.Random | None = None,
) -> Decision:
    """Decide what follows attempt number ``attempt`` (1-based) that raised ``exception``.

    ``started_at`` is when the first attempt started and ``now`` is the present, both in
    seconds since the epoch; ``previous_delay`` feeds decorrelated jitter.
    """
    if exception is None:
        return DONE
    verdict = rules.classify(exception, now)
    if verdict.kind == "fail":
        return Dead(PERMANENT_ERROR, verdict.rule)
    if verdict.kind == "snooze":
        delay = verdict.retry_after or 0.0
        decision = Retry(delay, verdict.rule, consumes_attempt=False)
    else:
        if policy.max_attempts is not None and attempt >= policy.max_attempts:
            return Dead(RETRIES_EXHAUSTED, f"attempt {attempt} of {policy.max_attempts} failed ({verdict.rule})")
        delay = policy.delay_for(attempt, previous=previous_delay, rng=rng)
        if verdict.retry_after is not None:
            delay = policy.capped(max(delay, verdict.retry_after))
        decision = Retry(delay, verdict.rule)
    if not math.isfinite(decision.delay):
        return Dead(RETRIES_EXHAUSTED, f"the delay after attempt {attempt} has no bound ({verdict.rule})")
    if policy.deadline is not None and (now + decision.delay) - started_at > policy.deadline:
        return Dead(
            DEADLINE_EXCEEDED,
            f"the next attempt would start {_precise(now + decision.delay - started_at)} after the first, past "
            f"the {duration(policy.deadline)} deadline",
        )
    return decision


def _precise(seconds: float) -> str:
    """A duration close to a deadline: to the tenth of a second below an hour (rounding must not hide the excess)."""
    return f"{seconds:.1f} s".replace(".0 s", " s") if seconds < 3600 else duration(seconds)
