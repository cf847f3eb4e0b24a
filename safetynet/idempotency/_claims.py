"""Claims: one statement claims a key for a run, one marks it succeeded (only while the run still owns it).

``claim`` is one ``INSERT … ON CONFLICT … RETURNING``: won (a new key, a failed one, a handed-over
one, or one whose lease ran out because its run died); already succeeded (the stored result is
returned); in progress elsewhere; or a crash loop (``max_deliveries`` runs holding it died).
"""

from __future__ import annotations

import contextlib
import json
import logging
import os
import socket
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, router, transaction

from safetynet.exceptions import ClaimLost, SafetynetError
from safetynet.models import IdempotencyClaim
from safetynet.redaction import redact_text

__all__ = ["CRASH_LOOP", "HANDOVER_PREFIX", "IN_PROGRESS", "SUCCEEDED", "WON", "Claim", "claim", "database_for_claims",
           "expire_task", "hand_over", "mark_succeeded", "new_handover_token", "purge", "release", "release_task",
           "run_atomically"]

logger = logging.getLogger("safetynet")

WON, SUCCEEDED, IN_PROGRESS, CRASH_LOOP = "won", "succeeded", "in_progress", "crash_loop"

@dataclass
class Claim:
    """The outcome of claiming a key, and what the holder needs to settle it."""

    key: str
    outcome: str
    owner: str = ""
    using: str = "default"
    lease: float = 30.0
    deliveries: int = 1
    result: Any = None
    result_stored: bool = False
    holder_task_id: str = ""
    lease_until: float = 0.0


_tables: dict[tuple[str, str], str] = {}


@contextlib.contextmanager
def _cursor(using: str) -> Iterator[Any]:
    """A cursor for the claim and the mark, the two statements every idempotent run makes.

    On PostgreSQL with psycopg 3 it is a server-side-binding cursor on Django's connection:
    the parameters travel apart from the statement instead of being quoted into it in Python,
    which is most of what a statement costs the worker here. Django's error wrapping is kept
    (its exceptions, and a broken connection noticed), and the statement joins whatever
    transaction Django has open on the connection. Elsewhere, Django's own cursor.
    """
    connection = connections[using]
    if connection.vendor == "postgresql" and _psycopg3():
        import psycopg

        connection.ensure_connection()
        with connection.wrap_database_errors, psycopg.Cursor(connection.connection) as cursor:
            yield cursor
        return
    with connection.cursor() as cursor:
        yield cursor


def _psycopg3() -> bool:
    from django.db.backends.postgresql.psycopg_any import is_psycopg3

    return is_psycopg3


def _table(using: str) -> str:
    """The claim table's quoted name on database ``using`` (every claim and mark needs it)."""
    connection = connections[using]
    table = _tables.get((using, connection.vendor))
    if table is None:
        table = _tables[using, connection.vendor] = connection.ops.quote_name(IdempotencyClaim._meta.db_table)
    return table


def database_for_claims() -> str:
    """The database alias claims are written to (Django's routers decide)."""
    return router.db_for_write(IdempotencyClaim) or "default"


