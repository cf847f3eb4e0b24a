"""Replay, discard and purge: what staff do with dead letters (from the admin, the dashboard, the CLI or Python)."""

from __future__ import annotations

import json
import logging
import uuid
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any

from celery import current_app
from django.db import DatabaseError, InterfaceError, connections, router, transaction

from safetynet import conf, progress, signals
from safetynet.deadletter import _groups
from safetynet.deadletter._caps import cap_arguments, is_truncated, truncated_paths
from safetynet.models import DeadLetter
from safetynet.protocol import headers as header_names
from safetynet.redaction import REDACTED, parameter_names, redact

__all__ = ["NOT_READ_BY_REPLAY", "ReplayOutcome", "discard", "purge", "replacement_arguments", "replay",
           "replay_refusal"]

logger = logging.getLogger("safetynet")


def replacement_arguments(args: Any, kwargs: Any) -> tuple[list[Any] | None, dict[str, Any] | None]:
    """Replacement ``args`` (a list or tuple) and ``kwargs`` (a dict with string keys), checked; None: not given.

    Raises TypeError saying what is wrong (a string is not a list of arguments), and ValueError
    for a truncation marker given back as if it were a value.
    """
    if args is not None and not isinstance(args, (list, tuple)):
        raise TypeError(f"replacement args must be a list (or tuple) of positional arguments, got "
                        f"{type(args).__name__} {_short(args)}")
    if kwargs is not None:
        if not isinstance(kwargs, dict):
            raise TypeError(f"replacement kwargs must be a dict of keyword arguments, got {type(kwargs).__name__} "
                            f"{_short(kwargs)}")
        odd = [key for key in kwargs if not isinstance(key, str)]
        if odd:
            raise TypeError(f"replacement kwargs must have string keys (argument names), got {_short(odd[0])}")
    cut = truncated_paths(args if args is not None else [], kwargs if kwargs is not None else {})
    if cut:
        raise ValueError(f"replacement {', '.join(cut)} is a marker of a value cut when stored, not a value: "
                         "give the whole value")
    return (list(args) if args is not None else None), (dict(kwargs) if kwargs is not None else None)


def _short(value: Any) -> str:
    shown = repr(value)
    return shown if len(shown) <= 80 else shown[:79] + "…"


def replay_refusal(row: Any, task: Any, args: Any = None, kwargs: Any = None, *, check_arguments: bool = True
                   ) -> str | None:
    """Why ``row`` cannot be replayed with these arguments (None: it can). Used by replay and --dry-run.

    ``check_arguments`` runs Celery's argument check; replay skips it, since apply_async runs it again.
    """
    if row.status != DeadLetter.Status.DEAD:
        return f"status is {row.status}, not dead"
    if task is None:
        return f"task {row.task_name!r} is not registered any more; the row is left as it was"
    given = args is not None or kwargs is not None
    argument_paths = [path for path in (row.redacted or []) if not path.startswith("headers.")]
    if "body" in argument_paths and not given:
        return ("the message body could not be decoded (or held no [args, kwargs]), so its arguments are unknown; "
                "replay it with args/kwargs given by hand")
    if argument_paths and not given:
        return f"arguments {', '.join(argument_paths)} were redacted when stored; replay it with replacement args/kwargs"
    # What would be sent: a value cut when stored must be replaced, whichever of args/kwargs holds it.
    cut = truncated_paths(row.args if args is None else [], row.kwargs if kwargs is None else {})
    if cut:
        return (f"arguments {', '.join(cut)} were cut when stored (over the dead-letter size caps, "
                "DEAD_LETTER_MAX_ARGUMENT_BYTES); replay it with replacement "
                + ("args" if all(path.startswith("args") for path in cut)
                   else "kwargs" if all(path.startswith("kwargs") for path in cut) else "args and kwargs"))
    check = getattr(task, "__header__", None) if check_arguments and getattr(task, "typing", False) else None
    if check is not None:  # what apply_async checks before it sends
        try:
            check(*(args if args is not None else row.args or []), **(kwargs if kwargs is not None else row.kwargs or {}))
        except TypeError as error:
            return f"not sent: {error!r}"
    return None


@dataclass(frozen=True)
class ReplayOutcome:
    """What happened to one row: the new task id, or why it was left as it was."""

    dead_letter_id: int
    task_name: str
    new_task_id: str | None = None
    error: str | None = None


NOT_READ_BY_REPLAY = ("history", "traceback", "exception_message", "detail", "raw_body")


