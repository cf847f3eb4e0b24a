"""The dead-letter Python API on the real PostgreSQL: recording, redaction, cap, alerts, replay."""

import logging
import time
import uuid

import pytest
import redis
from django.core import mail
from django.core.cache import cache
from django.test import override_settings

from safetynet.protocol import headers as header_names
from safetynet import deadletter, signals
from safetynet.models import DeadLetter
from tests.celery_app import app

pytestmark = pytest.mark.django_db


def record(**overrides):
    fields = {
        "task_name": "tests.fixtures.tasks.ping", "task_id": str(uuid.uuid4()), "reason": "retries_exhausted",
        "args": [], "kwargs": {}, "exception": ConnectionError("gateway 10.0.0.7 timed out after 30s"),
        "history": [{"attempt": 1, "started": time.time() - 5, "action": "retry", "message": "x", "traceback": ""},
                    {"attempt": 2, "started": time.time() - 1, "action": "dead", "message": "x", "traceback": ""}],
        "failed_at": time.time(),
    }
    fields.update(overrides)
    deadletter.give_up(deadletter.Failure(**fields), log=False)  # as the runtime gives a task up
    return DeadLetter.objects.get(task_id=fields["task_id"])


@pytest.fixture(autouse=True)
def fresh_alert_window():
    cache.clear()
    mail.outbox.clear()


def test_a_failure_is_stored_once_per_task_id():
    row = record(task_id="once")
    record(task_id="once", reason="permanent_error")  # a redelivered message, a flushed spool file
    assert DeadLetter.objects.filter(task_id="once").count() == 1
    assert row.reason == "retries_exhausted" and row.attempts == 2
    assert row.first_failed_at < row.last_failed_at


def test_a_redelivered_message_that_dies_again_is_announced_once():
    """The same task id given up twice (its message delivered again after the first death was recorded): one row,
    one task_ended, one task_dead, whatever the second death's reason."""
    from tests.fixtures import tasks

    ended, dead = [], []
    signals.task_ended.connect(lambda sender, event, **_: ended.append(event.task_id), weak=False,
                               dispatch_uid="test-twice-ended")
    signals.task_dead.connect(lambda sender, task_id, **_: dead.append(task_id), weak=False,
                              dispatch_uid="test-twice-dead")
    try:
        for reason in ("retries_exhausted", "permanent_error"):
            failure = deadletter.Failure(task_name=tasks.ping.name, task_id="twice-dead", reason=reason,
                                         exception=ConnectionError("down"), failed_at=time.time())
            deadletter.give_up(failure, task=tasks.ping._get_current_object(), log=False)
    finally:
        signals.task_ended.disconnect(dispatch_uid="test-twice-ended")
        signals.task_dead.disconnect(dispatch_uid="test-twice-dead")
    assert ended == dead == ["twice-dead"]
    assert DeadLetter.objects.filter(task_id="twice-dead").count() == 1


def test_alike_failures_share_a_fingerprint():
    first = record(exception=ConnectionError("gateway 10.0.0.7 timed out after 30s"))
    second = record(exception=ConnectionError("gateway 10.0.0.9 timed out after 31s"))
    other = record(exception=ValueError("gateway 10.0.0.9 timed out after 31s"))
    assert first.fingerprint == second.fingerprint != other.fingerprint


def test_sensitive_values_are_redacted_everywhere_they_are_stored():
    row = record(
        args=[10, "tok_live_SECRET123"], parameters=["amount", "card_token"],
        kwargs={"customer": {"password": "hunter2", "name": "Ann"}, "api_key": "k-123"},
        exception=ValueError("charge failed for card_token='tok_live_SECRET123'"),
    )
    assert row.args == [10, "[redacted]"]
    assert row.kwargs == {"customer": {"password": "[redacted]", "name": "Ann"}, "api_key": "[redacted]"}
    assert set(row.redacted) == {"args[1]", "kwargs.customer.password", "kwargs.api_key"}
    stored = repr(DeadLetter.objects.filter(pk=row.pk).values().get())
    assert "tok_live_SECRET123" not in stored and "hunter2" not in stored and "k-123" not in stored


