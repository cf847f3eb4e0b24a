"""The worker side beyond the task body: failures Celery handles in the main process.

- a hard time limit kills the child: ``SafetyRequest.on_timeout`` records it (reason ``time_limit``);
- an unknown task name (``task_unknown``), a message the worker refuses (``task_rejected``)
  and a body that cannot be decoded (the consumer's ``on_decode_error``, wrapped at
  ``worker_ready``) are recorded as ``unknown_task``, ``undecodable`` or ``rejected``;
- every worker runs a small thread that moves spooled dead letters into the database.

Each of these only acts on a failure; nothing here runs for a task that succeeds.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from typing import Any

from celery import signals as celery_signals
from celery.app.task import Context
from celery.worker.request import Request
from kombu.exceptions import ContentDisallowed, DecodeError

from safetynet.runtime.history import AttemptState, entry_for

__all__ = ["SafetyRequest", "connect"]

logger = logging.getLogger("safetynet")


def _record(**fields: Any) -> None:
    from safetynet import deadletter

    deadletter.record_safely(**fields)


class SafetyRequest(Request):
    """Celery's worker Request, recording a hard time limit as a dead letter."""

    def on_timeout(self, soft: bool, timeout: float) -> None:
        super().on_timeout(soft, timeout)
        if soft:
            return
        from celery.exceptions import TimeLimitExceeded

        from safetynet import conf, deadletter

        now = time.time()
        headers = Context(self.request_dict).headers or {}
        state = AttemptState.from_headers(headers, self.time_start or now - timeout)
        try:
            raise TimeLimitExceeded(timeout)
        except TimeLimitExceeded as exc:
            entry = entry_for(
                state.attempt, self.time_start or now - timeout, now, exc, action="dead", delay=None,
                reason="time_limit", worker=self.hostname, traceback_max_chars=conf.get().traceback_max_chars,
            )
            _record(
                task_name=self.task_name, task_id=self.id, reason="time_limit", args=self.args, kwargs=self.kwargs,
                parameters=deadletter.parameter_names(self.task), headers=headers, delivery_info=self.delivery_info,
                exception=exc, detail=f"hard time limit of {timeout:g}s exceeded", history=state.with_entry(entry),
                omitted=state.omitted, worker=self.hostname, failed_at=now,
            )


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


def connect() -> None:
    """Connect the worker-side receivers (called from the AppConfig)."""
    celery_signals.task_unknown.connect(_on_task_unknown, dispatch_uid="safetynet.task_unknown", weak=False)
    celery_signals.task_rejected.connect(_on_task_rejected, dispatch_uid="safetynet.task_rejected", weak=False)
    celery_signals.worker_ready.connect(_on_worker_ready, dispatch_uid="safetynet.worker_ready", weak=False)
