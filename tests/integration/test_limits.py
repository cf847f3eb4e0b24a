"""Limits shared by real worker processes on real Redis: a killed worker's slots come back within the lease, and
a partitioned limit keeps one customer's backlog from delaying another's calls."""

import os
import signal
import time
import uuid

import pytest
import redis

from safetynet import limits
from tests.fixtures import limit_tasks
from tests.integration.conftest import BROKERS, Worker, configure_app, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BROKER = os.environ.get("SAFETYNET_TEST_BROKER", BROKERS["redis"][0])
BACKEND = os.environ.get("SAFETYNET_TEST_BACKEND", BROKERS["redis"][1])
#: The workers' LIMIT_LEASE_SECONDS: a killed worker's slots are free again within it (docs/limits.md).
LEASE = 3.0


@pytest.fixture
def workers(tmp_path, worker_database, spool_dir):
    app = configure_app(BROKER, BACKEND)
    client = redis.Redis.from_url(BROKER)
    for key in client.scan_iter("safetynet:limit:test-*"):
        client.delete(key)
    started = []

    def start(name, concurrency=2, queue=None):
        worker = Worker(name, BROKER, BACKEND, tmp_path, concurrency=concurrency, database=worker_database,
                        spool_dir=spool_dir, extra_env={
                            "SAFETYNET_TEST_INCLUDE": "tests.fixtures.limit_tasks",
                            "SAFETYNET_TEST_LIMIT_LEASE_SECONDS": str(LEASE),
                            # The killed worker's unacknowledged messages come back to the queue this soon.
                            "SAFETYNET_TEST_VISIBILITY_TIMEOUT": "8",
                        })
        if queue is not None:  # consume another worker's queue (to take over what it left)
            worker.command[worker.command.index(worker.queue)] = queue
            worker.queue = queue
        started.append(worker.start(app))
        return worker

    yield start
    for worker in started:
        worker.stop()


def test_a_killed_workers_slots_are_free_again_within_the_lease_and_no_task_is_lost(workers):
    doomed = workers("doomed", concurrency=2)
    name = f"slots-{uuid.uuid4().hex[:8]}"
    sent = [limit_tasks.hold_slot.apply_async((f"{name}-{index}", 120.0), queue=doomed.queue) for index in range(2)]
    started = redis.Redis.from_url(os.environ.get("SAFETYNET_TEST_RECORD_URL", "redis://127.0.0.1:6379/14"))
    wait_until(lambda: all(started.llen(f"safetynet-tests:limit-started:{name}-{index}") for index in range(2)), 60,
               "both tasks running")
    assert limits.state_of("test-slots")["in_use"] == 2
    time.sleep(LEASE * 1.5)  # longer than the lease: only the heartbeat keeps the slots
    assert limits.state_of("test-slots")["in_use"] == 2
    os.killpg(doomed.process.pid, signal.SIGKILL)  # the whole worker: no one gives the slots back
    doomed.process.wait(timeout=10)
    killed_at = time.time()
    wait_until(lambda: limits.state_of("test-slots")["in_use"] == 0, LEASE + 2, "the slots free again")
    freed_after = time.time() - killed_at
    assert freed_after <= LEASE + 1.0, freed_after
    # No task lost: the messages the killed worker held come back (acks_late) and run on another worker.
    survivor = workers("survivor", concurrency=2, queue=doomed.queue)
    for result in sent:
        assert result.get(timeout=90) in {f"{name}-0", f"{name}-1"}
    for index in range(2):
        assert [run[0].startswith("survivor-") for run in limit_tasks.runs(f"{name}-{index}")] == [True]
    assert survivor.process.poll() is None


def overlapping(runs):
    """The most runs in progress at once."""
    edges = sorted([(start, 1) for _, start, _ in runs] + [(end, -1) for _, _, end in runs],
                   key=lambda edge: (edge[0], edge[1]))
    most = current = 0
    for _, step in edges:
        current += step
        most = max(most, current)
    return most


def test_a_partitioned_limit_keeps_customer_a_s_backlog_from_delaying_customer_b(workers):
    worker = workers("customers", concurrency=2)
    run = uuid.uuid4().hex[:8]
    sent_at = time.time()
    backlog = [limit_tasks.customer_call.apply_async((run, "a", n), queue=worker.queue) for n in range(16)]
    time.sleep(0.5)  # a's backlog is in the queue (and on its limit's line) before b asks
    b_sent = time.time()
    others = [limit_tasks.customer_call.apply_async((run, "b", n), queue=worker.queue) for n in range(3)]
    for result in others:
        assert result.get(timeout=60) in range(3)
    b_done = time.time()
    for result in backlog:
        assert result.get(timeout=120) in range(16)
    a_runs, b_runs = limit_tasks.runs(f"{run}-a"), limit_tasks.runs(f"{run}-b")
    assert len(a_runs) == 16 and len(b_runs) == 3
    # b's three calls: 2 per second of its own, so about a second, not after a's 8 seconds of backlog.
    assert b_done - b_sent < 4.0, b_done - b_sent
    assert max(end for _, _, end in a_runs) - sent_at >= 7.0  # a waited its turns: 16 calls at 2/s
    assert max(start for _, start, _ in b_runs) < max(start for _, start, _ in a_runs) - 3.0
    for runs in (a_runs, b_runs):  # each customer within its own limit: 1 at once, at most 2 a second
        assert overlapping(runs) == 1
        starts = sorted(start for _, start, _ in runs)
        assert all(sum(1 for other in starts if start <= other < start + 1.0) <= 2 for start in starts)
