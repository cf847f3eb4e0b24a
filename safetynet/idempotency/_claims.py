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
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, router, transaction

from safetynet.exceptions import ClaimLost, SafetynetError
from safetynet.driver import is_psycopg3, pipelines, raw_cursor, run_together
from safetynet.models import IdempotencyClaim
from safetynet.redaction import redact_text

__all__ = ["CRASH_LOOP", "HANDOVER_PREFIX", "IN_PROGRESS", "SUCCEEDED", "WON", "Begun", "Claim", "claim", "claim_and_begin",
           "database_for_claims", "expire_task", "hand_over", "mark_succeeded", "new_handover_token", "purge", "release",
           "release_task", "run_atomically"]

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


def _execute(using: str, sql: str, params: list[Any], *, fetch: bool = False) -> tuple[int, Any]:
    """Run one claim statement on the claims' connection: (rows changed, the first row returned if ``fetch``).

    On PostgreSQL with psycopg 3 the statement goes straight to the driver, on a cursor kept per
    connection: server-side binding (the parameters travel apart from the statement instead of
    being quoted into it in Python), none of Django's cursor wrapping, and prepared statements only
    if the connection's ``prepare_threshold`` asks for them (Django turns them off, for poolers).
    Django's error wrapping is kept (its exceptions, a broken connection noticed), and the
    statement joins whatever transaction Django has open on the connection. Elsewhere, Django's
    own cursor.
    """
    connection = connections[using]
    if connection.vendor == "postgresql" and is_psycopg3():
        if connection.connection is None:
            connection.ensure_connection()
        with connection.wrap_database_errors:
            cursor = raw_cursor(connection)
            cursor.execute(sql, params)
            return cursor.rowcount, cursor.fetchone() if fetch else None
    with connection.cursor() as cursor:
        cursor.execute(sql, params)
        return cursor.rowcount, cursor.fetchone() if fetch else None


@dataclass(frozen=True)
class _Sql:
    """The claim's and the mark's statements on one database (made once per alias)."""

    claim: str
    mark: str  # with the result
    mark_only: str  # the state alone (``safetynet.atomic()``)
    mark_strict: str  # with the result; fails (division by zero) when this run does not own the claim


def _sql(using: str) -> _Sql:
    connection = connections[using]
    statements = _statements.get((using, connection.vendor))
    if statements is None:
        statements = _statements[using, connection.vendor] = _make_sql(connection)
    return statements


_statements: dict[tuple[str, str], _Sql] = {}


def _make_sql(connection: Any) -> _Sql:
    table = connection.ops.quote_name(IdempotencyClaim._meta.db_table)
    postgresql = connection.vendor == "postgresql"
    # PostgreSQL: the claim commits without waiting for its WAL flush (an fsync per task). It is
    # visible to other runs at once all the same; only a crash of the database server (or a
    # failover) in the next fraction of a second can lose it, and that also ends this run's
    # connection: its body's writes cannot commit, since the mark checks the owner in the
    # body's transaction (run_atomically), which does wait for its flush, and so for the claim's.
    no_flush_wait = ", set_config('synchronous_commit', 'off', true)" if postgresql else ""
    claim = (
        f"INSERT INTO {table} (key, task_name, task_id, state, owner, lease_until, deliveries, result, "
        f"result_stored, error, created_at, updated_at) "
        f"VALUES (%s, %s, %s, 'in_progress', %s, %s, 1, NULL, false, '', %s, %s) "
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
        f"RETURNING deliveries{no_flush_wait}"
    )
    value = "CAST(%s AS jsonb)" if postgresql else "%s"
    owned = f"WHERE key = %s AND owner = %s AND state IN ('{IN_PROGRESS}', '{SUCCEEDED}')"
    mark = f"UPDATE {table} SET state = '{SUCCEEDED}', updated_at = %s, result = {value}, result_stored = %s {owned}"
    return _Sql(
        claim=claim,
        mark=mark,
        mark_only=f"UPDATE {table} SET state = '{SUCCEEDED}', updated_at = %s {owned}",
        # 1 / 0 when no row was marked: the error aborts the transaction, so a COMMIT sent with it
        # (in one round trip) commits nothing.
        mark_strict=f"WITH marked AS ({mark} RETURNING 1) SELECT 1 / count(*) FROM marked" if postgresql else "",
    )


