"""The database driver under Django's connections, for the few statements on the hot path that skip Django's cursor
wrapping (an idempotency claim and its mark, a ``django.tasks`` record): whether it is psycopg 3, a psycopg 3
cursor kept per driver connection, and one statement sent through libpq's asynchronous calls (its answer read
later, so that other work overlaps its round trip)."""

from __future__ import annotations

import functools
import logging
import re
import select
from collections.abc import Sequence
from typing import Any

__all__ = ["forgot_prepared", "is_psycopg3", "pipelines", "prepares", "raw_cursor", "read_answer", "run_together",
           "send_statement"]

logger = logging.getLogger("safetynet")


@functools.cache
def is_psycopg3() -> bool:
    """Whether Django's PostgreSQL backend runs on psycopg 3 (else psycopg 2)."""
    from django.db.backends.postgresql.psycopg_any import is_psycopg3 as found

    return bool(found)


@functools.cache
def pipelines() -> bool:
    """Whether psycopg 3's pipeline mode is there (libpq 14 or newer): several statements in one round trip."""
    if not is_psycopg3():
        return False
    import psycopg

    return bool(psycopg.Pipeline.is_supported())


def raw_cursor(connection: Any) -> Any:
    """A psycopg 3 cursor on the driver connection under Django's ``connection`` (made once per driver connection:
    a new one after a reconnect)."""
    raw = connection.connection
    kept = connection.__dict__.get("_safetynet_cursor")
    if kept is None or kept[0] is not raw:
        import psycopg

        kept = connection.__dict__["_safetynet_cursor"] = (raw, psycopg.Cursor(raw))
    return kept[1]


@functools.lru_cache(maxsize=64)
def _numbered(sql: str) -> bytes:
    """``%s`` placeholders as libpq's ``$1, $2, …`` (the statements given here hold no other ``%``)."""
    count = iter(range(1, 100_000))
    return re.sub("%s", lambda _: f"${next(count)}", sql).encode()


def _text(value: Any) -> bytes | None:
    if value is None or isinstance(value, bytes):
        return value
    return str(value).encode()


def send_statement(connection: Any, sql: str, params: Sequence[Any], *, name: str = "") -> None:
    """Send one statement with its parameters (as text: ``str()`` of each, None as NULL; the server casts them to
    the columns' types) on the psycopg 3 connection under Django's ``connection``, in its own implicit transaction
    (the connection is in autocommit), without waiting for the answer: ``read_answer`` reads it.

    ``name``: the statement is prepared on the connection once (the server then skips parsing and planning it,
    about a third of a small INSERT's cost there) and executed by name, unless ``prepares`` says not to.

    psycopg's own pipeline mode does the same with several times the Python work; psycopg is not told (its
    connection stays idle from its point of view, and the answer is read before anything else uses it)."""
    pgconn = connection.connection.pgconn
    values = [_text(value) for value in params]
    if name and prepares(connection) and _prepared(connection, name, sql):
        pgconn.send_query_prepared(name.encode(), values)
    else:
        pgconn.send_query_params(_numbered(sql), values)
    while pgconn.flush():  # (a non-blocking connection: what did not fit in the socket's buffer)
        _wait(pgconn.socket, select.POLLOUT)


#: Aliases whose server forgot a prepared statement twice (a pooler in transaction mode): never prepared again.
_unprepared: set[str] = set()


def prepares(connection: Any) -> bool:
    """Whether statements are prepared on ``connection``: not behind PgBouncer in transaction mode (which Django's
    ``DISABLE_SERVER_SIDE_CURSORS`` setting says), nor once its server forgot one twice."""
    if connection.alias in _unprepared:
        return False
    return not connection.settings_dict.get("DISABLE_SERVER_SIDE_CURSORS")


def forgot_prepared(connection: Any, error: BaseException) -> bool:
    """Whether ``error`` says the server does not know a statement prepared on ``connection`` (a pooler handed the
    next statement to another server connection, or ran DISCARD ALL). The first time, the statements are prepared
    again; the second, this alias sends them unprepared from then on."""
    cause = error if getattr(error, "sqlstate", None) else error.__cause__
    if getattr(cause, "sqlstate", None) != "26000":  # invalid_sql_statement_name
        return False
    connection.__dict__.pop("_safetynet_prepared", None)
    if connection.__dict__.pop("_safetynet_forgot", False):
        _unprepared.add(connection.alias)
        logger.warning("safetynet: the server of database %r forgets prepared statements (a pooler in transaction "
                       "mode?); they are no longer prepared there. Set DISABLE_SERVER_SIDE_CURSORS for it.",
                       connection.alias)
    else:
        connection.__dict__["_safetynet_forgot"] = True
    return True


def _prepared(connection: Any, name: str, sql: str) -> bool:
    """Whether ``name`` is prepared on the driver connection under ``connection`` (prepared now if it was not: the
    names are kept per driver connection, like ``raw_cursor``'s cursor)."""
    raw = connection.connection
    kept = connection.__dict__.get("_safetynet_prepared")
    if kept is None or kept[0] is not raw:  # (a new driver connection: nothing prepared on it yet)
        kept = connection.__dict__["_safetynet_prepared"] = (raw, set())
    if name not in kept[1]:
        if not _prepare(connection, name, sql):
            return False
        kept[1].add(name)
    return True


