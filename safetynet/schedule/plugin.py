"""The durable schedule's part in a task's path: one copy of a relayed message runs, and an idempotent
task's message is kept until a run takes it."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from typing import Any

from celery.exceptions import Ignore
from celery.utils import uuid as new_task_id
from django.db import DatabaseError, transaction

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
            accepted = _rows.accept(str(key), str(token))
        except (ValueError, TypeError):
            return  # not a header safetynet wrote
        except DatabaseError as error:  # cannot tell: run it (a second copy is rare; a lost one is worse)
            logger.warning("%s[%s]: could not check its relayed copy (%r); running it", task.name, request.id, error,
                           extra={"task_name": task.name, "task_id": request.id})
            return
        if not accepted:
            logger.warning("%s[%s]: a second copy of relayed message %s reached a worker; dropped", task.name,
                           request.id, key, extra={"task_name": task.name, "task_id": request.id, "action": "drop"})
            raise Ignore()


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
