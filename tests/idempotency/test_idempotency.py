"""Idempotency keys (declared, rendered, refused) and claims (won, deferred, stored, taken over)."""

import time
import uuid

import pytest
from django.core import checks
from django.db import connection
from django.test import override_settings

import safetynet
from safetynet import ConfigurationError, idempotency, schedule, shared
from safetynet.idempotency import CRASH_LOOP, IN_PROGRESS, SUCCEEDED, WON, IdempotencyKeyError
from safetynet.models import IdempotencyClaim, ScheduledMessage
from safetynet.protocol import headers
from tests.fixtures import tasks

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


def _scratch_ledger(table):
    """A table of order ids (created if missing, emptied) for bodies to write to; its ``write(order_id)``, which
    returns the id. The test drops it."""
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {table} (order_id integer)")
        cursor.execute(f"DELETE FROM {table}")

    def write(order_id):
        with connection.cursor() as cursor:
            cursor.execute(f"INSERT INTO {table} VALUES (%s)", [order_id])
        return order_id

    return write


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
    write = _scratch_ledger("idem_unit_ledger")
    held = _claim("k-8")
    with idempotency.holding(held):
        with idempotency.atomic():
            write(1)
    assert IdempotencyClaim.objects.get(key="k-8").state == "succeeded"

    lost = _claim("k-9")
    IdempotencyClaim.objects.filter(key="k-9").update(owner="someone else")
    with idempotency.holding(lost), pytest.raises(idempotency.ClaimLost):
        with idempotency.atomic():
            write(2)
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

    write = _scratch_ledger("idem_unit_ledger2")

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


@pytest.mark.django_db(transaction=True)
def test_the_mark_and_the_commit_in_one_round_trip_keep_hooks_errors_and_the_session_right(monkeypatch):
    from django.db import IntegrityError, transaction

    from safetynet.idempotency import _claims

    pipelined = []
    monkeypatch.setattr(_claims, "_mark_and_commit", lambda *args, real=_claims._mark_and_commit: (
        pipelined.append(args[0].key), real(*args))[1])

    with connection.cursor() as cursor:
        cursor.execute("CREATE TABLE IF NOT EXISTS idem_unit_parent (id integer PRIMARY KEY)")
        cursor.execute("CREATE TABLE IF NOT EXISTS idem_unit_child (parent integer REFERENCES idem_unit_parent "
                       "DEFERRABLE INITIALLY DEFERRED)")
        cursor.execute("DELETE FROM idem_unit_child")
        cursor.execute("DELETE FROM idem_unit_parent")

    def write(statement, params=()):
        with connection.cursor() as cursor:
            cursor.execute(statement, params)

    hooks = []

    def parent_and_hook(parent=1):
        write("INSERT INTO idem_unit_parent VALUES (%s)", [parent])
        transaction.on_commit(lambda: hooks.append("committed"))
        return {"parent": parent}

    assert idempotency.run_atomically(_claim("k-pipe-1"), parent_and_hook) == {"parent": 1}
    assert hooks == ["committed"]  # Django's on_commit callbacks run after the commit sent with the mark
    assert connection.get_autocommit() and not connection.in_atomic_block
    stored = IdempotencyClaim.objects.get(key="k-pipe-1")
    assert (stored.state, stored.result) == (SUCCEEDED, {"parent": 1})

    # A deferred constraint fails at COMMIT: the task sees Django's IntegrityError, the mark is not committed.
    orphan = _claim("k-pipe-2")
    with pytest.raises(IntegrityError):
        idempotency.run_atomically(orphan, lambda: write("INSERT INTO idem_unit_child VALUES (99)"))
    assert IdempotencyClaim.objects.get(key="k-pipe-2").state == IN_PROGRESS

    # A lost claim: the body's write and the hook are gone, and the session works on.
    lost = _claim("k-pipe-3")
    IdempotencyClaim.objects.filter(key="k-pipe-3").update(owner="someone else")
    with pytest.raises(idempotency.ClaimLost):
        idempotency.run_atomically(lost, lambda: parent_and_hook(2))
    assert hooks == ["committed"]
    with connection.cursor() as cursor:
        cursor.execute("SELECT count(*) FROM idem_unit_parent")
        assert cursor.fetchone()[0] == 1
        cursor.execute("DROP TABLE idem_unit_child")
        cursor.execute("DROP TABLE idem_unit_parent")
    assert connection.get_autocommit() and not connection.in_atomic_block
    assert pipelined == ["k-pipe-1", "k-pipe-2", "k-pipe-3"]


