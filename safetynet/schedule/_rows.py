"""The rows of ``ScheduledMessage``: every message safetynet must see taken by a worker, one row per task id.

A row is written for a retry that waits long (``retry``, until it is due), a message sent through
the outbox (``outbox``, in the caller's transaction), and an idempotent task's message sent at once
(``sent``, to send it again if the broker loses it). The row follows its task: each retry of the
same task writes over it (a newer history entry wins; a redelivered attempt writing the same entry
changes nothing), and a message that reuses a task id (``Task.replace``, fixed ids) takes the row
over once the earlier message was taken.
"""

from __future__ import annotations

import functools
import hashlib
import time
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from django.db import connections, router
from django.db.models import Q
from kombu.utils.json import dumps, loads
from kombu.transport import resolve_transport
from kombu.utils.imports import symbol_by_name
from kombu.utils.url import maybe_sanitize_url, parse_url

from safetynet import conf
from safetynet.exceptions import ConfigurationError
from safetynet.models import ScheduledMessage

__all__ = ["MAX_RESENDS", "NEVER", "Row", "accept", "bring_forward", "broker_of", "brokers_of", "database", "delay_of", "drop", "holds_same", "is_durable",
           "moment", "pack", "purge", "settle", "unpack", "write"]

#: A published message no worker took is sent again at most this many times, then dead-lettered.
MAX_RESENDS = 5

# apply_async options that are not part of the message (objects of the sending process).
_LOCAL_OPTIONS = frozenset({"producer", "connection", "router", "publisher", "result_cls", "add_to_parent",
                            "countdown", "eta", "enqueue"})


def broker_of(app: Any) -> str:
    """Which broker a row goes to: a digest of where ``app``'s broker is (transport, host, port, virtual host), so
    that a changed password or option leaves the rows to the same relays (no password is stored)."""
    return _where_digest(str(app.conf.broker_url or ""))


def brokers_of(app: Any) -> tuple[str, str]:
    """``broker_of(app)``, and the digest earlier versions wrote (of the whole URL): the relay takes both."""
    url = str(app.conf.broker_url or "")
    return _where_digest(url), hashlib.sha256(url.encode()).hexdigest()[:16]


@functools.lru_cache(maxsize=32)
def _where_digest(url: str) -> str:
    return hashlib.sha256(";".join(_place(one.strip()) for one in url.split(";") if one.strip()).encode()
                          ).hexdigest()[:16]


def _place(url: str) -> str:
    """Where one broker URL points: its transport, host, port (the transport's default if none is given) and
    virtual host; the URL with its credentials masked when kombu cannot read it."""
    try:
        parts = parse_url(url)
    except Exception:
        return maybe_sanitize_url(url)
    scheme = str(parts.get("transport") or "")
    try:  # "amqp" and "pyamqp" are the same broker; a missing port is the transport's default
        klass = symbol_by_name(resolve_transport(scheme.split("+", 1)[0]))
        transport, default_port = f"{klass.__module__}.{klass.__qualname__}", getattr(klass, "default_port", None)
    except Exception:
        transport, default_port = scheme, None
    return f"{transport}|{parts.get('hostname') or ''}|{parts.get('port') or default_port or ''}|" \
           f"{parts.get('virtual_host') or ''}"


def database() -> str:
    """The database alias the rows are written to (Django's routers decide)."""
    return router.db_for_write(ScheduledMessage) or "default"


def _table(using: str) -> str:
    return connections[using].ops.quote_name(ScheduledMessage._meta.db_table)


def moment(value: datetime | str) -> datetime:
    """An ``eta`` or ``expires`` as Celery reads it: a datetime or an ISO 8601 string, naive meaning UTC."""
    if isinstance(value, str):
        value = datetime.fromisoformat(value)
    return value if value.tzinfo else value.replace(tzinfo=timezone.utc)  # Celery's enable_utc


def delay_of(options: dict[str, Any], now: float) -> float:
    """Seconds until a message sent with these ``apply_async`` options is due (countdown or eta)."""
    eta = options.get("eta")
    if eta is not None:
        return max(0.0, moment(eta).timestamp() - now)
    countdown = options.get("countdown")
    return max(0.0, float(countdown)) if countdown is not None else 0.0