def test_redaction_patterns_come_from_settings():
    with override_settings(SAFETYNET={"REDACT_KEYS": [], "REDACT_PATTERNS": [r"^iban$"]}):
        row = record(kwargs={"iban": "DE89 3704", "password": "visible-now"})
    assert row.kwargs == {"iban": "[redacted]", "password": "visible-now"}


def test_new_dead_letter_mails_admins_once_per_fingerprint_window():
    record(exception=ConnectionError("db 1 down"))
    record(exception=ConnectionError("db 2 down"))  # same fingerprint: inside the window, no second mail
    record(exception=KeyError("order"))
    assert len(mail.outbox) == 2
    assert "[safetynet] tests.fixtures.tasks.ping died: retries_exhausted" in mail.outbox[0].subject


def test_alert_hooks_are_called_and_a_failing_hook_changes_nothing(caplog):
    seen = []

    def broken(row):
        raise RuntimeError("webhook down")

    with override_settings(SAFETYNET={"ALERT_HOOKS": [seen.append, broken], "ALERT_MAIL_ADMINS": False}):
        row = record()
    assert seen == [row] and "webhook down" in caplog.text and not mail.outbox


def test_the_cap_evicts_the_oldest_loudly(caplog):
    evicted = []
    signals.dead_letters_evicted.connect(lambda sender, **kw: evicted.append(kw), weak=False, dispatch_uid="t-ev")
    try:
        rows = [record() for _ in range(5)]
        with override_settings(SAFETYNET={"DEAD_LETTER_MAX_ROWS": 3}), caplog.at_level(logging.WARNING):
            assert deadletter.enforce_cap() == 2
    finally:
        signals.dead_letters_evicted.disconnect(dispatch_uid="t-ev")
    assert list(DeadLetter.objects.order_by("id").values_list("id", flat=True)) == [row.id for row in rows[2:]]
    assert "over its cap of 3 rows: evicted the 2 oldest" in caplog.text
    assert evicted and evicted[0]["count"] == 2
    assert any("dead letters evicted" in message.subject for message in mail.outbox)


def test_purge_deletes_by_age():
    old = record(failed_at=time.time() - 40 * 86400, history=[])
    new = record()
    from datetime import datetime, timedelta, timezone

    assert deadletter.purge(datetime.now(tz=timezone.utc) - timedelta(days=30)) == 1
    assert list(DeadLetter.objects.values_list("id", flat=True)) == [new.id]
    assert not DeadLetter.objects.filter(pk=old.pk).exists()


@pytest.fixture
def queue():
    name = f"safetynet-replay-{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(app.conf.broker_url).delete(name)


def test_replay_keeps_arguments_and_headers_starts_afresh_and_is_audited(queue, django_capture_on_commit_callbacks):
    replayed = []
    signals.task_replayed.connect(lambda sender, **kw: replayed.append(kw), weak=False, dispatch_uid="t-rp")
    try:
        row = record(task_name="tests.fixtures.dead_letter_tasks.ok", args=[1],
                     headers={"safetynet": {"attempt": 3}, "idempotency_key": "order-1", "authorization": "Bearer s3"})
        assert row.headers["authorization"] == "[redacted]" and "headers.authorization" in row.redacted
        with django_capture_on_commit_callbacks(execute=True):
            [outcome] = deadletter.replay(row, by="ann", queue=queue)
    finally:
        signals.task_replayed.disconnect(dispatch_uid="t-rp")
    row.refresh_from_db()
    assert outcome.new_task_id and outcome.error is None
    assert (row.status, row.replay_count, row.replayed_task_id, row.replayed_by) == (
        "replayed", 1, outcome.new_task_id, "ann")
    assert row.audit[-1]["action"] == "replay" and row.audit[-1]["queue"] == queue
    assert replayed[0]["new_task_id"] == outcome.new_task_id
    import json

    [raw] = redis.Redis.from_url(app.conf.broker_url).lrange(queue, 0, -1)
    message = json.loads(raw)
    headers = message["headers"]
    assert headers["id"] == outcome.new_task_id and headers["retries"] == 0
    assert headers["idempotency_key"] == "order-1" and "safetynet" not in headers  # a fresh attempt count
    assert "authorization" not in headers  # a redacted header is not sent as "[redacted]"
    assert headers[header_names.REPLAY_OF] == str(row.id)


