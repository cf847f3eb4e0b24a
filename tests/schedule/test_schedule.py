"""The durable schedule and the outbox, in process, against the real PostgreSQL and Redis broker.

Messages are read back from the broker's Redis list of a queue of each test's own; the worker
side (relay threads, kills, Redis stopped) is in tests/integration/test_scheduler.py.
"""

import base64
import json
import os
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
import redis
from django.db import connection, transaction
from django.test import override_settings

import safetynet
from safetynet import ConfigurationError, RetryPolicy, conf
from safetynet import schedule as scheduler
from safetynet.models import DeadLetter, ScheduledMessage
from safetynet.protocol.attempt import Attempt
from safetynet.protocol.headers import HISTORY as HEADER
from safetynet.protocol.headers import RELAYED
from safetynet.runtime import sending
from tests.celery_app import app

pytestmark = pytest.mark.django_db(transaction=True)

BROKER = redis.Redis.from_url(os.environ.get("SAFETYNET_TEST_BROKER", "redis://127.0.0.1:6379/15"))


@safetynet.task(name="tests.test_scheduler.add", retry_policy=RetryPolicy(max_attempts=3, backoff=3600))
def add(x, y):
    return x + y


@safetynet.task(name="tests.test_scheduler.add_outbox", enqueue="outbox")
def add_outbox(x, y):
    return x + y


@safetynet.task(name="tests.test_scheduler.pay_once", enqueue="outbox", idempotency_key="pay-{order_id}",
                unique_for=60)
def pay_once(order_id):
    return order_id


@pytest.fixture
def queue():
    name = f"safetynet-sched-{uuid.uuid4().hex[:8]}"
    yield name
    BROKER.delete(name)


def sent(queue):
    """The messages in ``queue``, oldest first: (task name, task id, headers)."""
    messages = [json.loads(raw) for raw in reversed(BROKER.lrange(queue, 0, -1))]
    return [(m["headers"]["task"], m["headers"]["id"], m["headers"]) for m in messages]


def retry_headers(started=None):
    """The headers of a delivered first attempt's message (none), or of a message of a task that started then."""
    return {} if started is None else {HEADER: {"attempt": 2, "started_at": started, "history": [{}]}}


def retry(task, args, *, task_id=None, queue=None, countdown=60, headers=None, expires=None):
    """Publish the retry of an attempt of ``task`` that failed, as the act step does; return the task id."""
    from celery.app.task import Context

    task = task._get_current_object()
    task_id = task_id or str(uuid.uuid4())
    delivered = headers or {}
    request = Context({"id": task_id, "args": list(args), "kwargs": {}, "retries": 0, "headers": delivered,
                       "delivery_info": {"exchange": "", "routing_key": queue} if queue else {},
                       "called_directly": False})
    attempt = Attempt(task=task, request=request, args=tuple(args), kwargs={}, started=time.time(), started_perf=0.0)
    next_headers = {**delivered, HEADER: {"attempt": attempt.number + 1, "started_at": attempt.history.started_at,
                                          "history": [*attempt.history.entries, {"attempt": attempt.number}]}}
    options = {"countdown": countdown, "headers": next_headers, "task_id": task_id}
    if queue:
        options["queue"] = queue
    if expires is not None:
        options["expires"] = expires
    sending.send_retry(attempt, task.signature(list(args), {}, options), countdown)
    return task_id


def row(key):
    return ScheduledMessage.objects.get(key=key)


# -- a long retry waits in the database -----------------------------------------------------


def test_a_long_retry_is_a_row_not_an_eta_message(queue):
    task_id = retry(add, (1, 2), queue=queue, countdown=3600)
    assert sent(queue) == []
    rows = list(ScheduledMessage.objects.filter(task_id=task_id))
    assert len(rows) == 1
    assert rows[0].kind == "retry" and rows[0].state == "scheduled"
    assert rows[0].due_at == pytest.approx(time.time() + 3600, abs=5)
    args, kwargs, options = scheduler.unpack(rows[0].message)
    assert args == [1, 2] and options["queue"] == queue and options["task_id"] == task_id
    assert "countdown" not in options and HEADER in options["headers"]


