"""The classic Celery retry examples, unchanged but for the decorator, and friends."""

import smtplib

from celery import shared_task

import safetynet
from safetynet import Permanent, RetryPolicy, Snooze, http_status


def send_mail(to):
    raise smtplib.SMTPException("421 service not available")


# (a) bind=True, max_retries=3, raise self.retry(exc=exc, countdown=5)
@safetynet.task(bind=True, max_retries=3)
def send_welcome_email(self, to):
    try:
        send_mail(to)
    except smtplib.SMTPException as exc:
        raise self.retry(exc=exc, countdown=5)


# (b) autoretry_for + retry_backoff
@safetynet.task(autoretry_for=(smtplib.SMTPException,), retry_backoff=True, retry_backoff_max=600, max_retries=5)
def send_digest(to):
    send_mail(to)


# (c) succeeds on its second attempt
@safetynet.task(bind=True, max_retries=3)
def flaky_once(self, key):
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("first try fails"), countdown=1)
    return {"attempt": self.attempt, "retries": self.request.retries}


@safetynet.task(bind=True, retry_policy=RetryPolicy(max_attempts=4, backoff=2, jitter="none"),
                retry_on=[http_status(429, 503)], fail_on=[KeyError])
def call_api(self, fail_times):
    if self.attempt <= fail_times:
        raise ConnectionError("upstream down")
    return self.attempt


@safetynet.task(bind=True)
def permanent(self):
    raise Permanent("order 42 was deleted")


@safetynet.task(bind=True, retry_policy=RetryPolicy(max_attempts=2, backoff=1, jitter="none"))
def snoozer(self, snoozes):
    if self.request.retries < snoozes:
        raise Snooze(10)
    return self.attempt


@shared_task(bind=True, max_retries=3)
def plain_send_welcome_email(self, to):
    try:
        send_mail(to)
    except smtplib.SMTPException as exc:
        raise self.retry(exc=exc, countdown=5)


@safetynet.task
def ping():
    return "pong"


class AlertingTask(safetynet.SafetyTask):
    """The classic on_failure alert: records what on_failure saw."""

    def on_failure(self, exc, task_id, args, kwargs, einfo):
        from tests.recording import record

        record("on_failure", task_id, {"type": type(exc).__name__, "message": str(exc)})


@safetynet.task(bind=True, base=AlertingTask, max_retries=1)
def alerting_send(self, to):
    try:
        send_mail(to)
    except smtplib.SMTPException as exc:
        raise self.retry(exc=exc, countdown=1)


@safetynet.task(bind=True, retry_policy=RetryPolicy(max_attempts=6, backoff=1, jitter="none", max_delay=60),
                retry_on=[http_status(429)])
def rate_limited_call(self):
    return self.attempt


@safetynet.task(retry_policy=RetryPolicy(max_attempts=None, backoff=10, jitter="none", deadline=35),
                retry_on=[ConnectionError])
def until_deadline():
    raise ConnectionError("still down")


@safetynet.task(retry_policy=RetryPolicy(max_attempts=60, backoff=0, jitter="none"), retry_on=[ConnectionError])
def many_retries():
    raise ConnectionError("x" * 400)


@safetynet.task(bind=True)
def ignored(self):
    from celery.exceptions import Ignore

    raise Ignore()


@safetynet.task(dont_autoretry_for=(KeyError,))
def only_dont_autoretry():
    raise KeyError("k")


@safetynet.task(bind=True, track_started=True, max_retries=2)
def tracked(self):
    import time

    time.sleep(0.8)
    if self.request.retries == 0:
        raise self.retry(exc=ConnectionError("once"), countdown=1)
    return self.attempt


@safetynet.task(bind=True, max_retries=1)
def retries_without_exc(self):
    raise self.retry(countdown=1)


# -- idempotency ---------------------------------------------------------------------------

#: What the idempotent test bodies ran, in this process (eager tests).
RUNS = []


@safetynet.task(idempotency_key="charge-{order_id}")
def idempotent_charge(order_id):
    RUNS.append(f"charge-{order_id}")
    return f"charged-{order_id}"


@safetynet.task(idempotency_key="early-{n}", acks_late=False)
def idempotent_early_ack(n):
    return n


@safetynet.task(idempotency_key=lambda n, region: f"order/{region}/{n}")
def keyed_by_callable(n, region):
    return n


@safetynet.task(idempotency_key="report-{name}", unique_for=60)
def unique_report(name):
    return name


@safetynet.task(acks_late=True)
def late_without_key():
    return None


@safetynet.task(bind=True, idempotency_key="self-retry-{n}", max_retries=3)
def idempotent_self_retry(self, n):
    """Calls self.retry() inside its body's transaction."""
    raise self.retry(exc=ConnectionError("upstream down"), countdown=5)
