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

import dataclasses
import functools
import inspect
import logging
import math
import threading
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

import celery
from celery.contrib.django.task import DjangoTask
from celery.exceptions import Ignore, Reject
from celery.exceptions import Retry as CeleryRetry
from celery.utils import uuid as new_task_id
from django.db import Error as DatabaseError
from django.db import transaction

from safetynet import conf, idempotency, progress, scheduler, signals
from safetynet.core.classify import ALWAYS_RETRY
from safetynet.core.decision import Dead, Decision, Retry, decide
from safetynet.core.policy import Fixed, RetryPolicy
from safetynet.exceptions import BreakerOpen, ConfigurationError, Permanent, Snooze, Transient
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
                if self.request.headers:
                    self._drop_second_copy()
                if self._idempotency is None and self.breaker is None and not self.retry_budget:
                    return body(*args, **kwargs)
                return self._run_guarded(functools.partial(body, *args, **kwargs), args, kwargs, started)
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
                if self.request.headers:
                    self._drop_second_copy()
                if self._idempotency is None and self.breaker is None and not self.retry_budget:
                    return body(self, *args, **kwargs)
                return self._run_guarded(functools.partial(body, self, *args, **kwargs), args, kwargs, started)
            except Exception as exc:
                self._after_failure(exc, started)
                raise

    functools.update_wrapper(guarded, body)
    guarded._safetynet_body = run  # type: ignore[attr-defined]
    return guarded


def _routing_of(delivery_info: Any, queue: Any = None) -> dict[str, Any]:
    """Where a retry goes, as Celery's ``signature_from_request`` routes it."""
    if queue:
        return {"queue": getattr(queue, "name", queue)}
    info = delivery_info or {}
    exchange, routing_key = info.get("exchange"), info.get("routing_key")
    if exchange == "" and routing_key:
        return {"queue": routing_key}
    return {name: value for name, value in (("exchange", exchange), ("routing_key", routing_key)) if value}


