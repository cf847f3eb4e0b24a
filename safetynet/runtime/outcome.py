"""The act step: after a run failed, the core decides; then the next attempt is published or the task given up.

    body raises ──▶ Celery's own control flow (Retry, Ignore, Reject)? let it pass
                ──▶ core.decide(policy, rules, attempt, exception, first start, now) ── plug-ins adjust a retry
                ──▶ Retry: plug-ins on_retry (hand the claim over …), publish, raise celery.exceptions.Retry
                    Dead:  deadletter.give_up (one line, one dead letter, one event); the ORIGINAL exception
                           then fails the task, so Celery's on_failure runs once, as it would
"""

from __future__ import annotations

import inspect
import logging
import time
from collections.abc import Callable
from typing import Any, cast

import celery
from celery.exceptions import Ignore, Reject
from celery.exceptions import Retry as CeleryRetry

from safetynet import conf, deadletter, signals
from safetynet.core.classify import ALWAYS_RETRY
from safetynet.core.decision import Dead, Decision, Retry, decide
from safetynet.core.policy import Fixed, RetryPolicy
from safetynet.exceptions import ConfigurationError, CrashLoop
from safetynet.protocol import headers as header_names
from safetynet.protocol.attempt import Attempt, Outgoing
from safetynet.protocol.history import HistoryEntry, entry_for
from safetynet.protocol.reasons import Reason
from safetynet.redaction import parameter_names
from safetynet.runtime import clock, options, sending
from safetynet.schedule import delay_of

__all__ = ["PASS_THROUGH", "RetryRequested", "after_failure", "give_up", "manual_policy", "retry"]

logger = logging.getLogger("safetynet")

#: Exceptions that are Celery's control flow, not failures to classify.
PASS_THROUGH = (CeleryRetry, Ignore, Reject)


class RetryRequested(Exception):
    """Stands for the failure when ``self.retry()`` is called without ``exc``."""


def after_failure(attempt: Attempt, exc: BaseException) -> None:
    """Decide after the body raised: raise Celery's ``Retry`` (published), or return to let ``exc`` fail the task."""
    if attempt.settled is exc:
        return
    if isinstance(exc, PASS_THROUGH):
        if isinstance(exc, Reject) and not getattr(exc, "requeue", False):
            _rejected(attempt, exc)
        return
    now = clock.now()
    history = attempt.history
    decision: Decision
    if isinstance(exc, CrashLoop):  # the runs holding its key keep dying: no policy can help
        decision = Dead(Reason.CRASH_LOOP, str(exc))
    else:
        resolved = options.resolved(attempt.task)
        decision = decide(resolved.policy, resolved.rules, history.attempt, exc, history.started_at, now,
                          previous_delay=history.previous_delay, rng=clock.rng())
        if isinstance(decision, Retry) and decision.consumes_attempt:
            attempt.settled = exc
            for plugin in attempt.plugins:
                decision = plugin.adjust(attempt, decision)
                if not isinstance(decision, Retry):
                    break
    attempt.settled, attempt.decision = exc, decision
    entry = _entry(attempt, now, exc, decision)
    if isinstance(decision, Retry):
        publish_retry(attempt, entry, decision, exc=exc, countdown=decision.delay)
    give_up(attempt, entry, decision, exc)  # type: ignore[arg-type]


def retry(attempt: Attempt, args: Any, kwargs: Any, exc: BaseException | None, throw: bool, eta: Any,
          countdown: float | None, max_retries: int | None, **options: Any) -> CeleryRetry:
    """``self.retry(...)`` with Celery's meaning, decided by the core."""
    task = attempt.task
    now = clock.now()
    history = attempt.history
    policy = manual_policy(task, eta, countdown, max_retries, now)
    failure = exc if exc is not None else RetryRequested("self.retry() called without exc")
    decision = decide(policy, ALWAYS_RETRY, history.attempt, failure, history.started_at, now,
                      previous_delay=history.previous_delay, rng=clock.rng())
    entry = _entry(attempt, now, exc, decision)
    if isinstance(decision, Retry):
        attempt.decision = decision
        # An explicit eta is published as given, unless the failure's Retry-After asked for longer.
        keep_eta = bool(eta) and decision.delay <= policy.backoff.base_delay(history.attempt)
        return publish_retry(attempt, entry, decision, exc=exc, args=args, kwargs=kwargs, throw=throw,
                             eta=eta if keep_eta else None, countdown=None if keep_eta else decision.delay, **options)
    # Let Celery raise what it raises when retries are exhausted: ``exc`` itself, or MaxRetriesExceededError
    # when there is none; record that, and mark it so the run does not decide twice.
    try:
        return _celery_retry(task, args, kwargs, exc, throw, eta, countdown, max_retries=-1, **options)
    except BaseException as raised:
        attempt.settled, attempt.decision = raised, decision
        if exc is None:
            entry = _entry(attempt, now, raised, decision)
        give_up(attempt, entry, decision, exc if exc is not None else raised)  # type: ignore[arg-type]
        raise


