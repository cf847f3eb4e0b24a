"""decide(): done, retry (when), or dead (why)."""

from __future__ import annotations

import dataclasses
import random

import pytest
import requests
from hypothesis import given, settings
from hypothesis import strategies as st

from safetynet.core.classify import Rules, http_status
from safetynet.core.decision import DONE, Dead, Done, Retry, decide
from safetynet.core.policy import Fixed, RetryPolicy
from safetynet.exceptions import ConfigurationError
from safetynet.exceptions import Permanent, Snooze, Transient
from tests.core.test_policy import policies, seconds, seeds

FAST = settings(max_examples=200, deadline=None)
# Up to 300 even uncapped exponential policies stay finite (100 * 10**299 < 1e308).
attempts = st.integers(min_value=1, max_value=300)
START = 1_700_000_000.0
NO_JITTER = RetryPolicy(max_attempts=3, backoff=Fixed(10), jitter="none", max_delay=600)
RETRY_ALL = Rules(unclassified="retry")


def rate_limited(retry_after: str) -> requests.HTTPError:
    response = requests.Response()
    response.status_code = 429
    response.headers["Retry-After"] = retry_after
    return requests.HTTPError("429", response=response)


# --- Done -------------------------------------------------------------------------------------------


def test_done_without_exception():
    assert decide(NO_JITTER, Rules(), 1, None, START, START) is DONE
    assert isinstance(DONE, Done)


def test_done_even_past_max_attempts_and_deadline():
    policy = NO_JITTER.replace(deadline=5)
    assert decide(policy, Rules(), 99, None, START, START + 1_000) == Done()


# --- retries exhausted ------------------------------------------------------------------------------


def test_retries_exhausted_at_max_attempts():
    assert decide(NO_JITTER, RETRY_ALL, 1, ValueError(), START, START) == Retry(10.0, 'no rule matched; UNCLASSIFIED is "retry"')
    assert decide(NO_JITTER, RETRY_ALL, 2, ValueError(), START, START) == Retry(10.0, 'no rule matched; UNCLASSIFIED is "retry"')
    dead = decide(NO_JITTER, RETRY_ALL, 3, ValueError(), START, START)
    assert isinstance(dead, Dead)
    assert dead.reason == "retries_exhausted"
    assert "attempt 3 of 3" in dead.detail and 'no rule matched; UNCLASSIFIED is "retry"' in dead.detail
    assert decide(NO_JITTER, RETRY_ALL, 4, ValueError(), START, START).reason == "retries_exhausted"


def test_max_attempts_one_never_retries():
    policy = NO_JITTER.replace(max_attempts=1)
    assert decide(policy, Rules(), 1, Transient("flaky"), START, START).reason == "retries_exhausted"


def test_unlimited_attempts_never_exhaust():
    policy = NO_JITTER.replace(max_attempts=None)
    assert decide(policy, Rules(), 100_000, Transient("flaky"), START, START) == Retry(10.0, "Transient")


@FAST
@given(policy=policies(), attempt=attempts, seed=seeds)
def test_retry_iff_attempts_remain(policy, attempt, seed):
    decision = decide(policy.replace(deadline=None), Rules(), attempt, Transient("x"), START, START, rng=random.Random(seed))
    if policy.max_attempts is not None and attempt >= policy.max_attempts:
        assert decision.reason == "retries_exhausted"
    else:
        assert isinstance(decision, Retry) and decision.consumes_attempt


# --- permanent errors -------------------------------------------------------------------------------


def test_permanent_is_dead_at_once():
    dead = decide(NO_JITTER, RETRY_ALL, 1, Permanent("row deleted"), START, START)
    assert dead == Dead("permanent_error", "Permanent")


def test_fail_on_is_dead_at_once():
    rules = Rules(retry_on=(Exception,), fail_on=(KeyError,))
    assert decide(NO_JITTER, rules, 1, KeyError("k"), START, START) == Dead("permanent_error", "fail_on KeyError")
    assert isinstance(decide(NO_JITTER, rules, 1, ValueError(), START, START), Retry)


def test_unclassified_fail_is_a_permanent_error():
    assert decide(NO_JITTER, Rules(), 1, ValueError(), START, START) == Dead("permanent_error", 'no rule matched; UNCLASSIFIED is "fail"')


def test_permanent_wins_over_exhausted_and_deadline():
    policy = NO_JITTER.replace(deadline=1)
    assert decide(policy, RETRY_ALL, 3, Permanent("x"), START, START + 50).reason == "permanent_error"


# --- transient: retry with the policy's delay ------------------------------------------------------


def test_transient_retries_with_policy_delay():
    decision = decide(NO_JITTER, Rules(), 1, Transient("flaky"), START, START)
    assert decision == Retry(10.0, "Transient", consumes_attempt=True)


def test_retry_reason_names_the_rule():
    rules = Rules(retry_on=(http_status(429),))
    assert decide(NO_JITTER, rules, 1, rate_limited("1"), START, START).reason == "retry_on http_status(429)"


