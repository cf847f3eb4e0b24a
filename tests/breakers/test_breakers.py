"""Circuit breakers on the real Redis and, as the fallback, on the real PostgreSQL."""

import re
import time
import uuid

import pytest
import redis
from django.test import override_settings

import safetynet
from safetynet import Breaker, BreakerOpen, ConfigurationError, Permanent, breakers, conf, signals
from safetynet.breakers import budgets

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = "redis://127.0.0.1:6379/13"


@pytest.fixture(params=["redis", "database"])
def declare(request):
    """Declare breakers (on Redis, or on the database with REDIS_URL="") for one test."""
    stores = {"redis": REDIS_URL, "database": ""}
    active = []

    def declare(**fields):
        name = f"up-{uuid.uuid4().hex[:8]}"
        settings = override_settings(SAFETYNET={"REDIS_URL": stores[request.param], "BREAKERS": {name: fields}})
        settings.enable()
        active.append(settings)
        return name

    yield declare
    for settings in reversed(active):
        settings.disable()
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter("safetynet:breaker:up-*"):
        client.delete(key)


def calls(name, outcomes):
    """Make one call per outcome (True: fine, False: the upstream failed); return the state after each."""
    states = []
    for ok in outcomes:
        ticket = breakers.enter(name)
        states.append(breakers.leave(ticket, ok=ok))
    return states


def test_it_opens_on_the_failure_rate_once_enough_calls_were_made(declare):
    name = declare(failure_rate=0.5, min_calls=4, open_seconds=30)
    assert calls(name, [False, False, False]) == ["closed"] * 3  # 3 calls: below min_calls
    assert calls(name, [True]) == ["closed"]  # 3 of 4 failed, but a success cannot open it
    assert calls(name, [False]) == ["open"]  # 4 of 5 failed
    with pytest.raises(BreakerOpen) as refused:
        breakers.enter(name)
    assert 30 <= refused.value.delay <= 33.5 and refused.value.name == name
    assert breakers.state_of(name)["state"] == "open"


def test_a_low_failure_rate_keeps_it_closed(declare):
    name = declare(failure_rate=0.6, min_calls=4)
    assert calls(name, [True, False, True, False, True, True, False, True]) == ["closed"] * 8  # at most 50 %
    state = breakers.state_of(name)
    assert (state["state"], state["calls"], state["failures"]) == ("closed", 8, 3)


def test_consecutive_failures_open_it_below_min_calls(declare):
    name = declare(min_calls=100, consecutive_failures=3)
    assert calls(name, [False, False, True, False, False]) == ["closed"] * 5
    assert calls(name, [False]) == ["open"]


def test_half_open_lets_a_probe_through_and_a_success_closes_it(declare):
    name = declare(min_calls=1, open_seconds=0.3, half_open_probes=1)
    calls(name, [False])
    with pytest.raises(BreakerOpen):
        breakers.enter(name)
    time.sleep(0.35)
    probe = breakers.enter(name)
    assert probe.state == "half_open" and probe.probe
    with pytest.raises(BreakerOpen, match="half-open and busy probing") as busy:  # one probe at a time
        breakers.enter(name)
    assert busy.value.delay <= 0.5 + 0.03 + 0.05  # back soon, not a whole open_seconds later
    assert breakers.leave(probe, ok=True) == "closed"
    assert breakers.enter(name).state == "closed"


def test_a_failed_probe_opens_it_again(declare):
    name = declare(min_calls=1, open_seconds=0.3, half_open_probes=2)
    calls(name, [False])
    time.sleep(0.35)
    first, second = breakers.enter(name), breakers.enter(name)
    assert first.probe and second.probe
    assert breakers.leave(first, ok=False) == "open"
    assert breakers.leave(second, ok=True) == "open"  # a late probe changes nothing
    with pytest.raises(BreakerOpen):
        breakers.enter(name)


def test_a_probe_that_never_reports_gives_its_place_up(declare):
    name = declare(min_calls=1, open_seconds=0.3)
    calls(name, [False])
    time.sleep(0.35)
    breakers.enter(name)  # its worker dies: no leave()
    with pytest.raises(BreakerOpen):
        breakers.enter(name)
    time.sleep(0.35)
    assert breakers.enter(name).probe


def test_a_deferral_frees_its_probe_without_closing_it(declare):
    name = declare(min_calls=1, open_seconds=0.3)
    calls(name, [False])
    time.sleep(0.35)
    probe = breakers.enter(name)
    assert breakers.leave(probe, ok=None) == "half_open"
    assert breakers.enter(name).probe  # the place is free again


