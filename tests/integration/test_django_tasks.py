"""``django.tasks`` tasks on real workers through safetynet's ``CeleryBackend``: retries seen through
``get_result().refresh()``, a death with its dead letter and a replay that succeeds, ``backoff(exception,
task_result)``, the backend's MAX_ATTEMPTS/BACKOFF, ``run_after`` through the durable schedule, the enqueue modes.
"""

import time
import uuid
from datetime import timedelta

import pytest
from django.db import transaction
from django.utils import timezone

from tests.fixtures import recording
from tests.integration.conftest import BROKERS, Worker, configure_app, wait_until, release_app

compat = pytest.importorskip("safetynet.taskrecords._compat")
if not compat.AVAILABLE:
    pytest.skip(compat.MISSING, allow_module_level=True)

from tests.fixtures import django_tasks as tasks  # noqa: E402  (needs Django's tasks API)

from safetynet import deadletter  # noqa: E402
from safetynet.models import DeadLetter, ScheduledMessage, TaskRecord  # noqa: E402
from safetynet.taskrecords._compat import TaskResultStatus  # noqa: E402

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

READY, RUNNING = TaskResultStatus.READY, TaskResultStatus.RUNNING
SUCCESSFUL, FAILED = TaskResultStatus.SUCCESSFUL, TaskResultStatus.FAILED


@pytest.fixture(scope="module", params=["redis", "rabbitmq+postgresql"])
def worker(request, tmp_path_factory, worker_database, spool_dir):
    broker, backend = BROKERS[request.param]
    app = configure_app(broker, backend)
    running = Worker(f"djtasks-{request.param}", broker, backend, tmp_path_factory.mktemp("djtasks"),
                     concurrency=2, database=worker_database, spool_dir=spool_dir,
                     extra_env={"SAFETYNET_TEST_INCLUDE": "tests.fixtures.django_tasks"}).start(app)
    default_queue = app.conf.task_default_queue
    app.conf.task_default_queue = running.queue  # Django's "default" queue is Celery's default queue
    yield running
    app.conf.task_default_queue = default_queue
    running.stop()
    release_app(app)