def claim(key: str, *, task_name: str, task_id: str, lease: float, max_deliveries: int, handover: str = "") -> Claim:
    """Claim ``key`` for this run: won, already succeeded, in progress elsewhere, or a crash loop.

    ``handover`` is the token an earlier attempt of the same task handed the claim over with
    when it scheduled this retry: the retry takes the claim at once, uncounted.
    """
    handed = handover or "-"  # never an owner
    using = database_for_claims()
    table = _table(using)
    owner = f"{task_id}/{socket.gethostname()}/{os.getpid()}/{uuid.uuid4().hex[:8]}"[:255]
    # PostgreSQL: the claim commits without waiting for its WAL flush (an fsync per task). It is
    # visible to other runs at once all the same; only a crash of the database server (or a
    # failover) in the next fraction of a second can lose it, and that also ends this run's
    # connection: its body's writes cannot commit, since mark_succeeded checks the owner in the
    # body's transaction (run_atomically), which does wait for its flush, and so for the claim's.
    postgresql = connections[using].vendor == "postgresql"
    no_flush_wait = ", set_config('synchronous_commit', 'off', true)" if postgresql else ""
    for _ in range(5):
        now = time.time()
        with _cursor(using) as cursor:
            cursor.execute(
                f"INSERT INTO {table} (key, task_name, task_id, state, owner, lease_until, deliveries, result, "
                f"result_stored, error, created_at, updated_at) "
                f"VALUES (%s, %s, %s, 'in_progress', %s, %s, 1, NULL, %s, '', %s, %s) "
                f"ON CONFLICT (key) DO UPDATE SET task_name = excluded.task_name, task_id = excluded.task_id, "
                f"state = 'in_progress', owner = excluded.owner, lease_until = excluded.lease_until, "
                # A failed key starts afresh; a hand-over is no new delivery; a takeover (the run
                # holding it died: its lease ran out) counts one more.
                f"deliveries = CASE WHEN {table}.state = 'failed' THEN 1 "
                f"WHEN {table}.owner = %s THEN {table}.deliveries ELSE {table}.deliveries + 1 END, "
                f"result = NULL, result_stored = excluded.result_stored, error = '', "
                f"updated_at = excluded.updated_at "
                f"WHERE {table}.state = 'failed' OR ({table}.state = 'in_progress' "
                f"AND ({table}.lease_until < %s OR {table}.owner = %s)) "
                f"RETURNING deliveries{no_flush_wait}",
                [key, task_name, task_id, owner, now + lease, False, now, now, handed, now, handed],
            )
            row = cursor.fetchone()
        if row is not None:
            deliveries = int(row[0])
            outcome = CRASH_LOOP if deliveries - 1 >= max_deliveries else WON
            return Claim(key, outcome, owner=owner, using=using, lease=lease, deliveries=deliveries)
        existing = _read(key, using)
        if existing is None or existing.outcome == "failed":
            continue  # settled or purged between the two statements: claim again
        existing.lease = lease
        return existing
    raise SafetynetError(f"could not claim idempotency key {key!r}: it changed state five times in a row")


def _read(key: str, using: str) -> Claim | None:
    row = (
        IdempotencyClaim.objects.using(using)
        .filter(key=key)
        .values_list("state", "owner", "result", "result_stored", "task_id", "lease_until", "deliveries")
        .first()
    )
    if row is None:
        return None
    state, owner, result, result_stored, task_id, lease_until, deliveries = row
    return Claim(key, state, owner=owner, using=using, result=result, result_stored=result_stored,
                 holder_task_id=task_id, lease_until=lease_until, deliveries=deliveries)


def mark_succeeded(held: Claim, result: Any = None, *, has_result: bool = True) -> bool:
    """Mark the claim succeeded (with its result) if this run still owns it; False if it does not.

    One raw ``UPDATE`` (every idempotent run makes it): the result is serialised here, once, with
    ``DjangoJSONEncoder``, and sent as JSON text (cast to ``jsonb`` on PostgreSQL); None is NULL.
    """
    connection = connections[held.using]
    table = _table(held.using)
    assignments, params = f"state = '{SUCCEEDED}', updated_at = %s", [time.time()]
    if has_result:
        text = None
        if result is not None:
            try:
                text = json.dumps(result, cls=DjangoJSONEncoder, allow_nan=False)
            except (TypeError, ValueError):
                logger.warning("safetynet: the result of the run holding %r is not JSON; a duplicate will get None",
                               held.key, extra={"idempotency_key": held.key})
        stored = result is None or text is not None
        value = "CAST(%s AS jsonb)" if text is not None and connection.vendor == "postgresql" else "%s"
        assignments += f", result = {value}, result_stored = %s"
        params += [text, stored]
    with _cursor(held.using) as cursor:
        cursor.execute(
            f"UPDATE {table} SET {assignments} "
            f"WHERE key = %s AND owner = %s AND state IN ('{IN_PROGRESS}', '{SUCCEEDED}')",
            [*params, held.key, held.owner],
        )
        return cursor.rowcount > 0