def test_a_short_retry_is_still_an_eta_message(queue):
    retry(add, (1, 2), queue=queue, countdown=1)
    assert [name for name, _, _ in sent(queue)] == ["tests.test_scheduler.add"]
    assert not ScheduledMessage.objects.exists()


def test_durable_retries_can_be_switched_off(queue):
    with override_settings(SAFETYNET={"DURABLE_RETRY_SECONDS": None}):
        retry(add, (1, 2), queue=queue, countdown=3600)
    assert len(sent(queue)) == 1 and not ScheduledMessage.objects.exists()


def test_the_same_retry_scheduled_twice_is_one_row(queue):
    """A redelivered attempt decides its retry again: the task's row keeps the first one; a later attempt's
    retry writes over it."""
    headers = retry_headers(started=time.time() - 60)
    retry(add, (1, 2), task_id="t-1", queue=queue, countdown=60, headers=headers)
    first = row("t-1")
    retry(add, (1, 2), task_id="t-1", queue=queue, countdown=600, headers=headers)
    assert ScheduledMessage.objects.filter(task_id="t-1").count() == 1 and row("t-1").due_at == first.due_at
    later = {HEADER: {**headers[HEADER], "attempt": 3, "history": [{}, {}]}}
    retry(add, (1, 2), task_id="t-1", queue=queue, countdown=600, headers=later)
    assert row("t-1").entry == first.entry + 1 and row("t-1").due_at > first.due_at + 500


def test_a_retry_scheduled_inside_a_transaction_that_rolls_back_is_kept(queue):
    """self.retry() inside the body's own atomic block: the Retry rolls it back, not the retry."""
    with pytest.raises(RuntimeError), transaction.atomic():
        retry(add, (1, 2), task_id="t-rollback", queue=queue, countdown=60)
        raise RuntimeError("the body's transaction rolls back")
    assert row("t-rollback").state == "scheduled"


# -- the relay --------------------------------------------------------------------------------


def test_the_relay_publishes_what_is_due_once_and_leaves_the_rest(queue):
    retry(add, (1, 2), task_id="due", queue=queue, countdown=60)
    retry(add, (3, 4), task_id="later", queue=queue, countdown=3600)
    ScheduledMessage.objects.filter(task_id="due").update(due_at=time.time() - 1)
    run = scheduler.relay(app)
    assert (run.published, run.resent, run.failed) == (1, 0, 0)
    [(name, task_id, headers)] = sent(queue)
    assert (name, task_id) == ("tests.test_scheduler.add", "due")
    key, token = headers[RELAYED]
    assert key == "due" and token == row("due").token and row("due").state == "published"
    assert HEADER in headers  # the attempt history travels on
    assert scheduler.relay(app).taken == 0
    assert len(sent(queue)) == 1 and row("later").state == "scheduled"


def test_a_message_the_broker_refuses_is_put_back_with_its_error(queue):
    from tests.integration.conftest import configure_app

    broker, backend = app.conf.broker_url, app.conf.result_backend
    configure_app("redis://127.0.0.1:1/0", backend)  # nothing listens there: connection refused
    try:
        retry(add, (1, 2), task_id="refused", queue=queue, countdown=60)
        ScheduledMessage.objects.update(due_at=time.time() - 1)
        run = scheduler.relay(app)
        assert (run.published, run.failed) == (0, 1) and run.error is not None
        kept = row("refused")
        # The broker is away: not the row's failure (the relay's own turns back off while it is away).
        assert kept.state == "scheduled" and kept.publishes == 0 and kept.failures == 0
        assert "Error" in kept.last_error and kept.due_at == pytest.approx(time.time() + 1, abs=1)
    finally:
        configure_app(broker, backend)


