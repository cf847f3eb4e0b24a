"""The PostgreSQL server the benchmarks' own databases live on, and how to make one.

Environment (all optional):

    SAFETYNET_BENCH_DB_HOST    PostgreSQL host          (default 127.0.0.1)
    SAFETYNET_BENCH_DB_PORT    PostgreSQL port          (default 5432)
    SAFETYNET_BENCH_DB_USER    PostgreSQL user          (default postgres)
    SAFETYNET_BENCH_PREPARE_THRESHOLD  psycopg's prepare_threshold for Django's connections (default: none,
                               Django's own default: no prepared statements)
"""

from __future__ import annotations

import os
from typing import Any

DB_HOST = os.environ.get("SAFETYNET_BENCH_DB_HOST", "127.0.0.1")
DB_PORT = os.environ.get("SAFETYNET_BENCH_DB_PORT", "5432")
DB_USER = os.environ.get("SAFETYNET_BENCH_DB_USER", "postgres")
#: psycopg's ``prepare_threshold`` for Django's connections: None (Django's default) prepares nothing.
PREPARE_THRESHOLD = int(os.environ["SAFETYNET_BENCH_PREPARE_THRESHOLD"]) if os.environ.get(
    "SAFETYNET_BENCH_PREPARE_THRESHOLD") else None


def django_database(name: str) -> dict[str, Any]:
    """Django's DATABASES entry for the database ``name`` on that server."""
    database = {"ENGINE": "django.db.backends.postgresql", "NAME": name, "HOST": DB_HOST, "PORT": DB_PORT,
                "USER": DB_USER}
    if PREPARE_THRESHOLD is not None:
        database["OPTIONS"] = {"prepare_threshold": PREPARE_THRESHOLD}
    return database


def ensure_database(name: str) -> bool:
    """Create the database ``name`` when it is missing; return True if it was created."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname="postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True
