"""Idempotency's part in a task's path: the key is claimed before the body runs, marked when it succeeds,
handed over to a retry, released when the task dies; a key is enqueued once per ``unique_for``."""

from __future__ import annotations

import dataclasses
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery.utils import uuid as new_task_id
from django.db import DatabaseError

from safetynet import conf, shared
from safetynet.core.decision import Retry
from safetynet.exceptions import (
    ConfigurationError,
    CrashLoop,
    IdempotencyKeyError,
    KeyInProgress,
    Permanent,
    Snooze,
    Transient,
)
from safetynet.idempotency import _claims
from safetynet.idempotency._heartbeat import holding
from safetynet.protocol import headers
from safetynet.protocol.attempt import Attempt, Outgoing, Plugin

__all__ = ["Idempotency"]

logger = logging.getLogger("safetynet")

_NOTE = "idempotency"
_HELD, _HANDED_OVER = "held", "handed over"


def _seconds_option(options: Mapping[str, Any], name: str, low: float, high: float, where: str) -> None:
    value = options.get(name)
    if value is not None and (isinstance(value, bool) or not isinstance(value, (int, float))
                              or not low <= value <= high):
        raise ConfigurationError(f"{where}: {name} must be a number of seconds from {low:g} to {high:g}, got {value!r}")


