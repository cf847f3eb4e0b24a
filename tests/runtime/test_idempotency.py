"""Idempotency keys (declared, rendered, refused) and claims (won, deferred, stored, taken over)."""

import time
import uuid

import pytest
from django.core import checks
from django.db import connection
from django.test import override_settings

import safetynet
from safetynet import ConfigurationError, idempotency, shared
from safetynet.idempotency import CRASH_LOOP, IN_PROGRESS, SUCCEEDED, WON, IdempotencyKeyError
from safetynet.models import IdempotencyClaim
from tests import tasks

# -- declaring a key -----------------------------------------------------------------------


def test_a_template_naming_a_missing_argument_is_refused_when_declared():
    with pytest.raises(ConfigurationError, match=r"names 'order', which is not an argument.*order_id"):
        @safetynet.task(idempotency_key="charge-{order}")
        def charge(order_id, amount):
            pass


def test_a_template_for_a_bound_task_is_checked_without_self():
    with pytest.raises(ConfigurationError, match=r"names 'self'"):
        @safetynet.task(bind=True, idempotency_key="charge-{self}")
        def charge(self, order_id):
            pass

    @safetynet.task(bind=True, idempotency_key="charge-{order_id}")
    def fine(self, order_id):
        pass


@pytest.mark.parametrize("spec, message", [
    ("charge-{}", "name the argument"),
    ("charge-{0}", "name the argument"),
    ("charge", "names no argument"),
    ("charge-{order_id", "not a valid template"),
    ("", "must be a template"),
    (42, "must be a template"),
])
def test_bad_templates_are_refused_with_what_to_write(spec, message):
    with pytest.raises(ConfigurationError, match=message):
        @safetynet.task(idempotency_key=spec)
        def charge(order_id):
            pass


def test_a_template_may_name_keyword_arguments_of_a_task_taking_kwargs():
    def open_kwargs(**kwargs):
        pass

    template = idempotency.KeyTemplate("charge-{order_id}", open_kwargs, bound=False, where="task t")
    assert template.render((), {"order_id": 7}) == "charge-7"
    with pytest.raises(IdempotencyKeyError, match="missing 'order_id'"):
        template.render((), {"other": 1})


@pytest.mark.parametrize("option, value, message", [
    ("unique_for", 60, "needs idempotency_key"),
    ("idempotency_lease", 0, "from 1 to 86400"),
    ("idempotency_atomic", "yes", "True or False"),
    ("max_deliveries", 0, ">= 1"),
])
def test_bad_idempotency_options_are_refused(option, value, message):
    with pytest.raises(ConfigurationError, match=message):
        @safetynet.task(**{option: value})
        def charge(order_id):
            pass


def test_an_idempotent_task_acknowledges_late_and_requeues_on_worker_loss_unless_told_otherwise():
    assert tasks.idempotent_charge.acks_late is True
    assert tasks.idempotent_charge.reject_on_worker_lost is True
    assert tasks.idempotent_early_ack.acks_late is False
    assert tasks.send_welcome_email.acks_late is False  # not idempotent: Celery's default


def test_the_class_reads_the_template_and_a_direct_call_has_no_key():
    assert type(tasks.idempotent_charge._get_current_object()).idempotency_key == "charge-{order_id}"
    assert tasks.idempotent_charge.idempotency_key is None  # no request: nothing is running


# -- rendering -----------------------------------------------------------------------------


def test_the_key_comes_from_positional_keyword_and_default_arguments_alike():
    template = tasks.idempotent_charge._idempotency
    assert template.render((42,), {}) == template.render((), {"order_id": 42}) == "charge-42"
    assert tasks.keyed_by_callable._idempotency.render((3, "eu"), {}) == "order/eu/3"


def test_a_key_over_the_limit_is_refused_at_enqueue_with_a_clear_message():
    with pytest.raises(IdempotencyKeyError, match=r"300 characters long; the limit is 255.*identifiers, not payloads"):
        tasks.idempotent_charge.apply_async(args=("x" * 293,))  # refused before anything is sent


def test_a_callable_must_return_a_string():
    def none_key(n):
        pass

    template = idempotency.KeyTemplate(lambda n: None, none_key, bound=False, where="task t")
    with pytest.raises(IdempotencyKeyError, match="returned None, not a string"):
        template.render((1,), {})


