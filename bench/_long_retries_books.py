"""The books of ``bench/long_retries.py``: its PostgreSQL databases, and what their rows say.

The benchmark process migrates a template database (safetynet's tables) and adds the table
every execution writes a row to, with no unique constraint, so that a task run twice shows as
two rows; each worker then gets a copy of it of its own.
"""

from __future__ import annotations

from dataclasses import dataclass

from _postgres import DB_HOST, DB_PORT, DB_USER

EXECUTIONS_TABLE = """
CREATE TABLE long_retries_execution (
    id bigserial PRIMARY KEY,
    task_name text NOT NULL,
    batch text NOT NULL,
    task_id text NOT NULL,
    attempt integer NOT NULL,
    pid integer NOT NULL,
    at double precision NOT NULL
);
CREATE INDEX long_retries_execution_batch ON long_retries_execution (batch, attempt);
"""


def server():
    """A connection to the PostgreSQL server (its ``postgres`` database), with a clear message if it is away."""
    import psycopg

    try:
        return psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname="postgres", autocommit=True,
                               connect_timeout=5)
    except psycopg.OperationalError as error:
        raise SystemExit(f"long_retries.py: needs PostgreSQL at {DB_HOST}:{DB_PORT} (user {DB_USER}; "
                         f"SAFETYNET_BENCH_DB_HOST/_PORT/_USER to change it): {error}") from None


def create_template(name: str) -> None:
    """Create ``name`` afresh, migrate it (the benchmark process's Django database) and add the execution table."""
    import psycopg
    from django.core.management import call_command
    from django.db import connections
    from psycopg import sql

    with server() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    call_command("migrate", verbosity=0, interactive=False)
    connections.close_all()  # a template must have no session open
    with psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname=name, autocommit=True) as conn:
        conn.execute(EXECUTIONS_TABLE)


def drop_databases(names: list[str]) -> None:
    """Drop the run's databases (their sessions too: a worker killed on the way out may have left one)."""
    from django.db import connections
    from psycopg import sql

    connections.close_all()
    with server() as conn:
        for name in names:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


@dataclass
class Executions:
    """What the execution rows of a batch say."""

    rows: int = 0
    first_attempts: int = 0  # executions of attempt 1
    retried_tasks: int = 0  # distinct tasks with an execution of attempt 2 or later
    retry_rows: int = 0  # executions of attempt 2 or later
    distinct_runs: int = 0  # distinct (task, attempt)
    distinct_first: int = 0  # distinct tasks with an execution of attempt 1

    @property
    def duplicates(self) -> int:
        return self.rows - self.distinct_runs

    @property
    def duplicate_first(self) -> int:
        return self.first_attempts - self.distinct_first


class Books:
    """One worker's PostgreSQL database, cloned from the template, read from the benchmark process."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.conn = None

    def create(self, template: str) -> None:
        import psycopg
        from psycopg import sql

        with server() as conn:
            conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(self.name)))
            conn.execute(sql.SQL("CREATE DATABASE {} TEMPLATE {}").format(sql.Identifier(self.name),
                                                                          sql.Identifier(template)))
        self.conn = psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname=self.name, autocommit=True)

    def close(self) -> None:
        if self.conn is not None:
            self.conn.close()
            self.conn = None

    def empty(self) -> None:
        """Before a round, with no worker running: no execution rows, no scheduled messages."""
        self.conn.execute(f"TRUNCATE long_retries_execution, {scheduled_table()}")

    def executions(self, batch: str) -> Executions:
        row = self.conn.execute(
            "SELECT count(*), count(*) FILTER (WHERE attempt = 1), count(DISTINCT task_id) FILTER (WHERE attempt > 1),"
            " count(*) FILTER (WHERE attempt > 1), count(DISTINCT (task_id, attempt)),"
            " count(DISTINCT task_id) FILTER (WHERE attempt = 1)"
            " FROM long_retries_execution WHERE batch = %s",
            (batch,),
        ).fetchone()
        return Executions(*row)

    def scheduled(self, batch: str) -> dict[str, int]:
        """safetynet's scheduled messages of ``batch``, by state."""
        rows = self.conn.execute(
            f"SELECT state, count(*) FROM {scheduled_table()} WHERE task_id LIKE %s GROUP BY state",
            (f"{batch}-%",),
        ).fetchall()
        return dict(rows)


def scheduled_table() -> str:
    from safetynet.models import ScheduledMessage

    return ScheduledMessage._meta.db_table
