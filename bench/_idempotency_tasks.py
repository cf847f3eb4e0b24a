"""The tasks of ``bench/idempotency.py``, on the app of ``bench/overhead.py`` (``celery -A _idempotency_tasks``).

- ``diy``: a plain Celery task guarded the way tutorials teach: a row per operation (``get_or_create`` by
  key), an "already done?" check, then the body and a status update in ``transaction.atomic()``;
- ``realistic_plain`` / ``realistic_idempotent``: a body that writes one ledger row with the ORM and waits
  5 ms (an API call), plain and idempotent;
- ``retry_plain`` / ``retry_safetynet``: fails once and retries at once (``self.retry(countdown=0)``), then
  succeeds; the second run counts itself, so the benchmark knows when every retry has run.
"""

from __future__ import annotations

import time

from _overhead_tasks import NOOPS, _client, app  # noqa: F401  (first: it configures Django; app: the worker's)
from celery import shared_task
from django.db import transaction

import safetynet
from _bench_app.models import LedgerRow, Operation

#: The realistic body's wait: an API call.
API_CALL_SECONDS = 0.005


@shared_task(name="bench.diy_noop", ignore_result=True)
def diy_noop(n: str) -> None:
    """The no-op behind the hand-written guard."""
    operation, _ = Operation.objects.get_or_create(key=f"noop-{n}")
    if operation.status == "done":
        return operation.result
    with transaction.atomic():
        result = None  # the body
        Operation.objects.filter(pk=operation.pk).update(status="done", result=result)
    return result


def _realistic_body(n: str) -> None:
    LedgerRow.objects.create(name=n)
    time.sleep(API_CALL_SECONDS)


@shared_task(name="bench.realistic_plain", ignore_result=True)
def realistic_plain(n: str) -> None:
    _realistic_body(n)


@safetynet.task(name="bench.realistic_idempotent", ignore_result=True, idempotency_key="realistic-{n}")
def realistic_idempotent(n: str) -> None:
    _realistic_body(n)


def _retried(key: str) -> None:
    _client().incr(key)


@shared_task(name="bench.retry_plain", bind=True, ignore_result=True, max_retries=3)
def retry_plain(self, counter: str = "") -> None:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    _retried(counter)


@safetynet.task(name="bench.retry_safetynet", bind=True, ignore_result=True, max_retries=3)
def retry_safetynet(self, counter: str = "") -> None:
    if self.request.retries == 0:
        raise self.retry(countdown=0)
    _retried(counter)


NOOPS.update({
    "diy": diy_noop, "realistic_plain": realistic_plain, "realistic_idempotent": realistic_idempotent,
    "retry_plain": retry_plain, "retry_safetynet": retry_safetynet,
})