_host: tuple[int, str] = (0, "")


def _owner(task_id: str) -> str:
    """A new owner token for a run of ``task_id``: task id, host, process and a nonce."""
    global _host
    pid = os.getpid()
    if _host[0] != pid:
        _host = (pid, f"{socket.gethostname()}/{pid}")
    return f"{task_id}/{_host[1]}/{os.urandom(4).hex()}"[:255]


def database_for_claims() -> str:
    """The database alias claims are written to (Django's routers decide)."""
    return router.db_for_write(IdempotencyClaim) or "default"


def claim(key: str, *, task_name: str, task_id: str, lease: float, max_deliveries: int, handover: str = "") -> Claim:
    """Claim ``key`` for this run: won, already succeeded, in progress elsewhere, or a crash loop.

    ``handover`` is the token an earlier attempt of the same task handed the claim over with
    when it scheduled this retry: the retry takes the claim at once, uncounted.
    """
    using = database_for_claims()
    sql = _sql(using).claim
    owner = _owner(task_id)
    for _ in range(5):
        _, row = _execute(using, sql, _claim_params(key, task_name, task_id, owner, lease, handover), fetch=True)
        if row is not None:
            return _won(key, row, owner, using, lease, max_deliveries)
        existing = _held_elsewhere(key, using, lease)
        if existing is not None:
            return existing
        # (settled or purged between the two statements: claim again)
    raise SafetynetError(f"could not claim idempotency key {key!r}: it changed state five times in a row")


def _held_elsewhere(key: str, using: str, lease: float) -> Claim | None:
    """The claim on ``key`` that a claim did not win (in progress or succeeded), or None if it has been settled as
    failed or purged since (claim again)."""
    existing = _read(key, using)
    if existing is None or existing.outcome == "failed":
        return None
    existing.lease = lease
    return existing


def _claim_params(key: str, task_name: str, task_id: str, owner: str, lease: float, handover: str) -> list[Any]:
    handed = handover or "-"  # never an owner
    now = time.time()
    return [key, task_name, task_id, owner, now + lease, now, now, handed, now, handed]


def _won(key: str, row: Any, owner: str, using: str, lease: float, max_deliveries: int) -> Claim:
    deliveries = int(row[0])
    outcome = CRASH_LOOP if deliveries - 1 >= max_deliveries else WON
    return Claim(key, outcome, owner=owner, using=using, lease=lease, deliveries=deliveries)


class Begun:
    """The outermost ``atomic`` block ``claim_and_begin`` entered for the body: ended exactly once, by
    ``run_atomically`` (which takes it over) or by ``abandon`` (whatever stopped the run before that)."""

    def __init__(self, block: Any) -> None:
        self.block, self.ended = block, False

    def __exit__(self, *raised: Any) -> None:
        if not self.ended:
            self.ended = True
            self.block.__exit__(*raised)

    def abandon(self, error: BaseException | None = None) -> None:
        """End the block (rolled back, with ``error``) unless it has ended already."""
        if self.ended:
            return
        if error is None:
            transaction.set_rollback(True, using=self.block.using)
            self.__exit__(None, None, None)
        else:
            self.__exit__(type(error), error, error.__traceback__)


