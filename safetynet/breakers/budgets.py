"""Retry budgets: retries through a breaker (or a queue, or a named budget) capped to a share of its first attempts.

Counts live in the shared store (Redis, else the database), in 12 buckets over the budget's window.
"""

from __future__ import annotations

import math
import random
import time

from safetynet import conf, shared

__all__ = ["budgeted", "count_first_attempt", "usage"]

def _budget_keys(scope: str, kind: str, now: float, window: float) -> list[str]:
    bucket = math.floor(now / (window / 12))
    return [f"budget:{scope}:{kind}:{number}" for number in range(bucket - 11, bucket + 1)]


def count_first_attempt(scope: str) -> None:
    """A first attempt went through ``scope`` (a breaker): it earns the retries of the budget."""
    budget = conf.get().retry_budget
    if budget is not None:
        shared.incr(_budget_keys(scope, "first", time.time(), budget.window)[-1], ttl=budget.window * 2)


def budgeted(scope: str, delay: float) -> tuple[float, bool]:
    """Spend one retry of ``scope``'s budget: (``delay``, True) within it, else (a longer delay, False)."""
    budget = conf.get().retry_budget
    if budget is None:
        return delay, True
    now = time.time()
    firsts = sum(shared.counts(_budget_keys(scope, "first", now, budget.window)))
    retry_keys = _budget_keys(scope, "retry", now, budget.window)
    retries = sum(shared.counts(retry_keys))
    # Read, then counted: racing workers may overshoot by a few retries (as Envoy's budgets may).
    if retries < max(budget.min_retries, budget.ratio * firsts):
        shared.incr(retry_keys[-1], ttl=budget.window * 2)
        return delay, True
    return max(delay, budget.window / 4 + random.uniform(0, budget.window / 4)), False


def usage(scope: str) -> tuple[int, int] | None:
    """First attempts and retries counted in ``scope``'s window now (None without a budget)."""
    budget = conf.get().retry_budget
    if budget is None:
        return None
    now = time.time()
    counted = shared.counts(_budget_keys(scope, "first", now, budget.window) + _budget_keys(scope, "retry", now,
                                                                                               budget.window))
    return sum(counted[:12]), sum(counted[12:])
