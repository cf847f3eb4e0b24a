"""Idempotency keys and claims: a retried or redelivered task performs its effect once.

A task declares ``idempotency_key="charge-{order_id}"`` (a template over its arguments) or a
callable taking the task's arguments. Before the body runs, the key is claimed in the
database with one ``INSERT … ON CONFLICT … RETURNING`` statement:

- won: the body runs while a heartbeat thread moves the claim's lease on; by default the body's
  database writes and the "succeeded" mark commit in one transaction, and the mark only
  succeeds while this run still owns the claim, so a run that lost its claim rolls back;
- succeeded earlier: the stored result is returned and the body does not run;
- in progress elsewhere: the task is deferred (a snooze: no attempt used up);
- in progress, but its lease ran out (the worker died): taken over, and counted; after
  ``max_deliveries`` such deaths the task is dead-lettered as ``crash_loop``.

Orphans are found by a missed heartbeat, not by elapsed time, so a long run is never run twice.
"""

from __future__ import annotations

import contextlib
import inspect
import json
import logging
import os
import re
import socket
import string
import threading
import time
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from typing import Any

from django.core.serializers.json import DjangoJSONEncoder
from django.db import connections, models, router, transaction

from safetynet import scheduler
from safetynet.exceptions import (
    ClaimLost,
    ConfigurationError,
    CrashLoop,
    IdempotencyKeyError,
    KeyInProgress,
    SafetynetError,
)

__all__ = [
    "MAX_KEY_LENGTH",
    "Claim",
    "ClaimLost",
    "CrashLoop",
    "IdempotencyKeyError",
    "KeyInProgress",
    "HANDOVER_HEADER",
    "KeyTemplate",
    "atomic",
    "claim",
    "hand_over",
    "new_handover_token",
    "resend_lost",
    "track",
    "current",
    "mark_succeeded",
    "release",
    "release_task",
]

logger = logging.getLogger("safetynet")

#: The longest key a claim can hold (the column's size).
MAX_KEY_LENGTH = 255

WON, SUCCEEDED, IN_PROGRESS, CRASH_LOOP = "won", "succeeded", "in_progress", "crash_loop"


# -- keys --------------------------------------------------------------------------------------

_FIELD_ROOT = re.compile(r"^[^.\[]*")


class KeyTemplate:
    """A task's ``idempotency_key`` option, checked against the task's parameters when declared."""

    def __init__(self, spec: str | Callable[..., Any], function: Callable[..., Any], *, bound: bool, where: str):
        self.spec = spec
        signature = inspect.signature(function)
        parameters = list(signature.parameters.values())
        if bound and parameters:
            parameters = parameters[1:]
        self.signature = signature.replace(parameters=parameters)
        #: The parameters' names when all are plain positional ones: a call passing each of them
        #: positionally then maps onto them without ``Signature.bind`` (the common case, and cheaper).
        self.positional = tuple(p.name for p in parameters) if all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters
        ) else None
        if callable(spec):
            return
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigurationError(
                f"{where}: idempotency_key must be a template such as 'order-{{order_id}}' or a callable "
                f"taking the task's arguments, got {spec!r}"
            )
        names = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters)
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(spec) if field is not None]
        except ValueError as error:
            raise ConfigurationError(f"{where}: idempotency_key {spec!r} is not a valid template: {error}") from None
        if not fields:
            raise ConfigurationError(
                f"{where}: idempotency_key {spec!r} names no argument, so every call would share one key; "
                "write it over the arguments that identify the operation, e.g. 'charge-{order_id}'"
            )
        for field in fields:
            root = _FIELD_ROOT.match(field).group(0)  # type: ignore[union-attr]
            if not root or root.isdigit():
                raise ConfigurationError(
                    f"{where}: idempotency_key {spec!r}: name the argument ({{order_id}}), not a position ({{{field}}})"
                )
            if root not in names and not open_kwargs:
                known = ", ".join(sorted(names)) or "none"
                raise ConfigurationError(
                    f"{where}: idempotency_key {spec!r} names {root!r}, which is not an argument of the task "
                    f"(its arguments: {known})"
                )

    def render(self, args: Any, kwargs: Any) -> str:
        """The key for one call; IdempotencyKeyError when the arguments cannot make one."""
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        if callable(self.spec):
            value = self.spec(*args, **kwargs)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise IdempotencyKeyError(f"the idempotency_key callable returned {value!r}, not a string")
            key = value
        else:
            if self.positional is not None and not kwargs and len(args) == len(self.positional):
                values = dict(zip(self.positional, args))
            else:
                try:
                    bound = self.signature.bind(*args, **kwargs)
                except TypeError as error:
                    raise IdempotencyKeyError(f"cannot make the idempotency key {self.spec!r}: {error}") from None
                bound.apply_defaults()
                values = dict(bound.arguments)
                for parameter in self.signature.parameters.values():
                    if parameter.kind is parameter.VAR_KEYWORD:
                        values.update(values.pop(parameter.name, {}))
            try:
                key = self.spec.format_map(values)
            except (KeyError, AttributeError, IndexError) as error:
                raise IdempotencyKeyError(
                    f"cannot make the idempotency key {self.spec!r} from the arguments: missing {error}"
                ) from None
        return check_key(key)