# -- claims --------------------------------------------------------------------------------


def _claim(key, lease=30.0, max_deliveries=3, task_id=None):
    return idempotency.claim(key, task_name="t", task_id=task_id or uuid.uuid4().hex, lease=lease,
                             max_deliveries=max_deliveries)


@pytest.mark.django_db
def test_a_claim_is_won_once_and_a_second_run_sees_it_in_progress():
    first = _claim("k-1")
    assert first.outcome == WON and first.deliveries == 1
    second = _claim("k-1")
    assert second.outcome == IN_PROGRESS
    assert second.holder_task_id == IdempotencyClaim.objects.get(key="k-1").task_id
    assert second.lease_until > time.time()


@pytest.mark.django_db
def test_a_succeeded_claim_returns_its_stored_result():
    held = _claim("k-2")
    assert idempotency.mark_succeeded(held, {"charge": "ch_1", "amount": 12})
    later = _claim("k-2")
    assert later.outcome == SUCCEEDED
    assert later.result == {"charge": "ch_1", "amount": 12} and later.result_stored


@pytest.mark.django_db
def test_a_result_that_is_not_json_is_not_stored_and_says_so(caplog):
    held = _claim("k-3")
    assert idempotency.mark_succeeded(held, object())
    later = _claim("k-3")
    assert later.outcome == SUCCEEDED and later.result is None and not later.result_stored
    assert "not JSON" in caplog.text


@pytest.mark.django_db
def test_a_released_claim_is_won_again_afresh():
    held = _claim("k-4")
    idempotency.release(held, ConnectionError("gateway down"))
    row = IdempotencyClaim.objects.get(key="k-4")
    assert row.state == "failed" and row.error == "ConnectionError: gateway down"
    again = _claim("k-4")
    assert again.outcome == WON and again.deliveries == 1


@pytest.mark.django_db
def test_an_expired_lease_is_taken_over_and_the_old_owner_can_no_longer_mark_it():
    dead = _claim("k-5", lease=30)
    IdempotencyClaim.objects.filter(key="k-5").update(lease_until=time.time() - 1)  # its heartbeat stopped
    taker = _claim("k-5")
    assert taker.outcome == WON and taker.deliveries == 2
    assert not idempotency.mark_succeeded(dead, "late")
    assert idempotency.mark_succeeded(taker, "mine")
    assert _claim("k-5").result == "mine"


@pytest.mark.django_db
def test_runs_that_keep_dying_end_in_a_crash_loop():
    _claim("k-6")
    outcomes = []
    for _ in range(3):
        IdempotencyClaim.objects.filter(key="k-6").update(lease_until=0.0)
        outcomes.append(_claim("k-6", max_deliveries=2))
    assert [held.outcome for held in outcomes] == [WON, CRASH_LOOP, CRASH_LOOP]
    assert [held.deliveries for held in outcomes] == [2, 3, 4]


@pytest.mark.django_db(transaction=True)
def test_the_heartbeat_keeps_a_long_run_from_being_taken_over():
    held = _claim("k-7", lease=1.0)
    with idempotency.holding(held):
        time.sleep(2.5)  # more than twice the lease: only the heartbeat keeps it alive
        assert _claim("k-7").outcome == IN_PROGRESS
    time.sleep(1.2)  # no heartbeat now
    assert _claim("k-7").outcome == WON


@pytest.mark.django_db(transaction=True)
def test_atomic_commits_the_writes_with_the_mark_or_neither():
    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS idem_unit_ledger (order_id integer)")
        cursor.execute("DELETE FROM idem_unit_ledger")
    held = _claim("k-8")
    with idempotency.holding(held):
        with idempotency.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO idem_unit_ledger VALUES (1)")
    assert IdempotencyClaim.objects.get(key="k-8").state == "succeeded"

    lost = _claim("k-9")
    IdempotencyClaim.objects.filter(key="k-9").update(owner="someone else")
    with idempotency.holding(lost), pytest.raises(idempotency.ClaimLost):
        with idempotency.atomic():
            with connection.cursor() as cursor:
                cursor.execute("INSERT INTO idem_unit_ledger VALUES (2)")
    with connection.cursor() as cursor:
        cursor.execute("SELECT order_id FROM idem_unit_ledger ORDER BY order_id")
        assert cursor.fetchall() == [(1,)]
        cursor.execute("DROP TABLE idem_unit_ledger")