def test_replay_with_edited_arguments_is_audited_redacted(queue):
    row = record(task_name="tests.fixtures.dead_letter_tasks.charge", args=[1], kwargs={"card_token": "old"})
    [outcome] = deadletter.replay(row, kwargs={"card_token": "tok_new_SECRET"}, args=[2], queue=queue, by="ann")
    row.refresh_from_db()
    assert outcome.new_task_id
    assert row.audit[-1]["edited"] == {"args": [2], "kwargs": {"card_token": "[redacted]"}}
    assert "tok_new_SECRET" not in repr(DeadLetter.objects.filter(pk=row.pk).values().get())


def test_replay_with_arguments_the_task_does_not_take_leaves_the_row(queue):
    row = record(task_name="tests.fixtures.dead_letter_tasks.ok", args=[1])
    [outcome] = deadletter.replay(row, args=[1, 2, 3], queue=queue)
    assert outcome.new_task_id is None and "not sent" in outcome.error
    row.refresh_from_db()
    assert row.status == "dead" and row.replay_count == 0


def test_replay_refuses_unknown_tasks_and_redacted_rows_and_leaves_them(queue):
    unknown = record(task_name="tests.gone.away")
    secret = record(kwargs={"card_token": "x"})
    outcomes = {o.dead_letter_id: o for o in deadletter.replay([unknown.id, secret.id], queue=queue)}
    assert "not registered any more" in outcomes[unknown.id].error
    assert "redacted when stored" in outcomes[secret.id].error
    for row in (unknown, secret):
        before = row.audit
        row.refresh_from_db()
        assert row.status == "dead" and row.replay_count == 0 and row.audit == before


def test_replay_of_unknown_ids_says_so():
    with pytest.raises(LookupError, match="no dead letter with id 999999"):
        deadletter.replay([999999])


def test_discard_marks_handled_and_is_idempotent():
    row = record()
    assert deadletter.discard(DeadLetter.objects.filter(pk=row.pk), by="ann") == 1
    assert deadletter.discard(row.pk, by="ann") == 0
    row.refresh_from_db()
    assert row.status == "discarded" and row.audit[-1]["by"] == "ann"


def test_discard_never_overwrites_a_replay_that_committed_meanwhile():
    stale = record()  # read while dead, as a discard of a page of rows reads it
    DeadLetter.objects.filter(pk=stale.pk).update(
        status="replayed", audit=[{"action": "replay", "by": "bob", "new_task_id": "t-2"}])
    assert deadletter.discard([stale], by="ann") == 0
    stale.refresh_from_db()
    assert stale.status == "replayed" and stale.audit == [{"action": "replay", "by": "bob", "new_task_id": "t-2"}]


def test_an_undecodable_body_is_kept_redacted_and_a_binary_one_only_by_hash():
    text = record(reason="undecodable", raw_body=b'{"card_token": "tok_live_SECRET123", "n": 1}', body_unknown=True)
    import base64

    kept = base64.b64decode(text.raw_body).decode()
    assert "tok_live_SECRET123" not in kept and '"n": 1' in kept
    binary = record(reason="undecodable", raw_body=b"\x80\x04\x95 pickled", body_unknown=True)
    assert binary.raw_body == "" and "binary body of 11 bytes not kept (sha256" in binary.detail


def test_the_detail_is_redacted_too():
    row = record(reason="rejected", detail="Reject(requeue=False): 'password=hunter2 refused'")
    assert "hunter2" not in row.detail