def is_durable(delay: float) -> bool:
    """True if a retry delayed ``delay`` seconds goes through the durable schedule."""
    threshold = conf.get().durable_retry_seconds
    return threshold is not None and delay >= threshold


def pack(args: Any, kwargs: Any, options: dict[str, Any], now: float) -> str:
    """The row's message: arguments and publishing options as kombu JSON (ConfigurationError if not JSON)."""
    kept = {name: value for name, value in options.items() if name not in _LOCAL_OPTIONS and value is not None}
    for name in ("queue", "exchange"):
        if name in kept and not isinstance(kept[name], str):  # a kombu Queue or Exchange object
            kept[name] = getattr(kept[name], "name", str(kept[name]))
    expires = kept.get("expires")
    if isinstance(expires, (int, float)) and not isinstance(expires, bool):  # relative to the send, not the publish
        kept["expires"] = datetime.fromtimestamp(now + expires, tz=timezone.utc)
    try:
        return dumps({"args": list(args or ()), "kwargs": dict(kwargs or {}), "options": kept})
    except (TypeError, ValueError) as error:
        raise ConfigurationError(
            f"a message that waits in the database must be JSON (kombu's json): {error}"
        ) from None


def unpack(text: str) -> tuple[list[Any], dict[str, Any], dict[str, Any]]:
    """Arguments, keyword arguments and options of a row's message."""
    message = loads(text)
    return list(message.get("args") or ()), dict(message.get("kwargs") or {}), dict(message.get("options") or {})


@dataclass(frozen=True)
class Row:
    """One message to keep: what ``write`` stores."""

    task_id: str
    kind: str
    task_name: str
    broker: str
    due_at: float
    message: str
    #: "scheduled" (the relay publishes it when due) or "published" (sent already; sent again if not taken).
    state: str = ScheduledMessage.State.SCHEDULED
    #: The idempotency key whose claim tells whether a run took it ("" for a task that is not idempotent).
    claim_key: str = ""
    #: When the task's first attempt started (0: not known yet, a message never run).
    origin: float = 0.0
    #: How many attempt-history entries the message carries (0 for a first attempt).
    entry: int = 0
    #: The token of the copy sent already (a ``published`` row).
    token: str = ""


def write(row: Row, *, using: str | None = None, outside_transaction: bool = False) -> bool:
    """Store ``row`` as its task's row; False if the row there stays (a redelivered attempt, a message in flight).

    The write joins the transaction open on the connection (the outbox's point), unless
    ``outside_transaction``: a retry must not vanish with a transaction its failure rolls back.
    """
    using = using or database()
    table = _table(using)
    now = time.time()
    connection = connections[using]
    independent = outside_transaction and connection.in_atomic_block
    if independent:
        connection = _independent(using)
    try:
        with connection.cursor() as cursor:
            cursor.execute(
                f"INSERT INTO {table} (key, kind, task_name, task_id, broker, state, due_at, message, token, "
                f"consumed_token, publishes, failures, last_error, claim_key, origin, entry, created_at, updated_at) "
                f"VALUES (%s, %s, %s, %s, %s, %s, %s, %s, %s, '', %s, 0, '', %s, %s, %s, %s, %s) "
                f"ON CONFLICT (key) DO UPDATE SET kind = excluded.kind, task_name = excluded.task_name, "
                f"broker = excluded.broker, state = excluded.state, due_at = excluded.due_at, "
                f"message = excluded.message, token = excluded.token, consumed_token = '', "
                f"publishes = excluded.publishes, failures = 0, last_error = '', claim_key = excluded.claim_key, "
                f"origin = excluded.origin, entry = excluded.entry, updated_at = excluded.updated_at "
                # The same task moving on to a later attempt; or another message reusing the task id once the
                # earlier one was taken. A redelivered attempt writing its retry again changes nothing.
                f"WHERE ({table}.entry < excluded.entry AND ({table}.origin = excluded.origin OR {table}.origin = 0)) "
                f"OR ({table}.state = 'consumed' AND ({table}.origin <> excluded.origin OR excluded.entry = 0))",
                [row.task_id[:255], row.kind, row.task_name, row.task_id, row.broker, row.state, row.due_at,
                 row.message, row.token, 1 if row.state == ScheduledMessage.State.PUBLISHED else 0,
                 row.claim_key[:255], row.origin, row.entry, now, now],
            )
            return cursor.rowcount > 0
    finally:
        if independent:
            connection.close()


