"""The worker side beyond the task body: failures Celery handles in the main process.

- a hard time limit kills the child: it counts as an attempt; while the policy allows another,
  ``SafetyRequest.on_failure`` publishes the retry, else ``on_timeout`` records it (``time_limit``);
- the child dies mid-task (``WorkerLostError``): with ``acks_late`` and ``reject_on_worker_lost``
  Celery puts the message back, silently and without counting; the crashes of each task id and
  attempt are counted here (Redis, else the database) and past ``max_deliveries`` the message is
  acknowledged and recorded as ``crash_loop``. Without late acks the message is gone: it is
  recorded as ``worker_lost``;
- an unknown task name (``task_unknown``), a message the worker refuses (``task_rejected``)
  and a body that cannot be decoded (the consumer's ``on_decode_error``, wrapped at
  ``worker_ready``) are recorded as ``unknown_task``, ``undecodable`` or ``rejected``;
- every worker runs small threads: one moves spooled dead letters into the database, one sends
  lost idempotent messages again, one relays due scheduled retries and outbox messages.

Each of these only acts on a failure; nothing here runs for a task that succeeds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections import OrderedDict
from collections.abc import Callable
from typing import Any

from billiard.einfo import ExceptionInfo
from celery import signals as celery_signals
from celery.app.task import Context
from celery.exceptions import TimeLimitExceeded, WorkerLostError
from celery.utils.serialization import get_pickled_exception
from celery.worker.request import Request
from celery.worker.state import task_ready
from kombu.exceptions import ContentDisallowed, DecodeError

from safetynet.core.decision import Retry, decide
from safetynet.runtime import clock
from safetynet.idempotency import CrashLoop
from safetynet.runtime.history import HEADER, AttemptState, entry_for

__all__ = ["SafetyRequest", "connect"]

logger = logging.getLogger("safetynet")


def _record(**fields: Any) -> None:
    from safetynet import deadletter

    deadletter.record_safely(**fields)


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


#: Read by contrib.sentry, which drops the pool's "Process … exited" error line for them.
time_limited_children = _Pids()


def _unwrapped(exc_info: Any) -> BaseException:
    exc = exc_info.exception
    return getattr(exc, "exc", exc) if type(exc).__name__ == "ExceptionWithTraceback" else exc


class SafetyRequest(Request):
    """Celery's worker Request: hard time limits and lost workers end in a retry or a dead letter."""

    def on_failure(self, exc_info: Any, send_failed_event: bool = True, return_ok: bool = False) -> Any:
        exc = _unwrapped(exc_info)
        if isinstance(exc, TimeLimitExceeded):
            time_limited_children.add(getattr(self, "worker_pid", None))
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

    def _context_and_state(self, started: float) -> tuple[Context, AttemptState]:
        context = getattr(self, "_context", None) or Context(self.request_dict)
        return context, AttemptState.from_headers(context.headers or {}, started)

    def _retry_after_time_limit(self, exc: TimeLimitExceeded) -> bool:
        """The hard limit used up an attempt; publish the next one if the policy allows it."""
        from safetynet import conf, scheduler, signals

        task = self.task
        if not hasattr(task, "_resolved"):
            return False
        now = time.time()
        limit = float(exc.args[0]) if exc.args and isinstance(exc.args[0], (int, float)) else 0.0
        started = self.time_start or now - limit
        context, state = self._context_and_state(started)
        resolved = task._resolved()
        decision = decide(resolved.policy, resolved.rules, state.attempt, exc, state.started_at, now,
                          previous_delay=state.previous_delay, rng=clock.rng())
        if not isinstance(decision, Retry):
            return False
        settings = conf.get()
        entry = entry_for(state.attempt, started, now, exc, action="retry", delay=decision.delay,
                          reason=f"hard time limit ({decision.reason})", worker=self.hostname,
                          traceback_max_chars=settings.traceback_max_chars)
        header = state.header_after(entry, delay=decision.delay, consumes_attempt=True,
                                    max_entries=settings.history_max_entries, max_bytes=settings.history_max_bytes)
        # The killed run failed (it did not crash): its claim is free for the next attempt, uncounted.
        _release_claims(self, f"hard time limit: {exc}")
        try:
            task.signature_from_request(
                request=context, countdown=decision.delay, retries=(context.retries or 0) + 1,
                headers=scheduler.next_delivery_headers({**(context.headers or {}), HEADER: header}),
            ).apply_async()
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
            "%s[%s] attempt %s hit the hard time limit: retry in %.3fs", self.task_name, self.id, state.attempt,
            decision.delay, extra={"task_name": self.task_name, "task_id": self.id, "attempt": state.attempt,
                                   "action": "retry", "delay": decision.delay, "reason": "time_limit"},
        )
        signals.task_retrying.send_robust(sender=task, task_id=self.id, attempt=state.attempt, delay=decision.delay,
                                          reason="time_limit", exception=exc, entry=entry,
                                          args=self.args, kwargs=self.kwargs)
        return True

    def _after_worker_lost(self, exc_info: Any, exc: BaseException) -> Any:
        """Count the crash; past max_deliveries, turn Celery's silent requeue into a crash_loop dead letter."""
        from safetynet import conf, shared

        task = self.task
        _expire_claims(self)
        if getattr(task, "retry_on_worker_lost", False):
            return exc_info  # Celery >= 5.7 publishes a retry itself
        now = time.time()
        context, state = self._context_and_state(self.time_start or now)
        requeued = bool(task.acks_late and task.reject_on_worker_lost)
        counter = f"crashes:{self.id}:{state.attempt}"
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
                    self.task_name, self.id, state.attempt, crashes, limit,
                    extra={"task_name": self.task_name, "task_id": self.id, "attempt": state.attempt,
                           "action": "requeue", "reason": "worker_lost"},
                )
                return exc_info
            reason = "crash_loop"
            detail = f"the worker process died {crashes} times running attempt {state.attempt} (max_deliveries={limit})"
            try:
                raise CrashLoop(detail) from exc
            except CrashLoop as crash:
                failure: BaseException = crash
                exc_info = ExceptionInfo()
        else:
            reason, failure = "worker_lost", exc
            detail = ("the worker process died while running it, and Celery will not run it again: "
                      + ("it was acknowledged before it ran (acks_late=False)" if not task.acks_late
                         else "reject_on_worker_lost=False acknowledges a task whose worker died"))
        self._dead_letter(reason, failure, detail, context, state, self.time_start or now, now)
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
            self._record_time_limit(timeout)
        finally:
            _close_main_process_connections()

    def _record_time_limit(self, timeout: float) -> None:
        now = time.time()
        started = self.time_start or now - timeout
        context, state = self._context_and_state(started)
        try:
            raise TimeLimitExceeded(timeout)
        except TimeLimitExceeded as exc:
            self._dead_letter("time_limit", exc, f"hard time limit of {timeout:g}s exceeded", context, state,
                              started, now)

    def _dead_letter(self, reason: str, failure: BaseException, detail: str, context: Context, state: AttemptState,
                     started: float, now: float) -> None:
        """Record the task, which its (dead) process could not, and free its idempotency claim."""
        from safetynet import conf, deadletter

        entry = entry_for(state.attempt, started, now, failure, action="dead", delay=None, reason=reason,
                          worker=self.hostname, traceback_max_chars=conf.get().traceback_max_chars)
        _record(
            task_name=self.task_name, task_id=self.id, reason=reason, args=self.args, kwargs=self.kwargs,
            parameters=deadletter.parameter_names(self.task), headers=context.headers or {},
            delivery_info=self.delivery_info, exception=failure, detail=detail, history=state.with_entry(entry),
            omitted=state.omitted, worker=self.hostname, failed_at=now,
        )
        _release_claims(self, detail)


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
        return template.render(request.args, request.kwargs)
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
    from safetynet import idempotency

    _write_claim(request, idempotency.expire_task, "expire")


