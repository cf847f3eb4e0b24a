"""Fixtures for the dead-letter admin and command tests: rows, a private spool, a throwaway queue."""

import time
import uuid

import pytest
import redis

from safetynet import deadletter
from safetynet.models import DeadLetter
from tests.celery_app import app

SECRET = "tok_live_SECRET123"


@pytest.fixture(autouse=True)
def private_spool(settings, tmp_path):
    """Each test has its own spool, so recording never flushes another test's (or process's) records."""
    settings.SAFETYNET = {**settings.SAFETYNET, "SPOOL_DIR": str(tmp_path / "spool")}
    return tmp_path / "spool"


@pytest.fixture
def throwaway_queue():
    """A unique queue name on the test broker; its keys are deleted afterwards."""
    name = f"safetynet-test-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(app.conf.broker_url)
    for key in client.scan_iter(match=f"*{name}*"):
        client.delete(key)


def queued_messages(queue):
    """The raw messages waiting in ``queue`` on the Redis broker (newest first)."""
    import json

    client = redis.Redis.from_url(app.conf.broker_url)
    return [json.loads(item) for item in client.lrange(queue, 0, -1)]


def history(started, *, attempts=2, message="connection refused"):
    """A realistic attempt history: retries, then the final attempt."""
    entries = []
    for attempt in range(1, attempts + 1):
        last = attempt == attempts
        entries.append({
            "attempt": attempt,
            "started": started + 10 * (attempt - 1),
            "duration": 0.25,
            "exception": "ConnectionError",
            "message": message,
            "traceback": (
                "Traceback (most recent call last):\n"
                f'  File "/srv/shop/tasks.py", line {40 + attempt}, in charge\n'
                f"    gateway.charge(order)\nConnectionError: {message} (attempt {attempt})\n"
            ),
            "worker": "celery@worker-1",
            "action": "dead" if last else "retry",
            "delay": None if last else 2.0 * attempt,
            "reason": f"attempt {attempt} of {attempts} failed" if last else "DEFAULT_RETRY_ON is_network_error",
        })
    return entries


def make_dead_letter(task_name="tests.tasks.ping", *, reason="retries_exhausted", args=(), kwargs=None,
                     exception=None, attempts=2, failed_at=None, **extra):
    """Record one final failure the way the runtime does, and return its row."""
    failed_at = failed_at if failed_at is not None else time.time()
    task_id = str(uuid.uuid4())
    exception = exception if exception is not None else ConnectionError("connection refused")
    ended = deadletter.give_up(deadletter.Failure(
        task_name=task_name, task_id=task_id, reason=reason, args=args, kwargs=kwargs or {},
        exception=exception, history=history(failed_at - 10 * attempts, attempts=attempts,
                                              message=str(exception)) if attempts else [],
        failed_at=failed_at, worker="celery@worker-1", **extra,
    ), log=False)
    assert ended is not None and ended.dead_letter is not None and ended.dead_letter.id is not None
    return DeadLetter.objects.get(task_id=task_id)