def _prepare(connection: Any, name: str, sql: str) -> bool:
    """Prepare ``sql`` as ``name`` on the connection; False (and never again on this alias) if the server refused
    it for another reason than a broken connection (which raises)."""
    import psycopg

    raw = connection.connection
    try:
        _check(raw, raw.pgconn.prepare(name.encode(), _numbered(sql)))
    except psycopg.Error as error:
        if error.sqlstate == "42P05":  # duplicate_prepared_statement: a pooler's server connection has it already
            return True
        if not error.sqlstate or error.sqlstate.startswith("08"):  # no answer, or the connection broke
            raise
        _unprepared.add(connection.alias)
        logger.warning("safetynet: could not prepare a statement on database %r (%s); statements are sent "
                       "unprepared there", connection.alias, error)
        return False
    return True


def _check(raw: Any, result: Any) -> None:
    import psycopg
    from psycopg import pq

    if result is None:
        raise psycopg.OperationalError("the server sent no answer")
    if result.status == pq.ExecStatus.FATAL_ERROR:
        if raw.pgconn.status == pq.ConnStatus.BAD:  # (libpq's own error, no SQLSTATE: the connection is gone)
            message = (result.error_message or b"the connection broke").decode(errors="replace").strip()
            raise psycopg.OperationalError(message)
        raise psycopg.errors.error_from_result(result, encoding=raw.info.encoding)


def _wait(fd: int, events: int) -> None:
    poller = select.poll()
    poller.register(fd, events)
    poller.poll()


def _next_result(pgconn: Any) -> Any:
    """libpq's next result on ``pgconn``, waiting for the server until it has come (None: the end of a statement's
    results)."""
    while True:
        pgconn.consume_input()
        if not pgconn.is_busy():
            return pgconn.get_result()
        _wait(pgconn.socket, select.POLLIN)


def read_answer(connection: Any) -> None:
    """Read the answer to the statement ``send_statement`` sent; its error raised as psycopg's exception for its
    SQLSTATE (Django's ``wrap_database_errors`` turns it into Django's)."""
    pgconn = connection.connection.pgconn
    result, extra = _next_result(pgconn), pgconn.get_result()
    while extra is not None:  # (one statement: one result, then None)
        extra = pgconn.get_result()
    _check(connection.connection, result)


def run_together(connection: Any, statements: Sequence[tuple[str, Sequence[Any]]]) -> Any:
    """Run ``statements`` (SQL with ``%s`` placeholders, parameters as ``send_statement`` takes them) in one round
    trip, on the psycopg 3 connection under Django's ``connection``, through libpq's pipeline mode (``pipelines()``
    must be true); the first row of the first statement's answer (None if it returned none).

    Each statement is followed by a sync, so each ends as it would alone: in autocommit it commits in its own
    implicit transaction; ``BEGIN`` opens a transaction the next ones join (and psycopg, which reads the status from
    libpq, sends no ``BEGIN`` of its own then); a statement that fails aborts only itself, or the open transaction
    (a ``COMMIT`` behind it then rolls it back). Every answer is read; the first error is raised after that, as
    psycopg's exception for its SQLSTATE."""
    from psycopg import pq

    raw = connection.connection
    pgconn = raw.pgconn
    encoded = [(_numbered(sql), [_text(value) for value in params]) for sql, params in statements]  # (before: a
    # value that cannot be encoded must fail here, not halfway through the pipeline)
    results: list[Any] = []
    broken = False
    pgconn.enter_pipeline_mode()
    try:
        for sql_bytes, values in encoded:
            pgconn.send_query_params(sql_bytes, values)
            pgconn.pipeline_sync()
        while pgconn.flush():
            _wait(pgconn.socket, select.POLLOUT)
        syncs = 0
        while syncs < len(encoded):
            result = _next_result(pgconn)
            if result is None:  # (the end of one statement's answers)
                if pgconn.status == pq.ConnStatus.BAD:
                    broken = True
                    break
                continue
            if result.status == pq.ExecStatus.PIPELINE_SYNC:
                syncs += 1
            else:
                results.append(result)
    finally:
        if pgconn.status == pq.ConnStatus.OK and pgconn.pipeline_status != pq.PipelineStatus.OFF:
            try:
                pgconn.exit_pipeline_mode()
            except Exception:  # answers left unread (an error on its way already): a connection stuck in pipeline
                raw.close()    # mode serves nobody; Django opens a new one
    for result in results:
        _check(raw, result)
    if broken:
        _check(raw, None)
    first = results[0] if results else None
    if first is None or first.status != pq.ExecStatus.TUPLES_OK or first.ntuples == 0:
        return None
    return tuple(first.get_value(0, column) for column in range(first.nfields))
