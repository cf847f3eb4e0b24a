"""The Celery side: ``SafetyTask`` and the ``task`` decorator.

A safetynet task is a real Celery task. Its ``run`` is wrapped once, when the class is made:
the wrapper times the attempt and, only when the body raises, asks the core what to do.
Celery's ``self.retry`` is overridden to ask the same core, then hands the publishing to
Celery's own ``retry``, so routing, eager mode and argument handling stay Celery's.

The path of a failed attempt::

    body raises ──▶ pass-through? (Celery's Retry/Ignore/Reject, a direct call, already settled)
                ──▶ core.decide(policy, rules, attempt, exception, started_at, now)
                ──▶ Retry: publish with the history header, raise celery.exceptions.Retry
                    Dead:  log, send task_dead, let the ORIGINAL exception fail the task
"""

from __future__ import annotations

import functools
import inspect
import logging
import math
import threading
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import celery
from celery.exceptions import Ignore, Reject
from celery.exceptions import Retry as CeleryRetry

from safetynet import conf, signals
from safetynet.core.classify import ALWAYS_RETRY
from safetynet.core.decision import Dead, Decision, Retry, decide
from safetynet.core.policy import Fixed, RetryPolicy
from safetynet.exceptions import ConfigurationError
from safetynet.runtime import clock, options
from safetynet.runtime.history import HEADER, AttemptState, entry_for

__all__ = ["SafetyTask", "task"]

logger = logging.getLogger("safetynet")

# Exceptions that are Celery's control flow, not failures to classify.
_PASS_THROUGH = (CeleryRetry, Ignore, Reject)

# When the running attempt started; thread-local because thread and green pools share a task.
_attempt = threading.local()


class RetryRequested(Exception):
    """Stands for the failure when ``self.retry()`` is called without ``exc``."""


def _wrap_run(run: Any) -> Callable[..., Any]:
    """Wrap a task body so a failure reaches the decision core; success costs one clock read."""
    if isinstance(run, staticmethod):
        body = run.__func__

        def guarded(self: SafetyTask, *args: Any, **kwargs: Any) -> Any:
            _attempt.started = started = clock.now()
            try:
                return body(*args, **kwargs)
            except Exception as exc:
                self._after_failure(exc, started)
                raise

        signature = inspect.signature(body)
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        guarded.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_parameter, *signature.parameters.values()]
        )
    else:
        body = run

        def guarded(self: SafetyTask, *args: Any, **kwargs: Any) -> Any:  # type: ignore[misc]
            _attempt.started = started = clock.now()
            try:
                return body(self, *args, **kwargs)
            except Exception as exc:
                self._after_failure(exc, started)
                raise

    functools.update_wrapper(guarded, body)
    guarded._safetynet_body = run  # type: ignore[attr-defined]
    return guarded


def _seconds_until(eta: datetime | str, now: float) -> float:
    if isinstance(eta, str):
        eta = datetime.fromisoformat(eta)
    if eta.tzinfo is None:  # Celery's default enable_utc=True reads naive times as UTC
        eta = eta.replace(tzinfo=timezone.utc)
    return max(0.0, eta.timestamp() - now)


