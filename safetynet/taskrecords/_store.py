"""The ``TaskRecord`` rows: written at enqueue, at the end of each attempt, and (for a run that takes a while)
when it starts.

One is written per task and a few per attempt, so the writes are cheap: on PostgreSQL they go through a
connection of their own with ``synchronous_commit = off`` (a row reaches the disk a fraction of a second
later; a crash of the database server may lose the last changes, never corrupt them; a dead letter is
always written with a full commit), independent of the transaction the task body may hold open. A run
is marked ``RUNNING`` only once it has run ``RUNNING_AFTER`` seconds (a background job looks every
tenth of a second): a task that ends sooner goes from ``READY`` to its outcome in one write.
"""

from __future__ import annotations

import json
import logging
import os
import time
from collections.abc import Callable, Mapping
from datetime import datetime, timezone
from typing import Any, TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connections, transaction

from safetynet.background import Job, runner
from safetynet.driver import forgot_prepared, is_psycopg3, read_answer, send_statement
from safetynet.models import TaskRecord
from safetynet.taskrecords._connection import close_connections, database, execute, moment, records_connection, table
from safetynet.taskrecords._ended import FLUSH_SECONDS, batch, ended_row, flush, write_rows

__all__ = ["FLUSH_SECONDS", "RUNNING_AFTER", "attempt_ended", "attempt_started", "close_connections", "database", "dead",
           "flush", "insert", "insert_then", "moment", "purge", "read", "replayed"]

_T = TypeVar("_T")

logger = logging.getLogger("safetynet")

#: Seconds a run goes on before its row says ``RUNNING``.
RUNNING_AFTER = 0.2
_WATCH_SECONDS = 0.1


_INSERT = ("INSERT INTO {table} (id, backend, module_path, queue_name, priority, run_after, args, kwargs, status, "
           "enqueued_at, replay_of, attempts, worker_ids, errors, updated_at) VALUES ")
_INSERT_ROW = "(%s, %s, %s, %s, %s, %s, %s::jsonb, %s::jsonb, %s, %s, %s, 0, '[]', '[]', now())"


def _new_row(fields: Mapping[str, Any]) -> list[Any]:
    """The values of ``_INSERT_ROW``; arguments PostgreSQL's ``jsonb`` would refuse raise ``ValueError`` here, before
    anything is written or sent (refused by the INSERT, they would fail ``enqueue()`` after the message went)."""
    get = fields.get
    try:
        args = json.dumps(get("args") or [], ensure_ascii=False, allow_nan=False)
        kwargs = json.dumps(get("kwargs") or {}, ensure_ascii=False, allow_nan=False)
        args.encode(), kwargs.encode()  # (a lone surrogate: no UTF-8 for it)
    except ValueError as error:  # NaN or an infinity; UnicodeEncodeError is one too
        what = "a lone surrogate" if isinstance(error, UnicodeEncodeError) else "NaN or an infinite float"
        raise ValueError(f"task {get('module_path')}: its arguments hold {what}, which PostgreSQL cannot store in a "
                         f"JSON column") from None
    if ("\\u0000" in args or "\\u0000" in kwargs) and _holds_nul([get("args"), get("kwargs")]):
        raise ValueError(f"task {get('module_path')}: its arguments hold a NUL character (\\x00), which PostgreSQL "
                         f"cannot store in a JSON column")
    return [get("id"), get("backend"), get("module_path"), get("queue_name"), get("priority", 0), get("run_after"),
            args, kwargs, get("status", "READY"), get("enqueued_at"), get("replay_of", "")]


def _holds_nul(value: Any) -> bool:
    """Whether a JSON value holds the NUL character in a string (its text shows ``\\u0000`` also for a string that
    holds a backslash before ``u0000``)."""
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, Mapping):
        return any(_holds_nul(key) or _holds_nul(item) for key, item in value.items())
    if isinstance(value, (list, tuple)):
        return any(_holds_nul(item) for item in value)
    return False


_INSERT_NEW = _INSERT + _INSERT_ROW + " ON CONFLICT (id) DO NOTHING"


def insert(fields: Mapping[str, Any], *, in_transaction: bool = False) -> None:
    """Write a new row (``READY``). ``in_transaction``: in the caller's transaction (a rollback keeps nothing).
    Else (PostgreSQL) the row is written at once on the records' own connection, whatever the caller's transaction
    does, before its message is sent: batched, a fast worker could end the task before the row existed (the end
    of the attempt then raced the late insert, and the result stayed READY)."""
    using = database()
    if in_transaction or connections[using].vendor != "postgresql":
        TaskRecord(**fields).save(using=using, force_insert=True)
        return
    execute(using, _INSERT_NEW, _new_row(fields))