def check_key(key: str) -> str:
    """``key`` if it can be claimed; IdempotencyKeyError saying what is wrong otherwise."""
    if not key.strip():
        raise IdempotencyKeyError("the idempotency key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyError(
            f"the idempotency key is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}. "
            f"Build it from identifiers, not payloads (it starts {key[:40]!r})"
        )
    return key


# -- claims ------------------------------------------------------------------------------------


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
        from safetynet.models import IdempotencyClaim

        table = _tables[using, connection.vendor] = connection.ops.quote_name(IdempotencyClaim._meta.db_table)
    return table


def database_for_claims() -> str:
    """The database alias claims are written to (Django's routers decide)."""
    from safetynet.models import IdempotencyClaim

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
                f"result_stored, error, message, resent, created_at, updated_at) "
                f"VALUES (%s, %s, %s, 'in_progress', %s, %s, 1, NULL, %s, '', NULL, 0, %s, %s) "
                f"ON CONFLICT (key) DO UPDATE SET task_name = excluded.task_name, task_id = excluded.task_id, "
                f"state = 'in_progress', owner = excluded.owner, lease_until = excluded.lease_until, "
                # A failed key starts afresh; a queued one counts its runs (an orphan the sweeper
                # queued again keeps the count of the runs that died); a hand-over is no new delivery.
                f"deliveries = CASE WHEN {table}.state = 'failed' THEN 1 "
                f"WHEN {table}.state = 'queued' THEN {table}.deliveries + 1 "
                f"WHEN {table}.owner = %s THEN {table}.deliveries ELSE {table}.deliveries + 1 END, "
                f"result = NULL, result_stored = excluded.result_stored, error = '', "
                f"updated_at = excluded.updated_at "
                f"WHERE {table}.state IN ('failed', 'queued') OR ({table}.state = 'in_progress' "
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
        if existing is None or existing.outcome in ("failed", "queued"):
            continue  # settled, queued again or purged between the two statements: claim again
        existing.lease = lease
        return existing
    raise SafetynetError(f"could not claim idempotency key {key!r}: it changed state five times in a row")


def _read(key: str, using: str) -> Claim | None:
    from safetynet.models import IdempotencyClaim

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
    assignments, params = f"state = '{SUCCEEDED}', message = NULL, updated_at = %s", [time.time()]
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


#: The message header that carries a claim handed over to the next attempt.
HANDOVER_HEADER = "safetynet_claim"


HANDOVER_PREFIX = "handover/"


def new_handover_token() -> str:
    """A token for ``hand_over``, put in the retry message's headers."""
    return f"{HANDOVER_PREFIX}{uuid.uuid4().hex}"