def claim_and_begin(key: str, *, task_name: str, task_id: str, lease: float, max_deliveries: int,
                    handover: str = "") -> tuple[Claim, Begun | None]:
    """Claim ``key`` (as ``claim``) and, when it is won, open the body's transaction: ``(claim, begun)``, ``begun`` an
    outermost ``atomic`` block entered here, which the caller hands to ``run_atomically(claim, body, begun=begun)``
    (and ``abandon()``s if the run stops before that); ``(claim, None)`` otherwise.

    On PostgreSQL (psycopg 3 with pipeline mode, not behind a pooler, no transaction open, and no server timeout on
    idle transactions) the claim and the transaction's ``BEGIN`` go in one round trip: the claim still commits alone
    before the body starts (a crash of the body must leave it counted, and a duplicate must see the key taken, not
    wait on a row lock), and psycopg does not send a ``BEGIN`` of its own before the body's first statement (the
    one sent is the one it would send: the connection's isolation level, read-only and deferrable settings). A key
    not won rolls that empty transaction back and is read as ``claim`` reads it. Elsewhere it is ``claim``, and
    ``run_atomically`` opens the block.
    """
    using = database_for_claims()
    connection = connections[using]
    if not _begins_with_claim(connection):
        return claim(key, task_name=task_name, task_id=task_id, lease=lease, max_deliveries=max_deliveries,
                     handover=handover), None
    owner = _owner(task_id)
    begun = Begun(transaction.atomic(using=using))
    begun.block.__enter__()
    try:
        with connection.wrap_database_errors:
            row = run_together(connection, [
                (_sql(using).claim, _claim_params(key, task_name, task_id, owner, lease, handover)),
                (_begin_statement(connection.connection), ())])
        held = None if row is None else _won(key, row, owner, using, lease, max_deliveries)
        if held is not None and held.outcome == WON:
            return held, begun
        begun.abandon()  # the empty transaction (the claim committed on its own)
    except BaseException as error:
        begun.abandon(error)
        raise
    if held is None:  # not won: in progress elsewhere, succeeded, or settled between the statements
        existing = _held_elsewhere(key, using, lease)
        if existing is not None:
            return existing, None
        held = claim(key, task_name=task_name, task_id=task_id, lease=lease, max_deliveries=max_deliveries,
                     handover=handover)
    return held, None


def _begin_statement(raw: Any) -> str:
    """The ``BEGIN`` psycopg would send on ``raw`` (its isolation level, read-only and deferrable settings, which
    Django's ``OPTIONS`` may have set)."""
    parts = ["BEGIN"]
    if raw.isolation_level is not None:
        parts.append("ISOLATION LEVEL " + raw.isolation_level.name.replace("_", " "))
    if raw.read_only is not None:
        parts.append("READ ONLY" if raw.read_only else "READ WRITE")
    if raw.deferrable is not None:
        parts.append("DEFERRABLE" if raw.deferrable else "NOT DEFERRABLE")
    return " ".join(parts)


def _begins_with_claim(connection: Any) -> bool:
    """Whether the claim and the body's ``BEGIN`` can go in one round trip on ``connection``."""
    if connection.vendor != "postgresql" or not pipelines() or connection.in_atomic_block:
        return False
    if connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS"):  # a pooler in transaction mode: one at a time
        return False
    connection.ensure_connection()
    raw = connection.connection
    # (nothing left open on the driver connection behind Django's back: a BEGIN sent by hand, say)
    if not connection.get_autocommit() or raw.info.transaction_status != 0:  # IDLE
        return False
    return not _times_out_idle_transactions(connection, raw)


def _times_out_idle_transactions(connection: Any, raw: Any) -> bool:
    """Whether the server ends transactions left idle (``idle_in_transaction_session_timeout``, or PostgreSQL 17's
    ``transaction_timeout``): a body that waits away from the database would then lose the transaction the claim
    opened for it, so its ``BEGIN`` waits for its first statement, as psycopg sends it. Asked once per database alias
    and process (the server's, role's or database's setting; a session that changes it later is not followed)."""
    found = _idle_timeouts.get(connection.alias)
    if found is None:
        with connection.wrap_database_errors:
            row = raw.execute("SELECT current_setting('idle_in_transaction_session_timeout'), "
                              "current_setting('transaction_timeout', true)").fetchone()
        found = _idle_timeouts[connection.alias] = any(value not in (None, "", "0") for value in row)
    return found