def _rows(rows: Any) -> Iterator[Any]:
    """DeadLetter rows from a row, an id, ids or a queryset (a queryset is streamed, not loaded whole)."""
    if isinstance(rows, DeadLetter):
        yield rows
        return
    if isinstance(rows, int):
        rows = [rows]
    if hasattr(rows, "model") and hasattr(rows, "iterator"):
        # replay and discard never read these, and they are most of a row
        yield from rows.order_by("id").defer(*NOT_READ_BY_REPLAY).iterator(chunk_size=2000)
        return
    items = list(rows)
    if items and not isinstance(items[0], DeadLetter):
        found = {row.id: row for row in DeadLetter.objects.filter(id__in=items)}
        missing = [pk for pk in items if pk not in found]
        if missing:
            raise LookupError(f"no dead letter with id {', '.join(map(str, missing))}")
        items = [found[pk] for pk in items]
    yield from items


def _batches(rows: Any, size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in _rows(rows):
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _now() -> datetime:
    return datetime.now(tz=timezone.utc)


def replay(
    rows: Any,
    *,
    queue: str | None = None,
    args: list | tuple | None = None,
    kwargs: dict | None = None,
    by: str = "",
    app: Any = None,
    batch_size: int = 500,
) -> list[ReplayOutcome]:
    """Run dead letters again with a fresh attempt count; rows that cannot be replayed are left as they were.

    ``rows`` is a DeadLetter, an id, ids or a queryset. ``queue`` overrides the queue;
    ``args``/``kwargs`` replace the stored ones (the edit is audited, redacted).
    A row is refused when its task no longer exists, or when it has redacted values and
    no replacement arguments are given.
    """
    args, kwargs = replacement_arguments(args, kwargs)  # before anything is read or sent
    app = app or current_app._get_current_object()
    app.loader.import_default_modules()
    outcomes: list[ReplayOutcome] = []
    touched: set[str] = set()
    for batch in _batches(rows, batch_size):
        with transaction.atomic():
            # Claim the rows: a second replay running at the same time skips them instead of sending twice.
            claimed = set(DeadLetter.objects.select_for_update(skip_locked=True)
                          .filter(id__in=[row.id for row in batch], status=DeadLetter.Status.DEAD)
                          .values_list("id", flat=True))
            sendable = []
            for row in batch:
                task = app.tasks.get(row.task_name)
                refusal = replay_refusal(row, task, args, kwargs, check_arguments=False)
                if refusal is None and row.id not in claimed:
                    refusal = "being replayed or changed by someone else right now"
                if refusal is not None:
                    outcomes.append(ReplayOutcome(row.id, row.task_name, error=refusal))
                else:
                    sendable.append((row, task))
            outcomes.extend(_send(app, sendable, queue=queue, args=args, kwargs=kwargs, by=by))
            sent = {outcome.dead_letter_id for outcome in outcomes if outcome.new_task_id}
            touched.update(row.fingerprint for row, _task in sendable if row.id in sent)
    _groups.recount(touched)
    return outcomes


def _send(app: Any, sendable: list[tuple[Any, Any]], *, queue: str | None, args: Any, kwargs: Any, by: str
          ) -> list[ReplayOutcome]:
    """Publish claimed rows and mark them replayed (inside the caller's transaction, which holds the claim)."""
    outcomes: list[ReplayOutcome] = []
    done = []
    at = _now()
    # What the audit says is the same for every row of the call but the new task id.
    event: dict[str, Any] = {"action": "replay", "by": by, "at": at.isoformat()}
    if queue:
        event["queue"] = queue
    if (args is not None or kwargs is not None) and sendable:
        edited_args, edited_kwargs, _ = redact(args or [], kwargs or {}, parameter_names(sendable[0][1]))
        edited_args, edited_kwargs = cap_arguments(edited_args, edited_kwargs, conf.get())
        event["edited"] = {"args": edited_args if args is not None else None,
                           "kwargs": edited_kwargs if kwargs is not None else None}
    with app.producer_or_acquire() as producer:
        for row, task in sendable:
            new_id = str(uuid.uuid4())
            stored = {} if is_truncated(row.headers) else (row.headers or {})
            # A header redacted when stored (by key, or text blanked in its value) or cut is not sent as its
            # placeholder.
            cut = {path[len("headers."):].split(".", 1)[0].split("[", 1)[0]
                   for path in (row.redacted or []) if path.startswith("headers.")}
            headers = {key: value for key, value in stored.items()
                       if key not in header_names.DELIVERY and key not in header_names.CELERY and value != REDACTED
                       and key not in cut
                       and not is_truncated(value)}
            headers[header_names.REPLAY_OF] = str(row.id)
            options: dict[str, Any] = {"task_id": new_id, "headers": headers, "producer": producer}
            if queue or row.queue:
                options["queue"] = queue or row.queue
            if headers.get(header_names.PROGRESS):  # the user who watched the first run sees the replay too
                progress.carry_over(row.task_id, new_id, row.task_name)
            try:
                task.apply_async(list(args) if args is not None else row.args,
                                 dict(kwargs) if kwargs is not None else row.kwargs, **options)
            except Exception as error:  # bad arguments, the broker refused it: this row stays dead, the rest go on
                outcomes.append(ReplayOutcome(row.id, row.task_name, error=f"not sent: {error!r}"))
                continue
            row.status = DeadLetter.Status.REPLAYED
            row.replay_count += 1
            row.replayed_task_id = new_id
            row.replayed_at = at
            row.replayed_by = by
            row.audit = [*row.audit, {**event, "new_task_id": new_id}]
            done.append(row)
            outcomes.append(ReplayOutcome(row.id, row.task_name, new_task_id=new_id))
    # Sent is past the point of no return: if marking fails, say loudly which rows went out.
    try:
        _mark_replayed(done, at, by, event)
    except (DatabaseError, InterfaceError):
        logger.critical("safetynet: replayed dead letters %s but could not mark them; do not replay them again",
                        [row.id for row in done])
        raise

    def announce() -> None:
        for row in done:
            signals.task_replayed.send_robust(sender=DeadLetter, dead_letter=row,
                                              new_task_id=row.replayed_task_id, by=by)

    transaction.on_commit(announce)
    return outcomes


def _mark_replayed(rows: list[Any], at: datetime, by: str, event: dict[str, Any]) -> None:
    """Write what replay did to ``rows``: one UPDATE per batch on PostgreSQL, one statement per row elsewhere.

    Not ``bulk_update``: its CASE WHEN per field and row costs more Python per row than
    publishing the message. On PostgreSQL only the ids and new task ids travel per row; the
    audit event is appended and the replay count incremented by the database.
    """
    if not rows:
        return
    alias = router.db_for_write(DeadLetter)
    connection = connections[alias]
    meta = DeadLetter._meta
    quote = connection.ops.quote_name
    column = {name: quote(meta.get_field(name).column)
              for name in ("status", "replay_count", "replayed_task_id", "replayed_at", "replayed_by", "audit")}
    table, pk = quote(meta.db_table), quote(meta.pk.column)
    status = DeadLetter.Status.REPLAYED.value
    replayed_at = meta.get_field("replayed_at").get_db_prep_save(at, connection)
    if connection.vendor == "postgresql":
        params: list[Any] = [status, replayed_at, by, json.dumps(event)]
        for row in rows:
            params += [row.pk, row.replayed_task_id]
        values = ", ".join(["(%s, %s)"] * len(rows))
        sql = (
            f"UPDATE {table} AS d SET {column['status']} = %s, {column['replayed_at']} = %s,"
            f" {column['replayed_by']} = %s, {column['replayed_task_id']} = v.new_id,"
            f" {column['audit']} = d.{column['audit']} || jsonb_build_array(%s::jsonb"
            f" || jsonb_build_object('new_task_id', v.new_id)),"
            f" {column['replay_count']} = d.{column['replay_count']} + 1"
            f" FROM (VALUES {values}) AS v(id, new_id) WHERE d.{pk} = v.id"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
        return
    audit = meta.get_field("audit")
    sql = (
        f"UPDATE {table} SET {column['status']} = %s, {column['replayed_at']} = %s, {column['replayed_by']} = %s,"
        f" {column['replayed_task_id']} = %s, {column['audit']} = %s, {column['replay_count']} = %s WHERE {pk} = %s"
    )
    with transaction.atomic(using=alias, savepoint=False), connection.cursor() as cursor:
        cursor.executemany(sql, [
            [status, replayed_at, by, row.replayed_task_id, audit.get_db_prep_save(row.audit, connection),
             row.replay_count, row.pk]
            for row in rows
        ])



def discard(rows: Any, *, by: str = "") -> int:
    """Mark dead letters handled without running them; return how many changed."""
    at = _now().isoformat()
    changed = 0
    touched: set[str] = set()
    for batch in _batches(rows, 500):
        with transaction.atomic():
            # Read again under a lock: a replay committing meanwhile must not be overwritten, and a row a
            # replay holds right now is skipped (that replay marks it).
            dead = list(DeadLetter.objects.select_for_update(skip_locked=True)
                        .filter(id__in=[row.id for row in batch], status=DeadLetter.Status.DEAD)
                        .only("id", "status", "audit", "fingerprint"))
            for row in dead:
                row.status = DeadLetter.Status.DISCARDED
                row.audit = [*row.audit, {"action": "discard", "by": by, "at": at}]
            DeadLetter.objects.bulk_update(dead, ["status", "audit"])
        changed += len(dead)
        touched.update(row.fingerprint for row in dead)
    _groups.recount(touched)
    return changed


def purge(older_than: datetime, *, status: str | None = None) -> int:
    """Delete rows whose last failure is before ``older_than`` (optionally only of one status)."""
    rows = DeadLetter.objects.older_than(older_than)
    if status:
        rows = rows.filter(status=status)
    touched = set(rows.filter(status=DeadLetter.Status.DEAD).order_by().values_list("fingerprint", flat=True)
                  .distinct())
    count, _ = rows.delete()
    _groups.recount(touched)
    return count
