"""Durable delayed retries and the transactional outbox: task messages that wait in the database.

A Celery retry with a countdown is an ETA message: a worker fetches it at once and holds it in
memory until it is due, and on Redis a message held longer than ``visibility_timeout`` is
delivered again, so a long retry bloats workers and can run twice. Here a retry delayed at least
``DURABLE_RETRY_SECONDS`` is a row of ``ScheduledMessage`` instead; so is a message sent in
``outbox`` mode, written in the caller's transaction (a rollback sends nothing; a broker that is
down at commit time loses nothing).

The relay publishes due rows: a thread in every worker (``RELAY_IN_WORKERS``) and, if you like,
``python manage.py safetynet relay``. Any number of relays can run; each takes only the rows of
its own app's broker (a digest of the broker URL is kept on each row)::

    take   UPDATE … SET state = 'published', token = <new> WHERE key IN
               (SELECT key … WHERE due_at <= now ORDER BY due_at LIMIT n FOR UPDATE SKIP LOCKED)
    send   each message, carrying the header  safetynet_relayed = [key, token]
    commit (a message that could not be sent is put back, due again after a backoff)

Exactly once: a relay that dies between sending and committing leaves its rows to be sent again,
so a second copy of a message can exist. Each copy carries its row's key and a token; the first
copy that reaches a worker writes its token on the row (``accept``), and a copy with another token
is dropped there. A broker redelivering that same copy (its worker died) carries the same token
and runs again, as any late-acknowledged task does. A published row nobody took within
``LOST_MESSAGE_SECONDS`` is sent again the same way (the broker lost it), at most ``MAX_RESENDS``
times before it is dead-lettered.
"""

from __future__ import annotations

import logging
import threading
import time
import uuid
from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from django.db import connections, router, transaction
from kombu.utils.json import dumps, loads

from safetynet.exceptions import ConfigurationError

__all__ = [
    "MAX_RESENDS",
    "moment",
    "RELAYED_HEADER",
    "RelayRun",
    "accept",
    "bring_forward",
    "database",
    "delay_of",
    "is_durable",
    "next_delivery_headers",
    "pack",
    "publish_now",
    "purge",
    "relay",
    "schedule",
    "unpack",
]

logger = logging.getLogger("safetynet")

#: The header a relayed message carries: ``[row key, publish token]``.
RELAYED_HEADER = "safetynet_relayed"

#: A published message no worker took is sent again at most this many times, then dead-lettered.
MAX_RESENDS = 5

# apply_async options that are not part of the message (objects of the sending process).
_LOCAL_OPTIONS = frozenset({"producer", "connection", "router", "publisher", "result_cls", "add_to_parent",
                            "countdown", "eta", "enqueue"})


def broker_of(app: Any) -> str:
    """Which broker a row goes to: a digest of ``app``'s broker URL (no password is stored)."""
    import hashlib

    return hashlib.sha256(str(app.conf.broker_url or "").encode()).hexdigest()[:16]


def database() -> str:
    """The database alias scheduled and outbox messages are written to (Django's routers decide)."""
    from safetynet.models import ScheduledMessage

    return router.db_for_write(ScheduledMessage) or "default"


def _table(using: str) -> str:
    from safetynet.models import ScheduledMessage

    return connections[using].ops.quote_name(ScheduledMessage._meta.db_table)


# -- what goes in a row ------------------------------------------------------------------------


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
    from safetynet import conf

    threshold = conf.get().durable_retry_seconds
    return threshold is not None and delay >= threshold


def pack(args: Any, kwargs: Any, options: dict[str, Any], now: float) -> str:
    """The row's message: arguments and publishing options as kombu JSON (ConfigurationError if not JSON)."""
    kept = {name: value for name, value in options.items() if name not in _LOCAL_OPTIONS and value is not None}
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


def next_delivery_headers(headers: dict[str, Any]) -> dict[str, Any]:
    """The headers of a retry made from a delivered message: without the relay's token of that
    delivery (the retry is a new message, to be scheduled or published on its own)."""
    headers.pop(RELAYED_HEADER, None)
    return headers


