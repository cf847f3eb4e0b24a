"""Messages the broker loses: an idempotent task's message is kept until a run claims it, and sent again by the
relay (the same table and the same resend path as the durable schedule's), against the real PostgreSQL and Redis.

Messages are read back from the broker's Redis list of a queue of each test's own.
"""

import os
import json
import time
import uuid

import pytest
import redis
from django.db import connection

from safetynet import idempotency, schedule
from safetynet.idempotency import WON
from safetynet.models import DeadLetter, IdempotencyClaim, ScheduledMessage
from safetynet.protocol import headers
from tests.fixtures import tasks
from tests.celery_app import app

pytestmark = pytest.mark.django_db(transaction=True)

BROKER = redis.Redis.from_url(os.environ.get("SAFETYNET_TEST_BROKER", "redis://127.0.0.1:6379/15"))


@pytest.fixture
def queue():
    name = f"safetynet-lost-{uuid.uuid4().hex[:8]}"
    yield name
    BROKER.delete(name)


def sent(queue):
    """The messages in ``queue``, oldest first: (task id, headers)."""
    messages = [json.loads(raw) for raw in reversed(BROKER.lrange(queue, 0, -1))]
    return [(m["headers"]["id"], m["headers"]) for m in messages]


def due_now(key):
    ScheduledMessage.objects.filter(key=key).update(due_at=time.time() - 1)


def claim(key, task_id, handover=""):
    return idempotency.claim(key, task_name=tasks.idempotent_charge.name, task_id=task_id, lease=30,
                             max_deliveries=3, handover=handover)


def charge(queue, **options):
    order = uuid.uuid4().hex[:8]
    result = tasks.idempotent_charge.apply_async(args=(order,), queue=queue, **options)
    return f"charge-{order}", result.id


def test_a_sent_task_is_kept_and_sent_again_once_its_grace_runs_out(queue):
    key, task_id = charge(queue)
    row = ScheduledMessage.objects.get(key=task_id)
    assert (row.kind, row.state, row.claim_key) == ("sent", "published", key)
    assert row.due_at == pytest.approx(time.time() + 900, abs=5)  # LOST_MESSAGE_SECONDS
    assert schedule.relay(app).handled == 0  # not yet due
    due_now(task_id)
    assert schedule.relay(app).resent == 1  # nobody claimed it: the broker lost it
    [(first, _), (again, again_headers)] = sent(queue)
    assert first == again == task_id and again_headers[headers.RELAYED][0] == task_id
    assert schedule.relay(app).handled == 0  # due again only after another grace
    held = claim(key, task_id)
    assert (held.outcome, held.deliveries) == (WON, 1)
    assert idempotency.mark_succeeded(held, "ok")
    due_now(task_id)
    run = schedule.relay(app)
    assert (run.taken, run.resent) == (1, 0) and ScheduledMessage.objects.get(key=task_id).state == "consumed"


def test_a_message_a_run_holds_is_not_sent_again_and_a_late_record_changes_nothing(queue):
    key, task_id = charge(queue)
    held = claim(key, task_id)
    due_now(task_id)
    run = schedule.relay(app)
    assert (run.taken, run.resent) == (1, 0)  # running: looked at again once its lease may have run out
    assert ScheduledMessage.objects.get(key=task_id).due_at > held.lease_until
    idempotency.release(held, ValueError("bad"))
    due_now(task_id)
    assert schedule.relay(app).taken == 1 and ScheduledMessage.objects.get(key=task_id).state == "consumed"
    # A replay (a new task id for the same key) is kept on its own.
    _, replay_id = charge(queue)
    assert ScheduledMessage.objects.get(key=replay_id).state == "published"


def test_an_orphaned_claim_is_sent_again_at_once_and_counts_the_dead_run(queue):
    key, task_id = charge(queue)
    assert claim(key, task_id).deliveries == 1
    IdempotencyClaim.objects.filter(key=key).update(lease_until=time.time() - 1)  # its worker died
    assert schedule.sweep_orphans() == 1  # due now, not LOST_MESSAGE_SECONDS later
    assert schedule.relay(app).resent == 1
    again = claim(key, task_id)
    assert (again.outcome, again.deliveries) == (WON, 2)


def test_a_late_retry_sent_again_keeps_its_hand_over_and_counts_no_crash(queue, settings):
    """An idempotent task's retry that is an ETA message is kept too; sent again, it still holds the claim."""
    from celery import uuid as new_id

    settings.SAFETYNET = {**settings.SAFETYNET, "DURABLE_RETRY_SECONDS": None}  # its 5 s retry: an ETA message
    from celery.app.trace import build_tracer

    task = tasks.idempotent_self_retry._get_current_object()
    task_id = new_id()
    tracer = build_tracer(task.name, task, eager=False, propagate=False, app=task._get_app())
    request = {"id": task_id, "task": task.name, "args": [7], "kwargs": {}, "retries": 0, "is_eager": False,
               "hostname": "w", "delivery_info": {"exchange": "", "routing_key": queue}, "called_directly": False}
    assert tracer(task_id, [7], {}, request).info.state == "RETRY"
    [(_, retry_headers)] = sent(queue)
    token = retry_headers[headers.HANDOVER]
    row = ScheduledMessage.objects.get(key=task_id)
    assert (row.kind, row.state, row.claim_key, row.entry) == ("retry", "published", "self-retry-7", 1)
    # The retry was published a minute ago and is late: the claim it hands over ran out a second ago.
    ScheduledMessage.objects.filter(key=task_id).update(updated_at=time.time() - 60)
    IdempotencyClaim.objects.filter(key="self-retry-7").update(lease_until=time.time() - 1)
    for _ in range(2):
        assert schedule.sweep_orphans() == 1
        assert schedule.relay(app).resent == 1
        assert schedule.sweep_orphans() == 0  # once per lapse: the copy sent again waits for a run, or its grace
        # A run took the copy (it keeps the hand-over) and died too.
        IdempotencyClaim.objects.filter(key="self-retry-7").update(lease_until=time.time() - 1,
                                                                  updated_at=time.time())
    assert [found[headers.HANDOVER] for _, found in sent(queue)] == [token] * 3
    taken = idempotency.claim("self-retry-7", task_name=task.name, task_id=task_id, lease=30, max_deliveries=3,
                              handover=token)
    assert (taken.outcome, taken.deliveries) == (WON, 1)