def test_a_row_that_cannot_be_published_waits_longer_each_time_then_is_dead_lettered(queue):
    """The broker is there but the row itself fails (a broken message, a bad option): each failure waits longer,
    so it holds nothing back, and after MAX_PUBLISH_FAILURES it is a dead letter, not a retry for ever."""
    from safetynet.schedule import _relay

    retry(add, (1, 2), task_id="poison", queue=queue, countdown=60)
    retry(add, (3, 4), task_id="broken", queue=queue, countdown=60)
    retry(add, (5, 6), task_id="fine", queue=queue, countdown=60)
    args, kwargs, options = scheduler.unpack(row("poison").message)
    ScheduledMessage.objects.filter(key="poison").update(
        message=json.dumps({"args": args, "kwargs": kwargs, "options": {**options, "expires": "next tuesday"}}))
    ScheduledMessage.objects.filter(key="broken").update(message="{not json")
    ScheduledMessage.objects.update(due_at=time.time() - 1)
    for failures in range(1, _relay.MAX_PUBLISH_FAILURES):
        scheduler.relay(app)  # "broken" fails first (by key); the rest are due again in a second
        ScheduledMessage.objects.filter(key__in=["fine", "poison"], state="scheduled").update(due_at=time.time() - 1)
        scheduler.relay(app)  # "fine" is published (the first time round), "poison" fails
        assert {row(key).failures for key in ("poison", "broken")} == {failures}
        if failures <= 2:
            assert row("poison").due_at == pytest.approx(time.time() + 2 * failures * failures, abs=1)
        ScheduledMessage.objects.filter(key__in=["poison", "broken"]).update(due_at=time.time() - 1)
    assert row("fine").state == "published"  # the poison rows held it back no longer than a second
    assert scheduler.relay(app).given_up == 1
    ScheduledMessage.objects.filter(key="poison").update(due_at=time.time() - 1)
    run = scheduler.relay(app)
    poison, broken = DeadLetter.objects.get(task_id="poison"), DeadLetter.objects.get(task_id="broken")
    assert poison.reason == "rejected" and "could not be published 10 times" in poison.detail
    assert poison.args == [1, 2] and poison.exception_type == "ValueError"
    assert broken.reason == "undecodable" and base64.b64decode(broken.raw_body) == b"{not json"
    assert row("poison").state == row("broken").state == "consumed"
    assert run.given_up == 1


def test_a_relay_publishes_only_the_rows_of_its_own_broker(queue):
    """Workers of an app on another broker share the database: they leave this broker's rows be."""
    from celery import Celery

    retry(add, (1, 2), task_id="mine", queue=queue, countdown=60)
    ScheduledMessage.objects.update(due_at=time.time() - 1)
    other = Celery("elsewhere", broker="redis://127.0.0.1:6379/12", set_as_current=False)
    try:
        assert scheduler.relay(other).taken == 0
    finally:
        other.close()
    assert row("mine").state == "scheduled"
    assert scheduler.relay(app).published == 1


def test_the_broker_is_where_it_is_not_how_it_is_reached(queue):
    """A new password (or option) in the broker URL leaves the rows to the same relays; rows written by an earlier
    version (a digest of the whole URL) are taken over by the relay of that URL."""
    import hashlib

    from celery import Celery

    url = app.conf.broker_url
    same = Celery("same-place", broker=url.replace("redis://", "redis://:new-password@") + "?health_check_interval=5",
                  set_as_current=False)
    try:
        assert scheduler.broker_of(same) == scheduler.broker_of(app)
    finally:
        same.close()
    assert scheduler.brokers_of(app) == (scheduler.broker_of(app), hashlib.sha256(url.encode()).hexdigest()[:16])
    retry(add, (1, 2), task_id="legacy", queue=queue, countdown=60)
    ScheduledMessage.objects.filter(key="legacy").update(due_at=time.time() - 1,
                                                         broker=hashlib.sha256(url.encode()).hexdigest()[:16])
    assert scheduler.relay(app).published == 1
    assert row("legacy").broker == scheduler.broker_of(app)