def insert_then(fields: Mapping[str, Any], send: Callable[[], _T]) -> _T:
    """``insert(fields)``, then ``send()`` (the task's message); on PostgreSQL with psycopg 3 the two overlap: the
    INSERT goes out on the records' connection, the message is published while the database works on it, and the
    INSERT's answer is read after. The row is committed before this returns, as with ``insert``; a worker's write of
    the same row that comes first waits for it (the same id) and finds it.

    A broken connection before the INSERT went out: ``insert`` (a fresh connection), then ``send``. After the
    message went out: the row is written again on a fresh connection (``ON CONFLICT DO NOTHING``); if that fails
    too, the error is logged, not raised (the task was sent: the worker writes its row when the attempt ends)."""
    using = database()
    if connections[using].vendor != "postgresql" or not is_psycopg3():
        insert(fields)
        return send()
    values = _new_row(fields)
    connection = records_connection(using)
    try:
        with connection.wrap_database_errors:
            send_statement(connection, _INSERT_NEW.replace("{table}", table(connection)), values,
                           name="safetynet_record_new")
    except (OperationalError, InterfaceError):  # nothing went out
        connection.close()
        insert(fields)
        return send()
    try:
        outcome = send()
    except BaseException:
        _answer(connection, fields, sent=False)
        raise
    _answer(connection, fields, sent=True)
    return outcome


def _answer(connection: Any, fields: Mapping[str, Any], *, sent: bool) -> None:
    """Read the answer to ``insert_then``'s INSERT (the connection is then ready for its next statement). Its message
    was not sent: the row goes again (a READY row with no message would wait for ever). It was, and the connection
    broke: the row is written again on a fresh one."""
    try:
        with connection.wrap_database_errors:
            read_answer(connection)
    except DatabaseError as error:
        broken = isinstance(error, (OperationalError, InterfaceError))
        if broken:
            connection.close()
        elif not forgot_prepared(connection, error):
            raise
        if not sent:
            return
        try:
            insert(fields)
        except Exception:
            logger.exception("safetynet: the django.tasks record of %s could not be written; its task was sent (the "
                             "worker writes the record when the attempt ends)", fields.get("id"))
        return
    if not sent:
        try:
            execute(database(), "DELETE FROM {table} WHERE id = %s AND attempts = 0 AND status = %s",
                     [fields.get("id"), TaskRecord.Status.READY])
        except Exception:
            logger.exception("safetynet: the django.tasks record of %s was written but its task could not be sent; "
                             "the record could not be taken back", fields.get("id"))


def read(result_id: str) -> TaskRecord | None:
    """The row of ``result_id``, or None (what this process has batched is written first)."""
    batch.flush()
    return TaskRecord.objects.using(database()).filter(pk=str(result_id)[:64]).first()


# -- the worker's writes --------------------------------------------------------------------------


def attempt_ended(result_id: str, fields: Mapping[str, Any], *, attempt: int, started: float, worker_id: str,
                  status: str, error: Mapping[str, str] | None = None, finished: float | None = None,
                  return_value: Any = None) -> None:
    """One write at the end of attempt number ``attempt``: its worker, its error, the status it leaves (``READY``
    for a retry, ``SUCCESSFUL``, ``FAILED``), and the row itself if the enqueueing process wrote none (a replay,
    a message sent by another version). Attempts are counted once: a redelivered attempt writes over itself."""
    _watched.pop(result_id, None)
    using = database()
    if connections[using].vendor == "postgresql":
        _ended_postgres(using, result_id, fields, attempt, started, worker_id, status, error, finished,
                        return_value)
    else:
        _ended_generic(using, result_id, fields, attempt, started, worker_id, status, error, finished, return_value)


def _ended_postgres(using: str, result_id: str, fields: Mapping[str, Any], attempt: int, started: float,
                    worker_id: str, status: str, error: Mapping[str, str] | None, finished: float | None,
                    return_value: Any) -> None:
    row = ended_row(result_id, fields, attempt, started, worker_id, status, error, finished, return_value)
    if status == TaskRecord.Status.SUCCESSFUL and attempt == 1:
        # The happy path: a first attempt's success is the only write of the run; nothing can come after it.
        batch.add(using, row)
        return
    write_rows(using, [row])


