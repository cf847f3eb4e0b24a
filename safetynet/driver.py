"""The database driver under Django's connections, for the few statements on the hot path that skip Django's cursor
wrapping (an idempotency claim and its mark, a ``django.tasks`` record): whether it is psycopg 3, and a psycopg 3
cursor kept per driver connection."""

from __future__ import annotations

import functools
from typing import Any

__all__ = ["is_psycopg3", "pipelines", "raw_cursor"]


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
