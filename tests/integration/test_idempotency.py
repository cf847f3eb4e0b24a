"""Once-only effects and crash safety, on real prefork workers, Redis and PostgreSQL.

- a duplicate that arrives while the first run is in progress is deferred, then gets the
  stored result; the heartbeat keeps a run longer than its lease from being taken over;
- a later duplicate gets the stored result without running the body;
- a claim whose worker was killed is taken over once its lease runs out; the dead run's
  ledger row was rolled back with it;
- a task that kills its worker is dead-lettered as crash_loop after max_deliveries while the
  worker goes on serving; one acknowledged early is recorded as worker_lost;
- a hard time limit uses up an attempt and is retried; a soft one is transient.
"""

import os
import signal
import time
import uuid

import pytest
from django.db import connection

from safetynet import schedule
from safetynet.models import DeadLetter, IdempotencyClaim, ScheduledMessage
from tests.fixtures import idempotent_tasks, recording, tasks
from tests.integration.conftest import BROKERS, Worker, configure_app, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BROKER, BACKEND = BROKERS["redis"]


@pytest.fixture
def app():
    return configure_app(BROKER, BACKEND)


@pytest.fixture
def ledger():
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {idempotent_tasks.LEDGER} (order_id text, task_id text)")
        cursor.execute(f"DELETE FROM {idempotent_tasks.LEDGER}")

    def rows(order_id):
        with connection.cursor() as cursor:
            cursor.execute(f"SELECT task_id FROM {idempotent_tasks.LEDGER} WHERE order_id = %s", [order_id])
            return [task_id for (task_id,) in cursor.fetchall()]

    return rows


@pytest.fixture
def workers(tmp_path, worker_database, spool_dir, app):
    started = []

    def start(name, concurrency=4):
        worker = Worker(name, BROKER, BACKEND, tmp_path / name, concurrency=concurrency, database=worker_database,
                        spool_dir=spool_dir)
        (tmp_path / name).mkdir(exist_ok=True)
        started.append(worker.start(app))
        return worker

    yield start
    for worker in started:
        worker.stop()


def order():
    return f"o-{uuid.uuid4().hex[:10]}"


def test_a_duplicate_in_progress_is_deferred_then_gets_the_stored_result(workers, ledger):
    worker = workers("defer")
    order_id = order()
    # The first run takes 5 s, more than twice its 2 s lease: only the heartbeat keeps it.
    first = idempotent_tasks.pay.apply_async((order_id, 5.0), queue=worker.queue)
    wait_until(lambda: idempotent_tasks.runs(f"pay-{order_id}") == 1, 30, "the first run started")
    second = idempotent_tasks.pay.apply_async((order_id,), queue=worker.queue)
    assert first.get(timeout=60)["task_id"] == first.id
    assert second.get(timeout=60) == first.get()  # the stored result, not a second run
    assert idempotent_tasks.runs(f"pay-{order_id}") == 1
    assert ledger(order_id) == [first.id]
    deferrals = recording.read("retrying", second.id)
    assert deferrals and all(entry["action"] == "snooze" for entry in deferrals)
    assert "is in progress in task " + first.id in deferrals[0]["message"]
    row = IdempotencyClaim.objects.get(key=f"pay-{order_id}")
    assert (row.state, row.task_id, row.deliveries) == ("succeeded", first.id, 1)


def test_a_later_duplicate_gets_the_stored_result_without_running(workers, ledger):
    worker = workers("stored")
    order_id = order()
    first = idempotent_tasks.pay.apply_async((order_id,), queue=worker.queue).get(timeout=30)
    again = idempotent_tasks.pay.apply_async((order_id,), queue=worker.queue)
    assert again.get(timeout=30) == first
    assert first == {"order": order_id, "key": f"pay-{order_id}", "task_id": first["task_id"]}
    assert idempotent_tasks.runs(f"pay-{order_id}") == 1
    assert ledger(order_id) == [first["task_id"]]
    assert recording.read("retrying", again.id) == []


