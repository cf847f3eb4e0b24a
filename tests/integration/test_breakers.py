"""A breaker's state is shared: one worker process opens it, another defers its tasks, on real Redis."""

import time
import uuid

import pytest
import redis
from celery import states

from safetynet import breakers
from tests.fixtures import breaker_tasks, recording
from tests.integration.conftest import BROKERS, Worker, configure_app, wait_for

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]


@pytest.fixture
def two_workers(tmp_path, worker_database, spool_dir):
    broker, backend = BROKERS["redis"]
    app = configure_app(broker, backend)
    redis.Redis.from_url(broker).delete("safetynet:breaker:upstream", "safetynet:breaker:upstream:window",
                                        "safetynet:breaker:upstream:probes")
    started = []
    try:
        for name in ("a", "b"):
            started.append(Worker(name, broker, backend, tmp_path, concurrency=2, database=worker_database,
                                  spool_dir=spool_dir).start(app))
        yield started
    finally:
        for worker in started:
            worker.stop()


def test_one_worker_opens_the_breaker_and_the_other_defers_without_calling(two_workers):
    a, b = two_workers
    run = uuid.uuid4().hex[:8]
    failing = [breaker_tasks.call_upstream.apply_async((f"{run}-fail-{i}", True), queue=a.queue) for i in range(3)]
    for result in failing:
        wait_for(result, timeout=60)
    assert breakers.state_of("upstream")["state"] == "open"  # opened in worker a's processes
    opened = time.time()

    waiting = breaker_tasks.call_upstream.apply_async((f"{run}-later", False), queue=b.queue)
    time.sleep(1.5)
    assert breaker_tasks.runs(f"{run}-later") == 0  # worker b saw it open: the upstream was not called
    assert waiting.state in (states.PENDING, states.RETRY)
    wait_for(waiting, timeout=60)
    assert waiting.state == states.SUCCESS
    assert waiting.result["attempt"] == 1  # deferred, not retried: no attempt used
    assert waiting.result["worker"].startswith("b-")
    assert time.time() - opened >= 3.5  # not before the breaker could half-open (open_seconds=4)
    assert breaker_tasks.runs(f"{run}-later") == 1
    assert breakers.state_of("upstream")["state"] == "closed"  # its probe succeeded
    retried = recording.read("retrying", waiting.id)
    assert retried and all(entry["action"] == "snooze" for entry in retried)
    assert all("breaker 'upstream' is open" in entry["message"] for entry in retried)