def test_a_published_message_nobody_took_is_sent_again_with_a_new_token(queue):
    retry(add, (1, 2), task_id="lost", queue=queue, countdown=60)
    ScheduledMessage.objects.update(due_at=time.time() - 1)
    scheduler.relay(app)
    first = row("lost").token
    # LOST_MESSAGE_SECONDS later nobody has taken it (the broker lost it):
    ScheduledMessage.objects.update(due_at=time.time() - 1)
    run = scheduler.relay(app)
    assert run.resent == 1
    again = row("lost")
    assert again.publishes == 2 and again.token != first
    tokens = [headers[RELAYED][1] for _, _, headers in sent(queue)]
    assert tokens == [first, again.token]


def test_a_message_sent_again_too_often_is_dead_lettered(queue):
    retry(add, (1, 2), task_id="nobody", queue=queue, countdown=60)
    ScheduledMessage.objects.update(state="published", publishes=scheduler.MAX_RESENDS + 1, due_at=time.time() - 1)
    run = scheduler.relay(app)
    assert run.given_up == 1 and sent(queue) == []
    dead = DeadLetter.objects.get(task_id="nobody")
    assert dead.reason == "rejected" and dead.exception_type == "safetynet.LostMessage"
    assert row("nobody").state == "consumed"


# -- one copy runs ---------------------------------------------------------------------------


def test_the_first_copy_of_the_latest_publish_wins_and_its_redelivery_runs_too():
    retry(add, (1, 2), task_id="copies", countdown=60)
    ScheduledMessage.objects.filter(key="copies").update(state="published", token="token-a")
    assert scheduler.accept("copies", "token-old") is False  # a copy of an earlier publish
    assert scheduler.accept("copies", "token-a") is True
    assert scheduler.accept("copies", "token-a") is True  # the broker redelivering the same copy
    assert scheduler.accept("copies", "token-b") is False  # a second copy
    assert row("copies").state == "consumed"
    assert scheduler.accept("purged-long-ago", "token-c") is True  # no row: run it


RUNS = []


@safetynet.task(name="tests.test_scheduler.counted", bind=True)
def counted(self):
    RUNS.append(self.request.id)


def test_a_second_copy_is_dropped_before_the_body_runs():
    runs = RUNS
    runs.clear()
    retry(counted, (), task_id="twice", countdown=60)
    ScheduledMessage.objects.filter(key="twice").update(state="published", token="first")
    scheduler.accept("twice", "first")
    second = counted.apply(task_id="twice", headers={RELAYED: ["twice", "second"]})
    assert second.state == "IGNORED" and runs == []
    first = counted.apply(task_id="twice", headers={RELAYED: ["twice", "first"]})
    assert first.state == "SUCCESS" and runs == ["twice"]


def test_the_second_copy_check_is_tried_again_while_the_database_is_away(monkeypatch, caplog):
    """A relayed copy is not run unchecked at the first database error: the check is tried again; only when the
    database stays away through every try does it run (a lost message would be worse than a rare second copy)."""
    from django.db import OperationalError

    from safetynet.schedule import plugin

    runs = RUNS
    runs.clear()
    retry(counted, (), task_id="away", countdown=60)
    ScheduledMessage.objects.filter(key="away").update(state="published", token="first")
    scheduler.accept("away", "first")
    monkeypatch.setattr(plugin, "CHECK_WAITS", (0.0, 0.0, 0.0))
    real, failures = plugin._rows.accept, []

    def flaky(key, token):
        if len(failures) < 2:
            failures.append(key)
            raise OperationalError("the database is away")
        return real(key, token)

    monkeypatch.setattr(plugin._rows, "accept", flaky)
    second = counted.apply(task_id="away", headers={RELAYED: ["away", "second"]})
    assert len(failures) == 2 and second.state == "IGNORED" and runs == []  # checked on the third try: dropped

    def away(key, token):
        raise OperationalError("the database is away")

    monkeypatch.setattr(plugin._rows, "accept", away)
    third = counted.apply(task_id="away", headers={RELAYED: ["away", "third"]})
    assert third.state == "SUCCESS" and runs == ["away"]
    assert "could not check its relayed copy" in caplog.text and "4 tries" in caplog.text


