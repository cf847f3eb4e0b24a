"""The worker's consumer: messages no task can run, and the background jobs every worker runs.

Every message the worker receives ends as a run or as one dead letter, and none stops the worker.
A consumer step (``MessageGuard``, added at ``worker_init``) puts a check in front of Celery's task
message callback: a message Celery could not take as a task (``messages.problem``: a body that is not
``[args, kwargs, embed]``, an id or a name that is not a text, a ``timelimit`` or an ``eta`` Celery
cannot use, ...) is recorded as ``malformed`` and acknowledged, and so is one on which Celery still
raises. An unknown task name (``task_unknown``), a message Celery refuses itself (``task_rejected``)
and a body that cannot be decoded (the consumer's ``on_decode_error``) are recorded as
``unknown_task``, ``malformed``, ``undecodable`` or ``rejected``. At ``worker_ready`` the main
process starts its background jobs: the relay, the orphan sweep, the spool flush and the hourly
housekeeping.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable, Mapping
from typing import Any

from celery import bootsteps
from celery import signals as celery_signals
from celery.exceptions import InvalidTaskError
from django.db import close_old_connections
from kombu.exceptions import ContentDisallowed, DecodeError

from safetynet import conf, deadletter, progress, schedule, shared, stats, taskrecords
from safetynet.background import Job, runner
from safetynet.deadletter import _spool_folder
from safetynet.exceptions import ConfigurationError
from safetynet.protocol.reasons import Reason
from safetynet.runtime import messages

__all__ = ["MessageGuard", "Relay", "connect", "guard_consumer", "guard_task_handler", "start_jobs"]

logger = logging.getLogger("safetynet")


def _message_fields(message: Any, synthetic_id: str = "undecodable") -> dict[str, Any]:
    raw_headers = getattr(message, "headers", None)
    headers: dict[Any, Any] = dict(raw_headers) if isinstance(raw_headers, Mapping) else {}
    name, task_id = headers.get("task"), headers.get("id")
    usable_name, usable_id = isinstance(name, str) and bool(name), isinstance(task_id, str) and bool(task_id)
    # A name or id that is not a text is kept in the headers as it came; the row gets a fresh id of its own.
    kept_out = {"lang", "argsrepr", "kwargsrepr"} | ({"task"} if usable_name else set()) | (
        {"id"} if usable_id else set())
    fields: dict[str, Any] = {
        "task_name": name if usable_name else ("?" if name is None else repr(name)[:200]),
        "task_id": task_id if usable_id else f"{synthetic_id}-{uuid.uuid4()}",
        "headers": {str(k): v for k, v in headers.items() if k not in kept_out},
        "delivery_info": getattr(message, "delivery_info", None) or {},
    }
    if raw_headers is not None and not isinstance(raw_headers, Mapping):
        fields["headers"] = {"headers": repr(raw_headers)[:1000]}
    try:
        body = message.decode()
    except Exception:
        raw = getattr(message, "body", b"")
        raw = raw.encode() if isinstance(raw, str) else bytes(raw or b"")
        fields["raw_body"] = raw
        # A body in a content type this worker refuses may still be a plain JSON task body.
        try:
            body = json.loads(raw)
        except (ValueError, RecursionError):
            body = None
    if isinstance(body, Mapping) and ("args" in body or "kwargs" in body):  # protocol 1, and the hybrid form
        if not usable_name and isinstance(body.get("task"), str) and body["task"]:
            fields["task_name"] = body["task"]
        if not usable_id and isinstance(body.get("id"), str) and body["id"]:
            fields["task_id"] = body["id"]
        body = [body.get("args", []), body.get("kwargs", {})]
    if (isinstance(body, (list, tuple)) and len(body) >= 2 and isinstance(body[0], (list, tuple))
            and isinstance(body[1], Mapping) and all(isinstance(key, str) for key in body[1])):
        fields["args"], fields["kwargs"] = list(body[0]), dict(body[1])
    else:
        fields["body_unknown"] = True  # replay needs arguments given by hand
    return fields


def _give_up(reason: Reason, message: Any, sender: Any, **fields: Any) -> None:
    synthetic_id = "malformed" if reason == Reason.MALFORMED else "undecodable"
    found = {**_message_fields(message, synthetic_id),
             **{key: value for key, value in fields.items() if value is not None}}
    deadletter.give_up(deadletter.Failure(reason=reason, worker=getattr(sender, "hostname", "") or "",
                                          failed_at=time.time(), **found))


def _on_task_unknown(sender: Any = None, message: Any = None, exc: BaseException | None = None,
                     name: str | None = None, id: str | None = None, **_: Any) -> None:  # noqa: A002
    _give_up(Reason.UNKNOWN_TASK, message, sender, task_name=name, task_id=id, exception=exc,
             detail=f"no task named {name!r} is registered in this worker")


def _on_task_rejected(sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    if exc is None or isinstance(exc, (ContentDisallowed, DecodeError)):
        reason = Reason.UNDECODABLE
    else:
        reason = Reason.MALFORMED if isinstance(exc, InvalidTaskError) else Reason.REJECTED
    _give_up(reason, message, sender, exception=exc,
             exception_type="" if exc else "UnknownMessage",
             exception_message="" if exc else "the message is not in a task message format",
             detail=f"content type {getattr(message, 'content_type', '?')}")


def _on_decode_error(consumer: Any, original: Callable[[Any, BaseException], Any]) -> Callable[..., Any]:
    def on_decode_error(message: Any, exc: BaseException) -> Any:
        _give_up(Reason.UNDECODABLE, message, consumer, exception=exc,
                 detail=f"content type {getattr(message, 'content_type', '?')}")
        return original(message, exc)

    on_decode_error._safetynet = True  # type: ignore[attr-defined]
    return on_decode_error


# -- every message a worker can receive ends as a run or one dead letter -------------------------

def _refuse(consumer: Any, message: Any, found: messages.Problem, error: BaseException | None = None) -> None:
    """Record the message as one dead letter (``malformed`` or ``undecodable``), then acknowledge it."""
    reason = Reason.UNDECODABLE if found.undecodable else Reason.MALFORMED
    failure = error or found.error
    _give_up(reason, message, consumer, detail=found.detail, exception=failure,
             exception_type="" if failure is not None else "MalformedMessage",
             exception_message="" if failure is not None else found.detail)
    if not message.acknowledged:
        message.ack_log_error(logger, tuple(getattr(consumer, "connection_errors", ()) or ()))


def guard_task_handler(consumer: Any, handler: Callable[[Any], Any]) -> Callable[[Any], Any]:
    """Celery's task message callback, behind a check of the message: one that Celery could not take as a
    task is recorded and acknowledged instead, and anything Celery still raises while it takes a message is
    too, so that no message stops the worker."""
    if getattr(handler, "_safetynet", False):
        return handler
    strategies = consumer.strategies

    def registered(name: str) -> bool:
        return name in strategies

    def on_task_received(message: Any) -> Any:
        try:
            found = messages.problem(message, registered)
        except Exception as error:  # the check itself must not stop the worker
            found = messages.Problem(f"the message could not be read: {error!r}"[:1000], error=error)
        if found is not None:
            return _refuse(consumer, message, found)
        try:
            return handler(message)
        except Exception as error:  # Celery could not take it: the message must not stop the worker
            # A warning with the traceback: the dead letter is the one report (Sentry: one event).
            if message.acknowledged:
                logger.warning("safetynet: Celery could not take a message it had acknowledged already",
                               exc_info=True)
                return None
            logger.warning("safetynet: Celery could not take a message; it is recorded as malformed", exc_info=True)
            return _refuse(consumer, message, messages.Problem(f"Celery could not take it: {error!r}"[:1000]),
                           error)

    on_task_received._safetynet = True  # type: ignore[attr-defined]
    return on_task_received


def guard_consumer(consumer: Any) -> None:
    """Put safetynet's message guard on a worker's consumer (idempotent): its task handler and its decode
    error callback, also the one kombu's task consumer kept."""
    create = consumer.create_task_handler
    if not getattr(create, "_safetynet", False):
        def create_task_handler(*args: Any, **kwargs: Any) -> Any:
            return guard_task_handler(consumer, create(*args, **kwargs))

        create_task_handler._safetynet = True  # type: ignore[attr-defined]
        consumer.create_task_handler = create_task_handler
    original = consumer.on_decode_error
    if not getattr(original, "_safetynet", False):
        consumer.on_decode_error = _on_decode_error(consumer, original)
    task_consumer = getattr(consumer, "task_consumer", None)
    if task_consumer is not None and not getattr(task_consumer.on_decode_error, "_safetynet", False):
        task_consumer.on_decode_error = consumer.on_decode_error


