"""Tasks with risky configuration, for the system-check tests (registered on demand)."""

from celery import shared_task

import safetynet
from safetynet import RetryPolicy


@shared_task(autoretry_for=(Exception,), max_retries=None)
def retries_everything_forever():
    pass


@safetynet.task(retry_policy=RetryPolicy(max_attempts=None), retry_on=[ConnectionError])
def retries_forever():
    pass


@safetynet.task(retry_policy=RetryPolicy(max_attempts=5, backoff=7200, jitter="none", max_delay=None))
def waits_two_hours():
    pass


@safetynet.task(retry_policy=RetryPolicy(max_attempts=3, deadline=600), retry_on=[Exception])
def bounded_catch_all():
    pass


@safetynet.task(breaker="nowhere")
def through_an_unknown_breaker():
    pass