@pytest.mark.django_db(transaction=True)
def test_a_row_claimed_by_another_replay_is_skipped_not_sent_twice(queue):
    import threading

    from django.db import connections, transaction

    row = record(task_name="tests.fixtures.dead_letter_tasks.ok", args=[1])
    locked, release = threading.Event(), threading.Event()

    def other_operator():
        try:
            with transaction.atomic():
                DeadLetter.objects.select_for_update().get(pk=row.pk)
                locked.set()
                release.wait(10)
        finally:
            connections.close_all()

    thread = threading.Thread(target=other_operator)
    thread.start()
    try:
        assert locked.wait(10)
        [outcome] = deadletter.replay(row, queue=queue)
    finally:
        release.set()
        thread.join()
    assert outcome.new_task_id is None and "someone else" in outcome.error
    assert redis.Redis.from_url(app.conf.broker_url).llen(queue) == 0


def test_a_message_that_repeats_a_secret_argument_is_blanked():
    row = record(task_name="tests.fixtures.dead_letter_tasks.charge", args=[10, "tok_live_SECRET123"],
                 parameters=["amount", "card_token"], exception=ValueError("declined: tok_live_SECRET123"),
                 history=[{"attempt": 1, "started": time.time(), "message": "declined: tok_live_SECRET123",
                           "traceback": 'ValueError: declined: tok_live_SECRET123'}])
    assert "tok_live_SECRET123" not in repr(DeadLetter.objects.filter(pk=row.pk).values().get())
    assert row.exception_message == "declined: [redacted]"


# -- header values -----------------------------------------------------------------------

def test_header_values_go_through_the_message_patterns_and_such_headers_are_not_replayed(
        queue, django_capture_on_commit_callbacks):
    row = record(task_name="tests.fixtures.dead_letter_tasks.ok", args=[1], kwargs={"card_token": "tok_live_SECRET123"},
                 parameters=["n"],
                 headers={"x-note": "retrying password=hunter2 now", "x-card": "for tok_live_SECRET123",
                          "x-nested": {"log": ["api_key: k-123456"]}, "tenant": "acme"})
    assert row.headers == {"x-note": "retrying password='[redacted]' now", "x-card": "for [redacted]",
                           "x-nested": {"log": ["api_key: '[redacted]'"]}, "tenant": "acme"}
    assert {"headers.x-note", "headers.x-card", "headers.x-nested.log[0]"} <= set(row.redacted)
    stored = repr(DeadLetter.objects.filter(pk=row.pk).values().get())
    assert "hunter2" not in stored and "tok_live_SECRET123" not in stored and "k-123456" not in stored
    with django_capture_on_commit_callbacks(execute=True):
        [outcome] = deadletter.replay(row, args=[1], kwargs={}, queue=queue, by="ann")
    assert outcome.error is None
    import json

    [raw] = redis.Redis.from_url(app.conf.broker_url).lrange(queue, 0, -1)
    headers = json.loads(raw)["headers"]
    # A header whose text was blanked is not sent blanked: the task gets the header or nothing.
    assert headers["tenant"] == "acme" and not {"x-note", "x-card", "x-nested"} & set(headers)


def test_the_gave_up_line_is_redacted_like_the_row(caplog):
    secret = "tok_live_SECRET123"
    task_id = str(uuid.uuid4())
    with caplog.at_level(logging.WARNING, logger="safetynet"):
        deadletter.give_up(deadletter.Failure(
            task_name="tests.fixtures.dead_letter_tasks.rejecting", task_id=task_id, reason="rejected",
            detail=f"Reject(requeue=False): ValueError('declined {secret}, password=hunter2')", args=[secret],
            parameters=["card_token"], failed_at=time.time(),
        ))
    [line] = [entry for entry in caplog.records if "gave up" in entry.getMessage()]
    assert secret not in line.getMessage() and "hunter2" not in line.getMessage() and task_id in line.getMessage()
    assert secret not in line.detail and "declined [redacted]" in line.detail