def _release_claims(request: Any, why: str) -> None:
    """The request was dead-lettered here: its claim is failed, so a replay can claim it."""
    from safetynet import idempotency

    _write_claim(request, lambda key, task_id: idempotency.release_task(key, task_id, why), "release")


def _message_fields(message: Any) -> dict[str, Any]:
    headers = dict(getattr(message, "headers", None) or {})
    fields: dict[str, Any] = {
        "task_name": str(headers.get("task") or "?"),
        "task_id": str(headers.get("id") or f"undecodable-{uuid.uuid4()}"),
        "headers": {k: v for k, v in headers.items() if k not in {"task", "id", "lang", "argsrepr", "kwargsrepr"}},
        "delivery_info": getattr(message, "delivery_info", None) or {},
    }
    try:
        body = message.decode()
    except Exception:
        raw = getattr(message, "body", b"")
        raw = raw.encode() if isinstance(raw, str) else bytes(raw or b"")
        fields["raw_body"] = raw
        # A body in a content type this worker refuses may still be a plain JSON task body.
        try:
            body = json.loads(raw)
        except ValueError:
            body = None
    if isinstance(body, (list, tuple)) and len(body) >= 2 and isinstance(body[0], list) and isinstance(body[1], dict):
        fields["args"], fields["kwargs"] = list(body[0]), dict(body[1])
    else:
        fields["body_unknown"] = True  # replay needs arguments given by hand
    return fields


