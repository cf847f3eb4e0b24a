"""Idempotency keys and claims: a retried or redelivered task performs its effect once.

A task declares ``idempotency_key="charge-{order_id}"`` (a template over its arguments) or a
callable taking the task's arguments. Before the body runs, the key is claimed in the database
with one ``INSERT … ON CONFLICT … RETURNING`` statement:

- won: the body runs while the heartbeat moves the claim's lease on; by default the body's
  database writes and the "succeeded" mark commit in one transaction, and the mark only succeeds
  while this run still owns the claim, so a run that lost its claim rolls back;
- succeeded earlier: the stored result is returned and the body does not run;
- in progress elsewhere: the task is deferred (a snooze: no attempt used up);
- in progress, but its lease ran out (the worker died): taken over, and counted; after
  ``max_deliveries`` such deaths the task is dead-lettered as ``crash_loop``.

Orphans are found by a missed heartbeat, not by elapsed time, so a long run is never run twice. A
message the broker loses is sent again by the durable schedule's relay (``safetynet.schedule``).
"""

from __future__ import annotations

import contextlib
from collections.abc import Iterator

from django.db import transaction

from safetynet.exceptions import (
    ClaimLost,
    CrashLoop,
    IdempotencyKeyError,
    KeyInProgress,
)
from safetynet.idempotency._claims import (
    CRASH_LOOP,
    HANDOVER_PREFIX,
    IN_PROGRESS,
    SUCCEEDED,
    WON,
    Claim,
    claim,
    database_for_claims,
    expire_task,
    hand_over,
    mark_succeeded,
    new_handover_token,
    purge,
    release,
    release_task,
    run_atomically,
)
from safetynet.idempotency._heartbeat import current, holding
from safetynet.idempotency._keys import MAX_KEY_LENGTH, KeyTemplate, check_key

__all__ = [
    "CRASH_LOOP",
    "HANDOVER_PREFIX",
    "IN_PROGRESS",
    "MAX_KEY_LENGTH",
    "SUCCEEDED",
    "WON",
    "Claim",
    "ClaimLost",
    "CrashLoop",
    "IdempotencyKeyError",
    "KeyInProgress",
    "KeyTemplate",
    "atomic",
    "check_key",
    "claim",
    "current",
    "database_for_claims",
    "expire_task",
    "hand_over",
    "holding",
    "mark_succeeded",
    "new_handover_token",
    "purge",
    "release",
    "release_task",
    "run_atomically",
]


@contextlib.contextmanager
def atomic(using: str | None = None) -> Iterator[None]:
    """A transaction that also marks the running task's idempotency claim succeeded.

    Use it in a task declared with ``idempotency_atomic=False`` around the database writes
    that make the operation's effect: they and the mark commit together, or neither does.
    Outside an idempotent task it is ``django.db.transaction.atomic``.
    """
    held = current()
    alias = using or (held.using if held is not None else None)
    with transaction.atomic(using=alias):
        yield
        if held is not None and not mark_succeeded(held, has_result=False):
            raise ClaimLost(f"idempotency key {held.key!r} was taken over by another run; rolled back")