def _ended_generic(using: str, result_id: str, fields: Mapping[str, Any], attempt: int, started: float,
                   worker_id: str, status: str, error: Mapping[str, str] | None, finished: float | None,
                   return_value: Any) -> None:
    with transaction.atomic(using=using):
        row = TaskRecord.objects.using(using).select_for_update().filter(pk=result_id).first()
        if row is None:
            row = TaskRecord(id=result_id, backend=fields["backend"], module_path=fields["module_path"],
                             queue_name=fields["queue_name"], priority=fields["priority"],
                             run_after=fields.get("run_after"), args=list(fields.get("args") or []),
                             kwargs=dict(fields.get("kwargs") or {}), enqueued_at=fields.get("enqueued_at"),
                             replay_of=fields.get("replay_of") or "")
        elif row.status in (TaskRecord.Status.SUCCESSFUL, TaskRecord.Status.FAILED) and row.attempts >= attempt:
            return
        if row.attempts < attempt:
            row.worker_ids = [*row.worker_ids, worker_id]
            row.errors = [*row.errors, dict(error)] if error else row.errors
            row.attempts = attempt
        row.status = status
        row.started_at = row.started_at or moment(started)
        row.last_attempted_at = moment(started)
        row.finished_at = moment(finished)
        row.return_value = return_value
        row.save(using=using)


def dead(result_id: str, dead_letter_id: int | None, error: Mapping[str, str] | None, *, attempt: int,
         worker_id: str, finished: float) -> None:
    """The task was given up: ``FAILED``, with its dead letter; ``error`` is added when the attempt that ended it
    has none yet (a hard time limit or a lost worker, found by the worker's main process)."""
    _watched.pop(result_id, None)
    using = database()
    with transaction.atomic(using=using):
        row = TaskRecord.objects.using(using).select_for_update().filter(pk=result_id).first()
        if row is None:
            return
        if row.attempts < attempt:
            row.worker_ids = [*row.worker_ids, worker_id]
            row.errors = [*row.errors, dict(error)] if error else row.errors
            row.attempts = attempt
        row.status = TaskRecord.Status.FAILED
        row.finished_at = moment(finished)
        row.dead_letter_id = dead_letter_id if dead_letter_id is not None else row.dead_letter_id
        row.save(using=using)


def replayed(old_id: str, new_id: str, enqueued: float) -> None:
    """A dead letter of a ``django.tasks`` task was sent again as ``new_id``: its row, ``READY``, linked to the
    row it replays."""
    using = database()
    old = TaskRecord.objects.using(using).filter(pk=old_id).first()
    if old is None:
        return
    TaskRecord.objects.using(using).get_or_create(pk=new_id, defaults={
        "backend": old.backend, "module_path": old.module_path, "queue_name": old.queue_name,
        "priority": old.priority, "args": old.args, "kwargs": old.kwargs, "status": TaskRecord.Status.READY,
        "enqueued_at": moment(enqueued), "replay_of": old.id,
    })
    # The worker may have written it first (it ran already): the link is added.
    TaskRecord.objects.using(using).filter(pk=new_id, replay_of="").update(replay_of=old.id)


def purge(older_than: datetime | None = None) -> int:
    """Delete the records not changed since ``older_than`` (default: TASK_RESULTS_KEEP_SECONDS ago) of tasks that
    finished; return how many. A task still waiting or running keeps its record whatever its age."""
    from datetime import timedelta

    from safetynet import conf

    if older_than is None:
        older_than = datetime.now(tz=timezone.utc) - timedelta(seconds=conf.get().task_results_keep_seconds)
    deleted, _ = (TaskRecord.objects.using(database())
                  .filter(updated_at__lt=older_than,
                          status__in=[TaskRecord.Status.SUCCESSFUL, TaskRecord.Status.FAILED]).delete())
    return int(deleted)


# -- RUNNING, for a run that takes a while ---------------------------------------------------------

#: Runs under way in this process: result id -> (attempt number, start time).
_watched: dict[str, tuple[int, float]] = {}
_watching = False


def attempt_started(result_id: str, attempt: int, started: float) -> None:
    """Attempt ``attempt`` started: its row says ``RUNNING`` if it is still running ``RUNNING_AFTER`` from now."""
    global _watching
    _watched[result_id] = (attempt, started)
    if not _watching:
        _watching = True
        runner.add(Job("django.tasks running", _mark_running, _WATCH_SECONDS, lane="tasks", at_start=False))


def _mark_running() -> None:
    now = time.time()
    due = [(result_id, attempt, started) for result_id, (attempt, started) in list(_watched.items())
           if now - started >= RUNNING_AFTER]
    if not due:
        return
    using = database()
    for result_id, attempt, started in due:
        if _watched.pop(result_id, None) is None:
            continue  # it ended meanwhile: its own write says how
        # Only a row still waiting for this attempt: never over an outcome written meanwhile.
        execute(using,
                 "UPDATE {table} SET status = %s, started_at = coalesce(started_at, %s), last_attempted_at = %s, "
                 "updated_at = %s WHERE id = %s AND status = %s AND attempts = %s",
                 [TaskRecord.Status.RUNNING, moment(started), moment(started), moment(now), result_id,
                  TaskRecord.Status.READY, attempt - 1])


def _forget_parent() -> None:
    global _watching
    _watched.clear()
    _watching = False


os.register_at_fork(after_in_child=_forget_parent)

