"""The ``django.tasks`` backend without a worker: its OPTIONS, refusals, priorities, records, purge and admin."""

from datetime import timedelta

import pytest
from django.core.exceptions import ImproperlyConfigured
from django.core.management import call_command
from django.test import override_settings
from django.utils import timezone

compat = pytest.importorskip("safetynet.taskrecords._compat")
if not compat.AVAILABLE:
    pytest.skip(compat.MISSING, allow_module_level=True)

from safetynet import taskrecords  # noqa: E402
from safetynet.models import TaskRecord  # noqa: E402
from safetynet.runtime.django_tasks import CeleryBackend, _policy, broker_priority, celery_name  # noqa: E402
from safetynet.taskrecords._compat import api  # noqa: E402
from tests.fixtures import django_tasks as tasks  # noqa: E402
from tests.fixtures.web import logged_in, person  # noqa: E402

pytestmark = pytest.mark.django_db


def backend(**options):
    return CeleryBackend("test", {"QUEUES": [], "OPTIONS": options})


@pytest.mark.parametrize(("options", "message"), [
    ({"MAX_ATEMPTS": 3}, "unknown option 'MAX_ATEMPTS'"),
    ({"MAX_ATTEMPTS": 0}, "whole number >= 1"),
    ({"MAX_ATTEMPTS": True}, "whole number >= 1"),
    ({"ENQUEUE": "later"}, "'now', 'on_commit', 'outbox'"),
    ({"BACKOFF": 3}, "must be a function"),
    ({"BACKOFF": "nodots"}, "dotted path"),
    ({"RETRY_POLICY": {"max_atempts": 2}}, "RETRY_POLICY"),
    ({"RETRY_POLICY": "fast"}, "RetryPolicy or a dict"),
])
def test_bad_options_are_refused_with_what_to_change(options, message):
    with pytest.raises(ImproperlyConfigured, match=message):
        backend(**options)


def test_a_backoff_that_cannot_be_imported_is_a_check_error():
    errors = backend(BACKOFF="tests.fixtures.django_tasks.no_such_function").check()
    assert [error.id for error in errors] == ["safetynet.E009"]
    assert "no_such_function" in errors[0].msg


def test_the_policy_the_task_declares_wins_over_the_backends():
    options = backend(MAX_ATTEMPTS=7).settings
    policy, backoff = _policy(tasks.flaky, options)
    assert policy.max_attempts == 4 and backoff is None
    policy, backoff = _policy(tasks.add, options)
    assert policy.max_attempts == 7
    policy, backoff = _policy(tasks.backs_off, options)
    assert policy.max_attempts == 3 and backoff is tasks.backs_off.backoff


@pytest.mark.parametrize(("priority", "redis", "amqp"), [(-100, 9, 0), (0, 5, 4), (1, 4, 5), (100, 0, 9)])
def test_priorities_on_the_brokers_range(priority, redis, amqp):
    assert broker_priority(priority, "redis://localhost/0") == redis
    assert broker_priority(priority, "amqp://guest@localhost//") == amqp


def test_priority_order_is_kept_on_both_brokers():
    priorities = range(-100, 101)
    amqp = [broker_priority(p, "amqp://") for p in priorities]
    redis = [broker_priority(p, "redis://") for p in priorities]
    assert amqp == sorted(amqp) and redis == sorted(redis, reverse=True)


def test_each_celery_backend_alias_has_its_own_celery_task():
    from celery import current_app

    assert celery_name("a.b", "default") == "django.tasks:a.b"
    assert celery_name("a.b", "quick") == "django.tasks:a.b@quick"
    for alias in ("default", "quick", "on_commit", "outbox"):
        assert celery_name(tasks.add.module_path, alias) in current_app.tasks


def test_arguments_that_are_not_json_say_so(settings):
    with pytest.raises(TypeError, match="tests.fixtures.django_tasks.add: its arguments must be JSON"):
        tasks.add.enqueue(object(), 1)


