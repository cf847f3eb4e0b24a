"""No secret of a safetynet task reaches Celery's result backend, the worker's log or a dead letter's headers.

Real prefork workers on Redis (results in Redis, as JSON and as pickle) and on RabbitMQ (results in
PostgreSQL through Celery's database backend). Each failure is raised twice: by a safetynet task
with ``SECRET`` and by its plain Celery twin with ``PLAIN_SECRET``; the twin shows what Celery
alone stores, raises and logs, so the tests prove they read the right places.
"""

import psycopg
import pytest
import redis
from django.db import connections

from tests.fixtures import secret_tasks
from tests.fixtures.secret_tasks import HEADER_SECRET, SECRET
from tests.integration.conftest import BROKERS, Worker, configure_app, wait_for, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

PLAIN_SECRET = "tok_live_PLAIN789"
KINDS = ("text", "echo", "unusual", "reduce", "unpicklable")
HEADERS = {"x-note": f"card_token={HEADER_SECRET}", "x-echo": f"for {SECRET}", "tenant": "acme"}

VARIANTS = {
    # name: (broker, backend, result serializer)
    "redis": (*BROKERS["redis"], "json"),
    "redis-pickle": (*BROKERS["redis"], "pickle"),
    "rabbitmq+postgresql": (*BROKERS["rabbitmq+postgresql"], "json"),
}


def _raised(result):
    try:
        result.get(timeout=30, propagate=True)
    except Exception as error:  # what Celery raises for a stored failure
        return error
    raise AssertionError(f"{result.id} did not fail")


@pytest.fixture(scope="module", params=sorted(VARIANTS))
def run(request, tmp_path_factory, worker_database, spool_dir, django_db_blocker):
    """One worker per variant; every case sent at once, waited for, the worker stopped (its log complete)."""
    broker, backend, serializer = VARIANTS[request.param]
    from tests.celery_app import app

    previous = app.conf.result_serializer, app.conf.result_accept_content
    app.conf.result_serializer, app.conf.result_accept_content = serializer, ["json", serializer]
    app = configure_app(broker, backend)
    worker = Worker(request.param, broker, backend, tmp_path_factory.mktemp(request.param), database=worker_database,
                    spool_dir=spool_dir, extra_env={"SAFETYNET_TEST_INCLUDE": "tests.fixtures.secret_tasks",
                                                    "SAFETYNET_TEST_RESULT_SERIALIZER": serializer})
    worker.start(app)
    try:
        safe = {kind: secret_tasks.fail.apply_async((kind, SECRET), queue=worker.queue, headers=HEADERS)
                for kind in KINDS}
        plain = {kind: secret_tasks.plain_fail.apply_async((kind, PLAIN_SECRET), queue=worker.queue)
                 for kind in KINDS}
        retried = secret_tasks.retry_later.apply_async((SECRET,), queue=worker.queue)
        for result in (*safe.values(), *plain.values()):
            wait_for(result, timeout=60)
        wait_until(lambda: retried.state == "RETRY", 30, "the RETRY state")
        raised = {kind: (_raised(safe[kind]), _raised(plain[kind])) for kind in KINDS}
        with django_db_blocker.unblock():
            from safetynet.models import DeadLetter

            ids = [result.id for result in safe.values()]
            wait_until(lambda: DeadLetter.objects.filter(task_id__in=ids).count() == len(KINDS), 30, "the dead letters")
            rows = list(DeadLetter.objects.filter(task_id__in=ids))
            with connections["default"].cursor() as cursor:  # the rows as stored, every column
                cursor.execute("SELECT * FROM safetynet_deadletter WHERE task_id = ANY(%s)", [ids])
                stored_rows = repr(cursor.fetchall())
    finally:
        worker.stop()
        app.conf.result_serializer, app.conf.result_accept_content = previous
        configure_app(broker, backend)
    yield {"variant": request.param, "backend": backend, "safe": safe, "plain": plain, "retried": retried,
           "raised": raised, "log": worker.log.read_text(), "rows": rows, "stored_rows": stored_rows}