class SafetyTask(celery.Task):
    """Celery ``Task`` base with retry policies, error classification and attempt history."""

    #: The worker-side request: records a hard time limit as a dead letter.
    Request = "safetynet.runtime.worker:SafetyRequest"

    #: A ``RetryPolicy``; None means Celery's own retry options, else the project default.
    retry_policy: RetryPolicy | None = None
    #: Matchers that make a failure worth retrying (exception classes, predicates, http_status).
    retry_on: Any = ()
    #: Matchers that make a failure permanent.
    fail_on: Any = ()

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        where = f"task {cls.__dict__.get('name') or cls.__qualname__}"
        if cls.__dict__.get("_decorated"):
            options.check_known(options.decorated_options(cls), where)
        options.validate(options.declared(cls, SafetyTask), where)
        run = cls.__dict__.get("run")
        if run is not None and not hasattr(run, "_safetynet_body"):
            cls.run = _wrap_run(run)
            # Celery's add_autoretry_behaviour skips a task that has _orig_run: autoretry_for is
            # applied here, through the core, instead of by Celery's wrapper.
            cls._orig_run = run

    # -- what a bound task can read -------------------------------------------------------

    def _resolved(self) -> options.Resolved:
        resolved = self.__dict__.get("_safetynet_resolved")
        if resolved is None or resolved.version != conf.version():
            resolved = options.resolve(self, SafetyTask)
            self.__dict__["_safetynet_resolved"] = resolved
        return resolved

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy in force for this task."""
        return self._resolved().policy

    @property
    def rules(self):  # noqa: ANN201 - a core.classify.Rules
        """The classification rules in force for this task."""
        return self._resolved().rules

    @property
    def attempt(self) -> int:
        """The number of the running attempt, 1 for the first (snoozes do not count)."""
        return AttemptState.from_headers(self.request.headers, 0.0).attempt

    # -- the failure path -----------------------------------------------------------------

    def _state(self, started: float) -> AttemptState:
        return AttemptState.from_headers(self.request.headers, started)

    def _after_failure(self, exc: Exception, started: float) -> None:
        """Decide after the body raised: raise Celery's Retry, or return to let ``exc`` fail the task."""
        if isinstance(exc, _PASS_THROUGH):
            if isinstance(exc, Reject) and not exc.requeue and not self.request.called_directly:
                self._record_rejected(exc, started)
            return
        request = self.request
        if request.called_directly or getattr(request, "_safetynet_settled", None) is exc:
            return
        resolved = self._resolved()
        state = self._state(started)
        now = clock.now()
        decision = decide(
            resolved.policy, resolved.rules, state.attempt, exc, state.started_at, now,
            previous_delay=state.previous_delay, rng=clock.rng(),
        )
        entry = self._entry(state, started, now, exc, decision)
        if isinstance(decision, Retry):
            self._publish_retry(state, entry, decision, exc=exc, countdown=decision.delay)
        self._give_up(state, entry, decision, exc)  # type: ignore[arg-type]

    def retry(  # type: ignore[override]
        self,
        args: Any = None,
        kwargs: Any = None,
        exc: BaseException | None = None,
        throw: bool = True,
        eta: datetime | None = None,
        countdown: float | None = None,
        max_retries: int | None = None,
        **retry_options: Any,
    ) -> CeleryRetry:
        """Celery's ``retry``, with the same meaning, decided by the safetynet core."""
        request = self.request
        if request.called_directly:
            return super().retry(args, kwargs, exc, throw, eta, countdown, max_retries, **retry_options)
        now = clock.now()
        started = getattr(_attempt, "started", now)
        state = self._state(started)
        policy = self._manual_policy(eta, countdown, max_retries, now)
        failure = exc if exc is not None else RetryRequested("self.retry() called without exc")
        decision = decide(
            policy, ALWAYS_RETRY, state.attempt, failure, state.started_at, now,
            previous_delay=state.previous_delay, rng=clock.rng(),
        )
        entry = self._entry(state, started, now, exc, decision)
        if isinstance(decision, Retry):
            # An explicit eta is published as given, unless the failure's Retry-After asked for longer.
            keep_eta = bool(eta) and decision.delay <= policy.backoff.base_delay(state.attempt)
            return self._publish_retry(
                state, entry, decision, args=args, kwargs=kwargs, exc=exc, throw=throw,
                eta=eta if keep_eta else None, countdown=None if keep_eta else decision.delay, **retry_options,
            )
        # Let Celery raise what it raises when retries are exhausted: ``exc`` itself, or
        # MaxRetriesExceededError when there is none; record that, and mark it so the wrapper
        # does not decide twice.
        try:
            return self._celery_retry(args, kwargs, exc, throw, eta, countdown, max_retries=-1, **retry_options)
        except BaseException as raised:
            request._safetynet_settled = raised
            if exc is None:
                entry = self._entry(state, started, now, raised, decision)
            self._give_up(state, entry, decision, exc if exc is not None else raised)  # type: ignore[arg-type]
            raise

    def _manual_policy(self, eta: Any, countdown: float | None, max_retries: int | None, now: float) -> RetryPolicy:
        """The policy of an explicit ``self.retry(...)``: Celery's meaning, the deadline kept."""
        resolved = self._resolved()
        base = resolved.policy
        if max_retries is not None:
            max_attempts = max_retries + 1
        elif resolved.explicit_policy:
            max_attempts = base.max_attempts
        else:
            max_attempts = None if self.max_retries is None else self.max_retries + 1
        if eta:
            delay: float | None = _seconds_until(eta, now)
        elif countdown is not None:
            delay = max(0.0, float(countdown))
        elif resolved.explicit_policy:
            delay = None  # the declared policy's own backoff
        else:
            delay = float(self.default_retry_delay)  # Celery: no countdown means default_retry_delay
        try:
            if delay is None:
                return base.replace(max_attempts=max_attempts)
            return RetryPolicy(
                max_attempts=max_attempts, backoff=Fixed(delay), jitter="none", max_delay=None, deadline=base.deadline
            )
        except ConfigurationError as error:
            raise ConfigurationError(f"task {self.name}: self.retry(): {error}") from None

    def _entry(self, state: AttemptState, started: float, now: float, exc: BaseException | None,
               decision: Decision) -> dict[str, Any]:
        if isinstance(decision, Retry):
            action, delay, reason = ("retry" if decision.consumes_attempt else "snooze"), decision.delay, decision.reason
        else:
            action, delay, reason = "dead", None, decision.reason  # type: ignore[union-attr]
        return entry_for(
            state.attempt, started, now, exc, action=action, delay=delay, reason=reason,
            worker=self.request.hostname, traceback_max_chars=conf.get().traceback_max_chars,
        )

    def _celery_retry(self, *args: Any, **kwargs: Any) -> CeleryRetry:
        """Celery's own retry; the max_retries we pass must not linger on the shared task object."""
        try:
            return celery.Task.retry(self, *args, **kwargs)
        finally:
            self.__dict__.pop("override_max_retries", None)

    def _publish_retry(self, state: AttemptState, entry: dict[str, Any], decision: Retry, **retry_kwargs: Any
                       ) -> CeleryRetry:
        settings = conf.get()
        request = self.request
        header = state.header_after(
            entry, delay=decision.delay, consumes_attempt=decision.consumes_attempt,
            max_entries=settings.history_max_entries, max_bytes=settings.history_max_bytes,
        )
        headers = {**(request.headers or {}), **(retry_kwargs.pop("headers", None) or {}), HEADER: header}
        logger.info(
            "%s[%s] attempt %s failed: %s in %.3fs (%s)", self.name, request.id, state.attempt, entry["action"],
            decision.delay, decision.reason,
            extra={"task_name": self.name, "task_id": request.id, "attempt": state.attempt,
                   "action": entry["action"], "delay": decision.delay, "reason": decision.reason},
        )
        signals.task_retrying.send_robust(
            sender=self, task_id=request.id, attempt=state.attempt, delay=decision.delay,
            reason=decision.reason, exception=retry_kwargs.get("exc"), entry=entry,
        )
        try:
            return self._celery_retry(max_retries=math.inf, headers=headers, **retry_kwargs)
        except Reject as rejected:
            # Celery turns a retry it could not publish (broker down) into Reject(requeue=False):
            # the message would be gone. Keep the task as a dead letter instead, to replay later.
            if not rejected.requeue and not request.is_eager:
                dead_entry = {**entry, "action": "dead", "delay": None, "reason": "rejected"}
                self._record_dead(request, "rejected", f"the retry could not be published: {rejected.reason!r}",
                                  retry_kwargs.get("exc"), state.with_entry(dead_entry), state.omitted)
            raise

    def _give_up(self, state: AttemptState, entry: dict[str, Any], decision: Dead, exc: BaseException | None) -> None:
        request = self.request
        history = state.with_entry(entry)
        logger.warning(
            "%s[%s] gave up after attempt %s: %s (%s)", self.name, request.id, state.attempt, decision.reason,
            decision.detail,
            extra={"task_name": self.name, "task_id": request.id, "attempt": state.attempt,
                   "reason": decision.reason, "detail": decision.detail},
        )
        if not request.is_eager:
            self._record_dead(request, decision.reason, decision.detail, exc, history, state.omitted)
        for receiver, response in signals.task_dead.send_robust(
            sender=self, task_id=request.id, reason=decision.reason, detail=decision.detail, exception=exc,
            history=history, omitted=state.omitted, args=request.args, kwargs=request.kwargs,
        ):
            if isinstance(response, Exception):
                logger.error("safetynet: task_dead receiver %r failed: %r", receiver, response)


    def _record_dead(self, request: Any, reason: str, detail: str, exc: BaseException | None,
                     history: list[dict[str, Any]], omitted: int) -> None:
        from safetynet import deadletter

        deadletter.record_safely(
            task_name=self.name, task_id=request.id, reason=reason, args=request.args, kwargs=request.kwargs,
            parameters=deadletter.parameter_names(self), headers=request.headers,
            delivery_info=request.delivery_info, exception=exc, detail=detail, history=history,
            omitted=omitted, worker=request.hostname or "", failed_at=clock.now(),
        )

    def _record_rejected(self, exc: Reject, started: float) -> None:
        request = self.request
        if request.is_eager:
            return
        state = self._state(started)
        reason = exc.reason if isinstance(exc.reason, BaseException) else None
        entry = entry_for(state.attempt, started, clock.now(), reason or exc, action="dead", delay=None,
                          reason="rejected", worker=request.hostname, traceback_max_chars=conf.get().traceback_max_chars)
        self._record_dead(request, "rejected", f"Reject(requeue=False): {exc.reason!r}", reason or exc,
                          state.with_entry(entry), state.omitted)


def task(*args: Any, **task_options: Any) -> Any:
    """Declare a safetynet task; works like Celery's ``shared_task`` and takes its options."""
    base = task_options.setdefault("base", SafetyTask)
    if not (isinstance(base, type) and issubclass(base, SafetyTask)):
        raise ConfigurationError(f"safetynet.task: base must be SafetyTask or a subclass of it, got {base!r}")
    named = task_options.get("name") or (args[0].__qualname__ if args and callable(args[0]) else None)
    where = f"task {named}" if named else "@safetynet.task(...)"
    options.check_known(task_options, where)
    options.validate(task_options, where)
    return celery.shared_task(*args, **task_options)
