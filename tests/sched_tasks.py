"""Tasks the durable-schedule and outbox tests run in real worker processes."""

from django.db import connection

import safetynet
from safetynet import Fixed, RetryPolicy, Transient

#: One row per run of a task body (the tests count them: exactly once?).
LEDGER = "sched_ledger"


def record_run(task, name):
    with connection.cursor() as cursor:
        cursor.execute(
            f"INSERT INTO {LEDGER} (name, task_id, attempt, relayed) VALUES (%s, %s, %s, %s)",
            [name, task.request.id, task.attempt, str((task.request.headers or {}).get("safetynet_relayed"))],
        )


@safetynet.task(bind=True, retry_policy=RetryPolicy(max_attempts=3, backoff=Fixed(6), jitter="none"))
def retry_later(self, name, delay=None):
    """Fail the first attempt (a retry ``delay`` seconds later, else the policy's 6 s), then record the run."""
    if self.attempt == 1:
        if delay is not None:
            raise self.retry(countdown=delay)
        raise Transient("first attempt fails")
    record_run(self, name)
    return self.attempt


@safetynet.task(bind=True, enqueue="outbox")
def outboxed(self, name):
    """Sent through the outbox: record the run."""
    record_run(self, name)
    return name


@safetynet.task(bind=True, acks_late=True, reject_on_worker_lost=True,
                retry_policy=RetryPolicy(max_attempts=3, backoff=Fixed(6), jitter="none"))
def retry_later_acked_late(self, name, delay):
    """Record every run, first attempt included; the first asks for a retry ``delay`` seconds later.

    Acknowledged after the run: a worker killed mid-run gets the message delivered again, so a
    redelivered first attempt runs (and schedules) again, and a redelivered retry runs again with
    the same relay token.
    """
    record_run(self, name)
    if self.attempt == 1:
        raise self.retry(countdown=delay)
    return self.attempt


@safetynet.task(bind=True, retry_policy=RetryPolicy(max_attempts=3, backoff=Fixed(6), jitter="none"))
def retry_twice(self, name, delay):
    """Record every run; the first two attempts ask for a retry ``delay`` seconds later."""
    record_run(self, name)
    if self.attempt <= 2:
        raise self.retry(countdown=delay)
    return self.attempt
