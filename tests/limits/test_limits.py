"""Limits on the real Redis and, as the fallback, on the real PostgreSQL."""

import os
import time
import uuid

import pytest
import redis
from django.test import override_settings

import safetynet
from safetynet import ConfigurationError, LimitReached, Transient, limits, signals
from safetynet.limits import _leases
from safetynet.limits.plugin import LimitGuard

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = os.environ.get("SAFETYNET_TEST_BROKER", "redis://127.0.0.1:6379/13")


class TooMany(Exception):
    """An HTTP 429 as requests raises it (read by duck typing)."""

    def __init__(self, retry_after=None):
        super().__init__("429 Too Many Requests")
        self.response = type("Response", (), {"status_code": 429,
                                              "headers": {"Retry-After": retry_after} if retry_after else {}})()


@pytest.fixture(params=["redis", "database"])
def declare(request):
    """Declare limits (on Redis, or on the database with REDIS_URL="") for one test."""
    stores = {"redis": REDIS_URL, "database": ""}
    active = []

    def declare(lease=30.0, **fields):
        name = f"lim-{uuid.uuid4().hex[:8]}"
        settings = override_settings(SAFETYNET={"REDIS_URL": stores[request.param], "LIMIT_LEASE_SECONDS": lease,
                                                "LIMITS": {name: fields}})
        settings.enable()
        active.append(settings)
        return name

    declare.store = request.param
    yield declare
    for settings in reversed(active):
        settings.disable()
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter("safetynet:limit:lim-*"):
        client.delete(key)


def test_concurrency_is_shared_and_a_released_slot_is_free_again(declare):
    name = declare(concurrency=2)
    first, second = limits.acquire([(name, "")]), limits.acquire([(name, "")])
    assert first.store == declare.store
    with pytest.raises(LimitReached) as refused:
        limits.acquire([(name, "")])
    assert refused.value.reason == "concurrency" and refused.value.name == name and refused.value.delay > 0
    assert limits.state_of(name)["in_use"] == 2
    limits.release(first)
    third = limits.acquire([(name, "")])
    limits.release(second)
    limits.release(third)
    assert limits.state_of(name)["in_use"] == 0


def test_the_rate_is_a_sliding_window_and_the_wait_is_until_the_oldest_call_leaves_it(declare):
    name = declare(rate="3/2s")
    began = time.time()
    for _ in range(3):
        limits.release(limits.acquire([(name, "")]))
    with pytest.raises(LimitReached) as refused:
        limits.acquire([(name, "")])
    assert refused.value.reason == "rate" and 1.5 < refused.value.delay <= 2.05  # 2 s and its 2 % margin
    assert limits.state_of(name)["calls"] == 3
    time.sleep(max(0.0, began + 2.1 - time.time()))
    limits.release(limits.acquire([(name, "")]))


def test_refused_tasks_get_turns_spaced_at_the_limits_pace_and_keep_them(declare):
    name = declare(rate="10/s")
    for _ in range(10):
        limits.acquire([(name, "")])
    turns = []
    for task in ("a", "b", "c"):
        asked = time.time()
        with pytest.raises(LimitReached) as refused:
            limits.acquire([(name, "")], task_id=task)
        turns.append(asked + refused.value.delay)
    assert turns[1] - turns[0] == pytest.approx(0.1, abs=0.05) and turns[2] - turns[1] == pytest.approx(0.1, abs=0.05)
    with pytest.raises(LimitReached) as newcomer:  # no task id: not on the line, but behind it all the same
        limits.acquire([(name, "")])
    assert time.time() + newcomer.value.delay >= turns[2]
    state = limits.state_of(name)
    assert state["waiting"] == 3 and state["line_in"] > 0


def test_partitions_are_limited_apart(declare):
    name = declare(concurrency=1, partition_by="customer_id")
    a = limits.acquire([(name, "a")])
    with pytest.raises(LimitReached):
        limits.acquire([(name, "a")])
    b = limits.acquire([(name, "b")])  # customer a's slot does not hold customer b back
    assert limits.state_of(name)["in_use"] == 2
    limits.release(a)
    limits.release(b)
    with pytest.raises(ConfigurationError, match="is partitioned"):
        safetynet.limit(name)


def test_several_limits_admit_a_call_together_or_hold_nothing(declare):
    wide = declare(concurrency=5)
    narrow_settings = {"REDIS_URL": REDIS_URL if declare.store == "redis" else "", "LIMITS": {
        wide: {"concurrency": 5}, wide + "-narrow": {"concurrency": 1}}}
    with override_settings(SAFETYNET=narrow_settings):
        held = limits.acquire([(wide + "-narrow", "")])
        with pytest.raises(LimitReached) as refused:
            limits.acquire([(wide, ""), (wide + "-narrow", "")])
        assert refused.value.name == wide + "-narrow"
        assert limits.state_of(wide)["in_use"] == 0  # the wide one was not taken for a call that did not go
        limits.release(held)
        both = limits.acquire([(wide, ""), (wide + "-narrow", "")])
        assert limits.state_of(wide)["in_use"] == 1
        limits.release(both)