def run_atomically(held: Claim, call: Callable[[], Any]) -> Any:
    """Run the body and mark the claim succeeded in one transaction: both commit, or neither does.

    ClaimLost (after the rollback) when another run took the claim over meanwhile. When the body
    sent no statement on the claims' connection and left no ``on_commit`` callback, its
    transaction is empty and commits nothing; the mark then runs alone, as one statement in
    autocommit (no BEGIN and COMMIT round trips). That is the same outcome: the body wrote
    nothing to commit with it.
    """
    connection = connections[held.using]
    outermost = not connection.in_atomic_block
    with transaction.atomic(using=held.using):
        result = call()
        if connection.needs_rollback:
            # The body returned but asked for its transaction to be rolled back (set_rollback, or a
            # swallowed error): nothing of it commits; the operation is done, so mark it alone.
            logger.warning("safetynet: the body holding %r returned with its transaction marked for rollback; "
                           "its writes are not committed", held.key, extra={"idempotency_key": held.key})
        elif not (outermost and _untouched(connection)):
            if not mark_succeeded(held, result):
                raise ClaimLost(f"idempotency key {held.key!r} was taken over by another run; this run's writes "
                                "rolled back")
            return result
    if not mark_succeeded(held, result):
        raise ClaimLost(f"idempotency key {held.key!r} was taken over by another run (the run wrote nothing)")
    return result


def _untouched(connection: Any) -> bool:
    """True if the open transaction of ``connection`` has sent no statement and has no on_commit callback."""
    if connection.run_on_commit or connection.needs_rollback:
        return False
    raw = connection.connection
    if raw is None:
        return False
    if connection.vendor == "postgresql":  # psycopg 3 and 2 both begin on the first statement
        return raw.info.transaction_status == 0  # TransactionStatus.IDLE / TRANSACTION_STATUS_IDLE
    if connection.vendor == "sqlite":
        return not raw.in_transaction
    return False



HANDOVER_PREFIX = "handover/"


def new_handover_token() -> str:
    """A token for ``hand_over``, put in the retry message's headers."""
    return f"{HANDOVER_PREFIX}{uuid.uuid4().hex}"


def hand_over(held: Claim, token: str, until: float) -> bool:
    """Keep the claim for the retry this run scheduled: ``token`` (carried by the retry) owns it now.

    Duplicates stay deferred while the task waits for its next attempt (the operation is still
    in progress); the lease covers the wait. False if this run no longer owns the claim.
    """
    return bool(IdempotencyClaim.objects.using(held.using).filter(
        key=held.key, owner=held.owner, state=IdempotencyClaim.State.IN_PROGRESS
    ).update(owner=token, lease_until=until, updated_at=time.time()))


def release(held: Claim, error: BaseException | None) -> None:
    """Give an unfinished claim up (the run failed): the next run may claim the key."""
    _mark_failed(IdempotencyClaim.objects.using(held.using).filter(
        key=held.key, owner=held.owner, state=IdempotencyClaim.State.IN_PROGRESS
    ), "" if error is None else _error_text(error))


def _mark_failed(claims: Any, error: str) -> int:
    """Settle ``claims`` (a queryset) as failed: the next run may claim the key afresh."""
    return claims.update(state=IdempotencyClaim.State.FAILED, lease_until=0.0, updated_at=time.time(),
                         error=error[:2000])


def _error_text(error: BaseException) -> str:
    """What a failed claim keeps of its error: redacted like a dead letter's message (``key=value`` pairs)."""
    return redact_text(f"{type(error).__name__}: {error}")


def expire_task(key: str, task_id: str) -> int:
    """End the lease of ``key`` if ``task_id`` holds it (its process is known dead): the next delivery takes over."""
    return IdempotencyClaim.objects.using(database_for_claims()).filter(
        key=key, task_id=task_id, state=IdempotencyClaim.State.IN_PROGRESS
    ).update(lease_until=0.0)


def release_task(key: str, task_id: str, error: str) -> int:
    """Mark ``key`` failed if ``task_id`` holds it (the task was dead-lettered in the worker's main process)."""
    return _mark_failed(IdempotencyClaim.objects.using(database_for_claims()).filter(
        key=key, task_id=task_id, state=IdempotencyClaim.State.IN_PROGRESS
    ), error)


def purge(older_than: float) -> int:
    """Delete settled claims last changed before ``older_than`` (seconds since the epoch)."""
    deleted, _ = IdempotencyClaim.objects.using(database_for_claims()).filter(
        updated_at__lt=older_than, state__in=[IdempotencyClaim.State.SUCCEEDED, IdempotencyClaim.State.FAILED]
    ).delete()
    return deleted