def hand_over(held: Claim, token: str, until: float, message: dict[str, Any] | None = None) -> bool:
    """Keep the claim for the retry this run scheduled: ``token`` (carried by the retry) owns it now.

    Duplicates stay deferred while the task waits for its next attempt (the operation is still
    in progress); the lease covers the wait. ``message`` is the retry, kept to be sent again if
    it is lost. False if this run no longer owns the claim.
    """
    from safetynet.models import IdempotencyClaim

    fields: dict[str, Any] = {"owner": token, "lease_until": until, "updated_at": time.time()}
    if message is not None:
        fields["message"] = message
    return bool(IdempotencyClaim.objects.using(held.using).filter(
        key=held.key, owner=held.owner, state=IdempotencyClaim.State.IN_PROGRESS
    ).update(**fields))


def release(held: Claim, error: BaseException | None) -> None:
    """Give an unfinished claim up (the run failed): the next run may claim the key."""
    from safetynet.models import IdempotencyClaim

    _mark_failed(IdempotencyClaim.objects.using(held.using).filter(
        key=held.key, owner=held.owner, state=IdempotencyClaim.State.IN_PROGRESS
    ), "" if error is None else _error_text(error))


def _mark_failed(claims: Any, error: str) -> int:
    """Settle ``claims`` (a queryset) as failed: the next run may claim the key afresh."""
    from safetynet.models import IdempotencyClaim

    return claims.update(state=IdempotencyClaim.State.FAILED, lease_until=0.0, updated_at=time.time(), message=None,
                         error=error[:2000])


def _error_text(error: BaseException) -> str:
    """What a failed claim keeps of its error: redacted like a dead letter's message (``key=value`` pairs)."""
    from safetynet.deadletter import redact_text

    return redact_text(f"{type(error).__name__}: {error}")


def expire_task(key: str, task_id: str) -> int:
    """End the lease of ``key`` if ``task_id`` holds it (its process is known dead): the next delivery takes over."""
    from safetynet.models import IdempotencyClaim

    return IdempotencyClaim.objects.using(database_for_claims()).filter(
        key=key, task_id=task_id, state=IdempotencyClaim.State.IN_PROGRESS
    ).update(lease_until=0.0)


def release_task(key: str, task_id: str, error: str) -> int:
    """Mark ``key`` failed if ``task_id`` holds it (the task was dead-lettered in the worker's main process)."""
    from safetynet.models import IdempotencyClaim

    return _mark_failed(IdempotencyClaim.objects.using(database_for_claims()).filter(
        key=key, task_id=task_id, state=IdempotencyClaim.State.IN_PROGRESS
    ), error)


def purge(older_than: float) -> int:
    """Delete settled claims last changed before ``older_than`` (seconds since the epoch)."""
    from safetynet.models import IdempotencyClaim

    deleted, _ = IdempotencyClaim.objects.using(database_for_claims()).filter(
        updated_at__lt=older_than, state__in=[IdempotencyClaim.State.SUCCEEDED, IdempotencyClaim.State.FAILED]
    ).delete()
    return deleted


# -- lost messages -----------------------------------------------------------------------------
#
# A broker can lose a message a worker was handed: kombu's Redis transport pops it (BRPOP) and
# only then records it as unacknowledged, so a worker killed in between, or a reply lost when
# Redis restarts, takes it away; no acknowledgement mode can bring it back. An idempotent task
# is recorded as "queued" when it is sent (after the sender's transaction commits); if no run
# has claimed it LOST_MESSAGE_SECONDS later, or a claim's lease ran out and no run took it over
# (a dead run, a lost retry), the sweeper in every worker sends the message again. A copy that
# was only slow is harmless: the claim makes the second run wait or return the stored result.


