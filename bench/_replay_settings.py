"""Django, database and Celery set-up of ``bench/replay.py``, and the task it replays.

Django is configured here, standalone, on a PostgreSQL database of its own (created when it
is missing, then migrated); the Celery app publishes to a Redis database of its own and keeps
no results. Nothing here runs a worker: the benchmark measures publishing only.

Environment (all optional):

    SAFETYNET_BENCH_DB         database name            (default safetynet_bench)
    and the PostgreSQL server's, read in ``_postgres.py``
    SAFETYNET_BENCH_REPLAY_REDIS   broker URL           (default redis://127.0.0.1:6379/8)
"""

from __future__ import annotations

import os

import django
from celery import Celery
from django.conf import settings

from _postgres import DB_HOST, DB_PORT, django_database  # noqa: F401  (replay.py prints DB_HOST, DB_PORT)
from _postgres import ensure_database as create_database_if_missing

DB_NAME = os.environ.get("SAFETYNET_BENCH_DB", "safetynet_bench")
BROKER_URL = os.environ.get("SAFETYNET_BENCH_REPLAY_REDIS", "redis://127.0.0.1:6379/8")
QUEUE = "bench.replay"
TASK_NAME = "bench.replay_noop"


def ensure_database() -> bool:
    """Create the benchmark's database when it is missing; return True if it was created."""
    return create_database_if_missing(DB_NAME)


if not settings.configured:
    settings.configure(
        SECRET_KEY="safetynet-bench",
        DEBUG=False,  # with DEBUG, Django would keep every query in memory
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "safetynet"],
        DATABASES={"default": django_database(DB_NAME)},
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
