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

import atexit
import json
import logging
import os
import threading
import time
import weakref
from collections.abc import Callable, Mapping, Sequence
from datetime import datetime, timezone
from typing import Any, TypeVar

from django.db import DatabaseError, InterfaceError, OperationalError, connections, router, transaction

from safetynet.background import Job, runner
from safetynet.driver import forgot_prepared, is_psycopg3, read_answer, send_statement
from safetynet.models import TaskRecord

__all__ = ["FLUSH_SECONDS", "RUNNING_AFTER", "attempt_ended", "attempt_started", "database", "dead", "flush", "insert",
           "insert_then", "moment", "purge", "read", "replayed"]

logger = logging.getLogger("safetynet")

#: Seconds a run goes on before its row says ``RUNNING``.
RUNNING_AFTER = 0.2
_WATCH_SECONDS = 0.1


def database() -> str:
    """The database alias the rows are written to (Django's routers decide)."""
    return router.db_for_write(TaskRecord) or "default"


def moment(value: float | None) -> datetime | None:
    """Seconds since the epoch as an aware datetime (None stays None)."""
    return None if value is None else datetime.fromtimestamp(value, tz=timezone.utc)


class _Writer(threading.local):
    """A connection of this thread's own for the rows (PostgreSQL), made again after a fork."""

    connection: Any = None
    pid: int = 0


_writer = _Writer()
#: Every thread's connection of this process (to close them all: ``close_connections``).
_writers: weakref.WeakSet[Any] = weakref.WeakSet()
_T = TypeVar("_T")


def close_connections() -> None:
    """Close the rows' own connections of every thread of this process (tests, before their database goes)."""
    for connection in list(_writers):
        raw = connection.connection  # (Django's close() refuses a connection made in another thread)
        if raw is not None:
            try:
                raw.close()
            except Exception:  # already broken: closed enough
                logger.debug("safetynet: closing a records connection failed", exc_info=True)


def _connection(using: str) -> Any:
    """Where a row is written outside the caller's transaction: a connection of our own on PostgreSQL (with
    ``synchronous_commit`` off), Django's own elsewhere (SQLite has one writer at a time anyway)."""
    if connections[using].vendor != "postgresql":
        return connections[using]
    writer = _writer
    if writer.connection is None or writer.pid != os.getpid() or writer.connection.alias != using:
        writer.connection = connections.create_connection(using)
        writer.pid = os.getpid()
        _writers.add(writer.connection)
    connection = writer.connection
    if connection.connection is None:
        connection.ensure_connection()
        with connection.cursor() as cursor:
            cursor.execute("SET synchronous_commit = off")
    return connection


def _execute(using: str, sql: str, params: Sequence[Any]) -> None:
    """Run one statement on the rows' connection; once more on a fresh one if the old one was broken."""
    for last in (False, True):
        connection = _connection(using)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql.replace("{table}", _table(connection)), params)
            return
        except (OperationalError, InterfaceError):
            connection.close()
            if last:
                raise