class MessageGuard(bootsteps.StartStopStep):
    """A consumer step, started after Celery's task consumer and before its event loop: ``guard_consumer``."""

    requires = ("celery.worker.consumer.tasks:Tasks",)

    def start(self, parent: Any) -> None:
        guard_consumer(parent)


def _on_worker_init(sender: Any = None, **_: Any) -> None:
    app = getattr(sender, "app", None)
    if app is not None:
        app.steps["consumer"].add(MessageGuard)


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    # A worker whose safetynet was set up after worker_init: the decode callback is wrapped now, the
    # task handler from the consumer's next connection on.
    if hasattr(sender, "create_task_handler") and hasattr(sender, "on_decode_error"):
        try:
            guard_consumer(sender)
        except Exception:  # the jobs below must start all the same
            logger.exception("safetynet: could not put the message guard on the worker's consumer")
    start_jobs(getattr(sender, "app", None))


# -- the background jobs of the worker's main process ------------------------------------------

class Relay:
    """The relay's turns (a job of every worker, and ``manage.py safetynet relay``): no wait while more is due,
    a growing wait while the database or the broker is away; returns the seconds until the next turn."""

    def __init__(self, app: Any, *, poll: float | None = None, limit: int = 500, sweeps: bool = False) -> None:
        self.app = app
        self.poll = poll
        self.limit = limit
        self.failures = 0
        #: Sweep orphans too, every ``_orphan_interval()`` (the command's relay; a worker sweeps in its own job).
        self.sweeps = sweeps
        self.next_sweep = 0.0

    def __call__(self) -> float:
        limit = self.limit
        if self.sweeps and time.monotonic() >= self.next_sweep:
            self.next_sweep = time.monotonic() + _orphan_interval()
            try:
                _sweep_orphans()
            except Exception as error:  # the database is away: the relay pass below says so
                logger.info("safetynet: orphan sweep postponed: %r", error)
        try:
            run = schedule.relay(self.app, limit=limit)
        except Exception as error:  # the database is away: try again, less often
            self.failures += 1
            logger.warning("safetynet: relay pass failed: %r", error, extra={"action": "relay"})
            close_old_connections()
            run = schedule.RelayRun(error=error)
        else:
            self.failures = self.failures + 1 if run.error is not None else 0
        if run.handled >= limit and run.error is None:
            return 0.0  # more is due: no wait
        interval = self.poll if self.poll is not None else conf.get().relay_poll_seconds
        return min(30.0, interval * (2 ** min(self.failures, 6))) if self.failures else interval