def _on_task_unknown(sender: Any = None, message: Any = None, exc: BaseException | None = None,
                     name: str | None = None, id: str | None = None, **_: Any) -> None:  # noqa: A002
    fields = _message_fields(message)
    fields["task_name"], fields["task_id"] = name or fields["task_name"], id or fields["task_id"]
    _record(reason="unknown_task", exception=exc, detail=f"no task named {name!r} is registered in this worker",
            worker=getattr(sender, "hostname", ""), failed_at=time.time(), **fields)


def _on_task_rejected(sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    fields = _message_fields(message)
    undecodable = exc is None or isinstance(exc, (ContentDisallowed, DecodeError))
    _record(reason="undecodable" if undecodable else "rejected", exception=exc,
            exception_type="" if exc else "UnknownMessage",
            exception_message="" if exc else "the message is not in a task message format",
            detail=f"content type {getattr(message, 'content_type', '?')}",
            worker=getattr(sender, "hostname", ""), failed_at=time.time(), **fields)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    consumer = sender
    original = getattr(consumer, "on_decode_error", None)
    if original is not None and not getattr(original, "_safetynet", False):
        def on_decode_error(message: Any, exc: BaseException) -> Any:
            fields = _message_fields(message)
            _record(reason="undecodable", exception=exc, detail=f"content type {message.content_type}",
                    worker=getattr(consumer, "hostname", ""), failed_at=time.time(), **fields)
            return original(message, exc)

        on_decode_error._safetynet = True  # type: ignore[attr-defined]
        consumer.on_decode_error = on_decode_error
    _start_spool_flusher()
    _start_lost_message_sweeper(getattr(consumer, "app", None))
    _start_relay(getattr(consumer, "app", None))


_flusher: threading.Thread | None = None


def _start_spool_flusher() -> None:
    global _flusher
    if _flusher is not None and _flusher.is_alive():
        return

    def loop() -> None:
        from django.db import close_old_connections

        from safetynet import conf, deadletter

        while True:
            time.sleep(conf.get().spool_flush_seconds)
            try:
                deadletter.flush_spool()
            except Exception as error:  # the database may still be down: try again later
                logger.info("safetynet: spool flush postponed: %r", error)
            finally:
                close_old_connections()

    _flusher = threading.Thread(target=loop, name="safetynet-spool-flusher", daemon=True)
    _flusher.start()


_sweeper: threading.Thread | None = None


def _start_lost_message_sweeper(app: Any) -> None:
    """Every worker sends again the idempotent tasks whose message was lost (see idempotency.resend_lost)."""
    global _sweeper
    if app is None or (_sweeper is not None and _sweeper.is_alive()):
        return

    def loop() -> None:
        from django.db import close_old_connections

        from safetynet import conf, idempotency

        while True:
            grace = conf.get().lost_message_seconds
            time.sleep(min(60.0, max(1.0, (grace or 240.0) / 4)))
            if grace is None:
                continue
            try:
                idempotency.resend_lost(app, grace=grace)
            except Exception as error:  # the database or the broker may be away: try again later
                logger.info("safetynet: lost-message sweep postponed: %r", error)
            finally:
                close_old_connections()

    _sweeper = threading.Thread(target=loop, name="safetynet-lost-message-sweeper", daemon=True)
    _sweeper.start()


_relay: threading.Thread | None = None


def _start_relay(app: Any) -> None:
    """Every worker publishes due scheduled retries and outbox messages (see safetynet.scheduler)."""
    from safetynet import conf, scheduler

    global _relay
    if app is None or not conf.get().relay_in_workers or (_relay is not None and _relay.is_alive()):
        return
    _relay = threading.Thread(target=scheduler.run_forever, args=(app,), kwargs={"stop": threading.Event()},
                              name="safetynet-relay", daemon=True)
    _relay.start()


def connect() -> None:
    """Connect the worker-side receivers (called from the AppConfig)."""
    celery_signals.task_unknown.connect(_on_task_unknown, dispatch_uid="safetynet.task_unknown", weak=False)
    celery_signals.task_rejected.connect(_on_task_rejected, dispatch_uid="safetynet.task_rejected", weak=False)
    celery_signals.worker_ready.connect(_on_worker_ready, dispatch_uid="safetynet.worker_ready", weak=False)