def holds_same(row: Row, *, using: str | None = None) -> bool:
    """True if the stored row is ``row``'s message at this attempt or a later one (what ``write`` left in place
    for a redelivered attempt: the same arguments), False if a message with other arguments holds it."""
    found = ScheduledMessage.objects.using(using or database()).filter(key=row.task_id[:255]).values_list(
        "entry", "message").first()
    if found is None or found[0] < row.entry:
        return False
    return unpack(found[1])[:2] == unpack(row.message)[:2]


def _independent(using: str) -> Any:
    """A new connection to ``using``, in autocommit, for a write that must not join the transaction open
    on Django's connection (the caller closes it; this is rare: a retry scheduled inside an atomic block)."""
    if connections[using].vendor == "sqlite":  # one writer at a time: it would wait for the open transaction
        raise ConfigurationError("SQLite cannot write outside the open transaction (it holds the only write lock)")
    return connections.create_connection(using)


def accept(key: str, token: str) -> bool:
    """On arrival: True if this copy of a relayed message is the one to run.

    The copy the row's latest publish sent (its ``token``) is the one; the first such copy to arrive
    marks the row taken, and the broker redelivering that same copy (its worker died) runs it again,
    as any late-acknowledged task does. A copy of an earlier publish, or a second copy, is dropped.
    A row of an idempotent task stays ``published``: its claim tells the relay when it is done.
    """
    using = database()
    table = _table(using)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET consumed_token = CASE WHEN consumed_token = '' AND token = %s THEN %s "
            f"ELSE consumed_token END, state = CASE WHEN claim_key = '' AND token = %s THEN 'consumed' "
            f"ELSE state END, updated_at = %s WHERE key = %s RETURNING consumed_token",
            [token, token, token, time.time(), key],
        )
        found = cursor.fetchone()
    # No row: purged after SCHEDULE_KEEP_SECONDS (or written elsewhere); run it.
    return found is None or found[0] == token


def settle(keys: list[str], using: str | None = None) -> None:
    """Mark rows taken by nobody (expired, given up) or done with: a copy of them that still turns up is dropped."""
    if keys:
        ScheduledMessage.objects.using(using or database()).filter(key__in=keys).update(
            state=ScheduledMessage.State.CONSUMED, consumed_token="-", updated_at=time.time())


#: The ``due_at`` of a published row that is never sent again (``LOST_MESSAGE_SECONDS`` is None).
NEVER = 1e18


def purge(older_than: float) -> int:
    """Delete the rows done with before ``older_than`` (seconds since the epoch): taken, or published and never
    to be sent again. A published row the relay still watches (a kept message due in two days) stays."""
    deleted, _ = ScheduledMessage.objects.using(database()).filter(
        Q(state=ScheduledMessage.State.CONSUMED)
        | Q(state=ScheduledMessage.State.PUBLISHED, due_at__gte=NEVER)
        | Q(state=ScheduledMessage.State.PUBLISHED, due_at__lt=older_than),
        updated_at__lt=older_than,
    ).delete()
    return deleted


def bring_forward(queryset: Any, when: float | None = None) -> int:
    """Make the scheduled rows of ``queryset`` due at ``when`` (now): the relay publishes them next."""
    now = time.time()
    return int(queryset.filter(state=ScheduledMessage.State.SCHEDULED).update(
        due_at=now if when is None else when, updated_at=now
    ))



def drop(key: str, using: str | None = None) -> None:
    """Forget a row not published yet (an outbox message a plug-in held back)."""
    ScheduledMessage.objects.using(using or database()).filter(
        key=key, state=ScheduledMessage.State.SCHEDULED).delete()