def track(key: str, *, task_name: str, task_id: str, message: dict[str, Any], grace: float) -> None:
    """Record a sent idempotent task as queued, unless a run already claimed its key."""
    using = database_for_claims()
    table = _table(using)
    now = time.time()
    value = "CAST(%s AS jsonb)" if connections[using].vendor == "postgresql" else "%s"
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (key, task_name, task_id, state, owner, lease_until, deliveries, result, "
            f"result_stored, error, message, resent, created_at, updated_at) "
            f"VALUES (%s, %s, %s, 'queued', '', %s, 0, NULL, %s, '', {value}, 0, %s, %s) "
            f"ON CONFLICT (key) DO UPDATE SET task_name = excluded.task_name, task_id = excluded.task_id, "
            f"state = 'queued', owner = '', lease_until = excluded.lease_until, deliveries = 0, "
            f"message = excluded.message, resent = 0, error = '', updated_at = excluded.updated_at "
            # Only a new task for a key whose last one failed (a replay, a new request): never the
            # task that has already run (its record may come in after it failed).
            f"WHERE {table}.state = 'failed' AND {table}.task_id <> excluded.task_id",
            [key, task_name, task_id, now + grace, False, json.dumps(message, cls=DjangoJSONEncoder), now, now],
        )


def resend_lost(app: Any, *, grace: float, limit: int = 200) -> int:
    """Send again the messages of claims nobody took in time; return how many were sent.

    The rows are taken (``SKIP LOCKED``: one sweeper per row) and moved on by a grace in one
    short transaction; the messages are published after it commits, so a slow broker holds no
    claim row locked. A publish that fails is tried again when the new grace runs out.
    """
    from safetynet.models import IdempotencyClaim

    using = database_for_claims()
    now = time.time()
    due: list[tuple[str, str, str, str, dict[str, Any], dict[str, Any], int]] = []
    given_up: list[tuple[str, str, str, dict[str, Any], int]] = []
    expired: list[str] = []
    with transaction.atomic(using=using):
        rows = list(
            IdempotencyClaim.objects.using(using)
            .select_for_update(skip_locked=True)
            .filter(state__in=[IdempotencyClaim.State.QUEUED, IdempotencyClaim.State.IN_PROGRESS],
                    lease_until__lt=now, message__isnull=False)
            .order_by("lease_until")
            .values_list("key", "task_name", "task_id", "state", "message", "resent", "deliveries")[:limit]
        )
        for key, task_name, task_id, state, message, resent, deliveries in rows:
            options = dict(message.get("options") or {})
            if isinstance(options.get("expires"), str):
                options["expires"] = scheduler.moment(options["expires"])
                if options["expires"].timestamp() < now:  # Celery would not run it now: it is over
                    expired.append(key)
                    continue
            if resent >= MAX_RESENDS and state == IdempotencyClaim.State.QUEUED and deliveries == 0:
                given_up.append((key, task_name, task_id, message, resent))  # sent again and again, never run
                continue
            due.append((key, task_name, task_id, state, message, options, resent))
        if due:
            # A dead run's claim is queued again: the copy claims it and counts a delivery. A retry
            # still holds its hand-over (the copy carries the token): it is no crash, nothing counts.
            unsettled = IdempotencyClaim.objects.using(using).filter(key__in=[row[0] for row in due])
            unsettled.exclude(owner__startswith=HANDOVER_PREFIX).update(state=IdempotencyClaim.State.QUEUED)
            unsettled.update(lease_until=time.time() + grace, resent=models.F("resent") + 1, updated_at=time.time())
        if expired:
            _mark_failed(IdempotencyClaim.objects.using(using).filter(key__in=expired),
                         "its message expired (the expires option) before a run claimed it")
        for key, task_name, task_id, message, resent in given_up:
            _give_up_lost(key, task_name, task_id, message, resent, using)
    sent = 0
    for key, task_name, task_id, state, message, options, resent in due:
        headers = {**(message.get("headers") or {}), "safetynet_resent": resent + 1}
        try:
            app.send_task(task_name, args=message.get("args") or (), kwargs=message.get("kwargs") or {},
                          task_id=task_id, headers=headers, **options)
        except Exception:  # the broker is away: the row is due again after the grace
            logger.exception("safetynet: could not send %s[%s] again; trying after %ss", task_name, task_id, grace)
            continue
        sent += 1
        logger.warning(
            "safetynet: %s[%s] (idempotency key %r) %s; sent it again", task_name, task_id, key,
            "was not started in time: its message was lost" if state == IdempotencyClaim.State.QUEUED
            else "holds an expired claim nobody took over: its run or its retry was lost",
            extra={"task_name": task_name, "task_id": task_id, "idempotency_key": key, "action": "resend"},
        )
    return sent


