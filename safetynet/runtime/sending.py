"""How a task's messages go out.

``apply_async`` sends in the task's enqueue mode, one strategy each: ``now`` (Celery's way),
``on_commit`` (once the caller's transaction commits), ``outbox`` (a row written in that
transaction, published once it commits, by a relay if the broker is away). The plug-ins see each
message first (``before_send``, in the caller) and wrap its publishing (``around_publish``).

A retry is published by the act step (``send_retry``): a row of the durable schedule when it waits
long, else an ETA message published at once (through the task's ``apply_async``, marked ``DIRECT``
so it is published as given).
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from typing import Any

from celery.utils import uuid as new_task_id
from celery.utils.saferepr import saferepr
from django.db import transaction

from safetynet import conf, schedule
from safetynet.exceptions import ConfigurationError
from safetynet.protocol.attempt import Attempt, Outgoing, Plugin
from safetynet.redaction import parameter_names, redact
from safetynet.runtime.plugins import pipeline_of

__all__ = ["DIRECT", "redacted_reprs", "send", "send_retry"]

logger = logging.getLogger("safetynet")

#: An ``apply_async`` option: publish the message as given (a retry, already routed by the act step).
DIRECT = "safetynet_direct"

Publish = Callable[..., Any]


def send(task: Any, args: Any, kwargs: Any, task_id: str | None, options: dict[str, Any], publish: Publish) -> Any:
    """``apply_async``: the message through the plug-ins, in the task's enqueue mode; ``publish`` is Celery's."""
    if options.pop(DIRECT, False):
        options.update(redacted_reprs(task, args, kwargs, options))
        return publish(args, kwargs, task_id=task_id, **options)
    pipeline = pipeline_of(task)
    mode = options.pop("enqueue", None)
    if mode is None:
        mode = task.enqueue or conf.get().enqueue
    elif mode not in conf.ENQUEUE_MODES:
        raise ConfigurationError(f"task {task.name}: enqueue must be one of "
                                 f"{', '.join(map(repr, conf.ENQUEUE_MODES))}, got {mode!r}")
    notes = {name: options.pop(name) for name in pipeline.send_options if name in options}
    message = Outgoing(task=task, args=args, kwargs=kwargs, options=options, mode=mode, task_id=task_id, notes=notes)
    for plugin in pipeline.hooks("before_send"):
        plugin.before_send(message)
    message.options.update(redacted_reprs(task, message.args, message.kwargs, message.options))
    if task._get_app().conf.task_always_eager:  # Celery runs it here and now: nothing is published
        return publish(message.args, message.kwargs, task_id=message.task_id, **message.options)

    def celery_publish(outgoing: Outgoing) -> Any:
        return publish(outgoing.args, outgoing.kwargs, task_id=outgoing.task_id, **outgoing.options)

    return _STRATEGIES[mode](message, functools.partial(_through, pipeline.hooks("around_publish")), celery_publish)


def redacted_reprs(task: Any, args: Any, kwargs: Any, options: dict[str, Any]) -> dict[str, str]:
    """``argsrepr``/``kwargsrepr`` for the message's headers with sensitive arguments redacted (by parameter name
    and key), when the task has any: what the worker's "received" line, events, Flower and ``celery inspect`` show.
    Empty when nothing is sensitive (Celery makes its own) or the caller gave its own."""
    if "argsrepr" in options or "kwargsrepr" in options or not (args or kwargs):
        return {}
    try:
        safe_args, safe_kwargs, found = redact(args or (), kwargs or {}, parameter_names(task))
    except Exception:  # arguments redaction cannot walk: Celery's own repr, as before
        return {}
    if not found:
        return {}
    amqp = task._get_app().amqp
    return {"argsrepr": saferepr(tuple(safe_args), getattr(amqp, "argsrepr_maxsize", 1024)),
            "kwargsrepr": saferepr(safe_kwargs, getattr(amqp, "kwargsrepr_maxsize", 1024))}


def _through(plugins: tuple[Plugin, ...], innermost: Callable[[Outgoing], Any], message: Outgoing) -> Any:
    """Publish ``message`` with ``innermost``, each plug-in around it (the first outermost)."""
    call = innermost
    for plugin in reversed(plugins):
        call = functools.partial(plugin.around_publish, publish=call)
    return call(message)


Chain = Callable[[Callable[[Outgoing], Any], Outgoing], Any]


def _now(message: Outgoing, chain: Chain, publish: Callable[[Outgoing], Any]) -> Any:
    return chain(publish, message)


def _on_commit(message: Outgoing, chain: Chain, publish: Callable[[Outgoing], Any]) -> Any:
    message.task_id = message.task_id or new_task_id()
    transaction.on_commit(functools.partial(chain, publish, message), using=schedule.database())
    return message.task.AsyncResult(message.task_id)


def _outbox(message: Outgoing, chain: Chain, publish: Callable[[Outgoing], Any]) -> Any:
    task = message.task
    task_id = message.task_id = message.task_id or new_task_id()
    using = schedule.database()
    now = time.time()
    options = {**{name: value for name, value in task._get_exec_options().items() if value is not None},
               **message.options, "task_id": task_id}
    row = schedule.Row(task_id=task_id, kind="outbox", task_name=task.name, broker=schedule.broker_of(task._get_app()),
                       due_at=now + schedule.delay_of(options, now), message=schedule.pack(message.args,
                       message.kwargs, options, now), claim_key=message.key or "")
    if not schedule.write(row, using=using):
        logger.warning("%s[%s]: a message with this task id waits to be published already; not sent again",
                       task.name, task_id, extra={"task_name": task.name, "task_id": task_id})
        return task.AsyncResult(task_id)
    published = False

    def relay_row(outgoing: Outgoing) -> Any:
        nonlocal published
        published = True
        schedule.publish_now(task._get_app(), [task_id])
        return task.AsyncResult(task_id)

    def once_committed() -> None:
        chain(relay_row, message)
        if not published:  # a plug-in held it back (unique_for): the row goes
            schedule.drop(task_id, using)

    transaction.on_commit(once_committed, using=using, robust=True)
    return task.AsyncResult(task_id)


_STRATEGIES = {"now": _now, "on_commit": _on_commit, "outbox": _outbox}


def send_retry(attempt: Attempt, signature: Any, delay: float) -> None:
    """Publish the next attempt: a durable row when it waits long enough, else an ETA message now."""
    task, request = attempt.task, attempt.request
    history = attempt.history
    grace = conf.get().lost_message_seconds
    durable = schedule.is_durable(delay)
    if not durable:
        signature.apply_async(**{DIRECT: True})
        if attempt.key is None or grace is None:
            return
    now = time.time()
    options = {**signature.options, "task_id": request.id}
    options.update(redacted_reprs(task, signature.args, signature.kwargs, options))
    row = schedule.Row(
        task_id=request.id, kind="retry", task_name=task.name, broker=schedule.broker_of(task._get_app()),
        due_at=now + delay + (0.0 if durable else grace or 0.0),
        message=schedule.pack(signature.args, signature.kwargs, options, now),
        state="scheduled" if durable else "published", claim_key=attempt.key or "", origin=history.started_at,
        entry=history.number + 1,
    )

    def write() -> None:
        try:
            if schedule.write(row, outside_transaction=True) or schedule.holds_same(row):
                return  # written; or this retry is there already (a redelivered attempt wrote it again)
            why = "another message with this task id holds its row, not taken yet"
        except Exception as error:  # not written: a long retry must still happen, as Celery would send it
            why = repr(error)
        if not durable:  # the ETA message is sent; only its safety net against loss is missing
            logger.warning("%s[%s]: could not keep the retry to send it again if lost (%s)", task.name, request.id,
                           why, extra={"task_name": task.name, "task_id": request.id, "action": "retry"})
            return
        logger.warning("%s[%s]: could not put the retry in the durable schedule (%s); published as an ETA message",
                       task.name, request.id, why,
                       extra={"task_name": task.name, "task_id": request.id, "action": "retry"})
        signature.apply_async(**{DIRECT: True})

    # A retry scheduled inside an idempotent body's transaction is written once it has ended (a failure
    # rolls it back); outside_transaction keeps it from a transaction of the body's own.
    attempt.when_transaction_ends(write)
