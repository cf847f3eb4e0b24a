"""State every worker on every machine must see alike: Redis when present, else the database.

Two operations, each one atomic round trip:

- ``incr(key, ttl)``: add one to a counter that forgets itself ``ttl`` seconds after its last
  increment; returns the new count (delivery counts of crashing tasks);
- ``add(key, value, ttl)``: set ``key`` unless it is set; returns None when this call set it,
  else the value already there (enqueue-side uniqueness).

Redis is ``SAFETYNET['REDIS_URL']``, or else the Celery broker when it is Redis. When Redis is
not configured, or does not answer, the database table ``SharedKey`` is used with one
``INSERT … ON CONFLICT … RETURNING`` statement (PostgreSQL, SQLite).
"""

from __future__ import annotations

import hashlib
import logging
import os
import time
from typing import Any

from safetynet import conf

__all__ = ["add", "counts", "delete", "incr", "purge_expired", "redis_client", "redis_errors"]

logger = logging.getLogger("safetynet")

_PREFIX = "safetynet:"
_clients: dict[tuple[str, int], Any] = {}


def _redis_url() -> str | None:
    url = conf.get().redis_url
    if url is not None:
        return url or None  # "" turns Redis off
    try:
        from celery import current_app

        broker = str(current_app.conf.broker_url or "")
    except Exception:  # no Celery app configured: the database it is
        return None
    return broker if broker.startswith(("redis://", "rediss://", "unix://")) else None


def redis_client() -> Any:
    """A redis-py client for the configured Redis (one per URL and process), or None."""
    url = _redis_url()
    if url is None:
        return None
    client = _clients.get((url, os.getpid()))
    if client is None:
        try:
            import redis
        except ImportError:
            logger.warning("safetynet: Redis is configured (%s) but redis-py is not installed; using the database",
                           url)
            return None
        client = redis.Redis.from_url(url, socket_timeout=5, socket_connect_timeout=5)
        _clients[(url, os.getpid())] = client
    return client


def redis_errors() -> tuple[type[BaseException], ...]:
    """What a Redis call raises when Redis is away (catch it and fall back to the database)."""
    import redis

    return (redis.RedisError, OSError)


def incr(key: str, ttl: float) -> int:
    """Add one to the shared counter ``key`` (kept ``ttl`` seconds after the last increment)."""
    client = redis_client()
    if client is not None:
        try:
            with client.pipeline(transaction=True) as pipe:
                pipe.incr(_PREFIX + key)
                pipe.expire(_PREFIX + key, max(1, int(ttl)))
                count, _ = pipe.execute()
            return int(count)
        except redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); counting %s in the database", error, key)
    return _database_incr(key, ttl)


def add(key: str, value: str, ttl: float) -> str | None:
    """Set ``key`` to ``value`` for ``ttl`` seconds unless it is set; None if set now, else the value there."""
    client = redis_client()
    if client is not None:
        try:
            for _ in range(3):  # the key may expire between SET NX and GET
                if client.set(_PREFIX + key, value, nx=True, px=max(1, int(ttl * 1000))):
                    return None
                existing = client.get(_PREFIX + key)
                if existing is not None:
                    return existing.decode() if isinstance(existing, bytes) else str(existing)
            return None
        except redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); keeping %s in the database", error, key)
    return _database_add(key, value, ttl)


def counts(keys: list[str]) -> list[int]:
    """The current values of shared counters (0 for one that is not set or expired), in one round trip."""
    if not keys:
        return []
    client = redis_client()
    if client is not None:
        try:
            return [int(value or 0) for value in client.mget([_PREFIX + key for key in keys])]
        except redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); reading counters from the database", error)
    from django.db import router

    from safetynet.models import SharedKey

    stored = {_column_key(key): key for key in keys}
    found = dict(SharedKey.objects.using(router.db_for_write(SharedKey) or "default").filter(
        key__in=list(stored), expires_at__gte=time.time()).values_list("key", "count"))
    return [int(found.get(_column_key(key), 0)) for key in keys]


def delete(key: str) -> None:
    """Forget ``key`` (a counter or a value)."""
    client = redis_client()
    if client is not None:
        try:
            client.delete(_PREFIX + key)
            return
        except redis_errors() as error:
            logger.warning("safetynet: Redis did not answer (%r); deleting %s in the database", error, key)
    from django.db import router

    from safetynet.models import SharedKey

    SharedKey.objects.using(router.db_for_write(SharedKey) or "default").filter(key=_column_key(key)).delete()


def _table() -> tuple[Any, str]:
    from django.db import connections, router

    from safetynet.models import SharedKey

    connection = connections[router.db_for_write(SharedKey) or "default"]
    return connection, connection.ops.quote_name(SharedKey._meta.db_table)


def _column_key(key: str) -> str:
    """``key`` as stored: a long one is cut and ended with its hash, to fit the 255-character column."""
    if len(key) <= 200:
        return key
    return f"{key[:150]}#{hashlib.sha256(key.encode()).hexdigest()}"


def purge_expired() -> int:
    """Delete the database rows of counters and values that expired (Redis forgets them by itself)."""
    from django.db import router

    from safetynet.models import SharedKey

    deleted, _ = SharedKey.objects.using(router.db_for_write(SharedKey) or "default").filter(
        expires_at__lt=time.time()).delete()
    return deleted


def _database_incr(key: str, ttl: float) -> int:
    key = _column_key(key)
    connection, table = _table()
    now = time.time()
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (key, value, count, expires_at) VALUES (%s, '', 1, %s) "
            f"ON CONFLICT (key) DO UPDATE SET "
            f"count = CASE WHEN {table}.expires_at < %s THEN 1 ELSE {table}.count + 1 END, "
            f"expires_at = excluded.expires_at RETURNING count",
            [key, now + ttl, now],
        )
        return int(cursor.fetchone()[0])


def _database_add(key: str, value: str, ttl: float) -> str | None:
    key = _column_key(key)
    connection, table = _table()
    now = time.time()
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {table} (key, value, count, expires_at) VALUES (%s, %s, 0, %s) "
            f"ON CONFLICT (key) DO UPDATE SET value = excluded.value, expires_at = excluded.expires_at "
            f"WHERE {table}.expires_at < %s RETURNING value",
            [key, value, now + ttl, now],
        )
        if cursor.fetchone() is not None:
            return None
        cursor.execute(f"SELECT value FROM {table} WHERE key = %s", [key])
        row = cursor.fetchone()
    return None if row is None else str(row[0])