def test_the_context_manager_and_the_decorator_count_only_upstream_failures(declare):
    name = declare(min_calls=2, failure_rate=0.7)

    @safetynet.breaker(name)
    def call(error=None):
        if error:
            raise error
        return "ok"

    with pytest.raises(Permanent):
        call(Permanent("bad data"))  # not the upstream's fault: counts as fine
    with pytest.raises(ConnectionError):
        call(ConnectionError("down"))
    assert breakers.state_of(name)["state"] == "closed"  # 1 of 2 failed
    with pytest.raises(TimeoutError), safetynet.breaker(name):
        raise TimeoutError("slow")
    with pytest.raises(ConnectionError), safetynet.breaker(name):
        raise ConnectionError("down")
    assert breakers.state_of(name)["state"] == "open"
    with pytest.raises(BreakerOpen):
        call()


def test_count_on_says_what_the_upstream_failing_is(declare):
    name = declare(min_calls=1, count_on=[KeyError])
    with pytest.raises(ConnectionError), safetynet.breaker(name):
        raise ConnectionError("not counted here")
    assert breakers.state_of(name)["state"] == "closed"
    with pytest.raises(KeyError), safetynet.breaker(name):
        raise KeyError("counted")
    assert breakers.state_of(name)["state"] == "open"


def test_staff_can_open_and_close_it_by_hand_and_changes_are_announced(declare):
    name = declare()
    seen = []

    def receiver(sender, name, state, by_hand, **kwargs):
        seen.append((name, state, by_hand))

    signals.breaker_changed.connect(receiver)
    try:
        breakers.force(name, "open", seconds=60)
        with pytest.raises(BreakerOpen):
            breakers.enter(name)
        breakers.force(name, "closed")
        assert breakers.enter(name).state == "closed"
    finally:
        signals.breaker_changed.disconnect(receiver)
    assert seen == [(name, "open", True), (name, "closed", True)]


def test_unknown_breakers_and_bad_thresholds_are_configuration_errors():
    with pytest.raises(ConfigurationError, match=r"unknown breaker 'nope'.*declared: upstream"):
        breakers.enter("nope")
    for fields, message in (({"failure_rate": 0}, "above 0"), ({"failure_rate": 1.5}, "from 0 to 1"),
                            ({"min_calls": 0}, "min_calls must be a whole number from 1"),
                            ({"window": 0}, "window"), ({"open_seconds": -1}, "open_seconds"),
                            ({"half_open_probes": 1.5}, "half_open_probes"), ({"count_on": [42]}, "count_on"),
                            ({"failur_rate": 0.5}, "Did you mean 'failure_rate'")):
        with pytest.raises(ConfigurationError, match=message):
            conf.build({"BREAKERS": {"smtp": fields}})
    with pytest.raises(ConfigurationError, match="must be a Breaker"):
        conf.build({"BREAKERS": {"smtp": 3}})
    assert conf.build({"BREAKERS": {"smtp": Breaker(min_calls=5)}}).breakers["smtp"].name == "smtp"
    with pytest.raises(ConfigurationError, match="breaker must be the name"):
        @safetynet.task(breaker="")
        def nameless():
            pass


def test_the_breakers_command_lists_opens_and_closes(declare):
    from io import StringIO

    from django.core.management import CommandError, call_command

    name = declare(min_calls=1)

    def command(*args):
        out = StringIO()
        call_command("safetynet", "breakers", *args, stdout=out)
        return out.getvalue()

    assert f"{name}  closed" in command("list")
    assert "is open" in command("open", name, "--for", "120")
    [state] = __import__("json").loads(command("list", "--json"))
    assert state["state"] == "open" and state["until"] > time.time() + 100
    assert re.search(r"open +0 +0 .* 1[12][0-9](\.[0-9]+)?s ", command("list"))
    assert "is closed" in command("close", name)
    with pytest.raises(CommandError, match="unknown breaker 'nope'"):
        command("open", "nope")


def test_prometheus_shows_every_breakers_state_and_counts_changes(declare):
    from prometheus_client import generate_latest

    from safetynet.contrib import prometheus

    name = declare(min_calls=1)
    prometheus.install()
    breakers.force(name, "open", seconds=60)
    with pytest.raises(BreakerOpen):
        breakers.enter(name)
    text = generate_latest(prometheus.collector_registry()).decode()
    assert f'safetynet_breaker_state{{breaker="{name}",state="open"}} 1.0' in text
    assert f'safetynet_breaker_state{{breaker="{name}",state="closed"}} 0.0' in text
    assert f'safetynet_breaker_changes_total{{breaker="{name}",state="open"}} 1.0' in text
    assert f'safetynet_breaker_refused_total{{breaker="{name}"}} 1.0' in text


