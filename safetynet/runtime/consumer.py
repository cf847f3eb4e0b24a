"""The worker's consumer: messages no task can run, and the background jobs every worker runs.

An unknown task name (``task_unknown``), a message the worker refuses (``task_rejected``) and a body
that cannot be decoded (the consumer's ``on_decode_error``, wrapped at ``worker_ready``) are
recorded as ``unknown_task``, ``undecodable`` or ``rejected``. At ``worker_ready`` the main process
starts its background jobs: the relay, the orphan sweep, the spool flush and the hourly housekeeping.
"""

from __future__ import annotations

import json
import logging
import time
import uuid
from collections.abc import Callable
from typing import Any

from celery import signals as celery_signals
from django.db import close_old_connections
from kombu.exceptions import ContentDisallowed, DecodeError

from safetynet import conf, deadletter, progress, schedule, shared, stats, taskrecords
from safetynet.background import Job, runner
from safetynet.deadletter import _spool_folder
from safetynet.exceptions import ConfigurationError
from safetynet.protocol.reasons import Reason

__all__ = ["Relay", "connect", "start_jobs"]

logger = logging.getLogger("safetynet")


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


def _give_up(reason: Reason, message: Any, sender: Any, **fields: Any) -> None:
    found = {**_message_fields(message), **{key: value for key, value in fields.items() if value is not None}}
    deadletter.give_up(deadletter.Failure(reason=reason, worker=getattr(sender, "hostname", "") or "",
                                          failed_at=time.time(), **found))


def _on_task_unknown(sender: Any = None, message: Any = None, exc: BaseException | None = None,
                     name: str | None = None, id: str | None = None, **_: Any) -> None:  # noqa: A002
    _give_up(Reason.UNKNOWN_TASK, message, sender, task_name=name, task_id=id, exception=exc,
             detail=f"no task named {name!r} is registered in this worker")


def _on_task_rejected(sender: Any = None, message: Any = None, exc: BaseException | None = None, **_: Any) -> None:
    undecodable = exc is None or isinstance(exc, (ContentDisallowed, DecodeError))
    _give_up(Reason.UNDECODABLE if undecodable else Reason.REJECTED, message, sender, exception=exc,
             exception_type="" if exc else "UnknownMessage",
             exception_message="" if exc else "the message is not in a task message format",
             detail=f"content type {getattr(message, 'content_type', '?')}")


def _on_worker_ready(sender: Any = None, **_: Any) -> None:
    consumer = sender
    original = getattr(consumer, "on_decode_error", None)
    if original is not None and not getattr(original, "_safetynet", False):
        def on_decode_error(message: Any, exc: BaseException) -> Any:
            _give_up(Reason.UNDECODABLE, message, consumer, exception=exc,
                     detail=f"content type {message.content_type}")
            return original(message, exc)

        on_decode_error._safetynet = True  # type: ignore[attr-defined]
        consumer.on_decode_error = on_decode_error
    start_jobs(getattr(consumer, "app", None))


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
    celery_signals.worker_ready.connect(_on_worker_ready, dispatch_uid="safetynet.worker_ready", weak=False)
