"""Test-only: the tasks the Sentry tests run, and a Celery app that initialises Sentry in the worker.

A worker started with ``-A tests.contrib.sentry_worker`` and ``SAFETYNET_TEST_SENTRY`` set
initialises sentry-sdk at import (before the pool forks), with a transport that pushes every
envelope, serialized, onto the Redis list ``SAFETYNET_TEST_SENTRY_KEY`` (and the reason of
every dropped error event onto ``<key>:dropped``):

    SAFETYNET_TEST_SENTRY=celery     default integrations; CeleryIntegration auto-enabled
    SAFETYNET_TEST_SENTRY=no-celery  default integrations but CeleryIntegration disabled

Imported by the test process only for the task objects (no Sentry there).
"""

import os
import signal
import time

import sentry_sdk
from sentry_sdk.transport import Transport

import safetynet
from safetynet import Permanent, RetryPolicy
from tests.celery_app import app  # noqa: F401  (the worker's app: `celery -A tests.contrib.sentry_worker`)

DSN = "http://public@127.0.0.1/1"
SECRET = "tok_live_SECRET123"


@safetynet.task(retry_policy=RetryPolicy(max_attempts=3, backoff=0.2, jitter="none"), retry_on=[ConnectionError])
def charge(order_id, card_token=None):
    """Retries twice, then dies (retries_exhausted)."""
    raise ConnectionError(f"payment gateway unreachable for order {order_id}")


@safetynet.task(retry_policy=RetryPolicy(max_attempts=3, backoff=0.2, jitter="none"), retry_on=[ConnectionError])
def charge_positional(card_token, order_id):
    """The secret passed positionally, and echoed in the exception message."""
    raise ConnectionError(f"declined: {card_token}")


@safetynet.task(bind=True, max_retries=2)
def refund(self, order_id, card_token=None):
    """The classic ``raise self.retry(exc=exc, countdown=...)``: dies after 3 attempts."""
    try:
        raise ConnectionError(f"refund of {order_id} failed")
    except ConnectionError as exc:
        raise self.retry(exc=exc, countdown=0.2)


@safetynet.task(bind=True, max_retries=1)
def poll(self, card_token=None):
    """``self.retry()`` without ``exc``: Celery raises MaxRetriesExceededError when it is given up."""
    raise self.retry(countdown=0.2)


@safetynet.task
def void(order_id, card_token=None):
    raise Permanent(f"order {order_id} was deleted")


@safetynet.task(time_limit=1, retry_policy=safetynet.RetryPolicy(max_attempts=2, backoff=safetynet.Fixed(0.2)))
def slow(card_token=None):
    time.sleep(30)


@safetynet.task(acks_late=False)
def die(card_token=None):
    """Its pool child is killed (kill -9): Celery will not run it again, safetynet records worker_lost."""
    os.kill(os.getpid(), signal.SIGKILL)


class RedisTransport(Transport):
    """Pushes each serialized envelope onto a Redis list the test reads."""

    def __init__(self, options=None, key=""):
        super().__init__(options)
        self.key = key

    def capture_envelope(self, envelope):
        from tests.fixtures import recording

        recording.client().rpush(self.key, envelope.serialize())

    def record_lost_event(self, reason, data_category=None, item=None, *, quantity=1):
        """Events an integration made and a processor or before_send dropped (the duplicates)."""
        from tests.fixtures import recording

        if data_category == "error":
            recording.client().rpush(f"{self.key}:dropped", reason)


def init_from_environment():
    variant = os.environ.get("SAFETYNET_TEST_SENTRY")
    if not variant:
        return
    from sentry_sdk.integrations.celery import CeleryIntegration

    from safetynet.contrib import sentry

    options = {"disabled_integrations": [CeleryIntegration()]} if variant == "no-celery" else {}
    sentry_sdk.init(
        dsn=DSN, transport=RedisTransport(key=os.environ["SAFETYNET_TEST_SENTRY_KEY"]),
        default_integrations=True, send_default_pii=True, **options,
    )
    sentry.install()  # what the proposed apps.py patch does in ready()


init_from_environment()