def test_the_claim_of_a_killed_worker_is_taken_over_when_its_lease_runs_out(workers, ledger):
    doomed, survivor = workers("doomed", concurrency=1), workers("survivor")
    order_id = order()
    idempotent_tasks.pay.apply_async((order_id, 60.0), queue=doomed.queue)
    wait_until(lambda: idempotent_tasks.runs(f"pay-{order_id}") == 1, 30, "the first run started")
    os.killpg(doomed.process.pid, signal.SIGKILL)  # the whole worker: no one can release the claim
    doomed.process.wait(timeout=10)
    killed_at = time.time()
    takeover = idempotent_tasks.pay.apply_async((order_id,), queue=survivor.queue)
    result = takeover.get(timeout=60)
    assert result["task_id"] == takeover.id
    assert idempotent_tasks.runs(f"pay-{order_id}") == 2
    assert ledger(order_id) == [takeover.id]  # the killed run's row died with its transaction
    row = IdempotencyClaim.objects.get(key=f"pay-{order_id}")
    assert (row.state, row.task_id, row.deliveries) == ("succeeded", takeover.id, 2)
    # It waited for the lease (2 s after the last heartbeat), not for a timeout of the run.
    deferrals = recording.read("retrying", takeover.id)
    assert deferrals, "the takeover should have waited for the lease"
    assert time.time() - killed_at < 30


def test_a_task_that_kills_its_worker_is_dead_lettered_as_crash_loop_and_the_worker_goes_on(workers):
    worker = workers("poison", concurrency=2)
    name = f"poison-{uuid.uuid4().hex[:8]}"
    poison = idempotent_tasks.kills_its_worker.apply_async((name,), queue=worker.queue)
    wait_until(lambda: DeadLetter.objects.filter(task_id=poison.id).exists(), 90, "the crash_loop dead letter")
    row = DeadLetter.objects.get(task_id=poison.id)
    assert row.reason == "crash_loop"
    assert "died 3 times" in row.detail and "max_deliveries=3" in row.detail
    assert row.exception_type == "safetynet.exceptions.CrashLoop"
    assert row.kwargs == {} and row.args == [name]
    assert idempotent_tasks.runs(name) == 3  # 3 deliveries, then no more
    assert poison.get(propagate=False, timeout=10) is not None and poison.state == "FAILURE"
    # The worker still serves: other tasks run, and the poison does not come back.
    assert tasks.ping.apply_async(queue=worker.queue).get(timeout=30) == "pong"
    order_id = order()
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {idempotent_tasks.LEDGER} (order_id text, task_id text)")
    assert idempotent_tasks.pay.apply_async((order_id,), queue=worker.queue).get(timeout=30)["order"] == order_id
    time.sleep(2)
    assert idempotent_tasks.runs(name) == 3
    assert DeadLetter.objects.filter(task_id=poison.id).count() == 1


def test_a_task_acknowledged_early_whose_worker_dies_is_recorded_as_worker_lost(workers):
    worker = workers("early")
    name = f"early-{uuid.uuid4().hex[:8]}"
    lost = idempotent_tasks.dies_acknowledged_early.apply_async((name,), queue=worker.queue)
    wait_until(lambda: DeadLetter.objects.filter(task_id=lost.id).exists(), 60, "the worker_lost dead letter")
    row = DeadLetter.objects.get(task_id=lost.id)
    assert row.reason == "worker_lost" and "acks_late=False" in row.detail
    assert row.exception_type == "billiard.exceptions.WorkerLostError"
    assert idempotent_tasks.runs(name) == 1


def test_a_hard_time_limit_uses_an_attempt_and_is_retried(workers):
    worker = workers("hard")
    name = f"hard-{uuid.uuid4().hex[:8]}"
    result = idempotent_tasks.slow_first_time.apply_async((name,), queue=worker.queue)
    assert result.get(timeout=60) == name
    assert idempotent_tasks.runs(name) == 2
    [retry] = recording.read("retrying", result.id)
    assert retry["exception"] == "billiard.exceptions.TimeLimitExceeded"
    assert retry["action"] == "retry" and retry["reason"].startswith("hard time limit")
    assert not DeadLetter.objects.filter(task_id=result.id).exists()


