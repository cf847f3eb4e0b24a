"""The relay: publishes the rows that are due, and sends again what no worker took.

Any number of relays can run (a thread in every worker, ``manage.py safetynet relay``); each takes
only the rows of its own app's broker. One pass::

    take    UPDATE … SET state = 'published', token = <new>, due_at = now + LOST_MESSAGE_SECONDS WHERE key IN
                (SELECT key … WHERE due_at <= now ORDER BY due_at LIMIT n FOR UPDATE SKIP LOCKED)
    check   a row published before is sent again only if no worker took it: for an idempotent task,
            its claim tells (held by a live run: not yet; settled: done; held by a dead run: again)
    send    each message, carrying the header  safetynet_relayed = [key, token]
    commit  (a message that could not be sent is put back, due again after a backoff)

A message sent again ``MAX_RESENDS`` times and never taken is given up as a ``rejected`` dead letter, and
one whose publishing failed ``MAX_PUBLISH_FAILURES`` times while the broker was there (a poison row) as a
``rejected`` (or, when the row itself cannot be read, ``undecodable``) one.
``sweep_orphans`` makes the rows of idempotent tasks whose run died (its claim's lease ran out)
due at once, so the next pass sends them again.
"""

from __future__ import annotations

import logging
import time
import uuid
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import celery
from django.db import connections, transaction
from kombu.exceptions import OperationalError as KombuOperationalError

from safetynet import conf, deadletter, idempotency
from safetynet.models import IdempotencyClaim, ScheduledMessage
from safetynet.protocol import headers
from safetynet.protocol.reasons import Reason
from safetynet.schedule._rows import (
    MAX_RESENDS,
    NEVER,
    brokers_of,
    database,
    moment,
    settle,
    unpack,
)

__all__ = ["MAX_PUBLISH_FAILURES", "RelayRun", "publish_now", "relay", "sweep_orphans"]

logger = logging.getLogger("safetynet")

#: A row whose message fails to publish this many times, the broker reachable, is dead-lettered (about 13 minutes
#: of tries: the waits grow 2, 8, 18, 32 … s).
MAX_PUBLISH_FAILURES = 10


@dataclass
class RelayRun:
    """What one pass of the relay did."""

    published: int = 0
    resent: int = 0
    failed: int = 0
    given_up: int = 0
    #: Rows published before whose message a run holds or finished: not sent again.
    taken: int = 0
    error: BaseException | None = None

    @property
    def handled(self) -> int:
        """Rows this pass took from the table."""
        return self.published + self.resent + self.failed + self.given_up + self.taken


def _table(using: str) -> str:
    return connections[using].ops.quote_name(ScheduledMessage._meta.db_table)


def _has_due(using: str, brokers: tuple[str, str], now: float) -> bool:
    return ScheduledMessage.objects.using(using).filter(
        broker__in=brokers, state__in=[ScheduledMessage.State.SCHEDULED, ScheduledMessage.State.PUBLISHED], due_at__lte=now
    ).exists()


@dataclass
class _Taken:
    key: str
    kind: str
    task_name: str
    task_id: str
    message: str
    publishes: int
    claim_key: str


def relay(app: Any, *, limit: int = 500, keys: list[str] | None = None) -> RelayRun:
    """Publish the due rows (or only ``keys``, if due): one pass; see the module's docstring."""
    using = database()
    now = time.time()
    run = RelayRun()
    brokers = brokers_of(app)  # this version's digest, and an earlier version's (its rows are taken over)
    if keys == [] or (keys is None and not _has_due(using, brokers, now)):
        return run
    grace = conf.get().lost_message_seconds
    token = uuid.uuid4().hex[:16]
    connection = connections[using]
    table = _table(using)
    skip_locked = " FOR UPDATE SKIP LOCKED" if connection.features.has_select_for_update_skip_locked else ""
    only = ""
    params: list[Any] = [token, now + grace if grace is not None else NEVER, now, brokers[0], *brokers, now]
    if keys is not None:
        only = f" AND key IN ({', '.join(['%s'] * len(keys))})"
        params += keys
    params.append(limit)
    with transaction.atomic(using=using):
        with connection.cursor() as cursor:
            cursor.execute(
                f"UPDATE {table} SET state = 'published', token = %s, consumed_token = '', due_at = %s, "
                f"publishes = publishes + 1, updated_at = %s, broker = %s WHERE key IN (SELECT key FROM {table} "
                f"WHERE broker IN (%s, %s) "
                f"AND state IN ('scheduled', 'published') AND due_at <= %s{only} ORDER BY due_at LIMIT %s{skip_locked}) "
                f"RETURNING key, kind, task_name, task_id, message, publishes, claim_key",
                params,
            )
            rows = sorted((_Taken(*row) for row in cursor.fetchall()), key=lambda row: row.key)
        rows = _not_taken(using, rows, grace, run)
        _publish(app, using, rows, token, run)
    if run.handled:
        logger.info("safetynet: relay published %s, sent again %s, failed %s, gave up %s",
                    run.published, run.resent, run.failed, run.given_up,
                    extra={"action": "relay", "published": run.published, "resent": run.resent})
    return run