@FAST
@given(policy=policies(), attempt=attempts, seed=seeds, previous=st.none() | seconds)
def test_retry_delay_is_the_policy_delay(policy, attempt, seed, previous):
    policy = policy.replace(max_attempts=None, deadline=None)
    decision = decide(policy, Rules(), attempt, Transient("x"), START, START, previous_delay=previous,
                      rng=random.Random(seed))
    assert decision == Retry(policy.delay_for(attempt, previous=previous, rng=random.Random(seed)), "Transient")


@FAST
@given(policy=policies(), attempt=attempts, seed=seeds)
def test_decide_is_deterministic_with_a_seed(policy, attempt, seed):
    first = decide(policy, RETRY_ALL, attempt, ValueError(), START, START + 5, rng=random.Random(seed))
    assert decide(policy, RETRY_ALL, attempt, ValueError(), START, START + 5, rng=random.Random(seed)) == first


def test_from_celery_policy_through_decide():
    policy = RetryPolicy.from_celery(max_retries=5, retry_backoff=True, retry_backoff_max=600, retry_jitter=True)
    rules = Rules(retry_on=(ConnectionError,))
    for attempt in range(1, 6):
        decision = decide(policy, rules, attempt, ConnectionError(), START, START, rng=random.Random(attempt))
        assert isinstance(decision, Retry)
        assert float(decision.delay).is_integer() and 0 <= decision.delay <= 2 ** (attempt - 1)
    assert decide(policy, rules, 6, ConnectionError(), START, START).reason == "retries_exhausted"


# --- snooze ---------------------------------------------------------------------------------------


def test_snooze_does_not_consume_an_attempt():
    decision = decide(NO_JITTER, Rules(), 1, Snooze(30), START, START)
    assert decision == Retry(30.0, "Snooze", consumes_attempt=False)


@pytest.mark.parametrize("attempt", [3, 4, 50])
def test_snooze_at_or_past_max_attempts_still_retries(attempt):
    decision = decide(NO_JITTER, Rules(), attempt, Snooze(30), START, START)
    assert decision == Retry(30.0, "Snooze", consumes_attempt=False)


def test_snooze_zero():
    assert decide(NO_JITTER, Rules(), 1, Snooze(0), START, START) == Retry(0.0, "Snooze", consumes_attempt=False)


def test_snooze_respects_the_deadline():
    policy = NO_JITTER.replace(deadline=100)
    assert isinstance(decide(policy, Rules(), 1, Snooze(40), START, START + 60), Retry)
    assert decide(policy, Rules(), 1, Snooze(41), START, START + 60).reason == "deadline_exceeded"


def test_snooze_wins_over_fail_on():
    decision = decide(NO_JITTER, Rules(fail_on=(Exception,)), 1, Snooze(5), START, START)
    assert decision == Retry(5.0, "Snooze", consumes_attempt=False)


# --- deadline ---------------------------------------------------------------------------------------


def test_deadline_boundary_is_inclusive():
    policy = NO_JITTER.replace(deadline=70)
    assert decide(policy, Rules(), 1, Transient("x"), START, START + 60) == Retry(10.0, "Transient")
    dead = decide(policy, Rules(), 1, Transient("x"), START, START + 60.5)
    assert dead.reason == "deadline_exceeded"
    assert dead.detail == "the next attempt would start 70.5 s after the first, past the 1 min 10 s deadline"


def test_exhausted_is_reported_before_deadline():
    policy = NO_JITTER.replace(deadline=1)
    assert decide(policy, Rules(), 3, Transient("x"), START, START + 100).reason == "retries_exhausted"


def signals(draw_seconds=st.floats(min_value=0, max_value=100_000, allow_nan=False, allow_infinity=False)):
    return st.one_of(
        st.builds(Transient, st.just("flaky")),
        st.builds(Transient, st.just("slow down"), retry_after=draw_seconds),
        st.builds(Snooze, draw_seconds),
        st.builds(ValueError),  # retried by RETRY_ALL as unclassified
        st.builds(rate_limited, st.integers(min_value=0, max_value=100_000).map(str)),
    )


@FAST
@given(
    policy=policies(deadline=st.floats(min_value=0.001, max_value=100_000, allow_nan=False, allow_infinity=False)),
    attempt=attempts,
    elapsed=st.floats(min_value=0, max_value=200_000, allow_nan=False),
    started_at=st.floats(min_value=0, max_value=2e9, allow_nan=False),
    exception=signals(),
    seed=seeds,
)
def test_deadline_is_never_exceeded(policy, attempt, elapsed, started_at, exception, seed):
    now = started_at + elapsed
    decision = decide(policy, RETRY_ALL, attempt, exception, started_at, now, rng=random.Random(seed))
    if isinstance(decision, Retry):
        assert now + decision.delay - started_at <= policy.deadline
    else:
        assert decision.reason in ("deadline_exceeded", "retries_exhausted")
    if isinstance(decision, Dead) and decision.reason == "deadline_exceeded":
        # Without the deadline the same draw would have retried too late.
        undeadlined = decide(policy.replace(deadline=None), RETRY_ALL, attempt, exception, started_at, now,
                             rng=random.Random(seed))
        assert isinstance(undeadlined, Retry)
        assert now + undeadlined.delay - started_at > policy.deadline