def test_a_soft_time_limit_is_transient_by_default(workers):
    worker = workers("soft")
    name = f"soft-{uuid.uuid4().hex[:8]}"
    result = idempotent_tasks.soft_slow_first_time.apply_async((name,), queue=worker.queue)
    assert result.get(timeout=60) == name
    [retry] = recording.read("retrying", result.id)
    assert retry["exception"] == "billiard.exceptions.SoftTimeLimitExceeded"
    assert "DEFAULT_RETRY_ON" in retry["reason"]


def test_hard_time_limits_of_an_idempotent_task_free_its_claim_and_are_not_crashes(workers):
    worker = workers("hard-idem")
    name = f"hard-idem-{uuid.uuid4().hex[:8]}"
    result = idempotent_tasks.idempotent_slow_three_times.apply_async((name,), queue=worker.queue)
    assert result.get(timeout=90) == name
    assert idempotent_tasks.runs(name) == 4
    entries = recording.read("retrying", result.id)
    assert [entry["action"] for entry in entries] == ["retry"] * 3  # no deferral behind a dead run's lease
    row = IdempotencyClaim.objects.get(key=f"slow-{name}")
    assert (row.state, row.deliveries) == ("succeeded", 1)


def test_a_duplicate_waits_while_the_first_waits_for_its_retry(workers):
    worker = workers("handover")
    order_id = order()
    first = idempotent_tasks.flaky_pay.apply_async((order_id,), queue=worker.queue)
    wait_until(lambda: recording.read("retrying", first.id), 30, "the first attempt failed and scheduled a retry")
    duplicate = idempotent_tasks.flaky_pay.apply_async((order_id,), queue=worker.queue)  # during the 3 s wait
    result = first.get(timeout=60)
    assert result == {"order": order_id, "task_id": first.id, "attempt": 2}
    assert duplicate.get(timeout=60) == result
    assert idempotent_tasks.runs(f"flaky-{order_id}") == 2  # the first's two attempts; the duplicate never ran
    assert {entry["action"] for entry in recording.read("retrying", duplicate.id)} == {"snooze"}
    row = IdempotencyClaim.objects.get(key=f"flaky-{order_id}")
    assert (row.state, row.task_id, row.deliveries) == ("succeeded", first.id, 1)  # the hand-over is no crash


def test_a_message_the_broker_lost_is_sent_again_and_runs_once(tmp_path, worker_database, spool_dir, app, ledger,
                                                               settings):
    """kombu's Redis transport can lose a message it popped (a worker killed, Redis restarted)."""
    import redis

    settings.SAFETYNET = {**settings.SAFETYNET, "LOST_MESSAGE_SECONDS": 2}
    worker = Worker("lost", BROKER, BACKEND, tmp_path, concurrency=2, database=worker_database, spool_dir=spool_dir,
                    extra_env={"SAFETYNET_TEST_LOST_MESSAGE_SECONDS": "2"})
    order_id = order()
    sent = idempotent_tasks.pay.apply_async((order_id,), queue=worker.queue)
    kept = ScheduledMessage.objects.get(key=sent.id)  # kept until a run claims it
    assert (kept.kind, kept.state, kept.claim_key, schedule.unpack(kept.message)[0]) == (
        "sent", "published", f"pay-{order_id}", [order_id])
    assert not IdempotencyClaim.objects.filter(key=f"pay-{order_id}").exists()
    assert redis.Redis.from_url(BROKER).delete(worker.queue) == 1  # the message is gone from the broker
    worker.start(app)
    try:
        assert sent.get(timeout=60)["task_id"] == sent.id
        row = IdempotencyClaim.objects.get(key=f"pay-{order_id}")
        assert (row.state, row.deliveries) == ("succeeded", 1)
        assert ScheduledMessage.objects.get(key=sent.id).publishes == 2  # sent once more, by the relay
        assert ledger(order_id) == [sent.id]
        assert "was published and no worker took it in time; sent it again" in worker.log.read_text()
    finally:
        worker.stop()