# -- enqueue modes ---------------------------------------------------------------------------


def test_an_outbox_message_is_published_after_commit_and_never_after_a_rollback(queue):
    with transaction.atomic():
        kept = add_outbox.apply_async((1, 2), queue=queue)
        assert sent(queue) == [] and row(kept.id).state == "scheduled"
    assert [task_id for _, task_id, _ in sent(queue)] == [kept.id]
    assert row(kept.id).state == "published"
    with pytest.raises(RuntimeError), transaction.atomic():
        dropped = add_outbox.apply_async((3, 4), queue=queue)
        raise RuntimeError("rolled back")
    assert not ScheduledMessage.objects.filter(key=dropped.id).exists()
    assert len(sent(queue)) == 1


def test_an_outbox_message_waits_for_the_relay_when_the_broker_is_away(queue):
    from tests.integration.conftest import configure_app

    broker, backend = app.conf.broker_url, app.conf.result_backend
    configure_app("redis://127.0.0.1:1/0", backend)  # nothing listens there: connection refused
    try:
        result = add_outbox.apply_async((1, 2), queue=queue)
    finally:
        configure_app(broker, backend)
    waiting = row(result.id)
    assert waiting.state == "scheduled" and waiting.publishes == 0 and waiting.last_error
    # The broker is back (here: the app points at the working broker again, a different URL than the
    # closed port that played the broker being down, so the row is moved over to it).
    ScheduledMessage.objects.update(due_at=time.time() - 1, broker=scheduler.broker_of(app))
    assert scheduler.relay(app).published == 1
    assert [task_id for _, task_id, _ in sent(queue)] == [result.id]


def test_an_outbox_countdown_waits_in_the_database(queue):
    result = add_outbox.apply_async((1, 2), queue=queue, countdown=600)
    assert sent(queue) == []
    assert row(result.id).due_at == pytest.approx(time.time() + 600, abs=5)


def test_on_commit_publishes_after_commit_only(queue):
    with transaction.atomic():
        result = add.apply_async((1, 2), queue=queue, enqueue="on_commit")
        assert sent(queue) == []
    assert [task_id for _, task_id, _ in sent(queue)] == [result.id]
    with pytest.raises(RuntimeError), transaction.atomic():
        add.delay_on_commit(3, 4)  # Celery's DjangoTask method works on a safetynet task
        raise RuntimeError("rolled back")
    assert len(sent(queue)) == 1


def test_unique_for_in_outbox_mode_is_taken_at_commit(queue):
    from safetynet import shared

    key = f"pay-{uuid.uuid4().hex[:6]}"
    order = key.removeprefix("pay-")
    with transaction.atomic():
        first = pay_once.apply_async((order,), queue=queue)
    with transaction.atomic():
        second = pay_once.apply_async((order,), queue=queue)
    assert [task_id for _, task_id, _ in sent(queue)] == [first.id]
    assert not ScheduledMessage.objects.filter(key=second.id).exists()
    shared.delete(f"unique:{key}")


def test_an_outbox_message_must_be_json(queue):
    with pytest.raises(ConfigurationError, match="must be JSON"):
        add_outbox.apply_async((object(), 2), queue=queue)