@pytest.mark.django_db
def test_results_are_stored_as_django_serialises_them_and_nan_is_not_json(caplog):
    import datetime

    held = _claim("k-10")
    assert idempotency.mark_succeeded(held, {"at": datetime.date(2024, 5, 1), "n": (1, 2)})
    assert _claim("k-10").result == {"at": "2024-05-01", "n": [1, 2]}
    held = _claim("k-11")
    assert idempotency.mark_succeeded(held, float("nan"))
    later = _claim("k-11")
    assert later.outcome == SUCCEEDED and later.result is None and not later.result_stored
    held = _claim("k-12")
    assert idempotency.mark_succeeded(held, None)
    later = _claim("k-12")
    assert later.result is None and later.result_stored


@pytest.mark.django_db(transaction=True)
def test_the_claim_does_not_change_the_sessions_commit_setting():
    with connection.cursor() as cursor:
        cursor.execute("SHOW synchronous_commit")
        before = cursor.fetchone()[0]
        assert _claim("k-13").outcome == WON
        cursor.execute("SHOW synchronous_commit")
        assert cursor.fetchone()[0] == before


@pytest.mark.django_db(transaction=True)
def test_run_atomically_marks_with_or_without_writes_and_a_lost_claim_rolls_back_or_runs_no_hook():
    from django.db import transaction

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS idem_unit_ledger2 (order_id integer)")
        cursor.execute("DELETE FROM idem_unit_ledger2")

    def write(order_id):
        with connection.cursor() as cursor:
            cursor.execute("INSERT INTO idem_unit_ledger2 VALUES (%s)", [order_id])
        return order_id

    hooks = []
    assert idempotency.run_atomically(_claim("k-14"), lambda: write(1)) == 1
    assert idempotency.run_atomically(_claim("k-15"), lambda: "nothing written") == "nothing written"
    assert _claim("k-14").result == 1 and _claim("k-15").result == "nothing written"
    for key, body in (("k-16", lambda: write(2)), ("k-17", lambda: "nothing"),
                      ("k-18", lambda: transaction.on_commit(lambda: hooks.append("ran")))):
        lost = _claim(key)
        IdempotencyClaim.objects.filter(key=key).update(owner="someone else")
        with pytest.raises(idempotency.ClaimLost):
            idempotency.run_atomically(lost, body)
        assert IdempotencyClaim.objects.get(key=key).state == IN_PROGRESS
    assert hooks == []
    with connection.cursor() as cursor:
        cursor.execute("SELECT order_id FROM idem_unit_ledger2 ORDER BY order_id")
        assert cursor.fetchall() == [(1,)]
        cursor.execute("DROP TABLE idem_unit_ledger2")


# -- eager runs (the body, the stored result) ----------------------------------------------


@pytest.mark.django_db
def test_an_eager_duplicate_gets_the_stored_result_without_running_the_body():
    tasks.RUNS.clear()
    first = tasks.idempotent_charge.apply(args=(101,)).get()
    second = tasks.idempotent_charge.apply(args=(101,)).get()
    assert first == second == "charged-101"
    assert tasks.RUNS == ["charge-101"]


@pytest.mark.django_db
def test_an_eager_run_meeting_a_key_in_progress_says_so():
    _claim("charge-102")
    result = tasks.idempotent_charge.apply(args=(102,))
    assert isinstance(result.result, idempotency.KeyInProgress)


@pytest.mark.django_db
def test_a_key_over_the_limit_in_a_message_dead_letters_as_permanent():
    result = tasks.keyed_by_callable.apply(args=(1, "x" * 300))
    assert isinstance(result.result, safetynet.Permanent)
    assert "the limit is 255" in str(result.result)


# -- enqueue-side uniqueness ---------------------------------------------------------------