def test_a_message_nobody_takes_is_dead_lettered_after_max_resends_and_an_expired_one_is_dropped(queue):
    key, task_id = charge(queue)
    for _ in range(schedule.MAX_RESENDS + 1):
        due_now(task_id)
        schedule.relay(app)
    assert len(sent(queue)) == 1 + schedule.MAX_RESENDS
    row = DeadLetter.objects.get(task_id=task_id)
    assert row.reason == "rejected" and f"idempotency key {key!r}" in row.detail and row.args == [key[7:]]
    assert row.exception_type == "safetynet.LostMessage"
    assert ScheduledMessage.objects.get(key=task_id).state == "consumed"

    expired_key, expired_id = charge(queue, expires=1)
    time.sleep(1.1)
    claim(expired_key, "someone-else")  # held by another task: this one never ran
    due_now(expired_id)
    assert schedule.relay(app).resent == 0 and len(sent(queue)) == 2 + schedule.MAX_RESENDS
    assert ScheduledMessage.objects.get(key=expired_id).state == "consumed"


def test_a_task_sent_with_a_countdown_is_not_sent_again_before_it_is_due(queue):
    _, task_id = charge(queue, countdown=3600, expires=7200)
    row = ScheduledMessage.objects.get(key=task_id)
    assert 3600 + 895 < row.due_at - time.time() < 3600 + 905
    _, _, options = schedule.unpack(row.message)
    assert options["queue"] == queue and "expires" in options


def test_a_resend_the_broker_refuses_is_tried_again_after_a_backoff(queue):
    from tests.integration.conftest import configure_app

    key, task_id = charge(queue)
    due_now(task_id)
    broker, backend = app.conf.broker_url, app.conf.result_backend
    configure_app("redis://127.0.0.1:1/0", backend)  # nothing listens there: connection refused
    try:
        ScheduledMessage.objects.update(broker=schedule.broker_of(app))
        run = schedule.relay(app)
    finally:
        configure_app(broker, backend)
    assert run.failed == 1 and run.error is not None
    row = ScheduledMessage.objects.get(key=task_id)
    assert row.state == "published" and row.publishes == 1 and row.failures == 0  # the broker was away
    assert row.due_at == pytest.approx(time.time() + 1, abs=1) and "Error" in row.last_error
    ScheduledMessage.objects.update(due_at=time.time() - 1, broker=schedule.broker_of(app))
    assert schedule.relay(app).resent == 1 and [found for found, _ in sent(queue)] == [task_id, task_id]


def test_the_orphan_sweep_reads_an_index():
    with connection.cursor() as cursor:
        cursor.execute("SELECT indexdef FROM pg_indexes WHERE indexname = 'safetynet_claim_unsettled'")
        assert "in_progress" in cursor.fetchone()[0]


def test_a_second_message_for_the_same_key_waits_its_turn_and_is_done_once_the_key_succeeded(queue):
    """The same key enqueued twice (two task ids): the second message's fate follows the key's claim."""
    key, first_id = charge(queue)
    order = key[len("charge-"):]
    second_id = tasks.idempotent_charge.apply_async(args=(order,), queue=queue).id
    held = claim(key, first_id)
    for task_id in (first_id, second_id):
        due_now(task_id)
    run = schedule.relay(app)
    assert (run.taken, run.resent) == (2, 0)  # a live run holds the key: both wait for it
    assert idempotency.mark_succeeded(held, "ok")
    for task_id in (first_id, second_id):
        due_now(task_id)
    run = schedule.relay(app)
    assert (run.taken, run.resent) == (2, 0)  # the effect is done: neither is sent again, nor dead-lettered
    assert set(ScheduledMessage.objects.filter(key__in=[first_id, second_id]).values_list("state", flat=True)) == {
        "consumed"}
    assert not DeadLetter.objects.filter(task_id__in=[first_id, second_id]).exists()


def test_another_tasks_failure_leaves_the_key_to_a_message_nobody_took(queue):
    key, first_id = charge(queue)
    second_id = tasks.idempotent_charge.apply_async(args=(key[len("charge-"):],), queue=queue).id
    idempotency.release(claim(key, first_id), ValueError("declined"))
    due_now(second_id)
    assert schedule.relay(app).resent == 1  # lost: the first task's failure does not settle it
    due_now(first_id)
    assert schedule.relay(app).taken == 1  # the first task failed: its own dead letter tells


def test_the_orphan_sweep_joins_in_python_when_claims_live_in_another_database(queue):
    from safetynet.schedule._relay import _sweep_apart

    key, task_id = charge(queue)
    claim(key, task_id)
    IdempotencyClaim.objects.filter(key=key).update(lease_until=time.time() - 1)
    assert _sweep_apart("default", "default", time.time(), 1000) == 1
    assert schedule.relay(app).resent == 1
    assert _sweep_apart("default", "default", time.time(), 1000) == 0  # once per lapse
