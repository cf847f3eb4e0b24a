"""Every final failure lands in the dead-letter store exactly once; replay makes them succeed.

Real worker processes on the real Redis (broker, results) and PostgreSQL (the store).
"""

import json
import time
import uuid
from collections import Counter
from pathlib import Path

import pytest
from django.db import connections
from kombu import Connection, Exchange, Producer

from tests.fixtures import dead_letter_tasks, late_deployed_tasks, recording
from tests.fixtures.tcp_proxy import TcpProxy
from tests.integration.conftest import BROKERS, Worker, configure_app

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BROKER, BACKEND = BROKERS["redis"]

# category -> (how many, expected reason or None when it succeeds)
MIX = {
    "ok": (400, None),
    "flaky": (150, None),
    "permanent": (100, "permanent_error"),
    "exhausted": (100, "retries_exhausted"),
    "slow": (40, "time_limit"),
    "rejecting": (60, "rejected"),
    "unknown": (75, "unknown_task"),
    "undecodable": (75, "undecodable"),
}


@pytest.fixture
def app():
    return configure_app(BROKER, BACKEND)


@pytest.fixture
def fault():
    recording.client().set(dead_letter_tasks.FAULT_KEY, 1)
    yield
    recording.client().delete(dead_letter_tasks.FAULT_KEY)


def start_worker(tmp_path, worker_database, spool_dir, app, name, **env):
    return Worker(name, BROKER, BACKEND, tmp_path, concurrency=4, database=worker_database,
                  spool_dir=spool_dir, extra_env=env).start(app)


def publish_undecodable(app, queue, task_id, n):
    """A task message in a content type this worker does not accept: it cannot be decoded there."""
    with Connection(BROKER) as connection:
        producer = Producer(connection)
        producer.publish(
            json.dumps([[n], {}, {"callbacks": None, "errbacks": None, "chain": None, "chord": None}]),
            exchange=Exchange(""), routing_key=queue, content_type="application/x-unknown", content_encoding="utf-8",
            headers={"lang": "py", "task": "tests.fixtures.dead_letter_tasks.ok", "id": task_id, "retries": 0, "root_id": task_id,
                     "parent_id": None, "group": None, "eta": None, "expires": None, "timelimit": [None, None],
                     "argsrepr": repr([n]), "kwargsrepr": "{}", "origin": "test"},
        )


def send_mix(app, queue):
    """Send the 1,000 tasks; return {task_id: category}."""
    sent = {}
    for category, (count, _) in MIX.items():
        for n in range(count):
            if category == "unknown":
                task_id = late_deployed_tasks.late.apply_async((n,), queue=queue).id
            elif category == "undecodable":
                task_id = str(uuid.uuid4())
                publish_undecodable(app, queue, task_id, n)
            else:
                task_id = getattr(dead_letter_tasks, category).apply_async((n,), queue=queue).id
            sent[task_id] = category
    return sent


def succeeded(app, task_ids):
    """The ids among ``task_ids`` whose result is SUCCESS (read straight from the Redis backend)."""
    ids = list(task_ids)
    keys = [app.backend.get_key_for_task(task_id) for task_id in ids]
    done = set()
    for start in range(0, len(keys), 500):
        for task_id, raw in zip(ids[start:start + 500], app.backend.client.mget(keys[start:start + 500]), strict=True):
            if raw and json.loads(raw)["status"] == "SUCCESS":
                done.add(task_id)
    return done


