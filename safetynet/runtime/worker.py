"""The worker's main process: failures Celery handles outside the task's own run.

- a hard time limit kills the child: it counts as an attempt; while the policy allows another,
  ``SafetyRequest.on_failure`` publishes the retry, else ``on_timeout`` records it (``time_limit``);
- the child dies mid-task (``WorkerLostError``): with ``acks_late`` and ``reject_on_worker_lost``
  Celery puts the message back, silently and without counting; the crashes of each task id and
  attempt are counted here (Redis, else the database) and past ``max_deliveries`` the message is
  acknowledged and recorded as ``crash_loop``. Without late acks the message is gone: it is
  recorded as ``worker_lost``.

Each of these only acts on a failure; nothing here runs for a task that succeeds.
"""

from __future__ import annotations

import logging
import threading
import time
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery.app.task import Context
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.utils.serialization import get_pickled_exception
from celery.worker.request import Request
from celery.worker.state import task_ready

from safetynet import conf, deadletter, idempotency, shared, signals
from safetynet.core.decision import Retry, decide
from safetynet.exceptions import ConfigurationError, CrashLoop
from safetynet.protocol import headers as header_names
from safetynet.protocol.attempt import Attempt
from safetynet.protocol.history import entry_for
from safetynet.protocol.reasons import Reason
from safetynet.redaction import parameter_names
from safetynet.runtime import clock, options, sending

__all__ = ["SafetyRequest", "killed_by_time_limit", "ran_safety_task"]

logger = logging.getLogger("safetynet")


