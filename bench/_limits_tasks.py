"""The Celery app and the two tasks of ``bench/limits.py``, imported by its worker subprocesses.

Both make the same call, ``GET /call?n=N&system=S`` on the upstream stub with urllib:
``safetynet_call`` through the limit "partner" (``limit="partner"``: concurrency 3 and 50/s
unless told otherwise), ``celery_call`` with Celery's own ``rate_limit="50/s"`` (per worker).

What became of each task is written to the run's private Redis (keys ``limits:*``):
``limits:<system>:ok`` (task number -> when it ended), deferrals and their waits, deaths.

Environment (set by ``limits.py``):

    SAFETYNET_LIMITS_REDIS      the private Redis: the broker, safetynet's REDIS_URL, the records
    SAFETYNET_LIMITS_UPSTREAM   base URL of the upstream stub
    SAFETYNET_LIMITS_READY_DIR  where a worker drops a file when it is ready
    SAFETYNET_LIMITS_CELERY_RATE  Celery's rate_limit (default 50/s)
"""

from __future__ import annotations

import os
import time
import urllib.request
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "_limits_settings")
django.setup()

import redis  # noqa: E402
from celery import Celery, shared_task, signals  # noqa: E402
from django.dispatch import receiver  # noqa: E402

import safetynet  # noqa: E402
from safetynet import signals as safetynet_signals  # noqa: E402

SAFETYNET_TASK = "limits.safetynet_call"
CELERY_TASK = "limits.celery_call"
UPSTREAM_TIMEOUT = 30.0
LIMIT = "partner"

REDIS_URL = os.environ.get("SAFETYNET_LIMITS_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("safetynet_limits")
app.conf.update(
    broker_url=REDIS_URL,
    result_backend=None,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
    task_send_sent_event=False,
)
app.set_default()

_records: redis.Redis | None = None


def records() -> redis.Redis:
    """The client this process writes its records with (one per process)."""
    global _records
    if _records is None:
        _records = redis.Redis.from_url(REDIS_URL, socket_timeout=10)
    return _records


def call_upstream(n: int, system: str) -> None:
    url = f"{os.environ['SAFETYNET_LIMITS_UPSTREAM']}/call?n={n}&system={system}"
    with urllib.request.urlopen(url, timeout=UPSTREAM_TIMEOUT) as response:
        response.read()


@safetynet.task(name=SAFETYNET_TASK, limit=LIMIT, ignore_result=True)
def safetynet_call(n: int) -> None:
    """Call the upstream within the limit "partner" (shared by every worker)."""
    call_upstream(n, "safetynet")


@shared_task(name=CELERY_TASK, rate_limit=os.environ.get("SAFETYNET_LIMITS_CELERY_RATE", "50/s"),
             ignore_result=True)
def celery_call(n: int) -> None:
    """The same call with Celery's rate_limit (each worker keeps its own)."""
    call_upstream(n, "celery")


_SYSTEMS = {SAFETYNET_TASK: "safetynet", CELERY_TASK: "celery"}


@signals.task_success.connect(weak=False)
def record_success(sender=None, **_):
    """Recorded once the run is over (its limit's slot given back), not inside the body holding it."""
    system = _SYSTEMS.get(getattr(sender, "name", None))
    if system is not None:
        records().zadd(f"limits:{system}:ok", {str(sender.request.kwargs.get("n")): time.time()})


# -- records -------------------------------------------------------------------------------------


# Deferrals are counted in the process and written when it stops: a Redis write per deferral would be the
# benchmark's own cost, inside the path it measures.
_counts: dict[str, int] = {}
_reasons: dict[str, int] = {}
_waits: list[float] = []


@receiver(safetynet_signals.task_retrying, weak=False)
def record_deferral(sender=None, delay=None, entry=None, **_):
    action = (entry or {}).get("action", "retry")  # "snooze": deferred by the limit, no attempt used
    _counts[action] = _counts.get(action, 0) + 1
    if action == "snooze":
        _waits.append(delay)


@receiver(safetynet_signals.limit_deferred, weak=False)
def record_reason(sender=None, name=None, reason=None, **_):
    _reasons[reason or "?"] = _reasons.get(reason or "?", 0) + 1


@signals.worker_process_shutdown.connect(weak=False)
def flush_counts(**_):
    client = records()
    with client.pipeline(transaction=False) as pipe:
        for action, count in _counts.items():
            pipe.incrby(f"limits:safetynet:{action}", count)
        for reason, count in _reasons.items():
            pipe.hincrby("limits:safetynet:reasons", reason, count)
        if _waits:
            pipe.rpush("limits:safetynet:waits", *(f"{wait!r}" for wait in _waits))
        pipe.execute()


@receiver(safetynet_signals.task_dead, weak=False)
def record_dead(sender=None, reason=None, kwargs=None, **_):
    records().zadd("limits:safetynet:dead", {str((kwargs or {}).get("n")): time.time()})


@signals.task_failure.connect(weak=False)
def record_celery_failure(sender=None, kwargs=None, **_):
    if getattr(sender, "name", None) == CELERY_TASK:
        records().zadd("limits:celery:dead", {str((kwargs or {}).get("n")): time.time()})


@signals.worker_process_init.connect(weak=False)
def warm_up_the_client(**_):
    """One unrecorded call from each worker process before it takes a task: the first ``urlopen`` of a fresh
    process (imports, the opener, a process just forked competing for a CPU) reached the stub some 70 ms after
    the body started, against ~0.3 ms for the next ones: a one-off of the benchmark's start-up, not of the
    limiter, which cannot see past the task's body (``margin`` is for that way; docs/limits.md)."""
    try:
        with urllib.request.urlopen(f"{os.environ['SAFETYNET_LIMITS_UPSTREAM']}/warm", timeout=UPSTREAM_TIMEOUT):
            pass
    except Exception:  # the round then measures a cold first call, as before
        pass


@signals.worker_ready.connect(weak=False)
def announce_ready(sender=None, **_):
    directory = os.environ.get("SAFETYNET_LIMITS_READY_DIR")
    if directory:
        Path(directory, f"ready.{os.getpid()}").touch()
