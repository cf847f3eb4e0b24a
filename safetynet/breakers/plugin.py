"""Breakers' and retry budgets' part in a task's path: no run while the upstream's breaker is open, and
no more retries than the budget allows."""

from __future__ import annotations

import dataclasses
import logging
from collections.abc import Callable, Mapping
from typing import Any

from safetynet.breakers import budgets, enter_or_skip, report
from safetynet.core.decision import Retry
from safetynet.exceptions import BreakerOpen, ConfigurationError, Transient
from safetynet.protocol.attempt import Attempt, Plugin

__all__ = ["BreakerGuard", "BudgetGuard", "budget_scope"]

logger = logging.getLogger("safetynet")


class BreakerGuard(Plugin):
    """The option ``breaker="smtp"``: while it is open the body is not run and the task is deferred (no attempt
    used) until it may half-open; what the body did is reported to it."""

    name = "breaker"
    options = frozenset({"breaker"})

    def validate(self, options: Mapping[str, Any], where: str) -> None:
        name = options.get("breaker")
        if name is not None and (not isinstance(name, str) or not name):
            raise ConfigurationError(f"{where}: breaker must be the name of a breaker in SAFETYNET['BREAKERS'], "
                                     f"got {name!r}")

    def takes_part(self, task: Any) -> bool:
        return getattr(task, "breaker", None) is not None

    def before_run(self, attempt: Attempt) -> None:
        try:
            attempt.notes[self.name] = enter_or_skip(attempt.task.breaker)
        except BreakerOpen as refused:
            if attempt.eager:  # an eager run cannot wait (its retry would run at once, again and again)
                raise Transient(f"{refused}; an eager run cannot wait for it") from None
            raise  # a Snooze: deferred, no attempt used

    def around_body(self, attempt: Attempt, body: Callable[[], Any]) -> Any:
        ticket = attempt.notes.pop(self.name, None)
        try:
            result = body()
        except BaseException as exc:
            # Only what the body did tells the breaker about the upstream (a stored result, a deferral or a
            # claim error made no call).
            report(ticket, exc if attempt.ran else None)
            raise
        report(ticket, True if attempt.ran else None)
        return result


def budget_scope(task: Any, request: Any) -> str | None:
    """Whose retry budget ``task``'s retries spend: a named one, its queue's, its breaker's, or none."""
    if isinstance(task.retry_budget, str):
        return f"named:{task.retry_budget}"
    if task.retry_budget:
        info = request.delivery_info or {}
        return f"queue:{info.get('routing_key') or task.queue or 'celery'}"
    if task.breaker is not None and task.retry_budget is None:
        return f"breaker:{task.breaker}"
    return None


def _safely(task: Any, call: Callable[..., Any], *args: Any) -> Any:
    try:
        return call(*args)
    except Exception as error:  # the budget is a guard: its store being away must not fail the task
        logger.warning("%s: retry budget not applied: %r", task.name, error, extra={"task_name": task.name})
        return None


class BudgetGuard(Plugin):
    """Retries spend a budget (``RETRY_BUDGET``) earned by first attempts; past it a retry waits longer."""

    name = "retry_budget"
    options = frozenset({"retry_budget"})

    def validate(self, options: Mapping[str, Any], where: str) -> None:
        budget = options.get("retry_budget")
        if budget is not None and not isinstance(budget, bool) and not (isinstance(budget, str) and budget):
            raise ConfigurationError(f"{where}: retry_budget must be True (its queue's), a budget name or False, "
                                     f"got {budget!r}")

    def takes_part(self, task: Any) -> bool:
        return bool(getattr(task, "retry_budget", None)) or (
            getattr(task, "breaker", None) is not None and getattr(task, "retry_budget", None) is None)

    def before_run(self, attempt: Attempt) -> None:
        scope = budget_scope(attempt.task, attempt.request)
        if scope is not None and attempt.number == 1:  # a first attempt (also after deferrals) earns budget
            _safely(attempt.task, budgets.count_first_attempt, scope)

    def adjust(self, attempt: Attempt, retry: Retry) -> Retry:
        scope = budget_scope(attempt.task, attempt.request)
        if scope is None:
            return retry
        spent = _safely(attempt.task, budgets.budgeted, scope, retry.delay)
        if spent is None or spent[1]:
            return retry
        kind, _, name = scope.partition(":")
        whose = {"breaker": "breaker", "queue": "queue", "named": "budget"}[kind]
        return dataclasses.replace(retry, delay=spent[0], reason=f"{retry.reason}; retry budget of {whose} {name!r} spent")
