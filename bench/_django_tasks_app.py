"""Django, Celery and the tasks of ``bench/django_tasks.py``, importable by its worker subprocess.

Imported by the benchmark (to enqueue) and by ``celery -A _django_tasks_app worker`` (with ``bench/`` on
PYTHONPATH). Django is configured here: ``TASKS["default"]`` is safetynet's ``CeleryBackend`` (its records in a
PostgreSQL database of the benchmark's own, created and migrated when missing) and, when django-tasks-fennel is
installed, ``TASKS["fennel"]`` is its Celery backend (its results in Celery's Redis result backend, as it needs).

Environment (all optional):

    SAFETYNET_BENCH_DJTASKS_REDIS  broker and result backend URL  (default redis://127.0.0.1:6379/11)
    SAFETYNET_BENCH_DJTASKS_DB     database name                  (default safetynet_bench_djtasks)
    and the PostgreSQL server's, read in ``_postgres.py``
"""

from __future__ import annotations

import os
import time

import django
from celery import Celery, shared_task
from django.conf import settings

from _postgres import django_database
from _postgres import ensure_database as create_database_if_missing

REDIS_URL = os.environ.get("SAFETYNET_BENCH_DJTASKS_REDIS", "redis://127.0.0.1:6379/11")
DB_NAME = os.environ.get("SAFETYNET_BENCH_DJTASKS_DB", "safetynet_bench_djtasks")
QUEUE = "bench.django_tasks"

try:
    import django_tasks_fennel  # noqa: F401
except ImportError as error:
    FENNEL_MISSING = f"django-tasks-fennel is not installed ({error})"
else:
    FENNEL_MISSING = ""

try:
    from django import tasks as _tasks_api  # noqa: F401
except ImportError:
    BACKPORT = True  # Django 5.2: the django-tasks backport
else:
    BACKPORT = False

if not settings.configured:
    tasks_setting = {"default": {"BACKEND": "safetynet.tasks.CeleryBackend", "QUEUES": []}}
    if not FENNEL_MISSING:
        tasks_setting["fennel"] = {"BACKEND": "django_tasks_fennel.backend.CeleryBackend", "QUEUES": [QUEUE]}
    settings.configure(
        SECRET_KEY="safetynet-bench",
        DEBUG=False,  # with DEBUG, Django would keep every query in memory
        USE_TZ=True,
        INSTALLED_APPS=["django.contrib.contenttypes", "django.contrib.auth", "safetynet",
                        *(["django_tasks"] if BACKPORT else [])],
        DATABASES={"default": django_database(DB_NAME)},
        SAFETYNET={"SPOOL_DIR": os.environ.get("SAFETYNET_BENCH_SPOOL") or None},
        TASKS=tasks_setting,
        LOGGING_CONFIG=None,
    )

app = Celery("safetynet_bench_django_tasks")
app.conf.update(
    broker_url=REDIS_URL,
    # fennel's results (get_result needs them); safetynet's backend keeps its own records, plain Celery none
    result_backend=REDIS_URL,
    task_default_queue=QUEUE,  # Django's "default" queue
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    task_send_sent_event=False,
    worker_hijack_root_logger=False,
)
app.set_default()
django.setup()

import safetynet  # noqa: E402  (needs Django set up)
from safetynet.taskrecords._compat import api  # noqa: E402

task = api.task


def ensure_database() -> bool:
    """Create the benchmark's database when it is missing; return True if it was created."""
    return create_database_if_missing(DB_NAME)


@shared_task(name="bench.celery_noop", ignore_result=True)
def celery_noop() -> None:
    """The plain Celery no-op, sent with ``apply_async``."""


@safetynet.task(name="bench.safetynet_noop", ignore_result=True)
def safetynet_noop() -> None:
    """The same no-op as a plain ``@safetynet.task`` (a reference: safetynet's own path, without django.tasks)."""


@shared_task(name="bench.marker", ignore_result=True)
def marker(key: str) -> None:
    """Records when the worker reached it (every message sent before it on the queue has run) and the worker's CPU
    time then (a solo worker: the process that ran them)."""
    import redis

    redis.Redis.from_url(REDIS_URL).set(key, f"{time.time()!r} {time.process_time()!r}", ex=3600)


def without_records() -> None:
    """An experiment, not a configuration: the backend without its durable ``TaskRecord`` rows (no INSERT at
    enqueue, no write when a run starts or ends; ``get_result()`` then finds nothing). ``bench/django_tasks.py
    --without-records`` calls it in the benchmark and, through ``SAFETYNET_BENCH_DJTASKS_NO_RECORDS``, in the worker:
    what is left of the gap to plain Celery is the rest of the backend's path and Django's own."""
    from safetynet import taskrecords
    from safetynet.taskrecords import _store

    taskrecords.insert_then = lambda fields, send: send()
    taskrecords.attempt_started = lambda *args, **kwargs: None
    _store.attempt_ended = lambda *args, **kwargs: None


if os.environ.get("SAFETYNET_BENCH_DJTASKS_NO_RECORDS"):
    without_records()


@task
def django_noop() -> None:
    """The ``django.tasks`` no-op, through safetynet's CeleryBackend."""


if not FENNEL_MISSING:
    @task(backend="fennel", queue_name=QUEUE)
    def fennel_noop() -> None:
        """The same no-op through django-tasks-fennel."""