@pytest.mark.parametrize("store", [REDIS_URL, ""])
def test_retries_through_a_breaker_are_budgeted_and_past_it_wait_longer(store):
    scope = f"budget-{uuid.uuid4().hex[:8]}"
    budget = {"ratio": 0.2, "min_retries": 3, "window": 60}
    with override_settings(SAFETYNET={"REDIS_URL": store, "RETRY_BUDGET": budget}):
        assert [budgets.budgeted(scope, 1.0) for _ in range(3)] == [(1.0, True)] * 3  # the minimum
        delay, within = budgets.budgeted(scope, 1.0)
        assert not within and 15 <= delay <= 30  # waits longer, is not dropped
        for _ in range(25):
            budgets.count_first_attempt(scope)
        assert budgets.budgeted(scope, 1.0) == (1.0, True)  # 20 % of 25 first attempts: 5 retries
        assert budgets.budgeted(scope, 1.0) == (1.0, True)
        assert budgets.budgeted(scope, 1.0)[1] is False
    with override_settings(SAFETYNET={"RETRY_BUDGET": None}):
        assert budgets.budgeted(scope, 1.0) == (1.0, True)
    with pytest.raises(ConfigurationError, match="RETRY_BUDGET: ratio"):
        conf.build({"RETRY_BUDGET": {"ratio": -1}})
    with pytest.raises(ConfigurationError, match="takes ratio, min_retries and window"):
        conf.build({"RETRY_BUDGET": {"percent": 20}})


def test_explain_names_the_breaker_and_its_rule():
    from io import StringIO

    from django.core.management import call_command

    import tests.fixtures.breaker_tasks  # noqa: F401  (registers the task)

    out = StringIO()
    call_command("safetynet", "explain", "tests.fixtures.breaker_tasks.call_upstream", stdout=out)
    assert "Breaker: upstream  (opens at 50% of >= 3 calls over 1 min; open 4 s, then 1 probe(s) at once" in out.getvalue()


FLAKY = []


@safetynet.task(name="tests.breakers.test_breakers.budgeted_call", bind=True, retry_budget="partner-calls",
                retry_policy=safetynet.RetryPolicy(max_attempts=2, backoff=1, jitter="none"))
def budgeted_call(self):
    FLAKY.append(self.attempt)
    if self.attempt == 1:
        raise ConnectionError("flaky")
    return "ok"


def test_a_task_can_spend_a_named_or_its_queues_budget():
    entries = []

    def receiver(sender, entry, **kwargs):
        entries.append(entry)

    signals.task_retrying.connect(receiver)
    try:
        with override_settings(SAFETYNET={"REDIS_URL": REDIS_URL,
                                          "RETRY_BUDGET": {"ratio": 0, "min_retries": 0, "window": 60}}):
            assert budgeted_call.apply().get() == "ok"
    finally:
        signals.task_retrying.disconnect(receiver)
    [entry] = entries
    assert "retry budget of budget 'partner-calls' spent" in entry["reason"] and entry["delay"] >= 15
    with pytest.raises(ConfigurationError, match="retry_budget must be True"):
        @safetynet.task(retry_budget=3)
        def wrong():
            pass


def test_a_failed_probe_that_outlived_its_place_still_reopens_it(declare):
    name = declare(min_calls=1, open_seconds=0.3)
    calls(name, [False])
    time.sleep(0.35)
    probe = breakers.enter(name)
    time.sleep(0.35)  # the upstream hangs: the probe's place expires
    assert breakers.leave(probe, ok=False) == "open"


def test_a_count_on_that_raises_does_not_replace_the_calls_own_error(declare):
    name = declare(min_calls=1, count_on=[lambda error: 1 / 0])
    with pytest.raises(ConnectionError), safetynet.breaker(name):
        raise ConnectionError("the call's own error")


def test_an_eager_run_through_an_open_breaker_fails_instead_of_waiting():
    from tests.fixtures import breaker_tasks

    breakers.force("upstream", "open", seconds=60)
    try:
        result = breaker_tasks.call_upstream.apply(("eager", False))
    finally:
        breakers.force("upstream", "closed")
    assert result.state == "FAILURE" and "an eager run cannot wait" in str(result.result)
    assert breaker_tasks.runs("eager") == 0
