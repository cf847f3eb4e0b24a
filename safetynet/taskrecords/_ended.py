"""The end of an attempt in the ``TaskRecord`` rows (PostgreSQL): one statement for one row or a batch of them, and
the batch of first-attempt successes a worker writes together, a few milliseconds later."""

from __future__ import annotations

import atexit
import json
import logging
import os
import threading
from collections.abc import Mapping, Sequence
from datetime import datetime
from typing import Any

from django.db import DatabaseError, InterfaceError, OperationalError

from safetynet.background import Job, runner
from safetynet.taskrecords._connection import execute

__all__ = ["FLUSH_ROWS", "FLUSH_SECONDS", "batch", "ended_row", "flush", "write_rows"]

logger = logging.getLogger("safetynet")


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

#: The end of an attempt, for one row or a batch: the rows as one JSON array of ``ended_row``'s lists.
_ENDED_ROWS = (_ENDED.replace(" VALUES ", " ") + "SELECT e->>0, e->>1, e->>2, e->>3, (e->>4)::smallint, "
               "to_timestamp((e->>5)::float8), e->6, e->7, e->>8, to_timestamp((e->>9)::float8), "
               "to_timestamp((e->>10)::float8), to_timestamp((e->>10)::float8), to_timestamp((e->>11)::float8), "
               "(e->>12)::integer, jsonb_build_array(e->>13), e->14, e->15, e->>16, now() "
               "FROM jsonb_array_elements(%s::jsonb) AS e" + _ENDED_CONFLICT)


def _epoch(value: datetime | None) -> float | None:
    return None if value is None else value.timestamp()


def ended_row(result_id: str, fields: Mapping[str, Any], attempt: int, started: float, worker_id: str, status: str,
               error: Mapping[str, str] | None, finished: float | None, return_value: Any) -> list[Any]:
    """One row of ``_ENDED_ROWS`` (JSON values as they are, times as seconds since the epoch)."""
    return [result_id, fields["backend"], fields["module_path"], fields["queue_name"], fields["priority"],
            _epoch(fields.get("run_after")), fields.get("args") or [], fields.get("kwargs") or {}, status,
            _epoch(fields.get("enqueued_at")), started, finished, attempt, worker_id, [dict(error)] if error else [],
            return_value, fields.get("replay_of") or ""]


def write_rows(using: str, rows: Sequence[list[Any]]) -> None:
    execute(using, _ENDED_ROWS, [json.dumps(rows, default=str)])


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
        write_rows(using, list(latest.values()))
        return
    except (OperationalError, InterfaceError):
        raise
    except DatabaseError:
        logger.warning("safetynet: a batch of django.tasks records was refused; writing them one by one",
                       exc_info=True)
    for row in latest.values():
        try:
            write_rows(using, [row])
        except (OperationalError, InterfaceError):
            raise
        except DatabaseError:
            logger.exception("safetynet: the django.tasks record of %s could not be written (dropped)", row[0])


batch = _Batch()


def flush() -> None:
    """Write this process's batched rows now (at exit, at the end of a request, when a worker stops)."""
    try:
        batch.flush()
    except Exception:
        logger.exception("safetynet: could not write the batched django.tasks records")


atexit.register(flush)
