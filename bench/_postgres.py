"""The PostgreSQL server the benchmarks' own databases live on, and how to make one.

Environment (all optional):

    SAFETYNET_BENCH_DB_HOST    PostgreSQL host          (default 127.0.0.1)
    SAFETYNET_BENCH_DB_PORT    PostgreSQL port          (default 5432)
    SAFETYNET_BENCH_DB_USER    PostgreSQL user          (default postgres)
"""

from __future__ import annotations

import os
from typing import Any

DB_HOST = os.environ.get("SAFETYNET_BENCH_DB_HOST", "127.0.0.1")
DB_PORT = os.environ.get("SAFETYNET_BENCH_DB_PORT", "5432")
DB_USER = os.environ.get("SAFETYNET_BENCH_DB_USER", "postgres")


def django_database(name: str) -> dict[str, Any]:
    """Django's DATABASES entry for the database ``name`` on that server."""
    return {"ENGINE": "django.db.backends.postgresql", "NAME": name, "HOST": DB_HOST, "PORT": DB_PORT,
            "USER": DB_USER}


def ensure_database(name: str) -> bool:
    """Create the database ``name`` when it is missing; return True if it was created."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname="postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (name,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(name)))
        return True
