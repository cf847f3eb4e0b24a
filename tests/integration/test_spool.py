"""Text PostgreSQL cannot store, from a real worker: stored sanitised at once, or through the signed spool.

The worker of the spool test reaches no database (its port points at nothing), so every dead
letter it records is spooled; this process, with the same SECRET_KEY, moves them in.
"""

import time
import uuid

import pytest

from tests.fixtures import dead_letter_tasks
from tests.integration.conftest import BROKERS, Worker, configure_app

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

BROKER, BACKEND = BROKERS["redis"]
NUL_TEXT = "order\x00 7"
CLEAN_TEXT = "order\ufffd 7"


@pytest.fixture
def app():
    return configure_app(BROKER, BACKEND)


def wait_until(condition, timeout, what):
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = condition()
        if value:
            return value
        time.sleep(0.25)
    raise AssertionError(f"timed out after {timeout}s waiting for {what}")


def send_unreadable(queue):
    return dead_letter_tasks.unreadable_text.apply_async((NUL_TEXT, {"key\x00": NUL_TEXT}), queue=queue)


def assert_sanitised(row):
    assert row.reason == "permanent_error"
    assert row.exception_message == f"could not parse {CLEAN_TEXT}"
    assert row.args == [CLEAN_TEXT, {"key\ufffd": CLEAN_TEXT}]
    assert {"args[0]", "args[1].key\ufffd"} <= set(row.redacted)


def test_a_nul_from_a_real_task_is_stored_sanitised_and_blocks_nothing(app, tmp_path, worker_database, spool_dir):
    from safetynet.models import DeadLetter

    worker = Worker("nul", BROKER, BACKEND, tmp_path, concurrency=2, database=worker_database,
                    spool_dir=spool_dir).start(app)
    try:
        first = send_unreadable(worker.queue)
        [row] = wait_until(lambda: list(DeadLetter.objects.filter(task_id=first.id)), 30, "the dead letter")
        after = dead_letter_tasks.charge.apply_async((5,), {"card_token": "x"}, queue=worker.queue)
        wait_until(lambda: DeadLetter.objects.filter(task_id=after.id).exists(), 30, "the next dead letter")
    finally:
        worker.stop()
    assert_sanitised(row)
    assert not list(spool_dir.glob(f"{first.id}*"))  # stored at once, never spooled
    assert "DataError" not in worker.log.read_text()


def test_a_nul_spooled_by_a_worker_without_database_is_stored_sanitised_when_flushed(app, tmp_path, settings,
                                                                                  worker_database):
    from safetynet import deadletter
    from safetynet.models import DeadLetter

    spool = tmp_path / "worker-spool"  # made by the worker, 0700
    worker = Worker("nodb", BROKER, BACKEND, tmp_path, concurrency=2, database=worker_database, spool_dir=spool,
                    extra_env={"SAFETYNET_TEST_DB_PORT": "1"}).start(app)
    task_ids = []
    try:
        results = [send_unreadable(worker.queue) for _ in range(3)]
        task_ids = [result.id for result in results]
        wait_until(lambda: len(list(spool.glob("*.json"))) == 3, 30, "three spooled records")
        # A run has spooled its record before it ends: stopping its worker sooner loses the child mid-task, and
        # the record becomes a worker_lost one (seen on a loaded machine).
        for result in results:
            result.get(timeout=30, propagate=False)
    finally:
        worker.stop()
    assert (spool.stat().st_mode & 0o777) == 0o700
    for path in spool.glob("*.json"):
        assert path.read_bytes().startswith(b"safetynet-spool/1 ")  # signed
    settings.SAFETYNET = {**settings.SAFETYNET, "SPOOL_DIR": str(spool)}
    assert deadletter.flush_spool() == 3
    rows = list(DeadLetter.objects.filter(task_id__in=task_ids))
    assert len(rows) == 3 and not list(spool.glob("*.json")) and not (spool / "quarantine").exists()
    for row in rows:
        assert_sanitised(row)


def test_a_planted_file_in_a_real_worker_spool_is_never_stored(app, tmp_path, worker_database):
    from safetynet.models import DeadLetter

    spool = tmp_path / "worker-spool"
    spool.mkdir(mode=0o700)
    planted_id = str(uuid.uuid4())
    (spool / f"{planted_id}.json").write_text(
        '{"task_name": "tests.fixtures.tasks.ping", "task_id": "%s", "reason": "permanent_error"}' % planted_id)
    worker = Worker("planted", BROKER, BACKEND, tmp_path, concurrency=1, database=worker_database,
                    spool_dir=spool).start(app)  # its background job flushes every 2 s (tests/settings.py)
    try:
        wait_until(lambda: (spool / "quarantine" / f"{planted_id}.json").exists(), 30, "the file quarantined")
    finally:
        worker.stop()
    assert not DeadLetter.objects.filter(task_id=planted_id).exists()
    assert "is not signed" in worker.log.read_text()


def test_a_worker_says_at_start_up_that_its_spool_is_refused_and_reads_nothing_there(app, tmp_path,
                                                                                    worker_database):
    from safetynet.models import DeadLetter

    spool = tmp_path / "shared-spool"
    spool.mkdir()
    spool.chmod(0o777)  # any local user could plant a record here
    (spool / "planted.json").write_text('{"task_id": "planted"}')
    worker = Worker("unsafe", BROKER, BACKEND, tmp_path, concurrency=1, database=worker_database,
                    spool_dir=spool).start(app)
    try:
        wait_until(lambda: "spool flush refused" in worker.log.read_text(), 30, "the flush job's refusal")
    finally:
        worker.stop()
    log = worker.log.read_text()
    start_up = log.split("spool flush refused", 1)[0]
    assert f"The dead-letter spool folder {spool}" in start_up and "can be written by every user" in start_up
    assert (spool / "planted.json").exists() and not (spool / "quarantine").exists()
    assert not DeadLetter.objects.filter(task_id="planted").exists()