@pytest.mark.django_db(transaction=True)
def test_a_record_is_ready_at_once_for_this_process():
    import uuid

    from kombu import Connection

    from tests.celery_app import app

    queue = f"djtasks-unit-{uuid.uuid4().hex[:8]}"  # consumed by no worker: deleted below
    with override_settings(TASKS={"default": {"BACKEND": "safetynet.tasks.CeleryBackend", "QUEUES": [queue]}}):
        try:
            result = tasks.noop.using(queue_name=queue).enqueue()
            again = tasks.noop.get_result(result.id)  # written from the batch before the read
        finally:
            with Connection(app.conf.broker_url) as connection:
                connection.default_channel.queue_delete(queue)
    assert again.status == compat.TaskResultStatus.READY and again.enqueued_at == result.enqueued_at
    assert again.attempts == 0 and again.errors == [] and again.worker_ids == []
    assert TaskRecord.objects.get(pk=result.id).queue_name == queue


def make(status, updated):
    row = TaskRecord.objects.create(id=f"{status}-{updated}", backend="default", module_path=tasks.add.module_path,
                                    queue_name="default", status=status)
    TaskRecord.objects.filter(pk=row.pk).update(updated_at=timezone.now() - timedelta(days=updated))
    return row


def test_purge_deletes_old_finished_results_only():
    make("SUCCESSFUL", 10), make("FAILED", 10), make("READY", 10), make("RUNNING", 10), make("SUCCESSFUL", 1)
    assert taskrecords.purge() == 2
    assert sorted(TaskRecord.objects.values_list("id", flat=True)) == ["READY-10", "RUNNING-10", "SUCCESSFUL-1"]


def test_the_results_purge_command(capsys):
    make("SUCCESSFUL", 3), make("FAILED", 1)
    call_command("safetynet", "results", "purge", "--older-than", "2d", "--dry-run")
    assert "would delete 1 django.tasks results" in capsys.readouterr().out
    call_command("safetynet", "results", "purge", "--older-than", "2d")
    assert "Deleted 1 django.tasks results" in capsys.readouterr().out
    assert list(TaskRecord.objects.values_list("id", flat=True)) == ["FAILED-1"]


def test_the_admin_shows_results_read_only():
    row = make("FAILED", 1)
    TaskRecord.objects.filter(pk=row.pk).update(
        errors=[{"exception_class_path": "builtins.ValueError", "traceback": "Traceback…\nValueError: boom"}],
        attempts=1, dead_letter_id=12)
    client = logged_in(person("viewer", "view_taskrecord"))
    listing = client.get("/admin/safetynet/taskrecord/")
    assert listing.status_code == 200 and row.id in listing.content.decode()
    page = client.get(f"/admin/safetynet/taskrecord/{row.id}/change/")
    text = page.content.decode()
    assert page.status_code == 200 and "ValueError: boom" in text and "/admin/safetynet/deadletter/12/" in text
    assert client.get("/admin/safetynet/taskrecord/add/").status_code == 403


def test_the_default_backend_is_celery():
    assert isinstance(api.task_backends["default"], CeleryBackend)


def test_safetynets_options_reach_the_celery_task():
    from celery import current_app

    celery_task = current_app.tasks[celery_name(tasks.charge.module_path, "default")]
    assert type(celery_task).idempotency_key == "charge-{order_id}" and celery_task._idempotency is not None
    assert celery_task.breaker == "upstream"
    assert celery_task.retry_policy.deadline == 60
    assert ConnectionError in celery_task.retry_on and KeyError in celery_task.fail_on
    assert celery_task.ignore_result  # the record is the result: nothing stored twice


def test_options_safetynet_refuses_are_invalid_tasks():
    def refused(order_id):
        pass

    refused.__qualname__ = "refused"  # as if at module level
    refused.__module__ = tasks.__name__
    with pytest.raises(compat.InvalidTask, match="retry_policy"):
        api.task(retry_policy="fast")(refused)
    with pytest.raises(compat.InvalidTask, match="idempotency_key"):
        api.task(idempotency_key="charge-{no_such_argument}")(refused)