def test_a_slot_whose_holder_stopped_renewing_frees_itself_after_the_lease(declare):
    name = declare(concurrency=1, lease=1.0)
    ticket = limits.acquire([(name, "")])
    _leases.drop(ticket)  # as if its process died: nothing renews it
    with pytest.raises(LimitReached):
        limits.acquire([(name, "")])
    time.sleep(1.1)
    limits.release(limits.acquire([(name, "")]))


def test_the_heartbeat_keeps_a_long_call_s_slot(declare):
    name = declare(concurrency=1, lease=1.0)
    ticket = limits.acquire([(name, "")])
    for _ in range(4):
        time.sleep(0.4)
        _leases.beat()
    with pytest.raises(LimitReached):  # 1.6 s later: still held
        limits.acquire([(name, "")])
    limits.release(ticket)
    assert ticket not in _leases.holding()


def test_a_429_pauses_a_limit_that_opted_in(declare):
    name = declare(rate="100/s", tighten_on_429=True, max_pause=30)
    paused = []

    def receiver(sender, **kwargs):
        paused.append(kwargs)

    signals.limit_paused.connect(receiver)
    try:
        with pytest.raises(TooMany), safetynet.limit(name):
            raise TooMany(retry_after="20")
    finally:
        signals.limit_paused.disconnect(receiver)
    assert paused == [{"signal": signals.limit_paused, "name": name, "partition": "", "seconds": 20.0,
                      "by_hand": False}]
    with pytest.raises(LimitReached) as refused:
        limits.acquire([(name, "")])
    assert refused.value.reason == "paused" and 19 < refused.value.delay <= 20
    other = declare(rate="100/s")  # not opted in: a 429 changes nothing
    with pytest.raises(TooMany), safetynet.limit(other):
        raise TooMany(retry_after="20")
    limits.release(limits.acquire([(other, "")]))


def test_the_context_manager_and_the_decorator_hold_a_slot_for_the_block(declare):
    name = declare(concurrency=1)

    @safetynet.limit(name)
    def call():
        assert limits.state_of(name)["in_use"] == 1
        return "done"

    assert call() == "done"
    with safetynet.limit(name):
        with pytest.raises(LimitReached):
            limits.acquire([(name, "")])
    assert limits.state_of(name)["in_use"] == 0
    with pytest.raises(ConfigurationError, match="unknown limit 'nope'"):
        safetynet.limit("nope")


def test_deferrals_are_announced(declare):
    name = declare(concurrency=1)
    seen = []

    def receiver(sender, **kwargs):
        seen.append((kwargs["name"], kwargs["reason"]))

    signals.limit_deferred.connect(receiver)
    try:
        held = limits.acquire([(name, "")])
        with pytest.raises(LimitReached):
            limits.acquire([(name, "")])
    finally:
        signals.limit_deferred.disconnect(receiver)
    limits.release(held)
    assert seen == [(name, "concurrency")]


def test_the_partition_is_read_from_the_arguments_by_name_or_by_a_callable():
    by_name = safetynet.Limit(concurrency=1, partition_by="customer_id", name="x")

    def body(self, order_id, customer_id="walk-in"):
        pass

    assert limits.partition_of(by_name, (1,), {"customer_id": 7}, body) == "7"
    assert limits.partition_of(by_name, (1, 8), {}, body) == "8"
    assert limits.partition_of(by_name, (1,), {}, body) == "walk-in"
    by_callable = safetynet.Limit(concurrency=1, partition_by=lambda order_id, **_: order_id % 2, name="y")
    assert limits.partition_of(by_callable, (5,), {}, body) == "1"
    with pytest.raises(ConfigurationError, match="partitioned by the argument 'tenant'"):
        limits.partition_of(safetynet.Limit(rate="1/s", partition_by="tenant", name="z"), (1,), {}, body)


LIMITED_CALLS = []


@safetynet.task(name="tests.limits.test_limits.limited", limit="lim-task")
def limited(customer_id):
    LIMITED_CALLS.append((customer_id, limits.state_of("lim-task")["in_use"]))
    return customer_id


def test_a_task_with_a_limit_holds_a_slot_while_it_runs_and_an_eager_run_cannot_wait():
    with override_settings(SAFETYNET={"REDIS_URL": REDIS_URL, "LIMITS": {"lim-task": {"concurrency": 1}}}):
        LIMITED_CALLS.clear()
        assert limited.apply(("a",)).get() == "a"
        assert LIMITED_CALLS == [("a", 1)] and limits.state_of("lim-task")["in_use"] == 0
        held = limits.acquire([("lim-task", "")])
        try:
            result = limited.apply(("b",))
        finally:
            limits.release(held)
        assert result.state == "FAILURE" and "an eager run cannot wait" in str(result.result)
        assert LIMITED_CALLS == [("a", 1)]