def dead_letters(task_ids):
    from safetynet.models import DeadLetter

    return list(DeadLetter.objects.filter(task_id__in=list(task_ids)))


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.5)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def test_a_thousand_mixed_tasks_each_end_once_and_replay_makes_them_succeed(
    app, fault, tmp_path, worker_database, spool_dir,
):
    from django.core.management import call_command

    from safetynet.models import DeadLetter

    worker = start_worker(tmp_path, worker_database, spool_dir, app, "mix")
    try:
        sent = send_mix(app, worker.queue)
        assert len(sent) == 1000

        def settled():
            ok, dead = succeeded(app, sent), dead_letters(sent)
            return (ok, dead) if len(ok) + len(dead) >= len(sent) else None

        ok, dead = wait_until(settled, 240, "every task to succeed or be dead-lettered")
    finally:
        worker.stop()

    # exactly once, with the right reason, and nothing both succeeded and dead
    assert len(ok) + len(dead) == len(sent) == 1000
    assert len({row.task_id for row in dead}) == len(dead)
    both = [(sent[row.task_id], row.reason, row.detail) for row in dead if row.task_id in ok]
    assert not both, f"succeeded and dead-lettered (category, reason, detail): {both}"
    expected = Counter({reason: count for count, reason in MIX.values() if reason})
    expected_categories = Counter()
    for category, (count, reason) in MIX.items():
        expected_categories[category] = count if reason else 0
    assert Counter(row.reason for row in dead) == expected
    for row in dead:
        assert MIX[sent[row.task_id]][1] == row.reason, (row.task_id, sent[row.task_id], row.reason)
    assert {sent[task_id] for task_id in ok} == {"ok", "flaky"}
    slow = [row for row in dead if row.reason == "time_limit"]
    assert all(row.exception_type.endswith("TimeLimitExceeded") for row in slow)
    exhausted = [row for row in dead if row.reason == "retries_exhausted"]
    assert all(row.attempts == 3 and len(row.history) == 3 for row in exhausted)
    unknown = [row for row in dead if row.reason == "unknown_task"]
    assert all(row.task_name == "tests.fixtures.late_deployed_tasks.late" and row.args for row in unknown)

    # fix the fault and deploy the missing task, then replay everything
    recording.client().delete(dead_letter_tasks.FAULT_KEY)
    fixed = start_worker(tmp_path, worker_database, spool_dir, app, "fixed", SAFETYNET_TEST_INCLUDE="tests.fixtures.late_deployed_tasks")
    try:
        call_command("safetynet", "dead", "replay", "--all", "--queue", fixed.queue, stdout=open("/dev/null", "w"))
        rows = list(DeadLetter.objects.filter(task_id__in=list(sent)))
        assert all(row.status == "replayed" and row.replayed_task_id for row in rows)
        replayed = {row.replayed_task_id for row in rows}
        wait_until(lambda: len(succeeded(app, replayed)) == len(replayed), 180, "every replayed task to succeed")
    finally:
        fixed.stop()
    assert len(ok) + len(replayed) == 1000
    assert not dead_letters(replayed)  # nothing died again


def test_a_garbage_body_is_recorded_and_replay_refuses_it(app, tmp_path, worker_database, spool_dir):
    from safetynet import deadletter
    from safetynet.models import DeadLetter

    worker = start_worker(tmp_path, worker_database, spool_dir, app, "garbage")
    task_id = str(uuid.uuid4())
    try:
        with Connection(BROKER) as connection:
            Producer(connection).publish(
                "{this is not json", exchange=Exchange(""), routing_key=worker.queue,
                content_type="application/json", content_encoding="utf-8",
                headers={"lang": "py", "task": "tests.fixtures.dead_letter_tasks.ok", "id": task_id},
            )
        [row] = wait_until(lambda: list(DeadLetter.objects.filter(task_id=task_id)), 30, "the undecodable record")
    finally:
        worker.stop()
    assert row.reason == "undecodable" and row.raw_body and "body" in row.redacted
    [outcome] = deadletter.replay(row)
    assert outcome.new_task_id is None and "could not be decoded" in outcome.error
    row.refresh_from_db()
    assert row.status == "dead" and row.replay_count == 0