class _Pids:
    """Pool children a hard time limit of a safetynet task killed (the pool then logs their exit)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.pids: OrderedDict[int, None] = OrderedDict()

    def add(self, pid: Any) -> None:
        if isinstance(pid, int):
            with self.lock:
                self.pids[pid] = None
                while len(self.pids) > 1_000:
                    self.pids.popitem(last=False)

    def forget(self, pid: Any) -> bool:
        """True (once) if ``pid`` was killed by such a time limit."""
        with self.lock:
            return self.pids.pop(pid, False) is None


_time_limited_children = _Pids()


def killed_by_time_limit(pid: Any) -> bool:
    """True (once) if pool child ``pid`` was killed by the hard time limit of a safetynet task (its exit is
    logged by the pool; the dead letter reports it already)."""
    return _time_limited_children.forget(pid)


def ran_safety_task(pid: Any) -> bool:
    """True if pool child ``pid`` was running a safetynet task when it died: safetynet retries, requeues or records
    that death itself (the pool logs the exit before the task's request hears of it)."""
    from celery.worker.state import active_requests

    return isinstance(pid, int) and any(
        getattr(request, "worker_pid", None) == pid and _is_safety_task(getattr(request, "task", None))
        for request in list(active_requests)
    )


def _unwrapped(exc_info: Any) -> BaseException:
    exc = exc_info.exception
    return getattr(exc, "exc", exc) if type(exc).__name__ == "ExceptionWithTraceback" else exc  # type: ignore[no-any-return]


def _is_safety_task(task: Any) -> bool:
    return bool(getattr(type(task), "_safetynet_base", False))


class SafetyRequest(Request):
    """Celery's worker Request: hard time limits and lost workers end in a retry or a dead letter."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = _unwrapped(exc_info)
        if isinstance(exc, TimeLimitExceeded):
            _time_limited_children.add(getattr(self, "worker_pid", None))
            if self._retry_after_time_limit(exc):
                return None
        if (isinstance(exc, (SystemExit, KeyboardInterrupt)) and hasattr(self, "_worker_lost_info")
                and not (getattr(self, "_already_cancelled", False) or getattr(self, "_already_revoked", False))):
            # Celery >= 5.7 (billiard >= 4.3) reports a child that exited this way before it is gone,
            # and treats it as a lost worker inside its on_failure: do the same, first.
            exc_info = self._worker_lost_info(exc)
            exc = _unwrapped(exc_info)
        if isinstance(exc, WorkerLostError):
            try:
                exc_info = self._after_worker_lost(exc_info, exc)
            finally:
                _close_main_process_connections()
        return super().on_failure(exc_info, send_failed_event, return_ok)

    def _celery_context(self) -> Context:
        """The request's context as the task saw it (Celery keeps it on ``_context``)."""
        return getattr(self, "_context", None) or Context(self.request_dict)

    def _attempt(self, started: float) -> Attempt:
        """The attempt the child ran, as far as the main process knows it (no plug-ins take part here)."""
        context = self._celery_context()
        return Attempt(task=self.task, request=context, args=tuple(self.args or ()), kwargs=dict(self.kwargs or {}),
                       started=started, started_perf=time.perf_counter())

    def _retry_after_time_limit(self, exc: TimeLimitExceeded) -> bool:
        """The hard limit used up an attempt; publish the next one if the policy allows it."""
        task = self.task
        if not _is_safety_task(task):
            return False
        now = time.time()
        limit = float(exc.args[0]) if exc.args and isinstance(exc.args[0], (int, float)) else 0.0
        attempt = self._attempt(self.time_start or now - limit)
        history = attempt.history
        allowed = getattr(task, "time_limit_retries", None)
        if allowed is None:
            allowed = conf.get().time_limit_retries
        if allowed is not None and history.time_limits >= allowed:
            # A run that hangs until it is killed is likely to hang again: each retry would hold a worker for
            # the whole limit. The task is dead-lettered as time_limit (on_timeout).
            self._time_limit_detail = (f"; killed by it {history.time_limits + 1} times "
                                       f"(time_limit_retries={allowed})")
            return False
        resolved = options.resolved(task)
        decision = decide(resolved.policy, resolved.rules, history.attempt, exc, history.started_at, now,
                          previous_delay=history.previous_delay, rng=clock.rng())
        if not isinstance(decision, Retry):
            return False
        settings = conf.get()
        entry = entry_for(history.attempt, attempt.started, now, exc, action="retry", delay=decision.delay,
                          reason=f"hard time limit ({decision.reason})", worker=self.hostname,
                          traceback_max_chars=settings.traceback_max_chars)
        header = history.header_after(entry, delay=decision.delay, consumes_attempt=True,
                                      max_entries=settings.history_max_entries, max_bytes=settings.history_max_bytes,
                                      time_limit=True)
        context = attempt.request
        # The killed run failed (it did not crash): its claim is free for the next attempt, uncounted.
        _release_claims(self, f"hard time limit: {exc}")
        headers = {key: value for key, value in (context.headers or {}).items() if key not in header_names.DELIVERY}
        headers[header_names.HISTORY] = header
        try:
            signature = task.signature_from_request(request=context, countdown=decision.delay,
                                                    retries=(context.retries or 0) + 1, headers=headers)
            sending.send_retry(attempt, signature, decision.delay)
        except Exception:
            logger.exception("safetynet: could not publish the retry of %s[%s] after its hard time limit",
                             self.task_name, self.id)
            return False
        self._safetynet_retried = True
        task_ready(self)
        try:
            task.backend.mark_as_retry(self.id, exc, request=context)
        except Exception:  # the state is informative; the retry is on its way
            logger.exception("safetynet: could not store the RETRY state of %s[%s]", self.task_name, self.id)
        if task.acks_late:
            self.acknowledge()
        self.send_event("task-retried", exception=repr(get_pickled_exception(exc)), traceback="")
        logger.warning(
            "%s[%s] attempt %s hit the hard time limit: retry in %.3fs", self.task_name, self.id, history.attempt,
            decision.delay, extra={"task_name": self.task_name, "task_id": self.id, "attempt": history.attempt,
                                   "action": "retry", "delay": decision.delay, "reason": "time_limit"},
        )
        signals.task_retrying.send_robust(sender=task, task_id=self.id, attempt=history.attempt, delay=decision.delay,
                                          reason="time_limit", exception=exc, entry=entry,
                                          args=self.args, kwargs=self.kwargs)
        return True

    def _after_worker_lost(self, exc_info: Any, exc: BaseException) -> Any:
        """Count the crash; past max_deliveries, turn Celery's silent requeue into a crash_loop dead letter."""
        task = self.task
        _expire_claims(self)
        if getattr(task, "retry_on_worker_lost", False):
            return exc_info  # Celery >= 5.7 publishes a retry itself
        now = time.time()
        attempt = self._attempt(self.time_start or now)
        number = attempt.history.attempt
        requeued = bool(task.acks_late and task.reject_on_worker_lost)
        counter = f"crashes:{self.id}:{number}"
        if requeued:
            limit = getattr(task, "max_deliveries", None) or conf.get().max_deliveries
            try:
                crashes = shared.incr(counter, ttl=86_400)
            except Exception:
                logger.exception("safetynet: could not count the crash of %s[%s]; Celery requeues it",
                                 self.task_name, self.id)
                return exc_info
            if crashes < limit:
                logger.warning(
                    "%s[%s] attempt %s: the worker process died (crash %s of %s); Celery puts it back in the queue",
                    self.task_name, self.id, number, crashes, limit,
                    extra={"task_name": self.task_name, "task_id": self.id, "attempt": number,
                           "action": "requeue", "reason": "worker_lost"},
                )
                return exc_info
            reason = Reason.CRASH_LOOP
            detail = f"the worker process died {crashes} times running attempt {number} (max_deliveries={limit})"
            try:
                raise CrashLoop(detail) from exc
            except CrashLoop as crash:
                failure: BaseException = crash
                exc_info = ExceptionInfo()
        else:
            reason, failure = Reason.WORKER_LOST, exc
            detail = ("the worker process died while running it, and Celery will not run it again: "
                      + ("it was acknowledged before it ran (acks_late=False)" if not task.acks_late
                         else "reject_on_worker_lost=False acknowledges a task whose worker died"))
        self._dead_letter(reason, failure, detail, attempt, now)
        if requeued:
            try:
                shared.delete(counter)
            except Exception:  # the counter expires by itself
                logger.info("safetynet: could not delete the crash counter of %s", self.id)
        return exc_info

    def on_timeout(self, soft: bool, timeout: float) -> None:
        if getattr(self, "_safetynet_retried", False):
            _close_main_process_connections()
            return  # the hard limit used up an attempt and the next one is published
        super().on_timeout(soft, timeout)
        if soft:
            return
        try:
            now = time.time()
            try:
                raise TimeLimitExceeded(timeout)
            except TimeLimitExceeded as exc:
                self._dead_letter(Reason.TIME_LIMIT, exc, f"hard time limit of {timeout:g}s exceeded"
                                  + getattr(self, "_time_limit_detail", ""),
                                  self._attempt(self.time_start or now - timeout), now)
        finally:
            _close_main_process_connections()

    def _dead_letter(self, reason: Reason, failure: BaseException, detail: str, attempt: Attempt, now: float) -> None:
        """Record the task, which its (dead) process could not, and free its idempotency claim."""
        history = attempt.history
        entry = entry_for(history.attempt, attempt.started, now, failure, action="dead", delay=None, reason=reason,
                          worker=self.hostname, traceback_max_chars=conf.get().traceback_max_chars)
        deadletter.give_up(deadletter.Failure(
            task_name=self.task_name, task_id=self.id, reason=reason, detail=detail, args=self.args or (),
            kwargs=self.kwargs or {}, parameters=parameter_names(self.task), headers=attempt.request.headers or {},
            delivery_info=self.delivery_info or {}, exception=failure, history=history.with_entry(entry),
            omitted=history.omitted, worker=self.hostname or "", failed_at=now,
        ))
        _release_claims(self, detail)


def with_safety(request_class: Any) -> type[SafetyRequest]:
    """A task class's own ``Request`` class with ``SafetyRequest`` behind it (its methods first, calling on
    through ``super()``): a hard time limit, a lost worker or a crash loop still end in a retry or a dead letter."""
    if isinstance(request_class, type) and issubclass(request_class, SafetyRequest):
        return request_class
    if not (isinstance(request_class, type) and issubclass(request_class, Request)):
        raise ConfigurationError(f"a task's Request must be a subclass of celery.worker.request.Request, "
                                 f"got {request_class!r}")
    combined = _with_safety.get(request_class)
    if combined is None:
        combined = _with_safety[request_class] = type(request_class.__name__, (request_class, SafetyRequest), {
            "__module__": request_class.__module__, "__qualname__": request_class.__qualname__,
            "__doc__": request_class.__doc__,
        })
    return combined


_with_safety: dict[type, type[SafetyRequest]] = {}


def _close_main_process_connections() -> None:
    """The worker's main process runs no task, so nothing else replaces a database connection that
    broke (a restart, a failover) between two of its rare writes."""
    try:
        from django.db import close_old_connections

        close_old_connections()
    except Exception:  # closing must not disturb the worker
        logger.debug("safetynet: could not close old database connections", exc_info=True)


def _claimed_key(request: Any) -> str | None:
    """The idempotency key the request's task claims, or None (not idempotent, or no valid key)."""
    template = getattr(request.task, "_idempotency", None)
    if template is None:
        return None
    try:
        return template.render(request.args, request.kwargs)  # type: ignore[no-any-return]
    except Exception:  # no valid key: the run could not have claimed one
        return None


def _write_claim(request: Any, write: Callable[[str, str], Any], what: str) -> None:
    """``write(key, task_id)`` to the request's idempotency claim, if its task claims one; never raising."""
    key = _claimed_key(request)
    if key is None:
        return
    try:
        write(key, request.id)
    except Exception:  # the lease runs out by itself
        logger.exception("safetynet: could not %s the idempotency claim of %s", what, request.id)


def _expire_claims(request: Any) -> None:
    """The process running the request is dead: its idempotency claim may be taken over at once."""
    _write_claim(request, idempotency.expire_task, "expire")


def _release_claims(request: Any, why: str) -> None:
    """The request was dead-lettered here: its claim is failed, so a replay can claim it."""
    _write_claim(request, lambda key, task_id: idempotency.release_task(key, task_id, why), "release")
