"""The books of ``bench/chaos.py``: its PostgreSQL database, the ledger, and what became of each order.

The database is made fresh for a run (dropped and created, then migrated for safetynet), with
two tables of the benchmark's own and no unique constraint on either, so that duplicates can
be counted rather than refused:

    chaos_ledger   one row per ledger write a task made (order_id, system, charge_id)
    chaos_failure  one row per plain Celery task that failed for good (its task_failure signal)
"""

from __future__ import annotations

import time
from collections import Counter
from dataclasses import dataclass, field

import psycopg
from psycopg import sql

import _chaos_tasks as tasks

TABLES = """
CREATE TABLE chaos_ledger (
    id bigserial PRIMARY KEY,
    order_id integer NOT NULL,
    system text NOT NULL,
    charge_id text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
CREATE INDEX chaos_ledger_system_order ON chaos_ledger (system, order_id);
CREATE TABLE chaos_failure (
    id bigserial PRIMARY KEY,
    order_id integer,
    system text NOT NULL,
    task_id text NOT NULL,
    exception text NOT NULL,
    created_at timestamptz NOT NULL DEFAULT now()
);
"""


def _settings() -> dict:
    from django.conf import settings

    return settings.DATABASES["default"]


def _server() -> psycopg.Connection:
    db = _settings()
    return psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"], dbname="postgres", autocommit=True)


def connect() -> psycopg.Connection:
    """A connection of the benchmark process to the run's database (autocommit)."""
    db = _settings()
    return psycopg.connect(host=db["HOST"], port=db["PORT"], user=db["USER"], dbname=db["NAME"], autocommit=True)


def create_database() -> str:
    """Drop and create the run's database, migrate safetynet into it, add the ledger tables."""
    from django.core.management import call_command
    from django.db import connections

    name = _settings()["NAME"]
    with _server() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
    call_command("migrate", verbosity=0, interactive=False)
    connections.close_all()
    with connect() as conn:
        conn.execute(TABLES)
    return name


def drop_database() -> None:
    from django.db import connections

    connections.close_all()
    with _server() as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(_settings()["NAME"])))


def _dead_letter_table() -> str:
    from safetynet.models import DeadLetter

    return DeadLetter._meta.db_table


def _claim_table() -> str:
    from safetynet.models import IdempotencyClaim

    return IdempotencyClaim._meta.db_table


def _schedule_table() -> str:
    from safetynet.models import ScheduledMessage

    return ScheduledMessage._meta.db_table


def dead_rows(conn: psycopg.Connection, system: str) -> list[tuple[int | None, str]]:
    """(order id, reason) of each final failure the system recorded."""
    if system == "safetynet":
        query = sql.SQL("SELECT (kwargs->>'order_id')::integer, reason FROM {} WHERE task_name = %s").format(
            sql.Identifier(_dead_letter_table()))
        return conn.execute(query, [tasks.SAFETYNET_TASK]).fetchall()
    return conn.execute("SELECT order_id, exception FROM chaos_failure WHERE system = %s", [system]).fetchall()


def accounted(conn: psycopg.Connection, system: str) -> int:
    """Orders that succeeded or were recorded as dead (the drain waits for all of them)."""
    succeeded = {row[0] for row in conn.execute(
        "SELECT DISTINCT order_id FROM chaos_ledger WHERE system = %s", [system])}
    dead = {order for order, _ in dead_rows(conn, system)}
    return len(succeeded | dead)


class Books:
    """The benchmark's connection for watching the run; it reconnects when the database drops it."""

    def __init__(self) -> None:
        self.conn = connect()

    def _retrying(self, function):
        for attempt in range(30):
            try:
                return function(self.conn)
            except psycopg.OperationalError:
                if attempt == 29:
                    raise
                time.sleep(1.0)
                try:
                    self.conn.close()
                    self.conn = connect()
                except psycopg.OperationalError:
                    pass

    def accounted(self, system: str) -> int:
        return self._retrying(lambda conn: accounted(conn, system))

    def postgres_started(self):
        """When the PostgreSQL server started (a change means it was restarted meanwhile)."""
        return self._retrying(lambda conn: conn.execute("SELECT pg_postmaster_start_time()").fetchone()[0])

    def close(self) -> None:
        self.conn.close()


@dataclass
class Outcome:
    """What became of the orders one system was sent."""

    system: str
    sent: int
    succeeded: int = 0
    dead: int = 0
    dead_by_reason: Counter = field(default_factory=Counter)
    dead_and_succeeded: int = 0
    lost: int = 0
    ledger_rows: int = 0
    duplicate_ledger: int = 0
    orders_with_duplicate_rows: int = 0
    claims: dict[str, int] = field(default_factory=dict)
    resent_claims: int = 0  # safetynet: tasks whose message its relay sent again (nobody took it in time)
    resent_messages: int = 0
    lost_orders: set[int] = field(default_factory=set)
    #: (order, reason, detail, exception) of dead letters whose order succeeded all the same.
    dead_yet_succeeded: list[tuple] = field(default_factory=list)


def outcome(conn: psycopg.Connection, system: str, order_ids: range) -> Outcome:
    """Count succeeded (a ledger row), dead (a final-failure record and no ledger row), lost (neither)."""
    result = Outcome(system, len(order_ids))
    rows = conn.execute(
        "SELECT order_id, count(*) FROM chaos_ledger WHERE system = %s GROUP BY order_id", [system]).fetchall()
    per_order = dict(rows)
    succeeded = set(per_order) & set(order_ids)
    result.succeeded = len(succeeded)
    result.ledger_rows = sum(per_order.values())
    result.duplicate_ledger = result.ledger_rows - len(per_order)
    result.orders_with_duplicate_rows = sum(1 for count in per_order.values() if count > 1)
    dead_reasons: dict[int | None, str] = {}
    for order, reason in dead_rows(conn, system):
        dead_reasons.setdefault(order, reason)
    dead = (set(dead_reasons) & set(order_ids)) - succeeded
    result.dead = len(dead)
    result.dead_by_reason = Counter(dead_reasons[order] for order in dead)
    result.dead_and_succeeded = len(set(dead_reasons) & succeeded)
    result.lost_orders = set(order_ids) - succeeded - dead
    result.lost = len(result.lost_orders)
    if system == "safetynet":
        query = sql.SQL("SELECT state, count(*) FROM {} GROUP BY state").format(sql.Identifier(_claim_table()))
        result.claims = dict(conn.execute(query).fetchall())
        # Messages the relay sent again (no worker took them in time): one table for every kept message.
        query = sql.SQL("SELECT count(*), coalesce(sum(publishes - 1), 0) FROM {} WHERE publishes > 1").format(
            sql.Identifier(_schedule_table()))
        result.resent_claims, result.resent_messages = conn.execute(query).fetchone()
        query = sql.SQL(
            "SELECT (kwargs->>'order_id')::integer, reason, detail, exception_type || ': ' || exception_message, "
            "task_id, worker FROM {} WHERE task_name = %s ORDER BY id").format(sql.Identifier(_dead_letter_table()))
        result.dead_yet_succeeded = [row for row in conn.execute(query, [tasks.SAFETYNET_TASK]) if row[0] in succeeded]
    return result


def unrecorded_charges(conn: psycopg.Connection, system: str, charged: set[int]) -> int:
    """Orders the gateway charged that have no ledger row: money taken, nothing in the books."""
    recorded = {row[0] for row in conn.execute(
        "SELECT DISTINCT order_id FROM chaos_ledger WHERE system = %s", [system])}
    return len(charged - recorded)