# --- Retry-After -----------------------------------------------------------------------------------


def test_retry_after_longer_than_backoff_wins():
    decision = decide(NO_JITTER, Rules(), 1, Transient("slow", retry_after=30), START, START)
    assert decision == Retry(30.0, "Transient")


def test_backoff_longer_than_retry_after_wins():
    decision = decide(NO_JITTER, Rules(), 1, Transient("slow", retry_after=1), START, START)
    assert decision == Retry(10.0, "Transient")


def test_retry_after_capped_by_max_delay():
    decision = decide(NO_JITTER, Rules(), 1, Transient("slow", retry_after=3600), START, START)
    assert decision == Retry(600.0, "Transient")


def test_retry_after_header_honoured_and_capped():
    rules = Rules(retry_on=(http_status(429),))
    assert decide(NO_JITTER, rules, 1, rate_limited("45"), START, START).delay == 45.0
    assert decide(NO_JITTER, rules, 1, rate_limited("86400"), START, START).delay == 600.0
    uncapped = NO_JITTER.replace(max_delay=None)
    assert decide(uncapped, rules, 1, rate_limited("86400"), START, START).delay == 86400.0


def test_garbage_retry_after_header_falls_back_to_backoff(caplog):
    rules = Rules(retry_on=(http_status(429),))
    assert decide(NO_JITTER, rules, 1, rate_limited("tomorrow"), START, START) == Retry(10.0, "retry_on http_status(429)")
    assert any(record.name == "safetynet" for record in caplog.records)


def test_retry_after_beyond_deadline_is_dead():
    policy = NO_JITTER.replace(deadline=300)
    decision = decide(policy, Rules(), 1, Transient("slow", retry_after=500), START, START)
    assert decision.reason == "deadline_exceeded"


@FAST
@given(
    policy=policies(),
    attempt=attempts,
    retry_after=st.floats(min_value=0, max_value=1e6, allow_nan=False, allow_infinity=False),
    via_header=st.booleans(),
    seed=seeds,
)
def test_retry_after_honoured_unless_capped(policy, attempt, retry_after, via_header, seed):
    policy = policy.replace(max_attempts=None, deadline=None)
    if via_header:
        retry_after = float(int(retry_after))
        exception = rate_limited(str(int(retry_after)))
    else:
        exception = Transient("slow down", retry_after=retry_after)
    decision = decide(policy, RETRY_ALL, attempt, exception, START, START, rng=random.Random(seed))
    assert isinstance(decision, Retry)
    if policy.max_delay is None or retry_after <= policy.max_delay:
        assert decision.delay >= retry_after
    else:
        assert decision.delay == policy.max_delay
    if policy.max_delay is not None:
        assert decision.delay <= policy.max_delay
    assert decision.delay >= policy.delay_range(attempt)[0]


# --- the decision values ------------------------------------------------------------------------------


def test_decisions_are_frozen_values():
    retry = Retry(1.0, "Transient")
    assert retry == Retry(1.0, "Transient", consumes_attempt=True)
    with pytest.raises(dataclasses.FrozenInstanceError):
        retry.delay = 2.0  # type: ignore[misc]
    assert Dead("permanent_error") == Dead("permanent_error", "")
    assert Done() == DONE


@pytest.mark.parametrize(
    ("exception", "strict", "lenient"),
    [
        (ValueError("x"), Dead("permanent_error", 'no rule matched; UNCLASSIFIED is "fail"'), Retry(10.0, 'no rule matched; UNCLASSIFIED is "retry"')),
        (SystemExit(1), Dead("permanent_error", 'no rule matched; UNCLASSIFIED is "fail"'), Retry(10.0, 'no rule matched; UNCLASSIFIED is "retry"')),
        (Transient(), Retry(10.0, "Transient"), Retry(10.0, "Transient")),
        (Permanent(), Dead("permanent_error", "Permanent"), Dead("permanent_error", "Permanent")),
        (Snooze(1), Retry(1.0, "Snooze", False), Retry(1.0, "Snooze", False)),
    ],
)
def test_every_exception_gets_exactly_one_outcome(exception, strict, lenient):
    assert decide(NO_JITTER, Rules(), 1, exception, START, START) == strict
    assert decide(NO_JITTER, RETRY_ALL, 1, exception, START, START) == lenient


def test_nan_snooze_cannot_slip_past_the_deadline():
    with pytest.raises(ConfigurationError, match="Snooze.delay"):
        Snooze(float("nan"))
    snooze = Snooze(1)
    snooze.delay = float("nan")  # forced past the constructor: decide must still not retry
    policy = NO_JITTER.replace(deadline=100)
    assert not isinstance(decide(policy, Rules(), 1, snooze, START, START), Retry)