def _celery_retry(task: Any, *args: Any, **kwargs: Any) -> CeleryRetry:
    """Celery's own retry; the max_retries we pass must not linger on the shared task object."""
    try:
        return celery.Task.retry(task, *args, **kwargs)
    finally:
        task.__dict__.pop("override_max_retries", None)


def manual_policy(task: Any, eta: Any, countdown: float | None, max_retries: int | None, now: float) -> RetryPolicy:
    """The policy of an explicit ``self.retry(...)``: Celery's meaning, the deadline kept."""
    resolved = options.resolved(task)
    base = resolved.policy
    max_attempts: int | None
    if max_retries is not None:
        max_attempts = max_retries + 1
    elif resolved.explicit_policy:
        max_attempts = base.max_attempts
    else:
        max_attempts = None if task.max_retries is None else task.max_retries + 1
    if eta:
        delay: float | None = delay_of({"eta": eta}, now)
    elif countdown is not None:
        delay = max(0.0, float(countdown))
    elif resolved.explicit_policy:
        delay = None  # the declared policy's own backoff
    else:
        delay = float(task.default_retry_delay)  # Celery: no countdown means default_retry_delay
    try:
        if delay is None:
            return base.replace(max_attempts=max_attempts)
        return RetryPolicy(max_attempts=max_attempts, backoff=Fixed(delay), jitter="none", max_delay=None,
                           deadline=base.deadline)
    except ConfigurationError as error:
        raise ConfigurationError(f"task {task.name}: self.retry(): {error}") from None


def _entry(attempt: Attempt, now: float, exc: BaseException | None, decision: Decision) -> HistoryEntry:
    if isinstance(decision, Retry):
        return entry_for(attempt.number, attempt.started, now, exc,
                         action="retry" if decision.consumes_attempt else "snooze", delay=decision.delay,
                         reason=decision.reason, worker=attempt.request.hostname,
                         traceback_max_chars=conf.get().traceback_max_chars)
    return entry_for(attempt.number, attempt.started, now, exc, action="dead", delay=None,
                     reason=decision.reason, worker=attempt.request.hostname,  # type: ignore[union-attr]
                     traceback_max_chars=conf.get().traceback_max_chars)


def _retry_arguments(task: Any, request: Any, args: Any, kwargs: Any) -> tuple[Any, Any]:
    """The arguments of the next attempt: the run's, or those given to ``self.retry``.

    Given only positional ones (or only keyword ones) for a run called the other way, the run's
    own keep the values the new ones do not replace, as Celery does.
    """
    if args is None and kwargs is None:
        return request.args, request.kwargs
    if (args is None) == (kwargs is None) or not (request.kwargs if args is not None else request.args):
        return (request.args if args is None else args), (request.kwargs if kwargs is None else kwargs)
    try:
        parameters = list(inspect.signature(task.run).parameters.values())
    except (TypeError, ValueError):
        return (request.args if args is None else args), (request.kwargs if kwargs is None else kwargs)
    either = inspect.Parameter.POSITIONAL_OR_KEYWORD
    positional = [p for p in parameters if p.kind in (inspect.Parameter.POSITIONAL_ONLY, either)]
    if args is not None:  # new positional arguments replace the keyword ones of the same parameters
        replaced = {p.name for p in positional[:len(args)] if p.kind is either}
        return args, {name: value for name, value in dict(request.kwargs).items() if name not in replaced}
    values = list(request.args)
    rest = dict(kwargs)
    for index, parameter in enumerate(positional[:len(values)]):
        if parameter.kind is either and parameter.name in rest:
            values[index] = rest.pop(parameter.name)
    return values, rest