def _not_taken(using: str, rows: list[_Taken], grace: float | None, run: RelayRun) -> list[_Taken]:
    """The rows to send: each one not published before, and each one published before that no run took."""
    tracked = [row for row in rows if row.claim_key and row.publishes > 1]
    if not tracked:
        return rows
    claims = {key: (state, task_id, lease_until) for key, state, task_id, lease_until in
              IdempotencyClaim.objects.using(idempotency.database_for_claims())
              .filter(key__in={row.claim_key for row in tracked})
              .values_list("key", "state", "task_id", "lease_until")}
    now = time.time()
    done, running, send = [], [], []
    for row in rows:
        claim = claims.get(row.claim_key) if row in tracked else None
        if claim is None:
            send.append(row)  # never claimed: its message was lost (or this row is no resend)
        elif claim[0] == IdempotencyClaim.State.SUCCEEDED:
            # The effect is done, by this task or by another message with the same key (sent twice): running
            # this one again would only hand back the stored result.
            done.append(row.key)
        elif claim[0] == IdempotencyClaim.State.FAILED and claim[1] == row.task_id:
            done.append(row.key)  # this task failed: its dead letter tells
        elif claim[0] == IdempotencyClaim.State.FAILED:
            send.append(row)  # another task's failure leaves the key free for this one
        elif claim[2] >= now and not _has_expired(row):
            # A live run (this task's, or another message's with the same key: this one's turn comes when it
            # ends), or a retry waiting with the claim handed over.
            running.append((row.key, claim[2]))
        else:
            send.append(row)  # its run died, or its retry was lost: the claim's lease ran out
    settle(done, using)
    if running:
        table = _table(using)
        with connections[using].cursor() as cursor:
            for key, lease_until in running:
                cursor.execute(
                    f"UPDATE {table} SET publishes = publishes - 1, due_at = %s, updated_at = %s WHERE key = %s",
                    [lease_until + (grace if grace is not None else 60.0), now, key],
                )
    run.taken = len(done) + len(running)
    return send