@pytest.mark.django_db
@pytest.mark.parametrize("redis_url", [None, ""], ids=["redis", "database"])
def test_the_same_key_enqueued_twice_within_the_window_sends_one_message(redis_url, monkeypatch):
    sent = []
    monkeypatch.setattr("celery.app.task.Task.apply_async", lambda self, *a, task_id=None, **k: sent.append(task_id))
    key = uuid.uuid4().hex
    with override_settings(SAFETYNET={"REDIS_URL": redis_url}):
        first = tasks.unique_report.apply_async(args=(key,))
        second = tasks.unique_report.apply_async(args=(key,))
        other = tasks.unique_report.apply_async(args=(key + "-other",))
        shared.delete(f"unique:report-{key}")
        shared.delete(f"unique:report-{key}-other")
    assert first is None  # what the stubbed Celery apply_async returned
    assert second.id == sent[0]  # the first message's result, nothing sent
    assert len(sent) == 2 and other is None


@pytest.mark.django_db
@pytest.mark.parametrize("redis_url", [None, ""], ids=["redis", "database"])
def test_shared_counters_count_and_expire(redis_url):
    key = f"test:{uuid.uuid4().hex}"
    with override_settings(SAFETYNET={"REDIS_URL": redis_url}):
        assert [shared.incr(key, ttl=60) for _ in range(3)] == [1, 2, 3]
        shared.delete(key)
        assert shared.incr(key, ttl=0.001) == 1
        time.sleep(1.1)  # Redis keeps at least a second
        assert shared.incr(key, ttl=60) == 1
        assert shared.add(key + ":v", "first", ttl=60) is None
        assert shared.add(key + ":v", "second", ttl=60) == "first"
        shared.delete(key)
        shared.delete(key + ":v")


# -- the system check ----------------------------------------------------------------------


def test_late_acks_without_a_key_draw_w005():
    from safetynet.checks import check_tasks

    warnings = {message.obj: message for message in check_tasks() if message.id == "safetynet.W005"}
    assert "tests.tasks.late_without_key" in warnings
    assert "tests.tasks.idempotent_charge" not in warnings
    assert "safetynet.W005" in {m.id for m in checks.run_checks(tags=["safetynet"])}


@pytest.mark.django_db
def test_a_claim_handed_over_to_the_retry_is_taken_by_its_token_only_and_uncounted():
    held = _claim("k-10")
    token = idempotency.new_handover_token()
    assert idempotency.hand_over(held, token, until=time.time() + 60)
    assert IdempotencyClaim.objects.get(key="k-10").owner == token
    assert _claim("k-10").outcome == IN_PROGRESS  # a duplicate still waits
    assert idempotency.claim("k-10", task_name="t", task_id="x", lease=30, max_deliveries=3,
                             handover="handover/forged").outcome == IN_PROGRESS
    retry = idempotency.claim("k-10", task_name="t", task_id="x", lease=30, max_deliveries=3, handover=token)
    assert (retry.outcome, retry.deliveries) == (WON, 1)
    assert not idempotency.hand_over(held, "handover/again", until=time.time() + 60)  # no longer its owner


@pytest.mark.django_db
def test_uniqueness_takes_the_longest_keys_and_lets_celery_resend_the_same_task_id(monkeypatch):
    sent = []
    monkeypatch.setattr("celery.app.task.Task.apply_async", lambda self, *a, task_id=None, **k: sent.append(task_id))
    name = "n" * 248  # "report-" + 248 = 255 characters, the longest key
    with override_settings(SAFETYNET={"REDIS_URL": ""}):
        tasks.unique_report.apply_async(args=(name,))
        tasks.unique_report.apply_async(args=(name,), task_id=sent[0])  # e.g. Celery's retry_on_worker_lost
        tasks.unique_report.apply_async(args=(name,))
        shared.delete(f"unique:report-{name}")
    assert sent == [sent[0], sent[0]]


@pytest.mark.django_db
def test_expired_shared_rows_are_purged():
    from safetynet.models import SharedKey

    with override_settings(SAFETYNET={"REDIS_URL": ""}):
        shared.incr("gone", ttl=0.001)
        shared.incr("kept", ttl=600)
        time.sleep(0.01)
        assert shared.purge_expired() == 1
    assert list(SharedKey.objects.values_list("key", flat=True)) == ["kept"]


class _App:
    """Stands for the Celery app the sweeper publishes with: records what it would send."""

    def __init__(self):
        self.sent = []

    def send_task(self, name, args=(), kwargs=None, task_id=None, headers=None, **options):
        self.sent.append((name, list(args), kwargs, task_id, headers, options))