def test_importing_safetynet_tasks_needs_no_tasks_api():
    import safetynet.tasks

    assert set(dir(safetynet.tasks)) >= {"CeleryBackend", "SafetynetTask", "broker_priority"}
    assert safetynet.tasks.CeleryBackend is CeleryBackend
    with pytest.raises(AttributeError):
        safetynet.tasks.NoSuchThing  # noqa: B018


@pytest.mark.django_db(transaction=True)
def test_a_new_record_is_seen_by_other_connections_as_soon_as_enqueue_returns():
    import uuid

    from django.db import connections
    from kombu import Connection

    from tests.celery_app import app

    queue = f"djtasks-unit-{uuid.uuid4().hex[:8]}"
    other = connections.create_connection("default")  # another process's view: its own connection
    try:
        with override_settings(TASKS={"default": {"BACKEND": "safetynet.tasks.CeleryBackend", "QUEUES": [queue]}}):
            try:
                sent = [tasks.noop.using(queue_name=queue).enqueue() for _ in range(3)]
                with other.cursor() as cursor:  # no flush, no wait: each was written before its message went
                    cursor.execute("SELECT id, status FROM safetynet_taskrecord WHERE id IN (%s, %s, %s)",
                                   [result.id for result in sent])
                    assert dict(cursor.fetchall()) == {result.id: "READY" for result in sent}
            finally:
                with Connection(app.conf.broker_url) as connection:
                    connection.default_channel.queue_delete(queue)
    finally:
        other.close()


def _new_record_fields():
    import uuid

    from django.utils import timezone

    return {"id": str(uuid.uuid4()), "backend": "default", "module_path": "tests.fixtures.x", "queue_name": "default",
            "priority": 0, "run_after": None, "args": [1], "kwargs": {}, "status": "READY",
            "enqueued_at": timezone.now()}


@pytest.mark.django_db(transaction=True)
def test_the_record_and_the_message_overlap_and_each_happens_once_even_when_the_connection_broke(monkeypatch):
    from safetynet.taskrecords import _store

    plain_inserts = []
    insert = _store.insert
    monkeypatch.setattr(_store, "insert", lambda fields, **kw: plain_inserts.append(fields["id"]) or insert(fields))

    sent = []
    fields = _new_record_fields()
    assert _store.insert_then(fields, lambda: sent.append(fields["id"]) or "sent") == "sent"
    assert sent == [fields["id"]] and _store.read(fields["id"]).status == "READY"
    assert plain_inserts == []  # overlapped: the pipeline wrote it

    # The records' connection broke while idle (a database restart): the row is written on a fresh one, the
    # message sent once.
    writer = _store.records_connection(_store.database())
    writer.connection.close()
    fields = _new_record_fields()
    assert _store.insert_then(fields, lambda: sent.append(fields["id"]) or "sent") == "sent"
    assert sent.count(fields["id"]) == 1 and _store.read(fields["id"]).status == "READY"
    assert plain_inserts == [fields["id"]]  # the fallback: written alone, on a fresh connection, then sent


@pytest.mark.django_db(transaction=True)
def test_a_send_that_fails_raises_after_the_records_answer_is_in():
    from safetynet.taskrecords import _store

    fields = _new_record_fields()

    def send():
        raise RuntimeError("the broker is away")

    with pytest.raises(RuntimeError, match="the broker is away"):
        _store.insert_then(fields, send)
    # The row went out before the message failed; it is taken back (a READY row with no message would wait for ever).
    assert _store.read(fields["id"]) is None
    # The connection is usable afterwards (the INSERT's answer was read).
    again = _new_record_fields()
    assert _store.insert_then(again, lambda: "sent") == "sent" and _store.read(again["id"]).status == "READY"