@pytest.mark.django_db(transaction=True)
def test_the_claim_and_the_bodys_begin_go_together_and_every_way_out_leaves_the_session_clean():
    import psycopg
    from django.db import DataError, transaction
    from psycopg.pq import TransactionStatus

    from safetynet.idempotency import _claims

    def claim_and_begin(key, max_deliveries=3):
        return _claims.claim_and_begin(key, task_name="t", task_id=uuid.uuid4().hex, lease=30.0,
                                       max_deliveries=max_deliveries)

    def clean():
        return (connection.get_autocommit() and not connection.in_atomic_block
                and connection.connection.info.transaction_status == TransactionStatus.IDLE)

    settings = connection.settings_dict
    other = psycopg.connect(host=settings["HOST"] or None, port=settings["PORT"] or None, user=settings["USER"],
                            dbname=settings["NAME"], autocommit=True)
    write = _scratch_ledger("idem_unit_ledger3")

    def committed(key):
        row = other.execute("SELECT state, deliveries FROM safetynet_idempotencyclaim WHERE key = %s", [key]).fetchone()
        return row and (row[0], row[1])

    try:
        # Won: the claim is committed (another session sees it) and the body's transaction is open already.
        held, begun = claim_and_begin("k-begin-1")
        assert held.outcome == WON and begun is not None
        assert committed("k-begin-1") == (IN_PROGRESS, 1)
        assert connection.in_atomic_block and connection.connection.info.transaction_status == TransactionStatus.INTRANS
        assert idempotency.run_atomically(held, lambda: write(1), begun=begun) == 1
        assert clean() and committed("k-begin-1") == (SUCCEEDED, 1)

        # The body fails: its write rolls back with the transaction, the claim stays held (the caller releases it).
        held, begun = claim_and_begin("k-begin-2")
        with pytest.raises(ZeroDivisionError):
            idempotency.run_atomically(held, lambda: write(2) / 0, begun=begun)
        assert clean() and committed("k-begin-2") == (IN_PROGRESS, 1)

        # Not won: in progress elsewhere, or a crash loop; the empty transaction is gone, the deliveries counted.
        taken, begun = claim_and_begin("k-begin-2")
        assert (taken.outcome, begun) == (IN_PROGRESS, None) and clean()
        IdempotencyClaim.objects.filter(key="k-begin-2").update(lease_until=0.0)
        looping, begun = claim_and_begin("k-begin-2", max_deliveries=1)
        assert (looping.outcome, begun) == (CRASH_LOOP, None) and clean()
        assert committed("k-begin-2") == (IN_PROGRESS, 2)
        done, begun = claim_and_begin("k-begin-1")
        assert (done.outcome, done.result, begun) == (SUCCEEDED, 1, None) and clean()

        # A claim the database refuses (a key longer than the column): Django's error, nothing left open.
        with pytest.raises(DataError):
            claim_and_begin("k" * 300)
        assert clean()

        # A transaction opened on the driver connection behind Django's back: not joined by a BEGIN of ours.
        connection.connection.execute("BEGIN")
        held, begun = claim_and_begin("k-begin-4")
        assert held.outcome == WON and begun is None
        connection.connection.execute("ROLLBACK")
        assert clean() and committed("k-begin-4") is None

        # The BEGIN is the one psycopg would send: the isolation level Django's OPTIONS may set is kept.
        raw = connection.connection
        raw.isolation_level = psycopg.IsolationLevel.SERIALIZABLE
        try:
            held, begun = claim_and_begin("k-begin-5")
            assert begun is not None
            with connection.cursor() as cursor:
                cursor.execute("SHOW transaction_isolation")
                assert cursor.fetchone()[0] == "serializable"
            begun.abandon()
            begun.abandon()  # (ended once)
        finally:
            raw.isolation_level = None
        assert clean() and committed("k-begin-5") == (IN_PROGRESS, 1)

        # A server that ends idle transactions: the BEGIN waits for the body's first statement, as psycopg sends it.
        with connection.cursor() as cursor:
            cursor.execute("SET idle_in_transaction_session_timeout = '10min'")
        _claims._idle_timeouts.pop("default", None)  # (asked once per alias)
        try:
            held, begun = claim_and_begin("k-begin-6")
            assert held.outcome == WON and begun is None and clean()
        finally:
            with connection.cursor() as cursor:
                cursor.execute("RESET idle_in_transaction_session_timeout")
            _claims._idle_timeouts.pop("default", None)

        # Inside the caller's own transaction: the usual claim, and run_atomically nests in that transaction.
        with transaction.atomic():
            held, begun = claim_and_begin("k-begin-3")
            assert held.outcome == WON and begun is None
            assert idempotency.run_atomically(held, lambda: write(3)) == 3
        assert clean() and committed("k-begin-3") == (SUCCEEDED, 1)
        assert [row[0] for row in other.execute("SELECT order_id FROM idem_unit_ledger3 ORDER BY 1")] == [1, 3]
    finally:
        other.close()
        with connection.cursor() as cursor:
            cursor.execute("DROP TABLE idem_unit_ledger3")


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
    assert "tests.fixtures.tasks.late_without_key" in warnings
    assert "tests.fixtures.tasks.idempotent_charge" not in warnings
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


@pytest.mark.django_db
def test_a_claim_the_database_cannot_take_is_transient(monkeypatch):
    from django.db import OperationalError

    def database_away(*args, **kwargs):
        raise OperationalError("connection refused")

    monkeypatch.setattr("safetynet.idempotency._claims.claim", database_away)
    tasks.RUNS.clear()
    result = tasks.idempotent_charge.apply(args=(103,))
    assert isinstance(result.result, safetynet.Transient) and "could not claim" in str(result.result)
    assert tasks.RUNS == []


@pytest.mark.django_db(transaction=True)
def test_self_retry_inside_the_body_transaction_still_hands_the_claim_over(monkeypatch):
    from celery import uuid as new_id
    from celery.app.trace import build_tracer

    task = tasks.idempotent_self_retry._get_current_object()
    task_id = new_id()
    tracer = build_tracer(task.name, task, eager=False, propagate=False, app=task._get_app())
    request = {"id": task_id, "task": task.name, "args": [1], "kwargs": {}, "retries": 0, "is_eager": False,
               "hostname": "w", "delivery_info": {"routing_key": "celery"}, "called_directly": False}
    assert tracer(task_id, [1], {}, request).info.state == "RETRY"
    _, _, options = schedule.unpack(ScheduledMessage.objects.get(key=task_id).message)  # its 5 s retry: a row
    token = options["headers"][headers.HANDOVER]
    row = IdempotencyClaim.objects.get(key="self-retry-1")
    assert (row.state, row.owner, row.deliveries) == ("in_progress", token, 1)  # not rolled back with the body
    retry = idempotency.claim("self-retry-1", task_name=task.name, task_id=task_id, lease=30, max_deliveries=3,
                              handover=token)
    assert (retry.outcome, retry.deliveries) == (WON, 1)