def publish_retry(attempt: Attempt, entry: HistoryEntry, decision: Retry, *, exc: BaseException | None,
                  args: Any = None, kwargs: Any = None, throw: bool = True, eta: Any = None,
                  countdown: float | None = None, **options: Any) -> CeleryRetry:
    """Publish the next attempt with the history header; raise (or return) Celery's ``Retry``."""
    task, request = attempt.task, attempt.request
    settings = conf.get()
    header = attempt.history.header_after(entry, delay=decision.delay, consumes_attempt=decision.consumes_attempt,
                                          max_entries=settings.history_max_entries,
                                          max_bytes=settings.history_max_bytes)
    headers = {key: value for key, value in {**(request.headers or {}), **(options.pop("headers", None) or {})}.items()
               if key not in header_names.DELIVERY}
    headers[header_names.HISTORY] = header
    args, kwargs = _retry_arguments(task, request, args, kwargs)
    message = Outgoing(task=task, args=args, kwargs=kwargs, options={**options, "headers": headers}, mode="retry",
                       task_id=request.id, key=attempt.key)
    for plugin in attempt.plugins:
        plugin.on_retry(attempt, decision, message)
    action = entry["action"]
    logger.info(
        "%s[%s] attempt %s failed: %s in %.3fs (%s)", task.name, request.id, attempt.number, action,
        decision.delay, decision.reason,
        extra={"task_name": task.name, "task_id": request.id, "attempt": attempt.number, "action": action,
               "delay": decision.delay, "reason": decision.reason},
    )
    signals.task_retrying.send_robust(
        sender=task, task_id=request.id, attempt=attempt.number, delay=decision.delay, reason=decision.reason,
        exception=exc, entry=entry, args=request.args, kwargs=request.kwargs,
    )
    options = dict(message.options)
    signature = task.signature_from_request(request, message.args, message.kwargs, countdown=countdown, eta=eta,
                                            retries=request.retries + 1, headers=options.pop("headers"), **options)
    when: Any = eta or countdown
    raised = CeleryRetry(exc=cast(Exception, exc), when=when, is_eager=request.is_eager, sig=signature)
    if not request.is_eager:
        try:
            sending.send_retry(attempt, signature, decision.delay)
        except Exception as error:
            _not_published(attempt, entry, error, exc)
    if throw:
        raise raised
    return raised


def _not_published(attempt: Attempt, entry: HistoryEntry, error: Exception, exc: BaseException | None) -> None:
    """The broker refused the retry (it is away): the message must not be lost with it."""
    task, request = attempt.task, attempt.request
    for plugin in attempt.plugins:
        plugin.on_retry_not_sent(attempt, error)
    if task.acks_late:
        # The message this attempt came in is not acknowledged yet: give it back to the broker instead (if the
        # broker is away, it stays unacknowledged and comes back).
        logger.warning(
            "%s[%s] attempt %s: the retry could not be published (%r); the message goes back to the queue",
            task.name, request.id, attempt.number, error,
            extra={"task_name": task.name, "task_id": request.id, "attempt": attempt.number,
                   "action": "requeue", "reason": "retry not published"},
        )
        raise Reject(error, requeue=True) from error
    # An early-acknowledged message is gone already: kept as a dead letter, to replay later.
    dead_entry: HistoryEntry = {**entry, "action": "dead", "delay": None, "reason": Reason.REJECTED}
    _give_up_with(attempt, dead_entry, Dead(Reason.REJECTED, f"the retry could not be published: {error!r}"), exc)
    raise Reject(error, requeue=False) from error


def give_up(attempt: Attempt, entry: HistoryEntry, dead: Dead, error: BaseException | None) -> None:
    """The task is given up: plug-ins told, one dead letter (once the body's transaction has ended)."""
    for plugin in attempt.plugins:
        plugin.on_give_up(attempt, dead, error)
    _give_up_with(attempt, entry, dead, error)


def _give_up_with(attempt: Attempt, entry: HistoryEntry, dead: Dead, error: BaseException | None) -> None:
    task, request = attempt.task, attempt.request
    history = attempt.history
    failure = deadletter.Failure(
        task_name=task.name, task_id=request.id, reason=Reason(dead.reason), detail=dead.detail,
        args=request.args or (), kwargs=request.kwargs or {}, parameters=parameter_names(task),
        headers=request.headers or {}, delivery_info=request.delivery_info or {}, exception=error,
        history=history.with_entry(entry), omitted=history.omitted, worker=request.hostname or "",
        failed_at=clock.now(),
    )
    runtime = time.perf_counter() - attempt.started_perf
    eager, notes = attempt.eager, attempt.notes
    record: Callable[[], object] = lambda: deadletter.give_up(failure, task=task, runtime=runtime, eager=eager,
                                                             notes=notes)
    attempt.when_transaction_ends(record)


def _rejected(attempt: Attempt, exc: Reject) -> None:
    """``Reject(requeue=False)`` from the body: the broker drops the message, so it is kept as a dead letter."""
    given = getattr(exc, "reason", None)
    reason = given if isinstance(given, BaseException) else None
    entry = entry_for(attempt.number, attempt.started, clock.now(), reason or exc, action="dead", delay=None,
                      reason=Reason.REJECTED, worker=attempt.request.hostname,
                      traceback_max_chars=conf.get().traceback_max_chars)
    _give_up_with(attempt, entry, Dead(Reason.REJECTED, f"Reject(requeue=False): {given!r}"), reason or exc)