def test_bad_enqueue_modes_are_refused():
    with pytest.raises(ConfigurationError, match=r"enqueue must be one of 'now', 'on_commit', 'outbox'"):
        @safetynet.task(enqueue="later")
        def later():
            pass
    with pytest.raises(ConfigurationError, match="enqueue must be one of"):
        add.apply_async((1, 2), enqueue="tomorrow")
    for setting, value in (("ENQUEUE", "later"), ("DURABLE_RETRY_SECONDS", -1), ("RELAY_POLL_SECONDS", 0),
                           ("RELAY_IN_WORKERS", "yes"), ("SCHEDULE_KEEP_SECONDS", 1)):
        with pytest.raises(ConfigurationError, match=setting):
            conf.build({setting: value})


# -- housekeeping ----------------------------------------------------------------------------


def test_rows_done_with_are_purged_after_the_keep_time(queue):
    retry(add, (1, 2), task_id="old", countdown=60)
    retry(add, (1, 2), task_id="waiting", countdown=60)
    ScheduledMessage.objects.filter(key="old").update(state="published", token="t")
    scheduler.accept("old", "t")
    ScheduledMessage.objects.update(updated_at=time.time() - 90_000)
    assert scheduler.purge(time.time() - 86_400) == 1
    assert list(ScheduledMessage.objects.values_list("key", flat=True)) == ["waiting"]


def test_pack_keeps_times_and_makes_a_relative_expiry_absolute():
    eta = datetime(2030, 1, 1, tzinfo=timezone.utc)
    now = time.time()
    text = scheduler.pack((1,), {"b": eta}, {"expires": 60, "producer": object(), "countdown": 5}, now)
    args, kwargs, options = scheduler.unpack(text)
    assert args == [1] and kwargs == {"b": eta}
    assert "producer" not in options and "countdown" not in options
    assert abs(options["expires"] - datetime.fromtimestamp(now + 60, tz=timezone.utc)) < timedelta(seconds=1)
    assert scheduler.delay_of({"eta": eta}, now) == pytest.approx(eta.timestamp() - now)
    assert scheduler.delay_of({"countdown": 7}, now) == 7


def test_due_now_brings_waiting_retries_forward(queue):
    retry(add, (1, 2), task_id="hours", queue=queue, countdown=7200)
    assert scheduler.bring_forward(ScheduledMessage.objects.all()) == 1
    assert scheduler.relay(app).published == 1
    assert [task_id for _, task_id, _ in sent(queue)] == ["hours"]
    with connection.cursor() as cursor:  # the table the relay reads is indexed on due time
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'safetynet_scheduled_due'")
        assert "due_at" in cursor.fetchone()[0]


def test_a_dead_letter_keeps_no_relay_token():
    """A replay is a new message: the token of the copy that died must not travel with it."""
    from safetynet import deadletter

    deadletter.record(deadletter.Failure(
        task_name="tests.test_scheduler.add", task_id="died-after-relay", reason="permanent_error", args=[1, 2],
        headers={RELAYED: ["k", "t"], "tenant": "a"}, exception_type="ValueError", exception_message="bad",
        failed_at=time.time()))
    assert DeadLetter.objects.get(task_id="died-after-relay").headers == {"tenant": "a"}


# -- the commands ----------------------------------------------------------------------------


def command(*args):
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("safetynet", *args, stdout=out)
    return out.getvalue()


def test_schedule_list_shows_what_waits_and_when(queue):
    assert "Nothing is waiting" in command("schedule", "list")
    retry(add, (1, 2), task_id="listed", queue=queue, countdown=3600)
    add_outbox.apply_async((1, 2), queue=queue, countdown=600)
    text = command("schedule", "list")
    assert "listed" in text and "retry" in text and "outbox" in text and "60m" in text
    [item] = json.loads(command("schedule", "list", "--kind", "retry", "--json"))
    assert item["key"] == "listed" and item["state"] == "scheduled" and item["task_name"] == add.name