class Idempotency(Plugin):
    """Claim the key, then run the body once: the path of an idempotent task."""

    name = _NOTE
    options = frozenset({"idempotency_key", "idempotency_lease", "idempotency_atomic", "unique_for"})

    def validate(self, options: Mapping[str, Any], where: str) -> None:
        key = options.get("idempotency_key")
        if key is not None and not (callable(key) or (isinstance(key, str) and key.strip())):
            raise ConfigurationError(
                f"{where}: idempotency_key must be a template such as 'order-{{order_id}}' or a callable, got {key!r}"
            )
        _seconds_option(options, "idempotency_lease", 1, 86_400, where)
        _seconds_option(options, "unique_for", 1, 30 * 86_400, where)
        if "idempotency_atomic" in options and not isinstance(options["idempotency_atomic"], bool):
            raise ConfigurationError(
                f"{where}: idempotency_atomic must be True or False, got {options['idempotency_atomic']!r}")
        needs_key = sorted({"idempotency_lease", "idempotency_atomic", "unique_for"} & {
            name for name, value in options.items() if value is not None})
        if needs_key and key is None:
            raise ConfigurationError(f"{where}: {', '.join(needs_key)} needs idempotency_key=... to say what is unique")

    def takes_part(self, task: Any) -> bool:
        return getattr(task, "_idempotency", None) is not None

    # -- the way out ---------------------------------------------------------------------------

    def before_send(self, message: Outgoing) -> None:
        # A bad key fails the caller, not a worker.
        message.key = message.task._idempotency.render(message.args, message.kwargs)

    def around_publish(self, message: Outgoing, publish: Callable[[Outgoing], Any]) -> Any:
        task, key = message.task, message.key
        if not task.unique_for or key is None or headers.REPLAY_OF in (message.options.get("headers") or {}):
            return publish(message)  # a replay is sent as asked
        message.task_id = message.task_id or new_task_id()
        existing = shared.add(f"unique:{key}", message.task_id, task.unique_for)
        if existing is not None and existing != message.task_id:  # the same id: Celery sending it again (a retry)
            logger.info("%s: idempotency key %r was enqueued as %s within %ss; not sent again",
                        task.name, key, existing, task.unique_for,
                        extra={"task_name": task.name, "task_id": existing, "idempotency_key": key})
            return task.AsyncResult(existing)
        if existing is not None:
            return publish(message)
        try:
            return publish(message)
        except BaseException:  # not sent: the window must not hide the next enqueue
            shared.delete(f"unique:{key}")
            raise

    # -- a run ---------------------------------------------------------------------------------

    def around_body(self, attempt: Attempt, body: Callable[[], Any]) -> Any:
        task, request = attempt.task, attempt.request
        try:
            key = task._idempotency.render(attempt.args, attempt.kwargs)
        except IdempotencyKeyError as error:
            raise Permanent(str(error)) from error
        attempt.key = key
        settings = conf.get()
        max_deliveries = task.max_deliveries or settings.max_deliveries
        claiming = {"task_name": task.name, "task_id": request.id, "max_deliveries": max_deliveries,
                    "lease": float(task.idempotency_lease or settings.idempotency_lease_seconds),
                    "handover": str((request.headers or {}).get(headers.HANDOVER) or "")}
        try:
            if task.idempotency_atomic:  # the body's transaction opened with the claim (one round trip less)
                held, begun = _claims.claim_and_begin(key, **claiming)
            else:
                held, begun = _claims.claim(key, **claiming), None
        except DatabaseError as error:  # the database is away: nothing ran, try again later
            raise Transient(f"could not claim idempotency key {key!r}: {error}") from error
        if held.outcome == _claims.SUCCEEDED:
            logger.info("%s[%s]: idempotency key %r already succeeded; returning its stored result",
                        task.name, request.id, key,
                        extra={"task_name": task.name, "task_id": request.id, "idempotency_key": key})
            return held.result
        if held.outcome == _claims.IN_PROGRESS:
            raise _deferral(attempt, held)
        if held.outcome == _claims.CRASH_LOOP:
            error = CrashLoop(
                f"the last {held.deliveries - 1} runs holding idempotency key {key!r} died without finishing "
                f"(max_deliveries={max_deliveries})"
            )
            _claims.release(held, error)
            raise error
        try:
            attempt.claim = held
            attempt.notes[_NOTE] = _HELD
            with holding(held):
                if not task.idempotency_atomic:
                    result = body()
                    if not _claims.mark_succeeded(held, result):
                        logger.warning("%s[%s]: idempotency key %r was taken over while this run worked",
                                       task.name, request.id, key)
                    return result
                attempt.in_body_transaction = True
                try:
                    return _claims.run_atomically(held, body, begun=begun)
                finally:
                    attempt.in_body_transaction = False
                    _after_transaction(attempt)
        except BaseException as error:
            if begun is not None:  # the run stopped before run_atomically took the body's transaction over
                begun.abandon(error)
            raise

    def on_retry(self, attempt: Attempt, retry: Retry, message: Outgoing) -> None:
        """Decided while the claim is held: the retry keeps it (handed over), so duplicates stay deferred."""
        held = attempt.claim
        if held is None or attempt.eager:
            return
        token = _claims.new_handover_token()
        until = time.time() + retry.delay + held.lease

        def hand_over() -> bool:
            try:
                return _claims.hand_over(held, token, until)
            except DatabaseError:
                logger.exception("safetynet: could not hand idempotency key %r over to the retry", held.key)
                return False

        if attempt.in_body_transaction:
            # self.retry() inside the body's transaction, which its Retry rolls back: hand over once it
            # has (a retry that comes first waits for the claim's lease, or the hand-over).
            attempt.when_transaction_ends(hand_over)
            handed = True
        else:
            handed = hand_over()
        if handed:
            message.headers[headers.HANDOVER] = token
            attempt.claim = dataclasses.replace(held, owner=token)
            attempt.notes[_NOTE] = _HANDED_OVER

    def on_retry_not_sent(self, attempt: Attempt, error: BaseException) -> None:
        # No message carries the claim: the run's end frees it (as the retry's, by the hand-over token).
        if attempt.notes.get(_NOTE) == _HANDED_OVER:
            attempt.notes[_NOTE] = _HELD

    def after_run(self, attempt: Attempt, error: BaseException | None) -> None:
        held = attempt.claim
        if held is None or error is None or attempt.notes.get(_NOTE) != _HELD:
            return  # nothing held, a success (marked), or handed over to the retry
        _release(held, error)


def _release(held: _claims.Claim, error: BaseException | None) -> None:
    try:
        _claims.release(held, error)
    except Exception:  # the failure itself is what the caller must see
        logger.exception("safetynet: could not release idempotency key %r", held.key)


def _deferral(attempt: Attempt, held: _claims.Claim) -> BaseException:
    """Another run holds the key: come back later without using up an attempt."""
    if attempt.eager:
        return KeyInProgress(
            f"idempotency key {held.key!r} is in progress in task {held.holder_task_id}; "
            "an eager run cannot wait for it"
        )
    remaining = max(0.0, held.lease_until - time.time())
    delay = max(0.5, min(remaining + 0.1, 2.0 ** attempt.history.snoozes(), 30.0))
    return Snooze(delay, f"idempotency key {held.key!r} is in progress in task {held.holder_task_id}")


def _after_transaction(attempt: Attempt) -> None:
    """The writes deferred until the body's transaction ended (a hand-over, a dead letter)."""
    writes, attempt.after_transaction = attempt.after_transaction, None
    for write in writes or ():
        try:
            write()
        except Exception:  # a record or a hand-over that fails must not hide the task's outcome
            logger.exception("safetynet: could not write after the body's transaction of %s[%s]",
                             attempt.task.name, attempt.request.id)