def _publish(app: Any, using: str, rows: list[_Taken], token: str, run: RelayRun) -> None:
    """Send the taken rows, inside the relay's transaction; put back the ones that could not be sent."""
    if not rows:
        return
    given_up = [row for row in rows if row.publishes > MAX_RESENDS + 1]
    if given_up:
        _give_up(using, given_up)
        run.given_up = len(given_up)
    pending = [row for row in rows if row.publishes <= MAX_RESENDS + 1]
    with app.producer_or_acquire() as producer:
        for index, row in enumerate(pending):
            try:
                args, kwargs, options = unpack(row.message)
                if _expired(options, row, using):
                    continue
                if index == 0:
                    # One try to reach the broker, no retries: a relay, or a request that committed an
                    # outbox message, does not wait for a broker that is away; the rows wait instead.
                    producer.connection.ensure_connection(max_retries=0)
                options["headers"] = {**(options.get("headers") or {}), headers.RELAYED: [row.key, token]}
                options.update(producer=producer, retry=False)
                task = app.tasks.get(row.task_name)
                if task is not None:  # Celery's own apply_async: the task's options, without sending it through ours
                    celery.Task.apply_async(task, args, kwargs, **options)
                else:
                    app.send_task(row.task_name, args, kwargs, **options)
            except Exception as error:  # the broker is away (or this row cannot be sent): put the rest back
                run.error = error
                rest = pending[index:]
                run.failed = len(rest)
                # The row that failed waits longer each time (it may be what fails: a poison row must not hold
                # the others back), and counts the failure unless the broker was away; the rest are due again in
                # a second.
                outage = _is_outage(error, producer)
                failures = _put_back(using, [item.key for item in rest[:1]], error, failed=not outage)
                _put_back(using, [item.key for item in rest[1:]], error, failed=False)
                logger.warning("safetynet: relay could not publish %s[%s]: %r; %s message(s) put back",
                               row.task_name, row.task_id, error, len(rest),
                               extra={"task_name": row.task_name, "task_id": row.task_id, "action": "relay"})
                if not outage and failures >= MAX_PUBLISH_FAILURES:
                    _give_up_unpublishable(using, row, error, failures)
                    run.failed -= 1
                    run.given_up += 1
                return
            if row.publishes > 1:
                run.resent += 1
                logger.warning(
                    "safetynet: %s[%s] (%s) was published and no worker took it in time; sent it again",
                    row.task_name, row.task_id, row.kind,
                    extra={"task_name": row.task_name, "task_id": row.task_id, "action": "resend"},
                )
            else:
                run.published += 1


def _has_expired(row: _Taken) -> bool:
    """True if the row's message carries an ``expires`` that has passed (``_publish`` then settles it)."""
    expires = unpack(row.message)[2].get("expires")
    return isinstance(expires, (str, datetime)) and moment(expires).timestamp() <= time.time()


def _expired(options: dict[str, Any], row: _Taken, using: str) -> bool:
    """A message whose ``expires`` has passed is not published (a worker would discard it unrun, and the
    relay would send it again and again): the row is settled, as Celery would have settled it."""
    expires = options.get("expires")
    if not isinstance(expires, (str, datetime)) or moment(expires).timestamp() > time.time():
        return False
    settle([row.key], using)
    if row.claim_key:
        idempotency.release_task(row.claim_key, row.task_id,
                                 "its message expired (the expires option) before a run claimed it")
    logger.info("safetynet: %s[%s] expired before it was due; not published", row.task_name, row.task_id,
                extra={"task_name": row.task_name, "task_id": row.task_id, "action": "expired"})
    return True


def _is_outage(error: BaseException, producer: Any) -> bool:
    """True if ``error`` says the broker could not be reached (not that this message cannot be sent)."""
    connection = getattr(producer, "connection", None)
    errors = tuple(getattr(connection, "connection_errors", ()) or ())
    return isinstance(error, (KombuOperationalError, ConnectionError, TimeoutError, *errors))


def _give_up_unpublishable(using: str, row: _Taken, error: BaseException, failures: int) -> None:
    """A row whose message failed to publish ``MAX_PUBLISH_FAILURES`` times with the broker there: a dead letter,
    not a retry every 300 s for ever."""
    try:
        args, kwargs, options = unpack(row.message)
        reason, raw, unknown = Reason.REJECTED, None, False
    except Exception:  # the row's message itself is broken
        args, kwargs, options = [], {}, {}
        reason, raw, unknown = Reason.UNDECODABLE, row.message.encode(errors="replace"), True
    detail = (f"its {row.kind} message could not be published {failures} times, the broker reachable: "
              f"{type(error).__name__}: {error}")
    if row.claim_key:
        idempotency.release_task(row.claim_key, row.task_id, detail)
    deadletter.give_up(deadletter.Failure(
        task_name=row.task_name, task_id=row.task_id, reason=reason, detail=detail, args=args, kwargs=kwargs,
        headers=options.get("headers") or {}, delivery_info={"routing_key": options.get("queue", "")},
        exception=error, raw_body=raw, body_unknown=unknown, failed_at=time.time(),
    ))
    settle([row.key], using)


def _put_back(using: str, keys: list[str], error: BaseException, *, failed: bool) -> int:
    """Make ``keys`` due again; return the failures counted on the first (0 when there is none)."""
    if not keys:
        return 0
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
            f"updated_at = %s WHERE key IN ({', '.join(['%s'] * len(keys))}) RETURNING failures",
            [now, int(failed), f"{type(error).__name__}: {error}"[:2000], now, *keys],
        )
        counted = cursor.fetchall()
    return int(counted[0][0]) if counted else 0