def schedule(*, key: str, kind: str, task_name: str, task_id: str, broker: str, due_at: float, message: str,
             using: str | None = None, outside_transaction: bool = False) -> bool:
    """Write one row; False if ``key`` is there already.

    The row joins the transaction open on the connection (the outbox's point), unless
    ``outside_transaction``: a retry must not vanish with a transaction its failure rolls back.
    """
    using = using or database()
    now = time.time()
    connection = connections[using]
    independent = outside_transaction and connection.in_atomic_block
    if independent:
        connection = _independent(using)
    try:
        with connection.cursor() as cursor:
            # ON CONFLICT DO NOTHING: a redelivered attempt schedules nothing twice.
            cursor.execute(
                f"INSERT INTO {_table(using)} (key, kind, task_name, task_id, broker, state, due_at, message, token, "
                f"consumed_token, publishes, failures, last_error, created_at, updated_at) "
                f"VALUES (%s, %s, %s, %s, %s, 'scheduled', %s, %s, '', '', 0, 0, '', %s, %s) "
                f"ON CONFLICT (key) DO NOTHING",
                [key[:255], kind, task_name, task_id, broker, due_at, message, now, now],
            )
            return cursor.rowcount > 0
    finally:
        if independent:
            connection.close()


def _independent(using: str) -> Any:
    """A new connection to ``using``, in autocommit, for a write that must not join the transaction open
    on Django's connection (the caller closes it; this is rare: a retry scheduled inside an atomic block)."""
    if connections[using].vendor == "sqlite":  # one writer at a time: it would wait for the open transaction
        raise ConfigurationError("SQLite cannot write outside the open transaction (it holds the only write lock)")
    return connections.create_connection(using)


def settled(key: str, using: str | None = None) -> bool:
    """True if the row ``key`` belongs to a message already consumed (or given up): a task id used again."""
    from safetynet.models import ScheduledMessage

    return ScheduledMessage.objects.using(using or database()).filter(
        key=key[:255], state=ScheduledMessage.State.CONSUMED).exists()


# -- the relay ---------------------------------------------------------------------------------


@dataclass
class RelayRun:
    """What one pass of the relay did."""

    published: int = 0
    resent: int = 0
    failed: int = 0
    given_up: int = 0
    error: BaseException | None = None

    @property
    def taken(self) -> int:
        return self.published + self.resent + self.failed + self.given_up


def _has_due(using: str, broker: str, now: float) -> bool:
    from safetynet.models import ScheduledMessage

    return ScheduledMessage.objects.using(using).filter(
        broker=broker, state__in=[ScheduledMessage.State.SCHEDULED, ScheduledMessage.State.PUBLISHED], due_at__lte=now
    ).exists()


def relay(app: Any, *, limit: int = 500, keys: Iterable[str] | None = None) -> RelayRun:
    """Publish the due rows (or only ``keys``, if due): one pass; see the module's docstring."""
    from safetynet import conf

    using = database()
    now = time.time()
    run = RelayRun()
    key_list = None if keys is None else list(keys)
    broker = broker_of(app)
    if key_list == [] or (key_list is None and not _has_due(using, broker, now)):
        return run
    grace = conf.get().lost_message_seconds
    token = uuid.uuid4().hex[:16]
    connection = connections[using]
    table = _table(using)
    skip_locked = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    only = ""
    params: list[Any] = [token, now + grace if grace is not None else 1e18, now, broker, now]
    if key_list is not None:
        only = f" AND key IN ({', '.join(['%s'] * len(key_list))})"
        params += key_list
    params.append(limit)
    with transaction.atomic(using=using):
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET state = 'published', token = %s, due_at = %s, publishes = publishes + 1, "
                f"updated_at = %s WHERE key IN (SELECT key FROM {table} WHERE broker = %s "
                f"AND state IN ('scheduled', 'published') AND due_at <= %s{only} ORDER BY due_at LIMIT %s{skip_locked}) "
                f"RETURNING key, kind, task_name, task_id, message, publishes",
                params,
            )
            rows = cursor.fetchall()
        rows.sort(key=lambda row: row[0])
        _publish(app, using, rows, token, run)
    if run.taken:
        logger.info("safetynet: relay published %s, sent again %s, failed %s, gave up %s",
                    run.published, run.resent, run.failed, run.given_up,
                    extra={"action": "relay", "published": run.published, "resent": run.resent})
    return run


