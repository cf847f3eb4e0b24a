"""Tasks for the dead-letter integration tests: each fails in its own way while the fault is on."""

import time

from celery.exceptions import Reject

import safetynet
from safetynet import Permanent, RetryPolicy
from tests.recording import client

FAULT_KEY = "safetynet-tests:fault"


def fault_on():
    return client().exists(FAULT_KEY) == 1


@safetynet.task
def ok(n):
    return n


@safetynet.task(bind=True, retry_policy=RetryPolicy(max_attempts=4, backoff=0.2, jitter="none"),
                retry_on=[ConnectionError])
def flaky(self, n):
    if self.request.retries < 2:
        raise ConnectionError("not yet")
    return n


@safetynet.task
def permanent(n):
    if fault_on():
        raise Permanent(f"order {n} is invalid")
    return n


@safetynet.task(retry_policy=RetryPolicy(max_attempts=3, backoff=0.2, jitter="none"), retry_on=[ConnectionError])
def exhausted(n):
    if fault_on():
        raise ConnectionError(f"upstream {n} down")
    return n


@safetynet.task(time_limit=1, retry_policy=safetynet.RetryPolicy(max_attempts=1))  # the limit is final at once
def slow(n):
    if fault_on():
        time.sleep(5)
    return n


@safetynet.task
def rejecting(n):
    if fault_on():
        raise Reject(f"cannot handle {n}", requeue=False)
    return n


@safetynet.task(bind=True, max_retries=0)
def charge(self, amount, card_token):
    raise ConnectionError(f"gateway down while charging {amount}")