@pytest.mark.django_db
def test_a_sent_task_is_queued_and_sent_again_once_its_grace_runs_out():
    message = {"args": [7], "kwargs": {}, "options": {"queue": "q1"}, "headers": {"h": 1}}
    idempotency.track("lost-1", task_name="shop.pay", task_id="tid-lost", message=message, grace=60)
    app = _App()
    assert idempotency.resend_lost(app, grace=60) == 0  # not yet due
    IdempotencyClaim.objects.filter(key="lost-1").update(lease_until=time.time() - 1)
    assert idempotency.resend_lost(app, grace=60) == 1
    assert app.sent == [("shop.pay", [7], {}, "tid-lost", {"h": 1, "safetynet_resent": 1}, {"queue": "q1"})]
    assert idempotency.resend_lost(app, grace=60) == 0  # due again only after another grace
    row = IdempotencyClaim.objects.get(key="lost-1")
    assert (row.state, row.resent) == ("queued", 1)
    held = _claim("lost-1", task_id="tid-lost")
    assert (held.outcome, held.deliveries) == (WON, 1)
    assert idempotency.mark_succeeded(held, "ok")
    assert IdempotencyClaim.objects.get(key="lost-1").message is None


@pytest.mark.django_db
def test_a_run_already_claimed_or_failed_is_not_queued_again_by_a_late_record():
    held = _claim("lost-2", task_id="tid-2")
    idempotency.track("lost-2", task_name="t", task_id="tid-2", message={"args": []}, grace=60)
    assert IdempotencyClaim.objects.get(key="lost-2").state == "in_progress"
    idempotency.release(held, ValueError("bad"))
    idempotency.track("lost-2", task_name="t", task_id="tid-2", message={"args": []}, grace=60)  # its own late record
    assert IdempotencyClaim.objects.get(key="lost-2").state == "failed"
    idempotency.track("lost-2", task_name="t", task_id="tid-3", message={"args": []}, grace=60)  # a new task: a replay
    assert IdempotencyClaim.objects.get(key="lost-2").state == "queued"


@pytest.mark.django_db
def test_an_orphaned_claim_with_its_message_is_sent_again_and_counts_the_dead_run():
    idempotency.track("lost-3", task_name="t", task_id="tid-4", message={"args": [1]}, grace=60)
    held = _claim("lost-3", task_id="tid-4")
    assert held.deliveries == 1
    IdempotencyClaim.objects.filter(key="lost-3").update(lease_until=time.time() - 1)  # its worker died
    app = _App()
    assert idempotency.resend_lost(app, grace=60) == 1
    again = _claim("lost-3", task_id="tid-4")
    assert (again.outcome, again.deliveries) == (WON, 2)


@pytest.mark.django_db
def test_a_late_retry_resent_keeps_its_hand_over_and_counts_no_crash():
    held = _claim("lost-4", task_id="tid-5")
    token = idempotency.new_handover_token()
    retry = {"args": [1], "headers": {idempotency.HANDOVER_HEADER: token}}
    assert idempotency.hand_over(held, token, until=time.time() - 1, message=retry)  # the retry is late
    app = _App()
    for _ in range(3):
        assert idempotency.resend_lost(app, grace=60) == 1
        IdempotencyClaim.objects.filter(key="lost-4").update(lease_until=time.time() - 1)
    assert [sent[4][idempotency.HANDOVER_HEADER] for sent in app.sent] == [token] * 3
    taken = idempotency.claim("lost-4", task_name="t", task_id="tid-5", lease=30, max_deliveries=3, handover=token)
    assert (taken.outcome, taken.deliveries) == (WON, 1)


@pytest.mark.django_db
def test_a_message_nobody_takes_is_dead_lettered_after_max_resends_and_an_expired_one_is_dropped():
    from safetynet.models import DeadLetter

    idempotency.track("lost-5", task_name="shop.pay", task_id="tid-6", message={"args": [9], "options": {}},
                      grace=60)
    app = _App()
    for _ in range(idempotency.MAX_RESENDS + 1):
        IdempotencyClaim.objects.filter(key="lost-5").update(lease_until=time.time() - 1)
        idempotency.resend_lost(app, grace=60)
    assert len(app.sent) == idempotency.MAX_RESENDS
    row = DeadLetter.objects.get(task_id="tid-6")
    assert row.reason == "rejected" and "no run claimed idempotency key 'lost-5'" in row.detail and row.args == [9]
    assert IdempotencyClaim.objects.get(key="lost-5").state == "failed"

    past = "2020-01-01T00:00:00+00:00"
    idempotency.track("lost-6", task_name="t", task_id="tid-7", message={"args": [], "options": {"expires": past}},
                      grace=60)
    IdempotencyClaim.objects.filter(key="lost-6").update(lease_until=time.time() - 1)
    assert idempotency.resend_lost(app, grace=60) == 0
    assert IdempotencyClaim.objects.get(key="lost-6").state == "failed"


