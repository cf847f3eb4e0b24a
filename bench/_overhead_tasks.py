"""The Celery app and tasks of ``bench/overhead.py``, importable by its worker subprocesses.

Imported by the benchmark itself (to publish) and by ``celery -A _overhead_tasks worker``
(with ``bench/`` on PYTHONPATH). Django is configured here, minimally: safetynet reads
``settings.SAFETYNET``, and the idempotent no-op claims its key in a PostgreSQL database of the
benchmark's own (the benchmark creates it when it is missing and migrates it; the plain and
safetynet no-ops never open a connection).

Environment (all optional):

    SAFETYNET_BENCH_REDIS        broker URL                (default redis://127.0.0.1:6379/9)
    SAFETYNET_BENCH_OVERHEAD_DB  database name             (default safetynet_bench_overhead)
    and the PostgreSQL server's, read in ``_postgres.py``
"""

from __future__ import annotations

import os
import time

import django
from celery import Celery, shared_task
from django.conf import settings

from _postgres import DB_HOST, DB_PORT, DB_USER, django_database
from _postgres import ensure_database as create_database_if_missing

DB_NAME = os.environ.get("SAFETYNET_BENCH_OVERHEAD_DB", "safetynet_bench_overhead")

if not settings.configured:
    from safetynet import conf as safetynet_conf

    safetynet_settings = {}
    # The worker's dead-letter spool flusher gets a directory of the benchmark's own (a no-op
    # never fails, so it stays empty) rather than the machine's shared default.
    if os.environ.get("SAFETYNET_BENCH_SPOOL") and "SPOOL_DIR" in safetynet_conf.DEFAULTS:
        safetynet_settings["SPOOL_DIR"] = os.environ["SAFETYNET_BENCH_SPOOL"]
    settings.configure(
        # _bench_app: the tables of bench/idempotency.py's hand-written guard and realistic body
        INSTALLED_APPS=["safetynet", "_bench_app"],
        DATABASES={"default": django_database(DB_NAME)},
        DEBUG=False,  # with DEBUG, Django would keep every query in memory
        SAFETYNET=safetynet_settings,
        USE_TZ=True,
    )
    django.setup()

import safetynet  # noqa: E402  (needs the settings above)


def disable_prometheus() -> bool:
    """Disconnect safetynet's Prometheus receivers (the app connects them when prometheus_client is installed)."""
    try:
        from safetynet.contrib import prometheus
    except ImportError:  # prometheus_client is not installed: nothing was connected
        return False
    prometheus.uninstall()
    return True


if os.environ.get("SAFETYNET_BENCH_NO_PROMETHEUS"):
    disable_prometheus()

if os.environ.get("SAFETYNET_BENCH_PLAIN_CELERY"):
    # The worker of a plain Celery system is a plain Celery worker: without safetynet's message guard (the consumer
    # step that checks every message before Celery reads it) and without its main process's background jobs (the
    # relay, the spool flush, the orphan sweep, housekeeping), both started by these two receivers. A project with
    # safetynet installed has them in every worker, for plain tasks too: they are part of what safetynet costs.
    from celery import signals as celery_signals

    celery_signals.worker_init.disconnect(dispatch_uid="safetynet.worker_init")
    celery_signals.worker_ready.disconnect(dispatch_uid="safetynet.worker_ready")

BROKER_URL = os.environ.get("SAFETYNET_BENCH_REDIS", "redis://127.0.0.1:6379/9")

app = Celery("safetynet_bench")
app.conf.update(
    broker_url=BROKER_URL,
    result_backend=None,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    worker_send_task_events=False,
    worker_enable_remote_control=False,
    task_send_sent_event=False,
    task_store_errors_even_if_ignored=False,
)
app.set_default()

_redis = None


def _client():
    global _redis
    if _redis is None:
        import redis

        _redis = redis.Redis.from_url(BROKER_URL)
    return _redis


@shared_task(name="bench.plain_noop", ignore_result=True)
def plain_noop() -> None:
    """A no-op plain Celery task."""


@safetynet.task(name="bench.safetynet_noop", ignore_result=True)
def safetynet_noop() -> None:
    """The same no-op, as a safetynet task."""


@safetynet.task(name="bench.idempotent_noop", ignore_result=True, idempotency_key="noop-{n}")
def idempotent_noop(n: str) -> None:
    """The same no-op, idempotent: each message has an ``n`` of its own, so each run claims a fresh key."""


@shared_task(name="bench.mark", ignore_result=True)
def mark(key: str) -> None:
    """Record when the worker reached this point of its queue: wall clock and the worker's CPU time.

    Pushed onto a list, so the benchmark can wait for it with BLPOP.
    """
    _client().rpush(key, f"{time.time()!r} {time.process_time()!r}")


NOOPS = {"plain": plain_noop, "safetynet": safetynet_noop, "idempotent": idempotent_noop}


def ensure_database() -> None:
    """Create the benchmark's database when it is missing, and migrate it (safetynet's tables)."""
    import psycopg
    from django.core.management import call_command

    try:
        create_database_if_missing(DB_NAME)
    except psycopg.OperationalError as error:
        raise SystemExit(
            f"overhead.py: the idempotent no-op needs PostgreSQL at {DB_HOST}:{DB_PORT} (user {DB_USER}): {error}"
        ) from None
    call_command("migrate", verbosity=0, interactive=False, run_syncdb=True)  # safetynet's, and _bench_app's


def clear_claims() -> int:
    """Empty the claim table of the benchmark's own database; return how many rows it held."""
    from django.db import connection

    from safetynet.models import IdempotencyClaim

    table = connection.ops.quote_name(IdempotencyClaim._meta.db_table)
    with connection.cursor() as cursor:
        cursor.execute(f"SELECT count(*) FROM {table}")
        rows = cursor.fetchone()[0]
        cursor.execute(f"TRUNCATE {table}")
    connection.close()  # the workers are what is measured; hold no session across a round
    return rows
