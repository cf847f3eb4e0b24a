"""The Celery app and the two payment tasks of ``bench/chaos.py``, imported by its worker subprocesses.

Both tasks do the same work: charge an order at the payment gateway stub, then write one
ledger row. ``safetynet_charge`` is the safetynet way (an idempotency key, sent to the
gateway too); ``celery_charge`` is plain Celery written the way the classic tutorials write
it (``autoretry_for`` network errors, exponential ``retry_backoff``, early acks). Final
failures of the plain task are written to ``chaos_failure`` by a ``task_failure`` receiver;
safetynet writes its own dead letters.

Environment (set by ``chaos.py``):

    SAFETYNET_CHAOS_BROKER      the broker: the private Redis of the run, or RabbitMQ
    SAFETYNET_CHAOS_GATEWAY     base URL of the gateway stub
    SAFETYNET_CHAOS_VISIBILITY  broker visibility timeout, seconds (default 10)
    SAFETYNET_CHAOS_READY_DIR   where a worker drops a file when it is ready
"""

from __future__ import annotations

import os
from pathlib import Path

import django

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "_chaos_settings")
django.setup()

import requests  # noqa: E402
from celery import Celery, signals  # noqa: E402
from django.db import connection  # noqa: E402

import safetynet  # noqa: E402

#: The gateway client's timeout: the stub stalls longer than this on the charges it "loses".
GATEWAY_TIMEOUT = 1.0
SAFETYNET_TASK = "chaos.safetynet_charge"
CELERY_TASK = "chaos.celery_charge"
VISIBILITY_TIMEOUT = float(os.environ.get("SAFETYNET_CHAOS_VISIBILITY", "10"))

BROKER_URL = os.environ.get("SAFETYNET_CHAOS_BROKER", "redis://127.0.0.1:6379/0")

# The same broker settings for both systems. Redis' default visibility timeout is an hour:
# a message a killed worker held would come back after that. A short one brings it back in
# seconds; the sweep for such messages runs every 2 s instead of every 100 s, and its mutex
# (which a killed worker may leave behind) expires after 10 s instead of 5 minutes.
BROKER_TRANSPORT_OPTIONS = {
    "visibility_timeout": VISIBILITY_TIMEOUT,
    "unacked_restore_interval": 2,
    "unacked_restore_throttle": 1,
    "unacked_mutex_expire": 10,
}

app = Celery("safetynet_chaos")
app.conf.update(
    broker_url=BROKER_URL,
    broker_transport_options=BROKER_TRANSPORT_OPTIONS if BROKER_URL.startswith("redis") else {},
    result_backend=None,
    task_ignore_result=True,
    task_serializer="json",
    accept_content=["json"],
    broker_connection_retry_on_startup=True,
    worker_send_task_events=False,
    worker_enable_remote_control=False,  # no pidbox queues left on a shared RabbitMQ
    task_send_sent_event=False,
)
app.set_default()


def _gateway() -> str:
    return os.environ["SAFETYNET_CHAOS_GATEWAY"]


def _insert_ledger_row(order_id: int, system: str, charge_id: str) -> None:
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO chaos_ledger (order_id, system, charge_id) VALUES (%s, %s, %s)",
            [order_id, system, charge_id],
        )


@safetynet.task(
    bind=True,
    name=SAFETYNET_TASK,
    idempotency_key="charge-{order_id}",
    idempotency_lease=5,
    retry_policy=safetynet.RetryPolicy(max_attempts=10, backoff=safetynet.Exponential(0.2, 2.0), max_delay=5),
    ignore_result=True,
)
def safetynet_charge(self, order_id: int, amount: int) -> str:
    """Charge the order once, with the task's idempotency key, and write its ledger row."""
    response = requests.post(
        f"{_gateway()}/charge",
        json={"order_id": order_id, "amount": amount},
        headers={"Idempotency-Key": self.idempotency_key},
        timeout=GATEWAY_TIMEOUT,
    )
    response.raise_for_status()
    charge_id = response.json()["charge_id"]
    _insert_ledger_row(order_id, "safetynet", charge_id)  # commits with the claim (idempotency_atomic)
    return charge_id


@app.task(
    bind=True,
    name=CELERY_TASK,
    autoretry_for=(requests.exceptions.ConnectionError, requests.exceptions.Timeout),
    retry_backoff=True,
    retry_backoff_max=8,
    max_retries=10,
)
def celery_charge(self, order_id: int, amount: int) -> str:
    """The same, as the tutorials write it: retry on network errors with exponential backoff."""
    response = requests.post(f"{_gateway()}/charge", json={"order_id": order_id, "amount": amount},
                             timeout=GATEWAY_TIMEOUT)
    response.raise_for_status()
    charge_id = response.json()["charge_id"]
    _insert_ledger_row(order_id, "celery", charge_id)
    return charge_id


@signals.task_failure.connect(weak=False)
def record_celery_failure(sender=None, task_id=None, exception=None, kwargs=None, **_):
    """A plain Celery task that failed for good: one row, so the benchmark can count it as dead."""
    if getattr(sender, "name", None) != CELERY_TASK:
        return
    with connection.cursor() as cursor:
        cursor.execute(
            "INSERT INTO chaos_failure (order_id, system, task_id, exception) VALUES (%s, 'celery', %s, %s)",
            [(kwargs or {}).get("order_id"), task_id, type(exception).__name__],
        )


@signals.worker_ready.connect(weak=False)
def announce_ready(sender=None, **_):
    """Drop a file the benchmark waits for: this worker is consuming."""
    directory = os.environ.get("SAFETYNET_CHAOS_READY_DIR")
    if directory:
        Path(directory, f"ready.{os.getpid()}").touch()