@pytest.mark.django_db
def test_a_task_sent_with_a_countdown_is_not_resent_before_it_is_due(monkeypatch, settings,
                                                                     django_capture_on_commit_callbacks):
    monkeypatch.setattr("celery.app.task.Task.apply_async", lambda self, *a, task_id=None, **k: None)
    settings.SAFETYNET = {**settings.SAFETYNET, "LOST_MESSAGE_SECONDS": 60}
    with django_capture_on_commit_callbacks(execute=True) as callbacks:  # recorded once the sender commits
        tasks.idempotent_charge.apply_async(args=(777,), countdown=3600, expires=7200, queue="payments")
        assert not IdempotencyClaim.objects.filter(key="charge-777").exists()
    assert len(callbacks) == 1
    row = IdempotencyClaim.objects.get(key="charge-777")
    assert row.state == "queued" and 3600 + 55 < row.lease_until - time.time() < 3600 + 65
    assert row.message["options"]["queue"] == "payments" and "expires" in row.message["options"]


@pytest.mark.django_db
def test_a_claim_the_database_cannot_take_is_transient(monkeypatch):
    from django.db import OperationalError

    def database_away(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr(idempotency, "claim", database_away)
    tasks.RUNS.clear()
    result = tasks.idempotent_charge.apply(args=(103,))
    assert isinstance(result.result, safetynet.Transient) and "could not claim" in str(result.result)
    assert tasks.RUNS == []


@pytest.mark.django_db(transaction=True)
def test_self_retry_inside_the_body_transaction_still_hands_the_claim_over(monkeypatch):
    from celery import uuid as new_id
    from celery.app.trace import build_tracer

    published = []
    monkeypatch.setattr("celery.canvas.Signature.apply_async", lambda sig, *a, **k: published.append(sig.options))
    task = tasks.idempotent_self_retry._get_current_object()
    task_id = new_id()
    tracer = build_tracer(task.name, task, eager=False, propagate=False, app=task._get_app())
    request = {"id": task_id, "task": task.name, "args": [1], "kwargs": {}, "retries": 0, "is_eager": False,
               "hostname": "w", "delivery_info": {"routing_key": "celery"}, "called_directly": False}
    assert tracer(task_id, [1], {}, request).info.state == "RETRY"
    [options] = published
    token = options["headers"][idempotency.HANDOVER_HEADER]
    row = IdempotencyClaim.objects.get(key="self-retry-1")
    assert (row.state, row.owner, row.deliveries) == ("in_progress", token, 1)  # not rolled back with the body
    retry = idempotency.claim("self-retry-1", task_name=task.name, task_id=task_id, lease=30, max_deliveries=3,
                              handover=token)
    assert (retry.outcome, retry.deliveries) == (WON, 1)


@pytest.mark.django_db
def test_a_resend_the_broker_refuses_is_tried_again_after_the_grace():
    class _DownApp(_App):
        def send_task(self, *args, **kwargs):
            raise ConnectionError("broker down")

    idempotency.track("lost-7", task_name="t", task_id="tid-8", message={"args": [3]}, grace=60)
    IdempotencyClaim.objects.filter(key="lost-7").update(lease_until=time.time() - 1)
    assert idempotency.resend_lost(_DownApp(), grace=60) == 0
    row = IdempotencyClaim.objects.get(key="lost-7")
    assert row.state == "queued" and row.lease_until > time.time() + 50 and row.message == {"args": [3]}
    IdempotencyClaim.objects.filter(key="lost-7").update(lease_until=time.time() - 1)
    app = _App()
    assert idempotency.resend_lost(app, grace=60) == 1 and app.sent[0][3] == "tid-8"