def _table(connection: Any) -> str:
    return connection.ops.quote_name(TaskRecord._meta.db_table)


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
    _execute(using, _INSERT_NEW, _new_row(fields))


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
    connection = _connection(using)
    try:
        with connection.wrap_database_errors:
            send_statement(connection, _INSERT_NEW.replace("{table}", _table(connection)), values,
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
            _execute(database(), "DELETE FROM {table} WHERE id = %s AND attempts = 0 AND status = %s",
                     [fields.get("id"), TaskRecord.Status.READY])
        except Exception:
            logger.exception("safetynet: the django.tasks record of %s was written but its task could not be sent; "
                             "the record could not be taken back", fields.get("id"))


def read(result_id: str) -> TaskRecord | None:
    """The row of ``result_id``, or None (what this process has batched is written first)."""
    _batch.flush()
    return TaskRecord.objects.using(database()).filter(pk=str(result_id)[:64]).first()


# -- the batch: rows written together, a few milliseconds later -------------------------------------

#: At most this long between a row joining the batch and its write (a read in the same process writes at once).
FLUSH_SECONDS = 0.05
#: A batch this large is written at once, by the caller that filled it.
FLUSH_ROWS = 500


class _Batch:
    """First-attempt successes (the worker), written in one statement per turn.

    A success is the task's last word, so its write may come a few milliseconds late; a new row (enqueue), a failed
    attempt, a retry and a death are written at once. A process that exits (or a worker that stops) writes its batch
    first; a process killed outright loses at most ``FLUSH_SECONDS`` of it: those rows stay READY/RUNNING
    (documented)."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.successes: list[tuple[str, list[Any]]] = []
        self.pid = os.getpid()
        self.started = False

    def add(self, using: str, row: list[Any]) -> None:
        with self.lock:
            if self.pid != os.getpid():  # a forked child: the parent writes its own batch
                self.pid, self.successes, self.started = os.getpid(), [], False
            self.successes.append((using, row))
            full = len(self.successes) >= FLUSH_ROWS
            if not self.started:
                self.started = True
                runner.add(Job("django.tasks records", self.turn, FLUSH_SECONDS, lane="taskrecords",
                               at_start=False))
        if full:
            self.flush()

    def turn(self) -> None:
        self.flush()

    def flush(self) -> None:
        """Write what is batched (a failed write keeps the rows for the next turn, and raises)."""
        if not self.successes:
            return
        with self.lock:
            successes, self.successes = self.successes, []
        try:
            for using in {using for using, _ in successes}:
                _write_successes(using, [row for alias, row in successes if alias == using])
        except Exception:
            with self.lock:  # kept for the next turn (a bounded number: the oldest go first)
                self.successes = (successes + self.successes)[-100_000:]
            raise


def _write_successes(using: str, rows: list[list[Any]]) -> None:
    """One statement for a batch of successes: the rows go as one JSON array (a parameter each would cost psycopg
    several microseconds apiece). A row the database refuses (bad data) does not hold back the others: the batch is
    then written row by row and the refused ones are logged and dropped; a broken connection raises (kept)."""
    latest = {row[0]: row for row in rows}  # (a message run twice here: one row may be written once)
    try:
        _write_rows(using, list(latest.values()))
        return
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError:
        logger.warning("safetynet: a batch of django.tasks records was refused; writing them one by one",
                       exc_info=True)
    for row in latest.values():
        try:
            _write_rows(using, [row])
        except (OperationalError, InterfaceError):
            raise
        except DatabaseError:
            logger.exception("safetynet: the django.tasks record of %s could not be written (dropped)", row[0])


_batch = _Batch()


def flush() -> None:
    """Write this process's batched rows now (at exit, at the end of a request, when a worker stops)."""
    try:
        _batch.flush()
    except Exception:
        logger.exception("safetynet: could not write the batched django.tasks records")


atexit.register(flush)


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


_ENDED = ("INSERT INTO {table} AS r (id, backend, module_path, queue_name, priority, run_after, args, kwargs, "
          "status, enqueued_at, started_at, last_attempted_at, finished_at, attempts, worker_ids, errors, "
          "return_value, replay_of, updated_at) VALUES ")
_ENDED_CONFLICT = (
    " ON CONFLICT (id) DO UPDATE SET status = excluded.status, "
    "started_at = coalesce(r.started_at, excluded.started_at), "
    "last_attempted_at = excluded.last_attempted_at, finished_at = excluded.finished_at, "
    "worker_ids = CASE WHEN r.attempts < excluded.attempts THEN r.worker_ids || excluded.worker_ids "
    "ELSE r.worker_ids END, "
    "errors = CASE WHEN r.attempts < excluded.attempts THEN r.errors || excluded.errors ELSE r.errors END, "
    "attempts = greatest(r.attempts, excluded.attempts), return_value = excluded.return_value, "
    "updated_at = now() "
    "WHERE r.status NOT IN ('SUCCESSFUL', 'FAILED') OR r.attempts < excluded.attempts")

#: The end of an attempt, for one row or a batch: the rows as one JSON array of ``_ended_row``'s lists.
_ENDED_ROWS = (_ENDED.replace(" VALUES ", " ") + "SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::smallint, "
               "to_timestamp((e->>5)::float8), e->6, e->7, e->>8, to_timestamp((e->>9)::float8), "
               "to_timestamp((e->>10)::float8), to_timestamp((e->>10)::float8), to_timestamp((e->>11)::float8), "
               "(e->>12)::integer, jsonb_build_array(e->>13), e->14, e->15, e->>16, now() "
               "FROM jsonb_array_elements(%s::jsonb) AS e" + _ENDED_CONFLICT)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def _ended_row(result_id: str, fields: Mapping[str, Any], attempt: int, started: float, worker_id: str, status: str,
               error: Mapping[str, str] | None, finished: float | None, return_value: Any) -> list[Any]:
    """One row of ``_ENDED_ROWS`` (JSON values as they are, times as seconds since the epoch)."""
    return [result_id, fields["backend"], fields["module_path"], fields["queue_name"], fields["priority"],
            _epoch(fields.get("run_after")), fields.get("args") or [], fields.get("kwargs") or {}, status,
            _epoch(fields.get("enqueued_at")), started, finished, attempt, worker_id, [dict(error)] if error else [],
            return_value, fields.get("replay_of") or ""]


def _write_rows(using: str, rows: Sequence[list[Any]]) -> None:
    _execute(using, _ENDED_ROWS, [json.dumps(rows, default=str)])


def _ended_postgres(using: str, result_id: str, fields: Mapping[str, Any], attempt: int, started: float,
                    worker_id: str, status: str, error: Mapping[str, str] | None, finished: float | None,
                    return_value: Any) -> None:
    row = _ended_row(result_id, fields, attempt, started, worker_id, status, error, finished, return_value)
    if status == TaskRecord.Status.SUCCESSFUL and attempt == 1:
        # The happy path: a first attempt's success is the only write of the run; nothing can come after it.
        _batch.add(using, row)
        return
    _write_rows(using, [row])


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
        _execute(using,
                 "UPDATE {table} SET status = %s, started_at = coalesce(started_at, %s), last_attempted_at = %s, "
                 "updated_at = %s WHERE id = %s AND status = %s AND attempts = %s",
                 [TaskRecord.Status.RUNNING, moment(started), moment(started), moment(now), result_id,
                  TaskRecord.Status.READY, attempt - 1])


def _forget_parent() -> None:
    global _watching
    _watched.clear()
    _watching = False


os.register_at_fork(after_in_child=_forget_parent)