#: Database alias -> whether its server ends idle transactions (``_times_out_idle_transactions``).
_idle_timeouts: dict[str, bool] = {}


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
    statements = _sql(held.using)
    if not has_result:
        changed, _ = _execute(held.using, statements.mark_only, [time.time(), held.key, held.owner])
        return changed > 0
    changed, _ = _execute(held.using, statements.mark, [time.time(), *_result_params(held, result), held.key,
                                                         held.owner])
    return changed > 0


def _result_params(held: Claim, result: Any) -> list[Any]:
    """The stored result's parameters: its JSON text (None for None), and whether it is stored."""
    if result is None:
        return [None, True]
    try:
        return [json.dumps(result, cls=DjangoJSONEncoder, allow_nan=False), True]
    except (TypeError, ValueError):
        logger.warning("safetynet: the result of the run holding %r is not JSON; a duplicate will get None",
                       held.key, extra={"idempotency_key": held.key})
        return [None, False]


def _mark_and_commit(held: Claim, result: Any, connection: Any) -> bool:
    """Mark the claim and COMMIT the open transaction in one round trip (PostgreSQL, psycopg 3); False, and the
    transaction aborted (nothing committed), if this run no longer owns the claim.

    The two statements go out together in libpq's pipeline mode. The mark fails (division by zero) when it marks no
    row: the transaction is then aborted and the COMMIT behind it rolls it back; the caller's ``atomic`` ends it.
    Django's own COMMIT, when its ``atomic`` block ends, finds the transaction committed and sends nothing; its
    ``on_commit`` callbacks run as after any commit.
    """
    import psycopg

    params = [time.time(), *_result_params(held, result), held.key, held.owner]
    with connection.wrap_database_errors:
        try:
            run_together(connection, [(_sql(held.using).mark_strict, params), ("COMMIT", ())])
        except psycopg.errors.DivisionByZero:
            return False
    return True


def run_atomically(held: Claim, call: Callable[[], Any], *, begun: Begun | None = None) -> Any:
    """Run the body and mark the claim succeeded in one transaction: both commit, or neither does.

    ``begun``: the outermost ``atomic`` block ``claim_and_begin`` entered (taken over and ended here). ClaimLost (after the
    rollback) when another run took the claim over meanwhile. When the body sent no statement on the claims'
    connection and left no ``on_commit`` callback, its transaction is empty and commits nothing; the mark then runs
    alone, as one statement in autocommit (no BEGIN and COMMIT round trips). That is the same outcome: the body
    wrote nothing to commit with it.
    """
    connection = connections[held.using]
    outermost = begun is not None or not connection.in_atomic_block
    with contextlib.ExitStack() as block:
        if begun is not None:
            block.push(begun)
        else:
            block.enter_context(transaction.atomic(using=held.using))
        result = call()
        if connection.needs_rollback:
            # The body returned but asked for its transaction to be rolled back (set_rollback, or a
            # swallowed error): nothing of it commits; the operation is done, so mark it alone.
            logger.warning("safetynet: the body holding %r returned with its transaction marked for rollback; "
                           "its writes are not committed", held.key, extra={"idempotency_key": held.key})
        elif not (outermost and _untouched(connection)):
            if outermost and _pipelines(connection):
                if not _mark_and_commit(held, result, connection):
                    raise ClaimLost(f"idempotency key {held.key!r} was taken over by another run; this run's "
                                    "writes rolled back")
                return result
            if not mark_succeeded(held, result):
                raise ClaimLost(f"idempotency key {held.key!r} was taken over by another run; this run's writes "
                                "rolled back")
            return result
    if not mark_succeeded(held, result):
        raise ClaimLost(f"idempotency key {held.key!r} was taken over by another run (the run wrote nothing)")
    return result


def _pipelines(connection: Any) -> bool:
    """True if the mark and the COMMIT of the open transaction on ``connection`` can go in one round trip."""
    return connection.vendor == "postgresql" and pipelines() and connection.connection is not None


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