def raw_results(run, task_ids):
    """What the result backend holds for each task id, as stored: bytes (Redis) or the row's columns (SQL)."""
    backend = run["backend"]
    if backend.startswith("redis://"):
        client = redis.Redis.from_url(backend)
        return {task_id: client.get(f"celery-task-meta-{task_id}") for task_id in task_ids}
    with psycopg.connect(backend.replace("db+postgresql+psycopg://", "postgresql://")) as connection:
        rows = connection.execute("SELECT task_id, status, result, traceback FROM celery_taskmeta "
                                  "WHERE task_id = ANY(%s)", [list(task_ids)]).fetchall()
    return {task_id: repr((status, bytes(result or b""), traceback)).encode() + bytes(result or b"")
            + (traceback or "").encode() for task_id, status, result, traceback in rows}


def test_the_stored_exception_and_traceback_carry_no_secret(run):
    safe_ids = [result.id for result in run["safe"].values()] + [run["retried"].id]
    plain_ids = [result.id for result in run["plain"].values()]
    stored = raw_results(run, safe_ids + plain_ids)
    assert set(stored) == set(safe_ids + plain_ids) and all(stored.values())
    for task_id in safe_ids:
        assert SECRET.encode() not in stored[task_id], run["variant"]
        assert b"[redacted]" in stored[task_id]
        assert b"Traceback" in stored[task_id]  # the traceback is stored, redacted
    for task_id in plain_ids:  # Celery alone keeps the secret: the test reads the right place
        assert PLAIN_SECRET.encode() in stored[task_id]


def test_the_retry_state_is_stored_redacted(run):
    retried = run["retried"]
    assert retried.state == "RETRY"
    [raw] = raw_results(run, [retried.id]).values()
    assert b"RETRY" in raw and b"ConnectionError" in raw and b"[redacted]" in raw
    assert SECRET.encode() not in raw
    assert SECRET not in str(retried.result) and "[redacted]" in str(retried.result)
    assert isinstance(retried.result, ConnectionError)


@pytest.mark.parametrize("kind", KINDS)
def test_get_raises_what_celery_raises_with_the_message_redacted(run, kind):
    safe, plain = run["raised"][kind]
    assert (type(safe).__module__, type(safe).__qualname__) == (type(plain).__module__, type(plain).__qualname__)
    assert PLAIN_SECRET in str(plain)
    assert SECRET not in str(safe) and "[redacted]" in str(safe)
    if kind == "echo":  # a bare value: blanked, the rest of the message as it was
        assert str(safe) == str(plain).replace(PLAIN_SECRET, "[redacted]")
    if kind == "text":
        assert str(safe) == "charge refused: card_token='[redacted]' order=42"
    if kind == "reduce" and run["variant"] == "redis-pickle":  # rebuilt by its own __reduce__, attributes redacted
        assert isinstance(safe, secret_tasks.DeclinedError)
        assert (safe.code, safe.card_token) == ("E42", "[redacted]")


def test_the_worker_log_names_the_tasks_but_shows_no_secret(run):
    log = run["log"]
    assert SECRET not in log and HEADER_SECRET not in log
    assert PLAIN_SECRET in log  # Celery logs the plain twins' exceptions: the log is the one Celery writes
    for result in (*run["safe"].values(), run["retried"]):
        assert result.id in log
    assert f"Task {secret_tasks.fail.name}[" in log and "raised unexpected" in log
    assert f"Task {secret_tasks.retry_later.name}[{run['retried'].id}] retry: Retry in 60.0s: ConnectionError('gateway down for card_token='[redacted]' declined [redacted]')" in log
    assert "[redacted]" in log


def test_header_values_of_the_dead_letters_are_redacted(run):
    rows = run["rows"]
    assert len(rows) == len(KINDS)
    for row in rows:
        assert row.headers["tenant"] == "acme"
        assert row.headers["x-note"] == "card_token='[redacted]'" and row.headers["x-echo"] == "for [redacted]"
        assert {"headers.x-note", "headers.x-echo"} <= set(row.redacted)
    assert SECRET not in run["stored_rows"] and HEADER_SECRET not in run["stored_rows"]
    assert "acme" in run["stored_rows"]
