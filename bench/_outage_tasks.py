"""The Celery app and the two tasks of ``bench/outage.py``, imported by its worker subprocesses.

Both tasks make the same call: ``GET /call?n=N`` on the upstream stub, with urllib; a 503
raises ``urllib.error.HTTPError``. ``safetynet_call`` goes through the breaker "partner" and
retries with an exponential backoff (full jitter); ``celery_call`` is plain Celery with
``autoretry_for`` + ``retry_backoff`` and the same number of attempts (``max_retries=5``
is 6 runs, ``max_attempts=6``).

What became of each task is written to the run's private Redis (keys ``outage:*``) by the
workers: ``outage:<system>:ok`` and ``outage:<system>:dead`` (sorted sets: task number ->
time it finished), counters of retries and deferrals, and the breaker's changes of state.

Environment (set by ``outage.py``):

    SAFETYNET_OUTAGE_REDIS      the private Redis: the broker, safetynet's REDIS_URL, the records
    SAFETYNET_OUTAGE_UPSTREAM   base URL of the upstream stub
    SAFETYNET_OUTAGE_READY_DIR  where a worker drops a file when it is ready
"""

from __future__ import annotations

import os
import time
import urllib.error
import urllib.request
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "_outage_settings")
django.setup()

import redis  # noqa: E402
from celery import Celery, shared_task, signals  # noqa: E402
from django.dispatch import receiver  # noqa: E402

import safetynet  # noqa: E402
from safetynet import signals as safetynet_signals  # noqa: E402

SAFETYNET_TASK = "outage.safetynet_call"
CELERY_TASK = "outage.celery_call"
#: The client's timeout: the stub answers at once, up or down, so it never runs out here.
UPSTREAM_TIMEOUT = 2.0
ATTEMPTS = 6  # safetynet's max_attempts; Celery's max_retries is one less
BACKOFF_MAX = 16.0  # the 5th retry's delay, 2**4: neither system is capped before that
BREAKER = "partner"

REDIS_URL = os.environ.get("SAFETYNET_OUTAGE_REDIS", "redis://127.0.0.1:6379/0")

app = Celery("safetynet_outage")
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


def call_upstream(n: int) -> None:
    """One call to the upstream; an HTTPError (503) or URLError when it is down."""
    url = f"{os.environ['SAFETYNET_OUTAGE_UPSTREAM']}/call?n={n}"
    with urllib.request.urlopen(url, timeout=UPSTREAM_TIMEOUT) as response:
        response.read()


def _finished(system: str, n: int, attempt: int) -> None:
    client = records()
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd(f"outage:{system}:ok", {str(n): time.time()})
        pipe.hset(f"outage:{system}:attempts", str(n), attempt)
        pipe.execute()


@safetynet.task(
    bind=True,
    name=SAFETYNET_TASK,
    breaker=BREAKER,
    retry_policy=safetynet.RetryPolicy(max_attempts=ATTEMPTS, backoff=safetynet.Exponential(1.0, 2.0),
                                       jitter="full", max_delay=BACKOFF_MAX),
    ignore_result=True,
)
def safetynet_call(self, n: int) -> None:
    """Call the upstream through the breaker; a 503 is retried (and counted by the breaker)."""
    call_upstream(n)
    _finished("safetynet", n, self.attempt)


@shared_task(
    bind=True,
    name=CELERY_TASK,
    autoretry_for=(urllib.error.URLError, OSError),
    retry_backoff=True,
    retry_backoff_max=int(BACKOFF_MAX),
    max_retries=ATTEMPTS - 1,
    ignore_result=True,
)
def celery_call(self, n: int) -> None:
    """The same call, the way the Celery docs write it: autoretry_for + retry_backoff (jitter on)."""
    call_upstream(n)
    _finished("celery", n, self.request.retries + 1)


# -- records -------------------------------------------------------------------------------------


@receiver(safetynet_signals.breaker_changed, weak=False)
def record_breaker_change(sender=None, name=None, state=None, at=None, by_hand=False, **_):
    if name == BREAKER and not by_hand:
        records().rpush("outage:transitions", f"{at!r} {state}")


@receiver(safetynet_signals.breaker_refused, weak=False)
def record_refusal(sender=None, name=None, state=None, **_):
    if name == BREAKER:
        records().hincrby("outage:safetynet:refused", state or "?", 1)


@receiver(safetynet_signals.task_retrying, weak=False)
def record_safetynet_retry(sender=None, delay=None, entry=None, **_):
    action = (entry or {}).get("action", "retry")  # "snooze": deferred by the breaker, no attempt used
    client = records()
    with client.pipeline(transaction=False) as pipe:
        pipe.incr(f"outage:safetynet:{action}")
        if action == "snooze":
            pipe.rpush("outage:safetynet:snooze_delays", f"{delay!r}")
        pipe.execute()


@receiver(safetynet_signals.task_dead, weak=False)
def record_safetynet_dead(sender=None, reason=None, kwargs=None, **_):
    client = records()
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd("outage:safetynet:dead", {str((kwargs or {}).get("n")): time.time()})
        pipe.hincrby("outage:safetynet:dead_reasons", reason or "?", 1)
        pipe.execute()


@signals.task_retry.connect(weak=False)
def record_celery_retry(sender=None, **_):
    if getattr(sender, "name", None) == CELERY_TASK:
        records().incr("outage:celery:retry")


@signals.task_failure.connect(weak=False)
def record_celery_failure(sender=None, kwargs=None, exception=None, **_):
    """A plain Celery task that failed for good (retries exhausted): dead."""
    if getattr(sender, "name", None) != CELERY_TASK:
        return
    client = records()
    with client.pipeline(transaction=False) as pipe:
        pipe.zadd("outage:celery:dead", {str((kwargs or {}).get("n")): time.time()})
        # Celery hands the receiver a pickleable copy of the final HTTPError (an OSError).
        exhausted = sender.request.retries >= (sender.max_retries or 0)
        pipe.hincrby("outage:celery:dead_reasons", "retries_exhausted" if exhausted else type(exception).__name__, 1)
        pipe.execute()


@signals.worker_ready.connect(weak=False)
def announce_ready(sender=None, **_):
    """Drop a file the benchmark waits for: this worker is consuming."""
    directory = os.environ.get("SAFETYNET_OUTAGE_READY_DIR")
    if directory:
        Path(directory, f"ready.{os.getpid()}").touch()