def test_the_guard_defers_a_worker_run_until_its_turn():
    class Request:
        id, headers, is_eager = "task-1", {}, False

    class Task:
        name, limit = "x", ["lim-guard"]

        def run(self, customer_id):
            pass

    from safetynet.typing import Attempt

    attempt = Attempt(Task(), Request(), ("c1",), {}, time.time(), time.perf_counter())
    with override_settings(SAFETYNET={"REDIS_URL": REDIS_URL, "LIMITS": {"lim-guard": {"concurrency": 1}}}):
        held = limits.acquire([("lim-guard", "")])
        try:
            with pytest.raises(LimitReached) as refused:
                LimitGuard().before_run(attempt)
            assert isinstance(refused.value, safetynet.Snooze)  # a deferral: no attempt used
        finally:
            limits.release(held)
        LimitGuard().before_run(attempt)
        assert limits.state_of("lim-guard")["in_use"] == 1
        LimitGuard().after_run(attempt, None)
        assert limits.state_of("lim-guard")["in_use"] == 0
    with pytest.raises(ConfigurationError, match="limit must be the name of a limit"):
        @safetynet.task(limit=3)
        def wrong():
            pass
    assert Transient  # the eager refusal's type, above


def _guarded_attempt(task_id="task-readmit"):
    class Request:
        id, headers, is_eager = task_id, {}, False

    class Task:
        name, limit = "x", ["lim-readmit"]

        def run(self):
            pass

    from safetynet.typing import Attempt

    return Attempt(Task(), Request(), (), {}, time.time(), time.perf_counter())


def test_a_call_admitted_longer_ago_than_half_the_margin_is_checked_again_before_it_starts():
    client = redis.Redis.from_url(REDIS_URL)
    client.delete(*client.keys("safetynet:limit:lim-readmit*") or ["-"])
    limit = {"concurrency": 2, "rate": "2/s", "margin": 0.2}
    with override_settings(SAFETYNET={"REDIS_URL": REDIS_URL, "LIMITS": {"lim-readmit": limit}}):
        assert safetynet.Limit(**limit).recheck_after == pytest.approx(0.1)
        guard, attempt = LimitGuard(), _guarded_attempt()
        guard.before_run(attempt)
        first = attempt.notes["limit"]
        assert not first.stale()
        calls = []
        guard.around_body(attempt, lambda: calls.append("fresh"))  # checked once: no second look
        assert calls == ["fresh"] and limits.state_of("lim-readmit")["calls"] == 1

        # Admitted, then held up for longer than half the margin: the call is counted again, at its start.
        attempt = _guarded_attempt("task-late")
        guard.before_run(attempt)
        late = attempt.notes["limit"]
        late.asked -= 0.15
        assert late.stale()
        seen = []
        guard.around_body(attempt, lambda: seen.append(limits.state_of("lim-readmit")))
        assert seen[0]["calls"] == 2 and seen[0]["in_use"] == 1  # its first entries were taken back
        assert client.zscore("safetynet:limit:lim-readmit:log", late.token) is None

        # Checked again when the rate is used up: deferred until its turn, nothing held, the body not run.
        attempt = _guarded_attempt("task-refused")
        with pytest.raises(LimitReached):
            guard.before_run(attempt)
        client.delete("safetynet:limit:lim-readmit:log")
        guard.before_run(attempt)
        client.zadd("safetynet:limit:lim-readmit:log", {"a": time.time(), "b": time.time()})
        attempt.notes["limit"].asked -= 0.15
        with pytest.raises(LimitReached) as refused:
            guard.around_body(attempt, lambda: pytest.fail("the body ran over the rate"))
        assert refused.value.reason == "rate"
        assert limits.state_of("lim-readmit")["in_use"] == 0 and attempt.notes["limit"] is None
    client.delete(*client.keys("safetynet:limit:lim-readmit*") or ["-"])


def test_no_second_look_without_a_margin_or_on_the_database():
    assert safetynet.Limit(rate="5/s", margin=0).recheck_after is None
    assert safetynet.Limit(concurrency=3).recheck_after is None
    assert safetynet.Limit(rate="100/m").recheck_after == pytest.approx(0.5)  # the margin (at most 1 s), halved
    with override_settings(SAFETYNET={"REDIS_URL": "", "LIMITS": {"lim-readmit-db": {"rate": "5/s"}}}):
        ticket = limits.acquire([("lim-readmit-db", "")])
        ticket.asked -= 10
        assert ticket.store == "database" and not ticket.stale()
        assert limits.readmit(ticket) is ticket  # its log keeps no tokens: asking again would count it twice
        limits.release(ticket)
