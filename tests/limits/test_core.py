"""The pure part of limits: declaring one, parsing a rate, and the admission decision."""

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from safetynet import ConfigurationError, Limit, conf
from safetynet.core.limits import Usage, admit, held_for, parse_rate, take


@pytest.mark.parametrize("text, expected", [
    ("100/m", (100, 60.0)), ("20/s", (20, 1.0)), ("5000/h", (5000, 3600.0)), ("3/d", (3, 86400.0)),
    ("10/5s", (10, 5.0)), ("1/min", (1, 60.0)), (" 7 / 2m ", (7, 120.0)), ((50, 1), (50, 1.0)),
])
def test_rates_read_as_n_per_interval(text, expected):
    assert parse_rate(text) == expected


@pytest.mark.parametrize("text", ["100", "100/fortnight", "0/s", "-1/s", "a/s", "100/0s", 100, None])
def test_a_wrong_rate_says_how_to_write_one(text):
    with pytest.raises(ConfigurationError, match="rate"):
        parse_rate(text)


def test_a_limit_is_checked_when_declared():
    with pytest.raises(ConfigurationError, match="needs a concurrency, a rate or both"):
        Limit()
    with pytest.raises(ConfigurationError, match="concurrency must be a whole number from 1"):
        Limit(concurrency=0)
    with pytest.raises(ConfigurationError, match="partition_by must be the name of a task argument"):
        Limit(concurrency=1, partition_by="customer id")
    assert Limit(concurrency=5, rate="100/m", partition_by="customer_id").describe() == (
        "5 at once, 100 per min, per customer_id")
    assert Limit(rate="10/5s").describe() == "10 per 5 s"


def test_limits_in_the_settings_are_validated_with_the_limits_name():
    built = conf.build({"LIMITS": {"partner-api": {"concurrency": 5, "rate": "100/m", "partition_by": "customer_id"}}})
    assert built.limits["partner-api"] == Limit(concurrency=5, rate="100/m", partition_by="customer_id")
    assert built.limits["partner-api"].name == "partner-api"
    with pytest.raises(ConfigurationError, match=r"\['partner-api'\]: unknown field 'concurency'. Did you mean "
                                                 r"'concurrency'\?"):
        conf.build({"LIMITS": {"partner-api": {"concurency": 5}}})
    with pytest.raises(ConfigurationError, match="limit 'partner-api': rate must be 'N/s'"):
        conf.build({"LIMITS": {"partner-api": {"rate": "100 per minute"}}})
    with pytest.raises(ConfigurationError, match="a limit's name is 1 to 100"):
        conf.build({"LIMITS": {"partner api": {"rate": "1/s"}}})
    with pytest.raises(ConfigurationError, match="partition_by: cannot import"):
        conf.build({"LIMITS": {"x": {"rate": "1/s", "partition_by": "no.such.function"}}})
    by_path = conf.build({"LIMITS": {"x": {"rate": "1/s", "partition_by": "os.path.basename"}}})
    assert callable(by_path.limits["x"].partition_by)
    with pytest.raises(ConfigurationError, match="LIMIT_LEASE_SECONDS"):
        conf.build({"LIMIT_LEASE_SECONDS": 0})


def run(limit, state, now, task_id="", lease=30.0):
    """One check; an admitted call is taken as ``admit``'s caller would."""
    admission = admit(limit, state, now, task_id)
    if admission.admitted:
        take(limit, state, now, f"t{now}-{len(state.log)}-{len(state.leases)}", lease, task_id)
    return admission


def test_concurrency_admits_n_and_then_gives_turns_spaced_by_the_mean_hold():
    limit = Limit(concurrency=2)
    state = Usage(hold=3.0)
    assert run(limit, state, 100.0).admitted and run(limit, state, 100.0).admitted
    first, second = run(limit, state, 100.0, "a"), run(limit, state, 100.0, "b")
    assert (first.admitted, first.reason, first.turn) == (False, "concurrency", 101.5)  # hold 3 s / 2 slots
    assert (second.reason, second.turn) == ("concurrency", 103.0)  # the next place on the line
    state.leases.popitem()
    assert run(limit, state, 100.5, "c").admitted  # a slot is free: c takes it, though a and b wait for turns
    refused = run(limit, state, 101.5, "a")  # a is back for its turn, finds none free: the next free place
    assert (refused.reason, refused.turn, refused.returning) == ("concurrency", 103.0, True)
    assert state.line == 103.0  # and not at the back of the line
    state.leases.popitem()
    assert run(limit, state, 103.0, "a").admitted