#: A message sent this many times without a run claiming it is given up (a dead letter).
MAX_RESENDS = 5


def _give_up_lost(key: str, task_name: str, task_id: str, message: dict[str, Any], resent: int, using: str) -> None:
    """Nothing consumes it (no worker on its queue, revoked, unknown there): a dead letter, not a loop."""
    from safetynet import deadletter
    from safetynet.models import IdempotencyClaim

    detail = (f"its message was sent {resent + 1} times and no run claimed idempotency key {key!r}: no worker "
              "consumes its queue, or the task was revoked or is unknown there")
    deadletter.record_lost_message(
        task_name=task_name, task_id=task_id, args=message.get("args") or [], kwargs=message.get("kwargs") or {},
        headers=message.get("headers") or {}, queue=(message.get("options") or {}).get("queue", ""), detail=detail,
        idempotency_key=key,
    )
    _mark_failed(IdempotencyClaim.objects.using(using).filter(key=key, task_id=task_id), detail)


# -- the heartbeat -----------------------------------------------------------------------------


class _Heartbeat:
    """One thread per process that moves the leases of the claims this process holds."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.held: dict[str, Claim] = {}
        self.thread: threading.Thread | None = None
        self.pid = 0
        self.interval = 1.0
        self.wake = threading.Event()

    def hold(self, held: Claim) -> None:
        with self.lock:
            self.held[held.owner] = held
            if self.thread is None or self.pid != os.getpid() or not self.thread.is_alive():
                self.pid = os.getpid()
                self.wake = threading.Event()
                self.interval = held.lease / 3
                self.thread = threading.Thread(target=self.loop, name="safetynet-heartbeat", daemon=True)
                self.thread.start()
            elif held.lease / 3 < self.interval:
                self.wake.set()  # the thread sleeps longer than this claim's lease allows: shorten it

    def drop(self, held: Claim) -> None:
        with self.lock:
            self.held.pop(held.owner, None)

    def loop(self) -> None:
        from django.db import close_old_connections

        from safetynet.models import IdempotencyClaim

        while True:
            with self.lock:
                claims = list(self.held.values())
                self.interval = max(0.05, min((c.lease for c in claims), default=3.0) / 3)
                wake = self.wake
            if wake.wait(self.interval):
                wake.clear()
                continue  # a claim with a shorter lease arrived: sleep again, for its interval
            with self.lock:
                claims = list(self.held.values())
            if not claims:
                # Nothing to renew: do not keep a connection open for an idle process (it is
                # opened again, once, when a beat has claims to renew).
                connections.close_all()
                continue
            by_lease: dict[tuple[str, float], list[str]] = {}
            for held in claims:
                by_lease.setdefault((held.using, held.lease), []).append(held.owner)
            try:
                for (using, lease), owners in by_lease.items():
                    IdempotencyClaim.objects.using(using).filter(
                        owner__in=owners, state=IdempotencyClaim.State.IN_PROGRESS
                    ).update(lease_until=time.time() + lease)
            except Exception as error:  # the database may be away for a moment: try again next beat
                logger.warning("safetynet: could not renew idempotency leases: %r", error)
                close_old_connections()  # a broken connection is replaced on the next beat


_heartbeat = _Heartbeat()
# A process forked while holding claims (a body using multiprocessing) must not inherit them or a
# lock some thread held at the fork: it starts with none (its own thread starts on its first claim).
os.register_at_fork(after_in_child=lambda: _heartbeat.__init__())
_local = threading.local()


@contextlib.contextmanager
def holding(held: Claim) -> Iterator[Claim]:
    """While the body runs: the lease is renewed and ``current()`` is this claim."""
    _heartbeat.hold(held)
    previous = getattr(_local, "claim", None)
    _local.claim = held
    try:
        yield held
    finally:
        _local.claim = previous
        _heartbeat.drop(held)


def current() -> Claim | None:
    """The claim of the idempotent task running in this thread, if any."""
    return getattr(_local, "claim", None)


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