def test_schedule_due_now_needs_a_selection_and_can_be_dry(queue):
    from django.core.management import CommandError

    retry(add, (1, 2), task_id="forward", queue=queue, countdown=3600)
    with pytest.raises(CommandError, match="--key KEY"):
        command("schedule", "due-now")
    assert "would make 1 waiting" in command("schedule", "due-now", "--all", "--dry-run")
    assert row("forward").due_at > time.time() + 3000
    assert "Made 1 waiting" in command("schedule", "due-now", "--key", "forward")
    assert row("forward").due_at <= time.time()
    assert "Published 1, sent again 0" in command("relay", "--once")
    assert [task_id for _, task_id, _ in sent(queue)] == ["forward"]


def test_relay_refuses_a_poll_interval_out_of_range():
    from django.core.management import CommandError

    with pytest.raises(CommandError, match="--poll must be from 0.05 to 60"):
        command("relay", "--poll", "0")


def test_a_retry_whose_task_id_was_used_before_is_still_scheduled(queue):
    """Task.replace or a fixed task id: the row belongs to an earlier message that was taken; the new message
    (another first attempt) takes the row over. A redelivered attempt of the earlier one changes nothing."""
    earlier = retry_headers(started=time.time() - 3600)
    retry(add, (1, 2), task_id="reused", queue=queue, countdown=60, headers=earlier)
    ScheduledMessage.objects.filter(key="reused").update(state="published", token="old")
    scheduler.accept("reused", "old")
    retry(add, (1, 2), task_id="reused", queue=queue, countdown=60, headers=earlier)  # the earlier one, redelivered
    assert row("reused").state == "consumed"
    retry(add, (3, 4), task_id="reused", queue=queue, countdown=60, headers=retry_headers(started=time.time()))
    taken = row("reused")
    assert taken.state == "scheduled" and scheduler.unpack(taken.message)[0] == [3, 4]


def test_an_expired_message_is_not_published(queue):
    retry(add, (1, 2), task_id="late", queue=queue, countdown=60, expires=1)
    ScheduledMessage.objects.update(due_at=time.time() - 1)
    time.sleep(1.1)
    scheduler.relay(app)
    assert sent(queue) == [] and row("late").state == "consumed"


def test_a_retry_whose_row_another_message_holds_is_sent_as_an_eta_message(queue, caplog):
    """A reused task id whose earlier message is not taken yet keeps its row; the new retry is not dropped."""
    retry(add, (1, 2), task_id="held", queue=queue, countdown=60, headers=retry_headers(started=time.time() - 3600))
    assert sent(queue) == []
    retry(add, (3, 4), task_id="held", queue=queue, countdown=60, headers=retry_headers(started=time.time()))
    assert scheduler.unpack(row("held").message)[0] == [1, 2]  # the earlier message keeps its row
    [(name, task_id, headers)] = sent(queue)
    assert (name, task_id) == (add.name, "held") and "eta" in headers
    assert "another message with this task id holds its row" in caplog.text
    # The same retry decided again (a redelivered attempt) is there already: nothing more is sent.
    retry(add, (1, 2), task_id="held", queue=queue, countdown=60, headers=retry_headers(started=time.time() - 3600))
    assert len(sent(queue)) == 1


def test_a_published_row_the_relay_still_watches_is_not_purged(queue):
    retry(add, (1, 2), task_id="watched", countdown=60)
    retry(add, (1, 2), task_id="never", countdown=60)
    retry(add, (1, 2), task_id="overdue", countdown=60)
    ScheduledMessage.objects.filter(key="watched").update(state="published", due_at=time.time() + 86_400)
    ScheduledMessage.objects.filter(key="never").update(state="published", due_at=scheduler.NEVER)
    ScheduledMessage.objects.filter(key="overdue").update(state="published", due_at=time.time() - 90_000)
    ScheduledMessage.objects.update(updated_at=time.time() - 90_000)
    assert scheduler.purge(time.time() - 86_400) == 2
    assert list(ScheduledMessage.objects.values_list("key", flat=True)) == ["watched"]