class SafetyTask(DjangoTask):
    """Celery's (Django) ``Task`` base with retry policies, error classification and attempt history."""

    #: The worker-side request: records a hard time limit as a dead letter.
    Request = "safetynet.runtime.worker:SafetyRequest"

    #: A ``RetryPolicy``; None means Celery's own retry options, else the project default.
    retry_policy: RetryPolicy | None = None
    #: Matchers that make a failure worth retrying (exception classes, predicates, http_status).
    retry_on: Any = ()
    #: Matchers that make a failure permanent.
    fail_on: Any = ()
    #: A template over the task's arguments (``"charge-{order_id}"``) or a callable taking them;
    #: on an instance, the key of the running call.
    idempotency_key: Any = options.KeyOption(None)
    #: Seconds a claim outlives its last heartbeat (None: ``IDEMPOTENCY_LEASE_SECONDS``).
    idempotency_lease: float | None = None
    #: Run the body and the "succeeded" mark in one database transaction.
    idempotency_atomic: bool = True
    #: Enqueueing the same key again within this many seconds sends no second message.
    unique_for: float | None = None
    #: A task that kills its worker this many times is dead-lettered (None: ``MAX_DELIVERIES``).
    max_deliveries: int | None = None
    #: How ``delay()``/``apply_async()`` send it: "now", "on_commit" or "outbox" (None: ``ENQUEUE``).
    enqueue: str | None = None
    #: The name of a breaker in ``SAFETYNET["BREAKERS"]``: while it is open the body is not run and
    #: the task is deferred (no attempt used) until it may half-open.
    breaker: str | None = None
    #: Whose retry budget its retries spend (``RETRY_BUDGET``): None, its breaker's (if it has one);
    #: True, its queue's; a string, a budget of that name shared by the tasks naming it; False, none.
    retry_budget: bool | str | None = None

    #: Show the return value to the user who started the task (the progress endpoint's ``result``).
    progress_result: bool = False

    #: The compiled ``idempotency_key``; None for a task that is not idempotent.
    _idempotency: idempotency.KeyTemplate | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        where = f"task {cls.__dict__.get('name') or cls.__qualname__}"
        if cls.__dict__.get("_decorated"):
            options.check_known(options.decorated_options(cls), where)
        declared = options.declared(cls, SafetyTask)
        options.validate(declared, where)
        run = cls.__dict__.get("run")
        if run is not None and not hasattr(run, "_safetynet_body"):
            cls.run = _wrap_run(run)
            # Celery's add_autoretry_behaviour skips a task that has _orig_run: autoretry_for is
            # applied here, through the core, instead of by Celery's wrapper.
            cls._orig_run = run
        spec = declared.get("idempotency_key")
        if spec is not None and ("idempotency_key" in cls.__dict__ or run is not None):
            cls._make_idempotent(spec, declared, where)

    @classmethod
    def _make_idempotent(cls, spec: Any, declared: dict[str, Any], where: str) -> None:
        """Compile the key against the body's parameters; idempotent tasks get late acks by default."""
        # Read the raw class attribute: getattr would unwrap a staticmethod (an unbound task).
        body = next((vars(klass)["_orig_run"] for klass in cls.__mro__ if "_orig_run" in vars(klass)), None)
        if body is None:
            raise ConfigurationError(f"{where}: idempotency_key needs a task body (a run method)")
        bound = not isinstance(body, staticmethod)
        cls._idempotency = idempotency.KeyTemplate(
            spec, body if bound else body.__func__, bound=bound, where=where
        )
        cls.idempotency_key = options.KeyOption(spec)
        # Redelivery is safe now: acknowledge after the run, and requeue when the worker dies.
        if declared.get("acks_late") is None:
            cls.acks_late = True
        if declared.get("reject_on_worker_lost") is None:
            cls.reject_on_worker_lost = True

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

    def _current_idempotency_key(self) -> str | None:
        """The idempotency key of the running call (stable across retries, redeliveries, replays)."""
        request = self.request
        if self._idempotency is None or request.called_directly:
            return None
        key = getattr(request, "_safetynet_key", None)
        if key is None:
            key = self._idempotency.render(request.args, request.kwargs)
            request._safetynet_key = key
        return key

    def progress(self, current: float, total: float | None = None, message: str = "") -> None:
        """Tell the user who started this task how far it got (see safetynet.progress)."""
        progress.report(self, current, total, message)

    # -- enqueueing -----------------------------------------------------------------------

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,
                    **enqueue_options: Any) -> Any:
        """Celery's ``apply_async``, sent as the task's ``enqueue`` mode says: now, on commit or
        through the outbox; a long retry goes through the durable schedule; an idempotent task's
        key is checked here, and made unique if asked."""
        mode = enqueue_options.pop("enqueue", None)
        progress_for = enqueue_options.pop("progress_for", None)
        if progress_for is not None:  # shown to that user: the row first, then the message says it is tracked
            task_id = task_id or new_task_id()
            progress.track(task_id, self.name, progress.owner_of(progress_for), using=scheduler.database())
            enqueue_options["headers"] = {**(enqueue_options.get("headers") or {}), progress.HEADER: 1}
        headers = enqueue_options.get("headers") or {}
        if scheduler.RELAYED_HEADER in headers or self._get_app().conf.task_always_eager:
            return super().apply_async(args, kwargs, task_id=task_id, **enqueue_options)
        if HEADER in headers:  # a retry: its idempotency claim, if any, was handed over with it
            return self._send_retry(args, kwargs, task_id, enqueue_options)
        if mode is None:
            mode = self.enqueue or conf.get().enqueue
        elif mode not in conf.ENQUEUE_MODES:
            raise ConfigurationError(f"task {self.name}: enqueue must be one of "
                                     f"{', '.join(map(repr, conf.ENQUEUE_MODES))}, got {mode!r}")
        # A bad key fails the caller, not a worker.
        key = None if self._idempotency is None else self._idempotency.render(args, kwargs)
        if mode == "now":
            return self._send_unique(key, args, kwargs, task_id, enqueue_options)
        task_id = task_id or new_task_id()
        using = scheduler.database()
        if mode == "on_commit":
            transaction.on_commit(
                functools.partial(self._send_unique, key, args, kwargs, task_id, enqueue_options), using=using
            )
            return self.AsyncResult(task_id)
        now = time.time()
        options = {**{name: value for name, value in self._get_exec_options().items() if value is not None},
                   **enqueue_options, "task_id": task_id}
        written = scheduler.schedule(key=task_id, kind="outbox", task_name=self.name, task_id=task_id,
                                     broker=scheduler.broker_of(self._get_app()),
                                     due_at=now + scheduler.delay_of(options, now),
                                     message=scheduler.pack(args, kwargs, options, now), using=using)
        if not written and scheduler.settled(task_id, using):
            # The task id was used by an earlier message (Task.replace, a fixed id): its row is taken, so
            # this one is sent once the transaction commits, without the outbox.
            logger.warning("%s[%s]: task id used before; sent on commit instead of through the outbox",
                           self.name, task_id, extra={"task_name": self.name, "task_id": task_id})
            transaction.on_commit(
                functools.partial(self._send_unique, key, args, kwargs, task_id, enqueue_options), using=using)
            return self.AsyncResult(task_id)
        unique_key = None if "safetynet_replay_of" in (enqueue_options.get("headers") or {}) else key
        transaction.on_commit(functools.partial(self._publish_outbox, unique_key, task_id), using=using, robust=True)
        return self.AsyncResult(task_id)

    def _publish_outbox(self, key: str | None, task_id: str) -> None:
        """Once the outbox row has committed: take the ``unique_for`` window, then try to publish at once."""
        if key is not None and self.unique_for:
            from safetynet import shared
            from safetynet.models import ScheduledMessage

            existing = shared.add(f"unique:{key}", task_id, self.unique_for)
            if existing is not None and existing != task_id:
                ScheduledMessage.objects.using(scheduler.database()).filter(
                    key=task_id, state=ScheduledMessage.State.SCHEDULED).delete()
                logger.info("%s: idempotency key %r was enqueued as %s within %ss; outbox message %s dropped",
                            self.name, key, existing, self.unique_for, task_id,
                            extra={"task_name": self.name, "task_id": task_id, "idempotency_key": key})
                return
        scheduler.publish_now(self._get_app(), [task_id])

    def _send_retry(self, args: Any, kwargs: Any, task_id: str | None, enqueue_options: dict[str, Any]) -> Any:
        """Publish a retry: as an ETA message, or, when it waits long enough, through the durable schedule."""
        now = time.time()
        delay = scheduler.delay_of(enqueue_options, now)
        if not scheduler.is_durable(delay):
            return super().apply_async(args, kwargs, task_id=task_id, **enqueue_options)
        task_id = task_id or new_task_id()
        state = AttemptState.from_headers(enqueue_options["headers"], now)
        options = {**enqueue_options, "task_id": task_id}
        row = {"key": f"{task_id}#{state.omitted + len(state.history)}", "kind": "retry", "task_name": self.name,
               "task_id": task_id, "broker": scheduler.broker_of(self._get_app()), "due_at": now + delay}

        def write() -> None:
            try:
                written = scheduler.schedule(message=scheduler.pack(args, kwargs, options, now), **row,
                                             outside_transaction=True)
                if not written and scheduler.settled(row["key"]):
                    # Not a redelivered attempt scheduling again: the task id was used by an earlier
                    # message (Task.replace, a fixed id) whose row is taken. Send it as Celery would.
                    logger.warning("%s[%s]: task id used before; the retry is published as an ETA message",
                                   self.name, task_id, extra={"task_name": self.name, "task_id": task_id})
                    super(SafetyTask, self).apply_async(args, kwargs, task_id=task_id, **enqueue_options)
            except Exception as error:  # not written: the retry must still happen, as Celery would send it
                logger.warning("%s[%s]: could not put the retry in the durable schedule (%r); published as an "
                               "ETA message", self.name, task_id, error,
                               extra={"task_name": self.name, "task_id": task_id, "action": "retry"})
                super(SafetyTask, self).apply_async(args, kwargs, task_id=task_id, **enqueue_options)

        # A retry scheduled inside an idempotent body's transaction is written once it has ended (a
        # failure rolls it back).
        self._after_body_transaction(write)
        return self.AsyncResult(task_id)

    def _send_unique(self, key: str | None, args: Any, kwargs: Any, task_id: str | None,
                     enqueue_options: dict[str, Any]) -> Any:
        """Publish now; an idempotent task declared ``unique_for`` is sent once per window."""
        if key is None:
            return super().apply_async(args, kwargs, task_id=task_id, **enqueue_options)
        headers = enqueue_options.get("headers") or {}
        if self.unique_for and "safetynet_replay_of" not in headers:  # a replay is sent as asked
            from safetynet import shared

            task_id = task_id or new_task_id()
            existing = shared.add(f"unique:{key}", task_id, self.unique_for)
            if existing is not None and existing != task_id:  # the same id: Celery re-sending it (a retry)
                logger.info("%s: idempotency key %r was enqueued as %s within %ss; not sent again",
                            self.name, key, existing, self.unique_for,
                            extra={"task_name": self.name, "task_id": existing, "idempotency_key": key})
                return self.AsyncResult(existing)
            if existing is None:
                try:
                    return self._send_tracked(key, args, kwargs, task_id, enqueue_options)
                except BaseException:  # not sent: the window must not hide the next enqueue
                    shared.delete(f"unique:{key}")
                    raise
        return self._send_tracked(key, args, kwargs, task_id, enqueue_options)

    def _send_tracked(self, key: str, args: Any, kwargs: Any, task_id: str | None,
                      enqueue_options: dict[str, Any]) -> Any:
        """Publish, and record the task as queued so a message the broker loses is sent again."""
        grace = conf.get().lost_message_seconds
        # A chain, chord or callback does not travel in the recorded copy: such a task is not recorded.
        if grace is None or any(enqueue_options.get(name) for name in ("link", "link_error", "chain", "chord")):
            return super().apply_async(args, kwargs, task_id=task_id, **enqueue_options)
        task_id = task_id or new_task_id()
        result = super().apply_async(args, kwargs, task_id=task_id, **enqueue_options)
        self._track_sent(key, task_id, args, kwargs, enqueue_options, grace)
        return result

    def _track_sent(self, key: str, task_id: str, args: Any, kwargs: Any, enqueue_options: dict[str, Any],
                    grace: float) -> None:
        """Record the sent task as queued once the sender's transaction commits (see idempotency.track)."""
        now = time.time()
        options = {name: enqueue_options[name] for name in
                   ("queue", "exchange", "routing_key", "priority", "time_limit", "soft_time_limit")
                   if enqueue_options.get(name) is not None}
        for name in ("queue", "exchange"):
            if name in options and not isinstance(options[name], str):
                options[name] = getattr(options[name], "name", str(options[name]))
        # Not before it is due: a countdown or an eta moves the grace on; an expiry travels as a time.
        due = now + scheduler.delay_of(enqueue_options, now)
        expires = enqueue_options.get("expires")
        if isinstance(expires, (int, float)):
            options["expires"] = datetime.fromtimestamp(now + expires, tz=timezone.utc).isoformat()
        elif isinstance(expires, (str, datetime)):
            options["expires"] = scheduler.moment(expires).isoformat()
        message = {"args": list(args or ()), "kwargs": dict(kwargs or {}), "options": options,
                   "headers": dict(enqueue_options.get("headers") or {})}

        def record() -> None:
            try:
                idempotency.track(key, task_name=self.name, task_id=task_id, message=message,
                                  grace=grace + (due - now))
            except Exception:  # the message is sent; only its safety net against loss is missing
                logger.exception("safetynet: could not record %s[%s] as sent; a lost message will not be resent",
                                 self.name, task_id)

        transaction.on_commit(record, using=idempotency.database_for_claims())

    def _drop_second_copy(self) -> None:
        """A message the relay published: run only the first copy of it that reached a worker."""
        request = self.request
        relayed = request.headers.get(scheduler.RELAYED_HEADER)
        if not relayed or request.called_directly:
            return
        try:
            key, token = relayed
            accepted = scheduler.accept(str(key), str(token))
        except (ValueError, TypeError):
            return  # not a header safetynet wrote
        except DatabaseError as error:  # cannot tell: run it (a second copy is rare; a lost one is worse)
            logger.warning("%s[%s]: could not check its relayed copy (%r); running it", self.name, request.id, error,
                           extra={"task_name": self.name, "task_id": request.id})
            return
        if not accepted:
            logger.warning("%s[%s]: a second copy of relayed message %s reached a worker; dropped", self.name,
                           request.id, key, extra={"task_name": self.name, "task_id": request.id, "action": "drop"})
            raise Ignore()

    def _run_guarded(self, call: Callable[[], Any], args: Any, kwargs: Any, started: float) -> Any:
        """Through the task's breaker (if any), then its idempotency claim (if any), run the body."""
        request = self.request
        if request.called_directly:
            return call()
        from safetynet import breakers

        ticket = None
        if self.breaker is not None:
            try:
                ticket = breakers.enter_or_skip(self.breaker)
            except BreakerOpen as refused:
                if request.is_eager:  # an eager run cannot wait (its retry would run at once, again and again)
                    raise Transient(f"{refused}; an eager run cannot wait for it") from None
                raise  # a Snooze: deferred, no attempt used
        scope = self._budget_scope()
        if scope is not None and self.attempt == 1:  # a first attempt (also after deferrals) earns budget
            self._budget_safely(breakers.count_first_attempt, scope)
        ran = False

        def body() -> Any:
            nonlocal ran
            ran = True
            return call()

        try:
            result = self._run_claimed(body, args, kwargs, started) if self._idempotency is not None else body()
        except BaseException as exc:
            # Only what the body did tells the breaker about the upstream (a stored result, a deferral
            # or a claim error made no call).
            breakers.report(ticket, exc if ran else None)
            raise
        breakers.report(ticket, True if ran else None)
        return result

    def _budget_scope(self) -> str | None:
        """Whose retry budget this task's retries spend: a named one, its queue's, its breaker's, or none."""
        if isinstance(self.retry_budget, str):
            return f"named:{self.retry_budget}"
        if self.retry_budget:
            info = self.request.delivery_info or {}
            return f"queue:{info.get('routing_key') or self.queue or 'celery'}"
        if self.breaker is not None and self.retry_budget is None:
            return f"breaker:{self.breaker}"
        return None

    # -- idempotent runs --------------------------------------------------------------------

    def _run_claimed(self, call: Callable[[], Any], args: Any, kwargs: Any, started: float) -> Any:
        """Claim the key, then run the body once: the path of an idempotent task."""
        request = self.request
        if request.called_directly:
            return call()
        try:
            key = self._idempotency.render(args, kwargs)  # type: ignore[union-attr]
        except idempotency.IdempotencyKeyError as error:
            raise Permanent(str(error)) from error
        request._safetynet_key = key
        settings = conf.get()
        try:
            held = idempotency.claim(
                key, task_name=self.name, task_id=request.id,
                lease=float(self.idempotency_lease or settings.idempotency_lease_seconds),
                max_deliveries=self.max_deliveries or settings.max_deliveries,
                handover=str((request.headers or {}).get(idempotency.HANDOVER_HEADER) or ""),
            )
        except DatabaseError as error:  # the database is away: nothing ran, try again later
            raise Transient(f"could not claim idempotency key {key!r}: {error}") from error
        if held.outcome == idempotency.SUCCEEDED:
            logger.info("%s[%s]: idempotency key %r already succeeded; returning its stored result",
                        self.name, request.id, key,
                        extra={"task_name": self.name, "task_id": request.id, "idempotency_key": key})
            return held.result
        if held.outcome == idempotency.IN_PROGRESS:
            self._defer(held, started)
        if held.outcome == idempotency.CRASH_LOOP:
            self._crash_loop(held, started)
        request._safetynet_claim = held  # a retry scheduled by this run hands the claim over
        try:
            with idempotency.holding(held):
                if not self.idempotency_atomic:
                    result = call()
                    if not idempotency.mark_succeeded(held, result):
                        logger.warning("%s[%s]: idempotency key %r was taken over while this run worked",
                                       self.name, request.id, key)
                    return result
                request._safetynet_body_tx = True
                try:
                    return idempotency.run_atomically(held, call)
                finally:
                    request._safetynet_body_tx = False
                    self._run_after_body_transaction(request)
        except Exception as exc:
            # Decide while the claim is held: a retry keeps it (handed over to the next attempt),
            # so a duplicate stays deferred until the operation succeeds or dies.
            if not isinstance(exc, _PASS_THROUGH) and getattr(request, "_safetynet_settled", None) is not exc:
                try:
                    self._after_failure(exc, started)
                except CeleryRetry:
                    self._release_unless_handed_over(held, exc)
                    raise
                request._safetynet_settled = exc
            self._release_unless_handed_over(held, exc)
            raise
        except BaseException as exc:
            self._release_unless_handed_over(held, exc)
            raise

    def _release_unless_handed_over(self, held: idempotency.Claim, exc: BaseException) -> None:
        if getattr(self.request, "_safetynet_handed_over", None) is held:
            return
        try:
            idempotency.release(held, exc)
        except Exception:  # the failure itself is what the caller must see
            logger.exception("safetynet: could not release idempotency key %r", held.key)

    def _defer(self, held: idempotency.Claim, started: float) -> None:
        """Another run holds the key: come back later without using up an attempt."""
        request = self.request
        if request.is_eager:
            raise idempotency.KeyInProgress(
                f"idempotency key {held.key!r} is in progress in task {held.holder_task_id}; "
                "an eager run cannot wait for it"
            )
        state = self._state(started)
        deferrals = sum(1 for entry in state.history if entry.get("action") == "snooze")
        remaining = max(0.0, held.lease_until - time.time())
        delay = max(0.5, min(remaining + 0.1, 2.0 ** deferrals, 30.0))
        snooze = Snooze(delay, f"idempotency key {held.key!r} is in progress in task {held.holder_task_id}")
        self._after_failure(snooze, started)  # publishes the deferred run, or returns past the deadline
        request._safetynet_settled = snooze
        raise snooze

    def _crash_loop(self, held: idempotency.Claim, started: float) -> None:
        """The runs holding this key keep dying: dead-letter it instead of killing another worker."""
        request = self.request
        limit = self.max_deliveries or conf.get().max_deliveries
        error = idempotency.CrashLoop(
            f"the last {held.deliveries - 1} runs holding idempotency key {held.key!r} died without finishing "
            f"(max_deliveries={limit})"
        )
        idempotency.release(held, error)
        state = self._state(started)
        decision = Dead("crash_loop", str(error))
        # Like a crash loop the worker's main process finds, this one is announced by
        # dead_letter_recorded only (task_dead is for the retry decisions).
        self._give_up(state, self._entry(state, started, clock.now(), error, decision), decision, error,
                      send_task_dead=False)
        request._safetynet_settled = error
        raise error

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
        if isinstance(decision, Retry) and decision.consumes_attempt and (self.breaker or self.retry_budget):
            decision = self._within_budget(decision)
        entry = self._entry(state, started, now, exc, decision)
        if isinstance(decision, Retry):
            self._publish_retry(state, entry, decision, exc=exc, countdown=decision.delay)
        self._give_up(state, entry, decision, exc)  # type: ignore[arg-type]

    def _within_budget(self, decision: Retry) -> Retry:
        """Spend a retry of the breaker's budget; past it, the retry waits longer (it is never dropped)."""
        from safetynet import breakers

        scope = self._budget_scope()
        if scope is None:
            return decision
        spent = self._budget_safely(breakers.budgeted, scope, decision.delay)
        if spent is None or spent[1]:
            return decision
        kind, _, name = scope.partition(":")
        whose = {"breaker": "breaker", "queue": "queue", "named": "budget"}[kind]
        return dataclasses.replace(decision, delay=spent[0],
                                   reason=f"{decision.reason}; retry budget of {whose} {name!r} spent")

    def _budget_safely(self, call: Callable[..., Any], *args: Any) -> Any:
        try:
            return call(*args)
        except Exception as error:  # the budget is a guard: its store being away must not fail the task
            logger.warning("%s: retry budget not applied: %r", self.name, error, extra={"task_name": self.name})
            return None

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
            delay: float | None = scheduler.delay_of({"eta": eta}, now)
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
        headers = scheduler.next_delivery_headers(
            {**(request.headers or {}), **(retry_kwargs.pop("headers", None) or {}), HEADER: header})
        held = getattr(request, "_safetynet_claim", None)
        if held is not None and not request.is_eager:
            token = idempotency.new_handover_token()
            retry_headers = {**headers, idempotency.HANDOVER_HEADER: token}
            message = None
            if settings.lost_message_seconds is not None:  # kept to be sent again if the retry is lost
                message = {"args": list(retry_kwargs.get("args") or request.args or ()),
                           "kwargs": dict(retry_kwargs.get("kwargs") or request.kwargs or {}),
                           "options": _routing_of(request.delivery_info, retry_kwargs.get("queue")),
                           "headers": retry_headers}
            until = time.time() + decision.delay + held.lease
            if getattr(request, "_safetynet_body_tx", False):
                # self.retry() inside the body's transaction, which its Retry rolls back: hand over
                # once it has (a retry that comes first waits for the claim's lease, or the hand-over).
                self._after_body_transaction(lambda: idempotency.hand_over(held, token, until, message=message))
                handed = True
            else:
                try:
                    handed = idempotency.hand_over(held, token, until, message=message)
                except DatabaseError:
                    logger.exception("safetynet: could not hand idempotency key %r over to the retry", held.key)
                    handed = False
            if handed:
                headers = retry_headers
                request._safetynet_handed_over = held
                request._safetynet_handover_token = token
        logger.info(
            "%s[%s] attempt %s failed: %s in %.3fs (%s)", self.name, request.id, state.attempt, entry["action"],
            decision.delay, decision.reason,
            extra={"task_name": self.name, "task_id": request.id, "attempt": state.attempt,
                   "action": entry["action"], "delay": decision.delay, "reason": decision.reason},
        )
        signals.task_retrying.send_robust(
            sender=self, task_id=request.id, attempt=state.attempt, delay=decision.delay,
            reason=decision.reason, exception=retry_kwargs.get("exc"), entry=entry,
            args=request.args, kwargs=request.kwargs,
        )
        try:
            return self._celery_retry(max_retries=math.inf, headers=headers, **retry_kwargs)
        except Reject as rejected:
            # Celery turns a retry it could not publish (broker down) into Reject(requeue=False):
            # the message would be gone. A late-acked one goes back to the queue; an early-acked
            # one (its message is gone already) is kept as a dead letter, to replay later.
            token = getattr(request, "_safetynet_handover_token", None)
            if token is not None and held is not None:  # no message carries the claim: free it
                request._safetynet_handed_over = request._safetynet_handover_token = None
                orphan = dataclasses.replace(held, owner=token)
                self._after_body_transaction(lambda: idempotency.release(orphan, rejected))
            if not rejected.requeue and not request.is_eager and self.acks_late:
                # The message this attempt came in is not acknowledged yet: give it back to the
                # broker instead (if the broker is away, it stays unacknowledged and comes back).
                logger.warning(
                    "%s[%s] attempt %s: the retry could not be published (%r); the message goes back to the "
                    "queue", self.name, request.id, state.attempt, rejected.reason,
                    extra={"task_name": self.name, "task_id": request.id, "attempt": state.attempt,
                           "action": "requeue", "reason": "retry not published"},
                )
                raise Reject(rejected.reason, requeue=True) from rejected
            if not rejected.requeue and not request.is_eager:
                dead_entry = {**entry, "action": "dead", "delay": None, "reason": "rejected"}
                self._record_dead(request, "rejected", f"the retry could not be published: {rejected.reason!r}",
                                  retry_kwargs.get("exc"), state.with_entry(dead_entry), state.omitted)
            raise

    def _give_up(self, state: AttemptState, entry: dict[str, Any], decision: Dead, exc: BaseException | None,
                 *, send_task_dead: bool = True) -> None:
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
        if not send_task_dead:
            return
        for receiver, response in signals.task_dead.send_robust(
            sender=self, task_id=request.id, reason=decision.reason, detail=decision.detail, exception=exc,
            history=history, omitted=state.omitted, args=request.args, kwargs=request.kwargs,
        ):
            if isinstance(response, Exception):
                logger.error("safetynet: task_dead receiver %r failed: %r", receiver, response)

    def _after_body_transaction(self, write: Callable[[], Any]) -> None:
        """Run ``write`` now, or, inside an idempotent body's transaction (which a failure rolls
        back), as soon as that transaction has ended."""
        request = self.request
        if getattr(request, "_safetynet_body_tx", False):
            request.__dict__.setdefault("_safetynet_after_tx", []).append(write)
        else:
            write()

    def _run_after_body_transaction(self, request: Any) -> None:
        for write in request.__dict__.pop("_safetynet_after_tx", ()):
            try:
                write()
            except Exception:  # a record or a hand-over that fails must not hide the task's outcome
                logger.exception("safetynet: could not write after the body's transaction of %s[%s]",
                                 self.name, request.id)

    def _record_dead(self, request: Any, reason: str, detail: str, exc: BaseException | None,
                     history: list[dict[str, Any]], omitted: int) -> None:
        from safetynet import deadletter

        self._after_body_transaction(lambda: deadletter.record_safely(
            task_name=self.name, task_id=request.id, reason=reason, args=request.args, kwargs=request.kwargs,
            parameters=deadletter.parameter_names(self), headers=request.headers,
            delivery_info=request.delivery_info, exception=exc, detail=detail, history=history,
            omitted=omitted, worker=request.hostname or "", failed_at=clock.now(),
        ))

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

    def declare(function: Callable[..., Any]) -> Any:
        spec = task_options.get("idempotency_key")
        if spec is not None:  # checked now, not when Celery first builds the task class
            name = task_options.get("name") or getattr(function, "__qualname__", repr(function))
            idempotency.KeyTemplate(spec, function, bound=bool(task_options.get("bind")), where=f"task {name}")
        return celery.shared_task(**task_options)(function)

    if len(args) == 1 and callable(args[0]):
        return declare(args[0])
    if args:
        return celery.shared_task(*args, **task_options)
    return declare
