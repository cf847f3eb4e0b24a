"""Tasks the idempotency and crash-safety integration tests run in real worker processes."""

import os
import signal
import time

from django.db import connection

import safetynet
from safetynet import Fixed, RetryPolicy
from tests.recording import client

LEDGER = "idem_ledger"
QUICK = RetryPolicy(max_attempts=3, backoff=Fixed(0.2), jitter="none")


def count_run(name):
    """Count a body start in Redis (the tests read it: how many times did the effect start?)."""
    return client().incr(f"safetynet-tests:runs:{name}")


def runs(name):
    return int(client().get(f"safetynet-tests:runs:{name}") or 0)


@safetynet.task(bind=True, idempotency_key="pay-{order_id}", idempotency_lease=2)
def pay(self, order_id, seconds=0.0):
    """Write a ledger row, take ``seconds``, return who did it."""
    count_run(f"pay-{order_id}")
    with connection.cursor() as cursor:
        cursor.execute(f"INSERT INTO {LEDGER} (order_id, task_id) VALUES (%s, %s)", [order_id, self.request.id])
    time.sleep(seconds)
    return {"order": order_id, "key": self.idempotency_key, "task_id": self.request.id}


@safetynet.task(acks_late=True, reject_on_worker_lost=True, max_deliveries=3)
def kills_its_worker(name):
    """A poison message: every delivery kills the pool process running it."""
    count_run(name)
    os.kill(os.getpid(), signal.SIGKILL)


@safetynet.task
def dies_acknowledged_early(name):
    """Kills its pool process once; acknowledged before it ran, Celery cannot run it again."""
    count_run(name)
    os.kill(os.getpid(), signal.SIGKILL)


@safetynet.task(time_limit=1, retry_policy=QUICK)
def slow_first_time(name):
    """Hits the hard time limit on its first attempt only."""
    if count_run(name) == 1:
        time.sleep(5)
    return name


@safetynet.task(soft_time_limit=0.5, retry_policy=QUICK)
def soft_slow_first_time(name):
    """Hits the soft time limit (an exception in the body) on its first attempt only."""
    if count_run(name) == 1:
        time.sleep(3)
    return name


@safetynet.task(idempotency_key="slow-{name}", time_limit=1,
                retry_policy=RetryPolicy(max_attempts=5, backoff=Fixed(0.2), jitter="none"))
def idempotent_slow_three_times(name):
    """Hits the hard time limit on its first three attempts; each kill must free the claim, uncounted."""
    if count_run(name) <= 3:
        time.sleep(5)
    return name


@safetynet.task(bind=True, idempotency_key="flaky-{order_id}", idempotency_lease=2,
                retry_policy=RetryPolicy(max_attempts=3, backoff=Fixed(3), jitter="none"))
def flaky_pay(self, order_id):
    """Fails its first run (transient), succeeds on the retry 3 s later."""
    if count_run(f"flaky-{order_id}") == 1:
        raise ConnectionError("gateway unreachable")
    return {"order": order_id, "task_id": self.request.id, "attempt": self.attempt}