def test_no_dead_letter_is_lost_while_postgresql_is_down(app, fault, tmp_path, worker_database, spool_dir):
    """The worker reaches PostgreSQL through a proxy the test cuts: for the worker the server is gone (its
    connections dropped, new ones refused), while the shared server keeps serving everything else."""
    from safetynet.models import DeadLetter

    database = connections["default"].settings_dict
    proxy = TcpProxy(database["HOST"] or "127.0.0.1", int(database["PORT"] or 5432)).start()
    worker = start_worker(tmp_path, worker_database, spool_dir, app, "pgdown", SAFETYNET_TEST_DB_PORT=str(proxy.port))
    try:
        proxy.cut()
        results = [dead_letter_tasks.permanent.apply_async((n,), queue=worker.queue) for n in range(20)]
        for result in results:
            result.get(timeout=60, propagate=False)
            assert result.state == "FAILURE"
        ids = [result.id for result in results]
        wait_until(lambda: {path.stem for path in Path(spool_dir).glob("*.json")} >= set(ids) or None, 30,
                   "every record spooled")
        assert not DeadLetter.objects.filter(task_id__in=ids).exists()
        proxy.restore()
        # the worker's flusher moves them in once the database answers again
        wait_until(lambda: DeadLetter.objects.filter(task_id__in=ids).count() == 20, 60, "the spool to be flushed")
        assert not [path for path in Path(spool_dir).glob("*.json") if path.stem in ids]
    finally:
        worker.stop()
        proxy.stop()
    rows = DeadLetter.objects.filter(task_id__in=ids)
    assert rows.count() == 20 and {row.reason for row in rows} == {"permanent_error"}


def test_a_card_token_is_never_stored_nor_logged(app, tmp_path, worker_database, spool_dir):
    from safetynet.models import DeadLetter

    secret = "tok_live_SECRET123"
    worker = start_worker(tmp_path, worker_database, spool_dir, app, "secret")
    try:
        result = dead_letter_tasks.charge.apply_async((42,), {"card_token": secret}, queue=worker.queue)
        result.get(timeout=60, propagate=False)
        [row] = wait_until(lambda: list(DeadLetter.objects.filter(task_id=result.id)), 30, "the dead letter")
    finally:
        worker.stop()
    assert row.kwargs == {"card_token": "[redacted]"} and row.redacted == ["kwargs.card_token"]
    with connections["default"].cursor() as cursor:
        cursor.execute("SELECT * FROM safetynet_deadletter WHERE task_id = %s", [result.id])
        assert secret not in repr(cursor.fetchall())
    assert secret not in worker.log.read_text()


def test_a_ten_megabyte_argument_is_cut_on_every_path_that_records(app, fault, tmp_path, worker_database, spool_dir):
    """The worker child (the core decided), the main process (a hard time limit) and the consumer (an unknown
    task) each store a marker, not the 10 MB; the child's 10 MB exception message is cut too."""
    from safetynet import conf, deadletter
    from safetynet.models import DeadLetter

    huge = "x" * (10 * 1024 * 1024)
    worker = start_worker(tmp_path, worker_database, spool_dir, app, "huge")
    try:
        sent = {
            "permanent_error": dead_letter_tasks.permanent.apply_async((huge,), queue=worker.queue).id,
            "time_limit": dead_letter_tasks.slow.apply_async((huge,), queue=worker.queue).id,
            "unknown_task": late_deployed_tasks.late.apply_async((huge,), queue=worker.queue).id,
        }

        def recorded():
            found = {row.reason: row for row in DeadLetter.objects.filter(task_id__in=sent.values())}
            return found if len(found) == 3 else None

        rows = wait_until(recorded, 90, "three dead letters")
    finally:
        worker.stop()
    for reason, task_id in sent.items():
        row = rows[reason]
        assert row.task_id == task_id
        [marker] = row.args
        assert deadletter.is_truncated(marker) and marker["bytes"] == len(huge) + 2, reason
        with connections["default"].cursor() as cursor:
            cursor.execute("SELECT length(t::text) FROM safetynet_deadletter t WHERE id = %s", [row.pk])
            assert cursor.fetchone()[0] < 100_000, reason
    message = rows["permanent_error"].exception_message
    assert len(message) <= conf.get().dead_letter_max_message_chars and "characters in all, sha256" in message
    [outcome] = deadletter.replay(rows["permanent_error"])
    assert "args[0] were cut when stored" in outcome.error