def _flush_spool() -> None:
    try:
        deadletter.flush_spool()
    except ConfigurationError as error:  # another user can write the spool folder: nothing in it is read
        logger.error("safetynet: spool flush refused: %s", error, extra={"action": "spool_flush"})
    except Exception as error:  # the database may still be down: try again later
        logger.info("safetynet: spool flush postponed: %r", error)
    finally:
        close_old_connections()


def _orphan_interval() -> float:
    grace = conf.get().lost_message_seconds
    return min(60.0, max(1.0, (grace or 240.0) / 4))


def _sweep_orphans() -> None:
    if conf.get().lost_message_seconds is not None:
        schedule.sweep_orphans()


def _housekeeping() -> None:
    """Once an hour, in one worker at a time: old rows go."""
    settings = conf.get()
    jobs: tuple[tuple[str, Callable[[], int]], ...] = (
        ("schedule purge", lambda: schedule.purge(time.time() - settings.schedule_keep_seconds)),
        ("stats prune", stats.prune), ("progress purge", progress.purge), ("shared keys purge", shared.purge_expired),
        ("django.tasks results purge", taskrecords.purge))
    for name, job in jobs:
        try:
            job()
        except Exception as error:  # the database may be away: the next hour tries again
            logger.info("safetynet: %s postponed: %r", name, error)


def _report_spool_problem() -> None:
    """A spool this worker could not use is said at start-up (system checks do not run in a worker)."""
    try:
        _, _, problem = _spool_folder.inspect()
    except Exception as error:  # the settings are invalid: the first task will say it louder
        problem = str(error)
    if problem is not None:
        logger.error("safetynet: %s", problem, extra={"action": "spool_check"})


def start_jobs(app: Any) -> None:
    """The main process's background jobs (each added once)."""
    _report_spool_problem()
    runner.add(Job("spool flush", _flush_spool, lambda: conf.get().spool_flush_seconds,
                   at_start=False))
    runner.add(Job("housekeeping", _housekeeping, 3600.0, leader="housekeeping", at_start=False))
    if app is None:
        return
    if conf.get().relay_in_workers:
        runner.add(Job("relay", Relay(app), lambda: conf.get().relay_poll_seconds, lane="relay"))
    # At start-up too: the messages of a worker that was killed are sent again without waiting.
    runner.add(Job("orphan sweep", _sweep_orphans, _orphan_interval, lane="relay"))


def connect() -> None:
    """Connect the worker-side receivers (called from the AppConfig)."""
    celery_signals.task_unknown.connect(_on_task_unknown, dispatch_uid="safetynet.task_unknown", weak=False)
    celery_signals.task_rejected.connect(_on_task_rejected, dispatch_uid="safetynet.task_rejected", weak=False)
    celery_signals.worker_init.connect(_on_worker_init, dispatch_uid="safetynet.worker_init", weak=False)
    celery_signals.worker_ready.connect(_on_worker_ready, dispatch_uid="safetynet.worker_ready", weak=False)