def test_a_task_back_for_its_turn_and_refused_is_not_sent_to_the_back():
    limit = Limit(rate="2/s", margin=0)
    state = Usage()
    run(limit, state, 10.0)
    run(limit, state, 10.0)
    assert run(limit, state, 10.0, "a").turn == pytest.approx(11.0)
    assert run(limit, state, 10.0, "b").turn == pytest.approx(11.5)
    assert run(limit, state, 10.0, "c").turn == pytest.approx(12.0)
    again = run(limit, state, 10.9, "a")  # came back early: no token yet, and it keeps its place in front
    assert (again.admitted, again.reason, again.turn) == (False, "rate", pytest.approx(11.0))
    assert state.line == pytest.approx(12.0)


def test_a_pause_holds_every_call_until_it_ends():
    limit = Limit(rate="100/s")
    state = Usage(paused=50.0)
    refused = run(limit, state, 40.0, "a")
    assert (refused.admitted, refused.reason, refused.turn) == (False, "paused", 50.0)
    assert run(limit, state, 50.0, "a").admitted
    assert limit.pause_for(3.0) is None
    assert Limit(rate="1/s", tighten_on_429=True, max_pause=60).pause_for(600.0) == 60.0
    assert Limit(rate="1/s", tighten_on_429=True).pause_for(None) == 1.0
    assert Limit(rate="1/s", tighten_on_429=5).pause_for(None) == 5.0


def test_the_rate_s_window_has_a_margin_for_the_way_to_the_upstream():
    assert Limit(rate="50/s").window == pytest.approx(1.05)  # 50 ms
    assert Limit(rate="10/20s").window == pytest.approx(20.4)  # 2 %
    assert Limit(rate="100/h").window == 3601.0  # at most a second
    assert Limit(rate="10/s", margin=0).window == 1.0
    state = Usage()
    limit = Limit(rate="1/s")
    assert run(limit, state, 0.0).admitted
    refused = run(limit, state, 1.0, "a")  # a second later: still inside the window and its margin
    assert refused.reason == "rate" and refused.turn == pytest.approx(1.05)
    with pytest.raises(ConfigurationError, match="margin must be a number from 0"):
        Limit(rate="1/s", margin=-1)


def test_the_mean_hold_follows_the_calls():
    state = Usage()
    held_for(state, 2.0)
    assert state.hold == 2.0
    held_for(state, 4.0)
    assert state.hold == pytest.approx(2.4)


@settings(max_examples=60, deadline=None)
@given(count=st.integers(1, 8), interval=st.sampled_from([0.5, 1.0, 3.0]),
       arrivals=st.lists(st.floats(0, 20, allow_nan=False), min_size=1, max_size=120))
def test_no_window_of_the_interval_ever_holds_more_than_n_calls(count, interval, arrivals):
    limit = Limit(rate=(count, interval))
    state = Usage()
    admitted = []
    pending = sorted((at, f"task-{index}") for index, at in enumerate(arrivals))
    checks = 0
    while pending and checks < 5000:  # every refused task comes back at its turn, as a deferral would
        checks += 1
        now, task = pending.pop(0)
        admission = run(limit, state, now, task)
        if admission.admitted:
            admitted.append(now)
        else:
            assert admission.turn >= now
            pending.append((admission.turn, task))
            pending.sort()
    assert not pending  # everybody got through, in finite time
    for start in admitted:
        assert sum(1 for at in admitted if start <= at < start + interval) <= count


def test_a_deferral_by_a_limit_uses_no_attempt_and_the_deadline_still_counts():
    from safetynet import Dead, LimitReached, Retry, RetryPolicy, decide
    from safetynet.core.classify import Rules

    policy = RetryPolicy(max_attempts=3, deadline=60)
    waiting = decide(policy, Rules(), 3, LimitReached("partner-api", 20.0, "rate"), started_at=0.0, now=30.0)
    assert waiting == Retry(20.0, "Snooze", consumes_attempt=False)  # the 3rd of 3 attempts: still not used up
    late = decide(policy, Rules(), 1, LimitReached("partner-api", 40.0, "line"), started_at=0.0, now=30.0)
    assert isinstance(late, Dead) and late.reason == "deadline_exceeded"
