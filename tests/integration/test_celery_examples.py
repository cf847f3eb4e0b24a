"""Celery's documented retry patterns, unchanged but for the decorator, on a real prefork worker (Redis, PostgreSQL).

Each behaves as Celery documents it, with safetynet's records on top: one dead letter per task given
up, ``on_failure`` once after the last retry, a late-acked report stored once after its process was
killed, a scanner that swallows its soft limit stopped after two hard limits, and a task that calls
itself to "retry" decided once with one warning.
"""

import time
import uuid

import pytest
from django.db import connection

from safetynet.models import DeadLetter
from tests.fixtures import celery_examples as examples
from tests.fixtures import recording
from tests.integration.conftest import BROKERS, Worker, configure_app, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BROKER, BACKEND = BROKERS["redis"]


@pytest.fixture(scope="module")
def worker(tmp_path_factory, worker_database, spool_dir):
    app = configure_app(BROKER, BACKEND)
    running = Worker("examples", BROKER, BACKEND, tmp_path_factory.mktemp("examples"), concurrency=4,
                     database=worker_database, spool_dir=spool_dir,
                     extra_env={"SAFETYNET_TEST_INCLUDE": "tests.fixtures.celery_examples"}).start(app)
    yield running
    running.stop()


@pytest.fixture
def reports():
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {examples.REPORTS} (name text)")

    def rows(name):
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT count(*) FROM {examples.REPORTS} WHERE name = %s", [name])
            return cursor.fetchone()[0]

    return rows


def unique(prefix):
    return f"{prefix}-{uuid.uuid4().hex[:8]}"


def dead_letter(task_id, timeout=30):
    wait_until(lambda: DeadLetter.objects.filter(task_id=task_id).exists(), timeout, f"a dead letter for {task_id}")
    return DeadLetter.objects.get(task_id=task_id)


def test_bind_and_self_retry_with_a_countdown(worker):
    name = unique("mail")
    result = examples.send_confirmation.apply_async((name,), queue=worker.queue)
    assert result.get(timeout=60) == f"sent {name}"
    assert examples.runs(name) == 3
    waits = [entry["delay"] for entry in recording.read("retrying", result.id)]
    assert waits == [5, 5]  # countdown=5, as asked
    assert not DeadLetter.objects.filter(task_id=result.id).exists()


def test_autoretry_with_exponential_backoff(worker):
    name = unique("capture")
    result = examples.capture_payment.apply_async((name,), queue=worker.queue)
    assert result.get(timeout=60) == f"captured {name}"
    assert examples.runs(name) == 3
    waits = [entry["delay"] for entry in recording.read("retrying", result.id)]
    assert len(waits) == 2 and 0 <= waits[0] <= 1 and 0 <= waits[1] <= 2  # retry_backoff with full jitter


def test_autoretry_gives_up_after_max_retries_with_one_dead_letter(worker):
    name = unique("refund")
    result = examples.refund.apply_async((name,), queue=worker.queue)
    with pytest.raises(examples.GatewayTimeout):
        result.get(timeout=60)
    row = dead_letter(result.id)
    assert examples.runs(name) == 3  # max_retries=2: the first run and two retries
    assert row.reason == "retries_exhausted" and row.attempts == 3
    assert DeadLetter.objects.filter(task_id=result.id).count() == 1


def test_a_base_subclassing_celery_task_calls_on_failure_once_after_the_last_retry(worker):
    name = unique("inventory")
    result = examples.sync_inventory.apply_async((name,), queue=worker.queue)
    with pytest.raises(examples.GatewayTimeout):
        result.get(timeout=60)
    dead_letter(result.id)
    wait_until(lambda: recording.read("examples_on_failure", result.id), 10, "on_failure ran")
    time.sleep(1)  # a second call would show by now
    assert recording.read("examples_on_failure", result.id) == [{"type": "GatewayTimeout", "args": [name]}]
    assert recording.read("examples_on_retry", result.id) == ["GatewayTimeout", "GatewayTimeout"]
    assert recording.read("examples_after_return", result.id) == ["FAILURE"]  # Celery skips it for RETRY
    assert examples.runs(name) == 3


def test_the_apps_own_decorator_with_safetynets_base(worker):
    name = unique("stock")
    result = examples.reserve_stock.apply_async((name,), queue=worker.queue)
    assert result.get(timeout=60) == f"reserved {name} at attempt 2"


def test_a_late_acked_report_is_stored_once_after_its_process_is_killed(worker, reports):
    name = unique("report")
    result = examples.generate_report.apply_async((name,), queue=worker.queue)
    assert result.get(timeout=60) == name
    assert examples.runs(name) == 2  # killed once, delivered again
    assert reports(name) == 1
    assert not DeadLetter.objects.filter(task_id=result.id).exists()
    assert worker.process.poll() is None  # the worker goes on


def test_a_scanner_that_swallows_its_soft_limit_costs_at_most_two_hard_limits(worker):
    name = unique("scan")
    started = time.monotonic()
    result = examples.scan.apply_async((name,), queue=worker.queue)
    row = dead_letter(result.id, timeout=90)
    assert row.reason == "time_limit" and "time_limit_retries=1" in row.detail
    assert examples.runs(name) == 2
    durations = [entry["duration"] for entry in row.history]
    assert len(durations) == 2 and sum(durations) <= 2 * 2 + 1.0  # two kills of the 2 s limit, no more
    assert time.monotonic() - started < 60
    logged = worker.log.read_text().count(f"[{result.id}] gave up after attempt 2: time_limit")
    assert logged == 1  # the final record logs its one line, as every give-up does


def test_a_task_that_calls_itself_is_one_dead_letter_and_one_warning(worker):
    name = unique("feed")
    result = examples.fetch_feed.apply_async((name,), queue=worker.queue)
    with pytest.raises(RecursionError):
        result.get(timeout=60)
    row = dead_letter(result.id)
    assert DeadLetter.objects.filter(task_id=result.id).count() == 1
    assert row.exception_type == "RecursionError" and row.attempts == 1
    assert not any(key.startswith("_safetynet") for key in row.headers)
    time.sleep(0.5)
    log = worker.log.read_text()
    assert log.count(f"[{result.id}] called itself synchronously") == 1
    assert log.count(f"[{result.id}] gave up") == 1
