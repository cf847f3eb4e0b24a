"""The Celery app and the two retrying tasks of ``bench/long_retries.py``, imported by its worker subprocesses.

Both tasks have the same body, the classic Celery way to put off work: on its first attempt
the task calls ``self.retry(countdown=delay)``; any later attempt just runs. Every execution,
first attempt or not, writes one row to ``long_retries_execution`` (no unique constraint, so
that a task run twice shows as two rows). The only difference is the decorator:

- ``safetynet_retry``: ``@safetynet.task``. A retry delayed at least ``DURABLE_RETRY_SECONDS``
  (5 s by default) becomes a ``ScheduledMessage`` row; the relay thread of a worker publishes it
  when it is due;
- ``celery_retry``: ``@shared_task``. The retry is an ETA message that a worker fetches at once
  and holds in memory until it is due.

Task ids are ``<batch>-<n>-<random>`` (``task_id()``), so the benchmark can tell its batches
apart in the execution rows, in safetynet's scheduled rows and in the deliveries counted here.

Each worker counts the task messages it receives (Celery's ``task_received`` signal, in the
worker's main process: every copy a broker delivers, including the ETA messages it then holds)
and writes the counts to its broker's Redis database every half second, in the hash
``long:received`` (fields ``<batch>:first`` and ``<batch>:retry``).

Environment (set by ``long_retries.py``):

    SAFETYNET_LONG_BROKER      the broker: a database of the run's private Redis (required)
    SAFETYNET_LONG_VISIBILITY  the broker's visibility timeout, seconds (default 10)
    SAFETYNET_LONG_READY_DIR   where a worker drops a file when it is ready
"""

from __future__ import annotations

import os
import threading
import time
import uuid
from collections import Counter
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "_long_retries_settings")
django.setup()

from celery import Celery, shared_task, signals  # noqa: E402
from django.db import connection  # noqa: E402

import safetynet  # noqa: E402

SAFETYNET_TASK = "long.safetynet_retry"
CELERY_TASK = "long.celery_retry"
EXECUTIONS = "long_retries_execution"
RECEIVED = "long:received"
VISIBILITY_TIMEOUT = float(os.environ.get("SAFETYNET_LONG_VISIBILITY", "10"))
BROKER_URL = os.environ.get("SAFETYNET_LONG_BROKER")
if not BROKER_URL:
    # No default: on a shared Redis, a worker with a visibility timeout of seconds would deliver
    # again the messages other programs' workers hold.
    raise RuntimeError("_long_retries_tasks: SAFETYNET_LONG_BROKER is not set; long_retries.py sets it to a "
                       "database of its private redis-server")

# The same broker settings for both systems. Redis' default visibility timeout is an hour, so
# a held ETA message would be delivered again only after an hour; a short one shows the same
# behaviour in seconds. The sweep for such messages runs every 2 s instead of every 100 s.
BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": VISIBILITY_TIMEOUT,
    "unacked_restore_interval": 2,
    "unacked_restore_throttle": 1,
    "unacked_mutex_expire": 10,
}

app = Celery("safetynet_long_retries")
app.conf.update(
    broker_url=BROKER_URL,
    broker_transport_options=BROKER_TRANSPORT_OPTIONS,
    result_backend=None,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
    worker_enable_remote_control=False,
    task_send_sent_event=False,
)
app.set_default()


def task_id(batch: str, n: int) -> str:
    """The id of task ``n`` of ``batch``; a retry keeps it."""
    return f"{batch}-{n:06d}-{uuid.uuid4().hex[:12]}"


def batch_of(task_id: str) -> str:
    return task_id.split("-", 1)[0]


def _attempt(task, delay: float) -> None:
    """The body both tasks share: record this execution; on the first attempt, retry in ``delay`` s."""
    request = task.request
    attempt = request.retries + 1
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {EXECUTIONS} (task_name, batch, task_id, attempt, pid, at) VALUES (%s, %s, %s, %s, %s, %s)",
            [task.name, batch_of(request.id), request.id, attempt, os.getpid(), time.time()],
        )
    if attempt == 1 and delay > 0:
        raise task.retry(countdown=delay)


@safetynet.task(bind=True, name=SAFETYNET_TASK, max_retries=3, ignore_result=True)
def safetynet_retry(self, n: int, delay: float) -> None:
    """Put the work off by ``delay`` seconds once, then do it (safetynet)."""
    _attempt(self, delay)


@shared_task(bind=True, name=CELERY_TASK, max_retries=3, ignore_result=True)
def celery_retry(self, n: int, delay: float) -> None:
    """The same, plain Celery."""
    _attempt(self, delay)


TASKS = {"safetynet": safetynet_retry, "celery": celery_retry}


# -- what the worker received -------------------------------------------------------------------

_received: Counter[str] = Counter()


@signals.task_received.connect(weak=False)
def count_delivery(sender=None, request=None, **_):
    """Count every task message this worker receives (main process; counted in memory, written below)."""
    kind = "retry" if request.request_dict.get("retries") else "first"
    _received[f"{batch_of(request.id)}:{kind}"] += 1


def _write_received() -> None:
    """Write the counts to the broker's Redis every half second: no Redis round trip per message."""
    import redis

    client = redis.Redis.from_url(BROKER_URL, socket_timeout=5)
    while True:
        time.sleep(0.5)
        try:
            if _received:
                client.hset(RECEIVED, mapping=dict(_received))
        except redis.RedisError:
            pass  # the benchmark reports a stale count rather than a dead thread


@signals.worker_ready.connect(weak=False)
def announce_ready(sender=None, **_):
    """Start the count writer (after the pool has forked), then drop the file the benchmark waits for."""
    threading.Thread(target=_write_received, name="long-retries-received", daemon=True).start()
    directory = os.environ.get("SAFETYNET_LONG_READY_DIR")
    if directory:
        Path(directory, f"ready.{os.getpid()}").touch()
