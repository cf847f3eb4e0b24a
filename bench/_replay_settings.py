"""Django, database and Celery set-up of ``bench/replay.py``, and the task it replays.

Django is configured here, standalone, on a PostgreSQL database of its own (created when it
is missing, then migrated); the Celery app publishes to a Redis database of its own and keeps
no results. Nothing here runs a worker: the benchmark measures publishing only.

Environment (all optional):

    SAFETYNET_BENCH_DB         database name            (default safetynet_bench)
    SAFETYNET_BENCH_DB_HOST    PostgreSQL host          (default 127.0.0.1)
    SAFETYNET_BENCH_DB_PORT    PostgreSQL port          (default 5432)
    SAFETYNET_BENCH_DB_USER    PostgreSQL user          (default postgres)
    SAFETYNET_BENCH_REPLAY_REDIS   broker URL           (default redis://127.0.0.1:6379/8)
"""

from __future__ import annotations

import os

import django
from celery import Celery
from django.conf import settings

DB_NAME = os.environ.get("SAFETYNET_BENCH_DB", "safetynet_bench")
DB_HOST = os.environ.get("SAFETYNET_BENCH_DB_HOST", "127.0.0.1")
DB_PORT = os.environ.get("SAFETYNET_BENCH_DB_PORT", "5432")
DB_USER = os.environ.get("SAFETYNET_BENCH_DB_USER", "postgres")
BROKER_URL = os.environ.get("SAFETYNET_BENCH_REPLAY_REDIS", "redis://127.0.0.1:6379/8")
QUEUE = "bench.replay"
TASK_NAME = "bench.replay_noop"


def ensure_database() -> bool:
    """Create the benchmark's database when it is missing; return True if it was created."""
    import psycopg
    from psycopg import sql

    with psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname="postgres", autocommit=True) as conn:
        if conn.execute("SELECT 1 FROM pg_database WHERE datname = %s", (DB_NAME,)).fetchone():
            return False
        conn.execute(sql.SQL("CREATE DATABASE {}").format(sql.Identifier(DB_NAME)))
        return True


if not settings.configured:
    settings.configure(
        SECRET_KEY="safetynet-bench",
        DEBUG=False,  # with DEBUG, Django would keep every query in memory
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "safetynet"],
        DATABASES={
            "default": {
                "ENGINE": "django.db.backends.postgresql",
                "NAME": DB_NAME,
                "HOST": DB_HOST,
                "PORT": DB_PORT,
                "USER": DB_USER,
            }
        },
        SAFETYNET={},
        LOGGING_CONFIG=None,
    )
    django.setup()

import safetynet  # noqa: E402  (needs the settings above)

app = Celery("safetynet_bench_replay")
app.conf.update(
    broker_url=BROKER_URL,
    result_backend=None,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    task_send_sent_event=False,
)
app.set_default()


@safetynet.task(name=TASK_NAME, ignore_result=True)
def replay_noop(*args, **kwargs) -> None:
    """A no-op safetynet task: what the dead letters were, and what is published again."""