def _give_up(using: str, rows: list[_Taken]) -> None:
    """Sent again and again, never taken: no worker consumes its queue. A dead letter, not a loop."""
    for row in rows:
        args, kwargs, options = unpack(row.message)
        detail = (f"its {row.kind} message was published {row.publishes - 1} times and no worker took it: no worker "
                  "consumes its queue, or the task was revoked or is unknown there")
        if row.claim_key:
            detail += f" (idempotency key {row.claim_key!r})"
            idempotency.release_task(row.claim_key, row.task_id, detail)
        deadletter.give_up(deadletter.Failure(
            task_name=row.task_name, task_id=row.task_id, reason=Reason.REJECTED, detail=detail, args=args,
            kwargs=kwargs, headers=options.get("headers") or {},
            delivery_info={"routing_key": options.get("queue", "")}, exception_type="safetynet.LostMessage",
            exception_message=detail, failed_at=time.time(),
        ))
    settle([row.key for row in rows], using)


def publish_now(app: Any, keys: list[str]) -> None:
    """Publish outbox rows just committed, from the sending process (the relay is the safety net)."""
    try:
        relay(app, keys=keys, limit=len(keys))
    except Exception as error:  # the database or the broker is away: the relay sends them later
        logger.warning("safetynet: outbox message(s) %s not published now (%r); the relay will",
                       ", ".join(keys), error, extra={"action": "outbox"})


def sweep_orphans(*, limit: int = 1000) -> int:
    """Make due the rows of idempotent tasks whose claim's lease ran out with no run holding it; return how many.

    The run died with its worker, or its retry was lost: the next relay pass checks the claim and
    sends the message again (once ``LOST_MESSAGE_SECONDS`` would be too long to wait for that). A row
    is made due once per lapse: only if the claim was taken, or its lease ran, past the row's last
    publish (a message sent again after the lapse waits for a run to claim it, or for its own grace).
    """
    using = database()
    claims = idempotency.database_for_claims()
    now = time.time()
    if claims != using:
        return _sweep_apart(using, claims, now, limit)
    table = _table(using)
    claim_table = connections[using].ops.quote_name(IdempotencyClaim._meta.db_table)
    with connections[using].cursor() as cursor:
        cursor.execute(
            f"UPDATE {table} SET due_at = %s, updated_at = %s WHERE state = 'published' AND claim_key <> '' "
            f"AND due_at > %s AND EXISTS (SELECT 1 FROM {claim_table} c WHERE c.key = {table}.claim_key "
            f"AND c.task_id = {table}.task_id AND c.state = 'in_progress' AND c.lease_until < %s "
            f"AND (c.lease_until > {table}.updated_at OR c.updated_at > {table}.updated_at))",
            [now, now, now, now],
        )
        return cursor.rowcount


def _sweep_apart(using: str, claims: str, now: float, limit: int) -> int:
    """``sweep_orphans`` when the claims live in another database: the join is made here, a batch at a time."""
    expired = {(key, task_id): max(lease_until, updated_at) for key, task_id, lease_until, updated_at in
               IdempotencyClaim.objects.using(claims).filter(state=IdempotencyClaim.State.IN_PROGRESS,
                                                             lease_until__lt=now)
               .order_by("-lease_until").values_list("key", "task_id", "lease_until", "updated_at")[:limit]}
    if not expired:
        return 0
    rows = (ScheduledMessage.objects.using(using)
            .filter(state=ScheduledMessage.State.PUBLISHED, due_at__gt=now,
                    claim_key__in={key for key, _ in expired}, task_id__in={task_id for _, task_id in expired})
            .values_list("key", "claim_key", "task_id", "updated_at"))
    orphans = [key for key, claim_key, task_id, updated_at in rows
               if expired.get((claim_key, task_id), 0.0) > updated_at]
    if not orphans:
        return 0
    return ScheduledMessage.objects.using(using).filter(key__in=orphans, state=ScheduledMessage.State.PUBLISHED,
                                                         due_at__gt=now).update(due_at=now, updated_at=now)