@pytest.mark.django_db(transaction=True)
def test_arguments_postgresql_cannot_store_are_refused_before_anything_is_written_or_sent():
    from safetynet.taskrecords import _store

    fields = {**_new_record_fields(), "args": ["a\x00b"]}
    sent = []
    with pytest.raises(ValueError, match="NUL character"):
        _store.insert_then(fields, lambda: sent.append(1))
    assert sent == [] and _store.read(fields["id"]) is None
    for bad, what in ((["\ud800"], "a lone surrogate"), ([float("nan")], "NaN"), ({"x": float("inf")}, "infinite")):
        fields = {**_new_record_fields(), "args" if isinstance(bad, list) else "kwargs": bad}
        with pytest.raises(ValueError, match=what):
            _store.insert_then(fields, lambda: sent.append(1))
        assert sent == [] and _store.read(fields["id"]) is None
    # Characters outside ASCII are stored as they are.
    fields = {**_new_record_fields(), "args": ["café ☕ 𝄞"]}
    assert _store.insert_then(fields, lambda: "sent") == "sent" and _store.read(fields["id"]).args == ["café ☕ 𝄞"]
    # A backslash before "u0000" is no NUL: written and sent.
    fields = {**_new_record_fields(), "kwargs": {"path": "C:\\u0000"}}
    assert _store.insert_then(fields, lambda: "sent") == "sent"
    assert _store.read(fields["id"]).kwargs == {"path": "C:\\u0000"}


@pytest.mark.django_db(transaction=True)
def test_a_batch_with_a_row_the_database_refuses_writes_the_others(caplog):
    from safetynet.taskrecords import _store

    good = [_new_record_fields() for _ in range(3)]
    bad = {**_new_record_fields(), "args": ["a\x00b"]}  # (a message sent by other means: jsonb refuses it)
    for fields in [good[0], bad, good[1], good[2]]:
        _store.attempt_ended(fields["id"], fields, attempt=1, started=1.0, worker_id="w1", status="SUCCESSFUL",
                             finished=2.0, return_value={"ok": fields["id"]})
    # The same message run twice in this process: one row, written once (not an error for the whole batch).
    _store.attempt_ended(good[0]["id"], good[0], attempt=1, started=1.0, worker_id="w1", status="SUCCESSFUL",
                         finished=3.0, return_value={"ok": "again"})
    _store.flush()
    rows = {row.id: row for row in _store.TaskRecord.objects.filter(pk__in=[f["id"] for f in [*good, bad]])}
    assert set(rows) == {fields["id"] for fields in good}
    assert all(row.status == "SUCCESSFUL" and row.attempts == 1 and row.worker_ids == ["w1"] for row in rows.values())
    assert rows[good[1]["id"]].return_value == {"ok": good[1]["id"]} and rows[good[0]["id"]].return_value == {"ok": "again"}
    assert any("could not be written (dropped)" in record.getMessage() for record in caplog.records)
    assert _store.batch.successes == []


@pytest.mark.django_db(transaction=True)
def test_the_records_insert_is_prepared_once_and_survives_a_server_that_forgets_it(monkeypatch, caplog):
    from safetynet import driver
    from safetynet.taskrecords import _store

    monkeypatch.setattr(driver, "_unprepared", set())
    connection = _store.records_connection(_store.database())

    def server_has_it():
        with connection.cursor() as cursor:
            cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE name = 'safetynet_record_new'")
            return cursor.fetchone()[0] == 1

    sent = []
    for _ in range(3):
        fields = _new_record_fields()
        assert _store.insert_then(fields, lambda: sent.append(1) or "sent") == "sent"
        assert _store.read(fields["id"]).status == "READY"
    assert server_has_it() and len(sent) == 3

    # A pooler in transaction mode hands the next statement to a server connection that never saw it (here: the
    # server forgets it): the row is written anyway, the message sent once, and the statement prepared again.
    for forgotten in range(2):
        with connection.cursor() as cursor:
            cursor.execute("DEALLOCATE safetynet_record_new")
        fields = _new_record_fields()
        assert _store.insert_then(fields, lambda: sent.append(1) or "sent") == "sent"
        assert _store.read(fields["id"]).status == "READY" and len(sent) == 4 + forgotten
        if forgotten == 0:
            fields = _new_record_fields()
            assert _store.insert_then(fields, lambda: "sent") == "sent" and server_has_it()
    # Forgotten twice: this database is no longer sent prepared statements, and the log says why.
    assert driver._unprepared == {connection.alias} and not driver.prepares(connection)
    assert any("forgets prepared statements" in record.getMessage() for record in caplog.records)
    fields = _new_record_fields()
    assert _store.insert_then(fields, lambda: "sent") == "sent" and _store.read(fields["id"]) is not None


