"""The durable schedule's part in a task's path: one copy of a relayed message runs, and an idempotent
task's message is kept until a run takes it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore
from celery.utils import uuid as new_task_id
from django.db import DatabaseError, close_old_connections, transaction

from safetynet import conf
from safetynet.protocol import headers
from safetynet.protocol.attempt import Attempt, Outgoing, Plugin
from safetynet.schedule import _rows

__all__ = ["SecondCopy", "Tracking"]

logger = logging.getLogger("safetynet")


class SecondCopy(Plugin):
    """A message the relay published: only the copy of its latest publish that reaches a worker first runs."""

    name = "second_copy"
    run_headers = frozenset({headers.RELAYED})

    def before_run(self, attempt: Attempt) -> None:
        relayed = (attempt.request.headers or {}).get(headers.RELAYED)
        if not relayed:
            return
        task, request = attempt.task, attempt.request
        try:
            key, token = relayed
        except (ValueError, TypeError):
            return  # not a header safetynet wrote
        accepted = _accepted(str(key), str(token), task.name, request.id)
        if not accepted:
            logger.warning("%s[%s]: a second copy of relayed message %s reached a worker; dropped", task.name,
                           request.id, key, extra={"task_name": task.name, "task_id": request.id, "action": "drop"})
            raise Ignore()


#: Waits between tries of the relayed-copy check while the database is away (about 5 s in all).
CHECK_WAITS = (0.2, 0.5, 1.0, 1.5, 2.0)


def _accepted(key: str, token: str, task_name: str, task_id: str) -> bool:
    """``_rows.accept``, tried again while the database is away: a copy is not run unchecked at the first error.
    Still away after the last try: run it (a second copy is rare; a message dropped unrun would be lost)."""
    for wait in (*CHECK_WAITS, None):
        try:
            return _rows.accept(key, token)
        except DatabaseError as error:
            if wait is None:
                logger.warning("%s[%s]: could not check its relayed copy (%r), %s tries; running it", task_name,
                               task_id, error, len(CHECK_WAITS) + 1,
                               extra={"task_name": task_name, "task_id": task_id, "action": "relayed"})
                return True
            close_old_connections()  # a broken connection is replaced at the next try
            time.sleep(wait)
    return True


#: ``apply_async`` options that say where a message goes (kept to send it again).
_ROUTING = ("queue", "exchange", "routing_key", "priority", "time_limit", "soft_time_limit", "expires")
#: Options whose effect does not travel in a kept message: such a message is not kept.
_UNTRACKED = ("link", "link_error", "chain", "chord")


class Tracking(Plugin):
    """An idempotent task sent at once is kept (as a ``sent`` row) until a run claims it, to send it again if lost."""

    name = "tracking"

    def takes_part(self, task: Any) -> bool:
        return getattr(task, "_idempotency", None) is not None

    def around_publish(self, message: Outgoing, publish: Callable[[Outgoing], Any]) -> Any:
        grace = conf.get().lost_message_seconds
        if (grace is None or message.key is None or message.mode == "outbox"
                or any(message.options.get(name) for name in _UNTRACKED)):
            return publish(message)
        message.task_id = message.task_id or new_task_id()
        result = publish(message)
        _keep(message, message.task_id, grace)
        return result


def _keep(message: Outgoing, task_id: str, grace: float) -> None:
    """Write the ``sent`` row once the sender's transaction commits (a rollback keeps nothing)."""
    now = time.time()
    options = {name: message.options[name] for name in _ROUTING if message.options.get(name) is not None}
    options["headers"] = dict(message.options.get("headers") or {})
    options["task_id"] = task_id
    # Not before it is due: a countdown or an eta moves the grace on.
    due = now + _rows.delay_of(message.options, now) + grace
    task = message.task
    try:
        packed = _rows.pack(message.args, message.kwargs, options, now)
    except Exception as error:  # not JSON: it cannot be kept, but it is sent
        logger.warning("safetynet: %s[%s] cannot be kept to send again (%s)", task.name, task_id, error)
        return
    row = _rows.Row(task_id=task_id, kind="sent", task_name=task.name, broker=_rows.broker_of(task._get_app()),
                    due_at=due, message=packed, state="published", claim_key=message.key or "")

    def keep() -> None:
        try:
            _rows.write(row)
        except Exception:  # the message is sent; only its safety net against loss is missing
            logger.exception("safetynet: could not keep %s[%s] to send again; a lost message will not be resent",
                             task.name, task_id)

    transaction.on_commit(keep, using=_rows.database())