def _publish(app: Any, using: str, rows: list[tuple[Any, ...]], token: str, run: RelayRun) -> None:
    """Send the taken rows, inside the relay's transaction; put back the ones that could not be sent."""
    if not rows:
        return
    given_up = [row for row in rows if row[5] > MAX_RESENDS + 1]
    if given_up:
        _give_up(using, given_up)
        run.given_up = len(given_up)
    pending = [row for row in rows if row[5] <= MAX_RESENDS + 1]
    with app.producer_or_acquire() as producer:
        for index, (key, kind, task_name, task_id, message, publishes) in enumerate(pending):
            try:
                args, kwargs, options = unpack(message)
                if _expired(options, key, task_name, task_id, using):
                    continue
                if index == 0:
                    # One try to reach the broker, no retries: a relay, or a request that committed an
                    # outbox message, does not wait for a broker that is away; the rows wait instead.
                    producer.connection.ensure_connection(max_retries=0)
                options["headers"] = {**(options.get("headers") or {}), RELAYED_HEADER: [key, token]}
                options.update(producer=producer, retry=False)
                task = app.tasks.get(task_name)
                if task is not None:
                    task.apply_async(args, kwargs, **options)
                else:
                    app.send_task(task_name, args, kwargs, **options)
            except Exception as error:  # the broker is away (or this row cannot be sent): put the rest back
                run.error = error
                rest = pending[index:]
                run.failed = len(rest)
                # The row that failed waits longer each time (it may be what fails: a poison row must
                # not hold the others back); the rest are due again in a second.
                _put_back(using, [row[0] for row in rest[:1]], error, failed=True)
                _put_back(using, [row[0] for row in rest[1:]], error, failed=False)
                logger.warning("safetynet: relay could not publish %s[%s]: %r; %s message(s) put back",
                               task_name, task_id, error, len(rest),
                               extra={"task_name": task_name, "task_id": task_id, "action": "relay"})
                return
            if publishes > 1:
                run.resent += 1
                logger.warning(
                    "safetynet: %s[%s] (%s) was published and no worker took it in time; sent it again",
                    task_name, task_id, kind, extra={"task_name": task_name, "task_id": task_id, "action": "resend"},
                )
            else:
                run.published += 1


def _expired(options: dict[str, Any], key: str, task_name: str, task_id: str, using: str) -> bool:
    """A message whose ``expires`` has passed is not published (a worker would discard it unrun, and the
    relay would send it again and again): the row is settled, as Celery would have settled it."""
    expires = options.get("expires")
    if not isinstance(expires, (str, datetime)) or moment(expires).timestamp() > time.time():
        return False
    _settle(using, [key])
    logger.info("safetynet: %s[%s] expired before it was due; not published", task_name, task_id,
                extra={"task_name": task_name, "task_id": task_id, "action": "expired"})
    return True


def _settle(using: str, keys: list[str]) -> None:
    """Mark rows consumed by nobody: a copy of them that still turns up is dropped."""
    from safetynet.models import ScheduledMessage

    ScheduledMessage.objects.using(using).filter(key__in=keys).update(
        state=ScheduledMessage.State.CONSUMED, consumed_token="-", updated_at=time.time())