def watch(result, timeout=60):
    """Refresh ``result`` until it finishes; return each (status, attempts, errors) seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout
    while True:
        state = (result.status, result.attempts, len(result.errors))
        if not seen or seen[-1] != state:
            seen.append(state)
        if result.is_finished:
            return seen
        assert time.monotonic() < deadline, f"{result.id} not finished after {timeout}s; seen {seen}"
        time.sleep(0.05)
        result.refresh()


def test_transient_twice_then_success(worker):
    name = uuid.uuid4().hex
    result = tasks.flaky_slow.enqueue(name, 2, "s3cr3t-token-value")
    seen = watch(result)
    waiting = [status for status, _, _ in seen[:-1]]
    assert set(waiting) <= {READY, RUNNING} and SUCCESSFUL not in waiting, seen
    # between attempts, waiting for the retry: READY with the failed attempts counted
    assert (READY, 1, 1) in seen and (READY, 2, 2) in seen, seen
    assert result.status == SUCCESSFUL and result.return_value == name
    assert result.attempts == 3 and len(result.worker_ids) == 3
    assert len(result.errors) == 2
    for error in result.errors:
        assert error.exception_class is ConnectionError
        assert f"{name} is down" in error.traceback and "Traceback" in error.traceback
        assert "hunter2" not in error.traceback and "s3cr3t-token-value" not in error.traceback  # redacted
    assert result.started_at < result.last_attempted_at <= result.finished_at
    again = tasks.flaky_slow.get_result(result.id)
    assert (again.status, again.attempts, len(again.errors)) == (SUCCESSFUL, 3, 2)
    assert not DeadLetter.objects.filter(task_id=result.id).exists()


def test_keeps_failing_then_dead_and_its_replay_succeeds_once_the_fault_is_gone(worker):
    name = uuid.uuid4().hex
    recording.client().set(tasks.FAULT, 1)
    try:
        result = tasks.until_fixed.enqueue(name)
        watch(result)
        assert result.status == FAILED
        assert result.attempts == 2 and len(result.errors) == 2
        assert all(error.exception_class is ConnectionError for error in result.errors)
        with pytest.raises(ValueError):
            result.return_value  # noqa: B018
        record = TaskRecord.objects.get(pk=result.id)
        wait_until(lambda: DeadLetter.objects.filter(task_id=result.id).exists(), 20, "its dead letter")
        dead = DeadLetter.objects.get(task_id=result.id)
        assert record.dead_letter_id == dead.id
        assert dead.reason == "retries_exhausted" and dead.attempts == 2
    finally:
        recording.client().delete(tasks.FAULT)
    [outcome] = deadletter.replay(dead, queue=worker.queue, by="test")
    assert outcome.error is None, outcome.error
    new_id = outcome.new_task_id
    replayed = tasks.until_fixed.get_result(new_id)
    assert replayed.status in (READY, RUNNING, SUCCESSFUL)
    watch(replayed)
    assert replayed.status == SUCCESSFUL and replayed.return_value == name and replayed.attempts == 1
    assert TaskRecord.objects.get(pk=new_id).replay_of == result.id
    result.refresh()
    assert result.status == FAILED  # the old result keeps its story


def test_backoff_of_new_features_142_and_max_attempts(worker):
    name = uuid.uuid4().hex
    result = tasks.backs_off.enqueue(name)
    watch(result)
    assert result.status == FAILED and result.attempts == 3 and len(result.errors) == 3
    assert int(recording.client().get(f"safetynet-tests:django-tasks:{name}")) == 3
    wait_until(lambda: DeadLetter.objects.filter(task_id=result.id).exists(), 20, "its dead letter")


def test_backoff_returning_none_stops(worker):
    name = uuid.uuid4().hex
    result = tasks.backoff_stops.enqueue(name)
    watch(result)
    assert result.status == FAILED and result.attempts == 2
    assert [error.exception_class for error in result.errors] == [ConnectionError, ValueError]
    wait_until(lambda: DeadLetter.objects.filter(task_id=result.id).exists(), 20, "its dead letter")
    assert "backoff() returned None" in DeadLetter.objects.get(task_id=result.id).detail


def test_the_backends_max_attempts_and_backoff(worker):
    name = uuid.uuid4().hex
    result = tasks.always_down.using(backend="quick").enqueue(name)
    assert result.backend == "quick"
    started = time.monotonic()
    watch(result)
    assert result.status == FAILED and result.attempts == 2 and len(result.errors) == 2
    assert time.monotonic() - started < 10  # BACKOFF's tenth of a second, not the default policy's wait
    # the same task through the default backend keeps safetynet's default policy (5 attempts)
    assert tasks.always_down.get_result(result.id).backend == "quick"


def test_run_after_waits_in_the_durable_schedule(worker):
    run_after = timezone.now() + timedelta(seconds=4)
    result = tasks.add.using(run_after=run_after).enqueue(20, 22)
    row = ScheduledMessage.objects.get(task_id=result.id)
    assert row.kind == "outbox" and row.state == "scheduled"
    assert abs(row.due_at - run_after.timestamp()) < 1
    assert TaskRecord.objects.get(pk=result.id).run_after == run_after
    time.sleep(2)
    result.refresh()
    assert result.status == READY
    watch(result)
    assert result.status == SUCCESSFUL and result.return_value == 42 and result.started_at >= run_after


def test_enqueue_on_commit_sends_nothing_when_the_transaction_rolls_back(worker):
    class Rollback(Exception):
        pass

    with pytest.raises(Rollback), transaction.atomic():
        lost = tasks.add.using(backend="on_commit").enqueue(1, 1)
        raise Rollback
    with transaction.atomic():
        kept = tasks.add.using(backend="on_commit").enqueue(2, 2)
        time.sleep(1)
        assert not TaskRecord.objects.filter(pk=kept.id, status=SUCCESSFUL).exists()  # not sent before commit
    watch(kept)
    assert kept.status == SUCCESSFUL and kept.return_value == 4
    assert not TaskRecord.objects.filter(pk=lost.id).exists()


def test_enqueue_through_the_outbox(worker):
    with pytest.raises(ZeroDivisionError), transaction.atomic():
        lost = tasks.add.using(backend="outbox").enqueue(1, 1)
        raise ZeroDivisionError
    with transaction.atomic():
        kept = tasks.add.using(backend="outbox").enqueue(3, 3)
        assert ScheduledMessage.objects.filter(task_id=kept.id, kind="outbox").exists()
    watch(kept)
    assert kept.status == SUCCESSFUL and kept.return_value == 6
    assert not TaskRecord.objects.filter(pk=lost.id).exists()
    assert not ScheduledMessage.objects.filter(task_id=lost.id).exists()


def test_takes_context_attempt_on_every_attempt(worker):
    name = uuid.uuid4().hex
    result = tasks.which_attempt.enqueue(name, failures=2)
    watch(result)
    assert result.status == SUCCESSFUL and result.return_value == {"attempt": 3, "id": result.id}
    assert [error.exception_class for error in result.errors] == [ConnectionError, ConnectionError]
    assert "attempt 1 failed" in result.errors[0].traceback and "attempt 2 failed" in result.errors[1].traceback


def test_an_idempotency_key_runs_the_effect_once(worker):
    order = int(uuid.uuid4().int % 1_000_000)
    first = tasks.charge.enqueue(order, 100)
    watch(first)
    second = tasks.charge.enqueue(order, 100)  # the same key: the stored result, not a second run
    watch(second)
    assert first.status == second.status == SUCCESSFUL
    assert first.return_value == second.return_value == {"order_id": order, "amount": 100}
    from safetynet.models import IdempotencyClaim

    claim = IdempotencyClaim.objects.get(key=f"charge-{order}")
    assert claim.state == "succeeded" and claim.task_id == first.id
