"""Where the ``TaskRecord`` rows are written: the database alias, and on PostgreSQL a connection of each thread's own
with ``synchronous_commit = off``, apart from any transaction the task body holds open (``_store`` says why)."""

from __future__ import annotations

import logging
import os
import threading
import weakref
from collections.abc import Sequence
from datetime import datetime, timezone
from typing import Any

from django.db import InterfaceError, OperationalError, connections, router

from safetynet.models import TaskRecord

__all__ = ["close_connections", "database", "execute", "moment", "records_connection", "table"]

logger = logging.getLogger("safetynet")


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


def close_connections() -> None:
    """Close the rows' own connections of every thread of this process (tests, before their database goes)."""
    for connection in list(_writers):
        raw = connection.connection  # (Django's close() refuses a connection made in another thread)
        if raw is not None:
            try:
                raw.close()
            except Exception:  # already broken: closed enough
                logger.debug("safetynet: closing a records connection failed", exc_info=True)


def records_connection(using: str) -> Any:
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


def execute(using: str, sql: str, params: Sequence[Any]) -> None:
    """Run one statement on the rows' connection; once more on a fresh one if the old one was broken."""
    for last in (False, True):
        connection = records_connection(using)
        try:
            with connection.cursor() as cursor:
                cursor.execute(sql.replace("{table}", table(connection)), params)
            return
        except (OperationalError, InterfaceError):
            connection.close()
            if last:
                raise


def table(connection: Any) -> str:
    return connection.ops.quote_name(TaskRecord._meta.db_table)