def _put_back(using: str, keys: list[str], error: BaseException, *, failed: bool) -> None:
    if not keys:
        return
    table = _table(using)
    now = time.time()
    # Due again after 2, 8, 18, 32 … up to 300 seconds for the row that failed (its failures counted), 1 s
    # for the others.
    due = ("%s + CASE WHEN failures >= 8 THEN 300 ELSE 2 * (failures + 1) * (failures + 1) END"
           if failed else "%s + 1")
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET state = CASE WHEN publishes <= 1 THEN 'scheduled' ELSE 'published' END, "
            f"publishes = publishes - 1, due_at = {due}, failures = failures + %s, last_error = %s, "
            f"updated_at = %s WHERE key IN ({', '.join(['%s'] * len(keys))})",
            [now, int(failed), f"{type(error).__name__}: {error}"[:2000], now, *keys],
        )


def _give_up(using: str, rows: list[tuple[Any, ...]]) -> None:
    """Sent again and again, never taken: no worker consumes its queue. A dead letter, not a loop."""
    from safetynet import deadletter

    for key, kind, task_name, task_id, message, publishes in rows:
        args, kwargs, options = unpack(message)
        deadletter.record_lost_message(
            task_name=task_name, task_id=task_id, args=args, kwargs=kwargs, headers=options.get("headers") or {},
            queue=options.get("queue", ""),
            detail=f"its {kind} message was published {publishes - 1} times and no worker took it: no worker "
                   "consumes its queue, or the task was revoked or is unknown there",
        )
    _settle(using, [row[0] for row in rows])


def publish_now(app: Any, keys: list[str]) -> None:
    """Publish outbox rows just committed, from the sending process (the relay is the safety net)."""
    try:
        relay(app, keys=keys, limit=len(keys))
    except Exception as error:  # the database or the broker is away: the relay sends them later
        logger.warning("safetynet: outbox message(s) %s not published now (%r); the relay will",
                       ", ".join(keys), error, extra={"action": "outbox"})


def accept(key: str, token: str) -> bool:
    """On arrival: True if this copy of a relayed message is the one to run (see the module's docstring)."""
    using = database()
    table = _table(using)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET consumed_token = CASE WHEN consumed_token = '' THEN %s ELSE consumed_token END, "
            f"state = 'consumed', updated_at = %s WHERE key = %s RETURNING consumed_token",
            [token, time.time(), key],
        )
        row = cursor.fetchone()
    # No row: purged after SCHEDULE_KEEP_SECONDS (or written elsewhere); run it.
    return row is None or row[0] == token


def purge(older_than: float) -> int:
    """Delete the rows of messages published or consumed before ``older_than`` (seconds since the epoch)."""
    from safetynet.models import ScheduledMessage

    deleted, _ = ScheduledMessage.objects.using(database()).filter(
        state__in=[ScheduledMessage.State.PUBLISHED, ScheduledMessage.State.CONSUMED], updated_at__lt=older_than
    ).delete()
    return deleted


def bring_forward(queryset: Any, when: float | None = None) -> int:
    """Make the scheduled rows of ``queryset`` due at ``when`` (now): the relay publishes them next."""
    from safetynet.models import ScheduledMessage

    now = time.time()
    return queryset.filter(state=ScheduledMessage.State.SCHEDULED).update(
        due_at=now if when is None else when, updated_at=now
    )


# -- running it --------------------------------------------------------------------------------


def run_forever(app: Any, *, stop: threading.Event, poll: float | None = None, limit: int = 500) -> None:
    """The relay loop: publish what is due, sleep ``poll`` seconds, purge old rows now and then."""
    from django.db import close_old_connections

    from safetynet import conf

    failures = 0
    next_purge = 0.0
    while not stop.is_set():
        settings = conf.get()
        interval = poll if poll is not None else settings.relay_poll_seconds
        try:
            result = relay(app, limit=limit)
            failures = failures + 1 if result.error is not None else 0
            if time.time() >= next_purge:
                purge(time.time() - settings.schedule_keep_seconds)
                next_purge = time.time() + 60.0
        except Exception as error:  # the database is away: try again, less often
            failures += 1
            logger.warning("safetynet: relay pass failed: %r", error, extra={"action": "relay"})
            close_old_connections()
            result = RelayRun()
        if result.taken >= limit and result.error is None:
            continue  # more is due: no sleep
        stop.wait(min(30.0, interval * (2 ** min(failures, 6))) if failures else interval)
