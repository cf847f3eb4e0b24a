"""The Celery app and tasks of ``bench/overhead.py``, importable by its worker subprocesses.

Imported by the benchmark itself (to publish) and by ``celery -A _overhead_tasks worker``
(with ``bench/`` on PYTHONPATH). Django is configured here, minimally, because safetynet
reads ``settings.SAFETYNET``.
"""

from __future__ import annotations

import os
import time

import django
from celery import Celery, shared_task
from django.conf import settings

if not settings.configured:
    from safetynet import conf as safetynet_conf

    safetynet_settings = {}
    # The worker's dead-letter spool flusher gets a directory of the benchmark's own (a no-op
    # never fails, so it stays empty) rather than the machine's shared default.
    if os.environ.get("SAFETYNET_BENCH_SPOOL") and "SPOOL_DIR" in safetynet_conf.DEFAULTS:
        safetynet_settings["SPOOL_DIR"] = os.environ["SAFETYNET_BENCH_SPOOL"]
    settings.configure(
        INSTALLED_APPS=["safetynet"],
        DATABASES={"default": {"ENGINE": "django.db.backends.sqlite3", "NAME": ":memory:"}},
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


@shared_task(name="bench.mark", ignore_result=True)
def mark(key: str) -> None:
    """Record when the worker reached this point of its queue: wall clock and the worker's CPU time.

    Pushed onto a list, so the benchmark can wait for it with BLPOP.
    """
    _client().rpush(key, f"{time.time()!r} {time.process_time()!r}")


NOOPS = {"plain": plain_noop, "safetynet": safetynet_noop}