@pytest.mark.django_db(transaction=True)
def test_no_prepared_statement_where_django_is_told_of_a_transaction_pooler(monkeypatch):
    from safetynet import driver
    from safetynet.taskrecords import _store

    connection = _store.records_connection(_store.database())
    monkeypatch.setitem(connection.settings_dict, "DISABLE_SERVER_SIDE_CURSORS", True)
    with connection.cursor() as cursor:
        cursor.execute("DEALLOCATE ALL")
    connection.__dict__.pop("_safetynet_prepared", None)
    assert not driver.prepares(connection)
    fields = _new_record_fields()
    assert _store.insert_then(fields, lambda: "sent") == "sent" and _store.read(fields["id"]).status == "READY"
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM pg_prepared_statements WHERE name LIKE 'safetynet%%'")
        assert cursor.fetchone()[0] == 0


@pytest.mark.django_db(transaction=True)
def test_a_records_connection_the_server_ended_is_replaced_prepared_or_not(monkeypatch):
    from django.db import connections

    from safetynet import driver
    from safetynet.taskrecords import _store

    monkeypatch.setattr(driver, "_unprepared", set())
    sent = []
    for fresh in (False, True):  # the statement prepared on the dead connection already, or not yet
        connection = _store.records_connection(_store.database())
        if fresh:
            connection.__dict__.pop("_safetynet_prepared", None)
        else:
            assert _store.insert_then(_new_record_fields(), lambda: "sent") == "sent"
        with connection.cursor() as cursor:
            cursor.execute("SELECT pg_backend_pid()")
            pid = cursor.fetchone()[0]
        with connections["default"].cursor() as cursor:  # the server ends it (a restart, an idle timeout)
            cursor.execute("SELECT pg_terminate_backend(%s)", [pid])
        fields = _new_record_fields()
        assert _store.insert_then(fields, lambda fields=fields: sent.append(fields["id"]) or "sent") == "sent"
        assert sent.count(fields["id"]) == 1 and _store.read(fields["id"]).status == "READY"
    assert driver._unprepared == set()  # a dead connection is no reason to stop preparing


@pytest.mark.django_db
def test_the_hot_tables_keep_their_keys_unique_but_lose_the_like_indexes():
    """Migration 0010: on PostgreSQL the ``varchar_pattern_ops`` twin of each hot table's key is gone (nothing uses
    ``LIKE`` on them); the unique index that makes ``ON CONFLICT`` work stays, and other tables keep theirs."""
    from django.db import connection

    if connection.vendor != "postgresql":
        pytest.skip("the _like indexes exist on PostgreSQL only")
    with connection.cursor() as cursor:
        cursor.execute("SELECT tablename, indexdef FROM pg_indexes WHERE tablename LIKE 'safetynet%%'")
        indexes = cursor.fetchall()
    hot = {"safetynet_taskrecord": "id", "safetynet_idempotencyclaim": "key", "safetynet_scheduledmessage": "key",
           "safetynet_sharedkey": "key"}
    for table, column in hot.items():
        found = [definition for name, definition in indexes if name == table]
        assert not [d for d in found if "varchar_pattern_ops" in d], table
        assert [d for d in found if "UNIQUE" in d and f"({column})" in d], table
    assert [d for name, d in indexes if name == "safetynet_deadletter" and "varchar_pattern_ops" in d]
