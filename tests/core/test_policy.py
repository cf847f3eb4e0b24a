"""RetryPolicy: backoff kinds, jitter kinds, caps, Celery's formula and bad input."""

from __future__ import annotations

import dataclasses
import math
import random
from unittest import mock

import celery.utils.time
import pytest
from celery.utils.time import get_exponential_backoff_interval
from hypothesis import given, settings
from hypothesis import strategies as st

from safetynet.core.policy import JITTERS, Backoff, CeleryBackoff, Exponential, Fixed, RetryPolicy
from safetynet.exceptions import ConfigurationError, SafetynetError

FAST = settings(max_examples=200, deadline=None)

# --- strategies (also used by test_decision.py) --------------------------------------------

seconds = st.floats(min_value=0, max_value=10_000, allow_nan=False, allow_infinity=False)
fixed_backoffs = st.builds(Fixed, seconds)
exponential_backoffs = st.builds(
    Exponential,
    base=st.floats(min_value=0, max_value=100, allow_nan=False, allow_infinity=False),
    factor=st.one_of(
        st.floats(min_value=1, max_value=10, allow_nan=False, allow_infinity=False),
        st.integers(min_value=1, max_value=10),
    ),
)
celery_backoffs = st.builds(CeleryBackoff, st.integers(min_value=1, max_value=100))
BACKOFF_KINDS = {"fixed": fixed_backoffs, "exponential": exponential_backoffs, "celery": celery_backoffs}
backoffs = st.one_of(*BACKOFF_KINDS.values())
seeds = st.integers(min_value=0, max_value=2**64)
# Attempts stay at or below 1000 to keep the strategies fast; overflow is tested on its own below.
attempts = st.integers(min_value=1, max_value=1000)


@st.composite
def policies(draw, *, backoff=backoffs, jitter=None, max_delay=None, deadline=None):
    """A valid RetryPolicy; ``max_delay``/``deadline`` strategies default to "sometimes None"."""
    return RetryPolicy(
        max_attempts=draw(st.none() | st.integers(min_value=1, max_value=50)),
        backoff=draw(backoff),
        jitter=draw(st.sampled_from(JITTERS) if jitter is None else st.just(jitter)),
        max_delay=draw(st.none() | seconds if max_delay is None else max_delay),
        deadline=draw(st.none() if deadline is None else deadline),
        whole_seconds=draw(st.booleans()),
    )


def schedule(policy: RetryPolicy, seed: int, count: int) -> list[float]:
    """The delays after attempts 1..count, feeding each one to the next as ``previous``."""
    rng = random.Random(seed)
    delays: list[float] = []
    previous = None
    for attempt in range(1, count + 1):
        previous = policy.delay_for(attempt, previous=previous, rng=rng)
        delays.append(previous)
    return delays


# --- properties over every backoff kind × every jitter kind ---------------------------------
# Each example draws one backoff of every kind and checks it under every jitter kind, so all
# twelve combinations are exercised in every example (and the suite stays fast).

jitters = pytest.mark.parametrize("jitter", JITTERS)


@st.composite
def policy_grids(draw, max_delay=seconds):
    """One policy per (backoff kind, jitter kind), sharing the other drawn fields."""
    shared = {
        "max_attempts": draw(st.none() | st.integers(min_value=1, max_value=50)),
        "max_delay": draw(max_delay),
        "whole_seconds": draw(st.booleans()),
    }
    return [
        RetryPolicy(backoff=draw(strategy), jitter=jitter, **shared)
        for strategy in BACKOFF_KINDS.values()
        for jitter in JITTERS
    ]


@settings(max_examples=5, deadline=None)
@given(grid=policy_grids())
def test_policy_grid_covers_every_combination(grid):
    assert {(type(p.backoff), p.jitter) for p in grid} == {
        (kind, jitter) for kind in (Fixed, Exponential, CeleryBackoff) for jitter in JITTERS
    }


@FAST
@given(grid=policy_grids(), attempt=attempts, seed=seeds, previous=st.none() | seconds)
def test_delay_within_range_capped_and_not_negative(grid, attempt, seed, previous):
    for policy in grid:
        given_previous = previous
        if policy.jitter == "decorrelated" and previous is not None:
            # decorrelated reads ``previous``: give it one the policy produced for the attempt before
            given_previous = policy.delay_for(attempt - 1, rng=random.Random(seed)) if attempt > 1 else None
        low, high = policy.delay_range(attempt)
        delay = policy.delay_for(attempt, previous=given_previous, rng=random.Random(seed))
        assert 0 <= low <= delay <= high <= policy.max_delay, (policy, attempt, delay)


@FAST
@given(grid=policy_grids(), seed=seeds, count=st.integers(min_value=1, max_value=40))
def test_whole_schedule_within_range_and_cap(grid, seed, count):
    for policy in grid:
        for attempt, delay in enumerate(schedule(policy, seed, count), start=1):
            low, high = policy.delay_range(attempt)
            assert 0 <= low <= delay <= high <= policy.max_delay, (policy, attempt, delay, (low, high))


@FAST
@given(grid=policy_grids(max_delay=st.none()), seed=seeds, count=st.integers(min_value=1, max_value=30))
def test_uncapped_schedule_finite_within_range(grid, seed, count):
    for policy in grid:
        for attempt, delay in enumerate(schedule(policy, seed, count), start=1):
            low, high = policy.delay_range(attempt)
            assert 0 <= low <= delay <= high, (policy, attempt, delay)
            assert math.isfinite(delay)


@FAST
@given(grid=policy_grids(max_delay=st.none() | seconds), seed=seeds, count=st.integers(min_value=1, max_value=30))
def test_same_seed_same_schedule(grid, seed, count):
    for policy in grid:
        first = schedule(policy, seed, count)
        assert len(first) == count
        assert schedule(policy, seed, count) == first, policy


@FAST
@given(grid=policy_grids(), seed=seeds, count=st.integers(min_value=1, max_value=30))
def test_whole_seconds_gives_integers(grid, seed, count):
    for policy in grid:
        policy = policy.replace(whole_seconds=True)
        for attempt, delay in enumerate(schedule(policy, seed, count), start=1):
            assert float(delay).is_integer(), (policy, attempt, delay)
            low, high = policy.delay_range(attempt)
            assert low <= delay <= high


@jitters
def test_different_seeds_differ_when_jittered(jitter):
    policy = RetryPolicy(max_attempts=None, backoff=Fixed(100), jitter=jitter, max_delay=None)
    schedules = {tuple(schedule(policy, seed, 5)) for seed in range(20)}
    assert len(schedules) == (1 if jitter == "none" else 20)


def test_unseeded_delay_for_uses_global_random():
    policy = RetryPolicy(backoff=Fixed(100), jitter="full")
    random.seed(1234)
    first = policy.delay_for(1)
    random.seed(1234)
    assert policy.delay_for(1) == first
    assert policy.delay_for(1, rng=random.Random(1234)) == first


# --- exact values of each backoff kind ------------------------------------------------------


def test_fixed_is_constant():
    policy = RetryPolicy(backoff=Fixed(7), jitter="none")
    assert [policy.delay_for(n) for n in range(1, 6)] == [7.0] * 5
    assert Fixed(7).base_delay(100) == 7.0


def test_number_backoff_means_fixed():
    assert RetryPolicy(backoff=5).backoff == Fixed(5)
    assert RetryPolicy(backoff=2.5).backoff == Fixed(2.5)


def test_named_backoffs():
    assert RetryPolicy(backoff="exponential").backoff == Exponential()
    assert RetryPolicy(backoff="celery").backoff == CeleryBackoff()


def test_exponential_defaults_double_up_to_the_cap():
    policy = RetryPolicy(jitter="none")
    assert policy.backoff == Exponential(1.0, 2.0)
    delays = [policy.delay_for(n) for n in range(1, 13)]
    assert delays == [1, 2, 4, 8, 16, 32, 64, 128, 256, 512, 600, 600]


def test_exponential_base_and_factor():
    backoff = Exponential(base=0.5, factor=3)
    assert [backoff.base_delay(n) for n in (1, 2, 3, 4)] == [0.5, 1.5, 4.5, 13.5]


def test_exponential_overflow_is_infinite_then_capped():
    assert Exponential(factor=10.0).base_delay(100_000) == math.inf
    assert Exponential(factor=10).base_delay(100_000) == math.inf
    assert RetryPolicy(backoff=Exponential(factor=10.0), jitter="none", max_delay=60).delay_for(100_000) == 60.0


def test_celery_backoff_doubles_from_factor():
    assert [CeleryBackoff(3).base_delay(n) for n in (1, 2, 3, 4)] == [3.0, 6.0, 12.0, 24.0]
    assert CeleryBackoff().base_delay(1) == 1.0
    assert CeleryBackoff().base_delay(5000) == math.inf


@pytest.mark.parametrize(("factor", "attempt"), [(1, 1025), (1, 1100), (1000, 1016)])
def test_celery_backoff_does_not_overflow_before_its_guard(factor, attempt):
    assert CeleryBackoff(factor).base_delay(attempt) == math.inf


def test_unlimited_celery_policy_survives_long_retry_runs():
    policy = RetryPolicy.from_celery(max_retries=None, retry_backoff=True, retry_jitter=True)
    delay = policy.delay_for(1025, rng=random.Random(0))
    assert 0 <= delay <= 600


def test_exponential_with_zero_base_stays_zero():
    policy = RetryPolicy(backoff=Exponential(base=0.0), jitter="none")
    assert policy.delay_for(1) == 0.0
    assert policy.delay_for(2000) == 0.0


def test_whole_seconds_without_cap_survives_overflowing_backoff():
    policy = RetryPolicy(max_attempts=None, backoff=Exponential(), max_delay=None, whole_seconds=True, deadline=3600)
    assert policy.delay_for(2000, rng=random.Random(0)) >= policy.delay_for(10, rng=random.Random(0))


def test_custom_backoff_protocol_is_accepted():
    class Linear:
        def base_delay(self, attempt: int) -> float:
            return 10.0 * attempt

    backoff = Linear()
    assert isinstance(backoff, Backoff)
    policy = RetryPolicy(backoff=backoff, jitter="none", max_delay=25)
    assert policy.backoff is backoff
    assert [policy.delay_for(n) for n in (1, 2, 3)] == [10.0, 20.0, 25.0]


# --- each jitter kind, concretely --------------------------------------------------------------


def test_delay_range_by_jitter():
    def make(jitter, **kw):
        return RetryPolicy(backoff=Fixed(10), jitter=jitter, max_delay=100, **kw)

    assert make("none").delay_range(3) == (10.0, 10.0)
    assert make("full").delay_range(3) == (0.0, 10.0)
    assert make("equal").delay_range(3) == (5.0, 10.0)
    assert make("decorrelated").delay_range(1) == (10.0, 30.0)
    assert make("decorrelated").delay_range(2) == (10.0, 90.0)
    assert make("decorrelated").delay_range(3) == (10.0, 100.0)
    assert RetryPolicy(backoff=Fixed(9), jitter="equal", whole_seconds=True).delay_range(1) == (4.0, 9.0)


def test_full_jitter_whole_seconds_reaches_every_integer():
    policy = RetryPolicy(backoff=Fixed(4), jitter="full", whole_seconds=True)
    seen = {policy.delay_for(1, rng=random.Random(seed)) for seed in range(300)}
    assert seen == {0.0, 1.0, 2.0, 3.0, 4.0}


def test_equal_jitter_keeps_half():
    policy = RetryPolicy(backoff=Fixed(10), jitter="equal")
    values = [policy.delay_for(1, rng=random.Random(seed)) for seed in range(300)]
    assert all(5 <= v <= 10 for v in values)
    assert min(values) < 6 and max(values) > 9


def test_decorrelated_grows_from_previous_and_is_capped():
    policy = RetryPolicy(backoff=Fixed(2), jitter="decorrelated", max_delay=50)
    first = [policy.delay_for(1, rng=random.Random(seed)) for seed in range(200)]
    assert all(2 <= v <= 6 for v in first)
    later = [policy.delay_for(5, previous=10, rng=random.Random(seed)) for seed in range(200)]
    assert all(2 <= v <= 30 for v in later)
    assert max(later) > 6  # previous=10 widened the window past 3 * base
    capped = [policy.delay_for(5, previous=1000, rng=random.Random(seed)) for seed in range(50)]
    assert max(capped) == 50.0
    assert all(2 <= v <= 50 for v in capped)


def test_no_jitter_equals_capped_base():
    policy = RetryPolicy(backoff=Exponential(base=1.5), jitter="none", max_delay=100, whole_seconds=True)
    assert [policy.delay_for(n) for n in (1, 2, 3, 8)] == [1.0, 3.0, 6.0, 100.0]


def test_capped():
    assert RetryPolicy(max_delay=60).capped(61) == 60.0
    assert RetryPolicy(max_delay=60).capped(59.5) == 59.5
    assert RetryPolicy(max_delay=None).capped(10**9) == 10**9


# --- Celery's formula ------------------------------------------------------------------------


def celery_delay(policy_kwargs: dict, attempt: int, rng: random.Random) -> int:
    """What Celery's autoretry computes for the retry after ``attempt``, drawing from ``rng``."""
    factor = int(max(1.0, float(policy_kwargs["retry_backoff"])))
    with mock.patch.object(celery.utils.time, "random", rng):
        return get_exponential_backoff_interval(
            factor=factor,
            retries=attempt - 1,
            maximum=int(policy_kwargs["retry_backoff_max"]),
            full_jitter=policy_kwargs["retry_jitter"],
        )


def test_from_celery_documented_example_stays_in_celery_range():
    policy = RetryPolicy.from_celery(max_retries=5, retry_backoff=True, retry_backoff_max=600, retry_jitter=True)
    assert policy.max_attempts == 6
    assert policy.backoff == CeleryBackoff(1)
    assert policy.jitter == "full"
    assert policy.whole_seconds is True
    for attempt in range(1, 16):
        allowed = range(0, min(600, 2 ** (attempt - 1)) + 1)
        for seed in range(20):
            delay = policy.delay_for(attempt, rng=random.Random(seed))
            assert float(delay).is_integer()
            assert int(delay) in allowed, (attempt, delay)


def test_from_celery_possible_values_equal_celerys():
    kwargs = {"retry_backoff": True, "retry_backoff_max": 600, "retry_jitter": True}
    policy = RetryPolicy.from_celery(max_retries=5, **kwargs)
    for attempt in (1, 2, 3, 4):
        ours = {policy.delay_for(attempt, rng=random.Random(seed)) for seed in range(400)}
        theirs = {celery_delay(kwargs, attempt, random.Random(seed)) for seed in range(400)}
        assert ours == set(map(float, theirs)) == set(map(float, range(2 ** (attempt - 1) + 1)))


@FAST
@given(
    retry_backoff=st.one_of(
        st.just(True),
        st.integers(min_value=1, max_value=20),
        st.floats(min_value=0.01, max_value=20, allow_nan=False),
    ),
    retry_backoff_max=st.integers(min_value=0, max_value=5000),
    retry_jitter=st.booleans(),
    seed=seeds,
    max_retries=st.integers(min_value=0, max_value=20),
)
def test_from_celery_matches_celery_draw_for_draw(retry_backoff, retry_backoff_max, retry_jitter, seed, max_retries):
    kwargs = {"retry_backoff": retry_backoff, "retry_backoff_max": retry_backoff_max, "retry_jitter": retry_jitter}
    policy = RetryPolicy.from_celery(max_retries=max_retries, **kwargs)
    ours_rng, celery_rng = random.Random(seed), random.Random(seed)
    for attempt in range(1, max_retries + 1):
        ours = policy.delay_for(attempt, rng=ours_rng)
        theirs = celery_delay(kwargs, attempt, celery_rng)
        assert ours == theirs, (attempt, ours, theirs)
        assert float(ours).is_integer()


@pytest.mark.parametrize("retry_backoff", [True, 1, 2, 3, 5])
@pytest.mark.parametrize("maximum", [0, 1, 10, 600])
def test_from_celery_without_jitter_is_exact(retry_backoff, maximum):
    policy = RetryPolicy.from_celery(
        max_retries=20, retry_backoff=retry_backoff, retry_backoff_max=maximum, retry_jitter=False
    )
    assert policy.jitter == "none"
    factor = int(retry_backoff)
    for attempt in range(1, 21):
        expected = min(maximum, factor * 2 ** (attempt - 1))
        assert policy.delay_for(attempt) == expected
        assert policy.delay_for(attempt) == get_exponential_backoff_interval(factor, attempt - 1, maximum, False)


@pytest.mark.parametrize(("retry_backoff", "factor"), [(True, 1), (1, 1), (3, 3), (2.7, 2), (0.5, 1), (10.0, 10)])
def test_from_celery_factor(retry_backoff, factor):
    assert RetryPolicy.from_celery(retry_backoff=retry_backoff).backoff == CeleryBackoff(factor)


def test_from_celery_without_backoff_uses_default_retry_delay():
    policy = RetryPolicy.from_celery(max_retries=3)
    assert policy == RetryPolicy(max_attempts=4, backoff=Fixed(180), jitter="none", max_delay=None)
    assert [policy.delay_for(n, rng=random.Random(n)) for n in range(1, 10)] == [180.0] * 9
    custom = RetryPolicy.from_celery(max_retries=3, retry_backoff=False, default_retry_delay=30)
    assert custom.backoff == Fixed(30)
    assert custom.delay_for(2) == 30.0
    assert RetryPolicy.from_celery(retry_backoff=0, default_retry_delay=5).backoff == Fixed(5)


@pytest.mark.parametrize(("max_retries", "max_attempts"), [(None, None), (0, 1), (3, 4), (5, 6)])
def test_from_celery_max_retries(max_retries, max_attempts):
    assert RetryPolicy.from_celery(max_retries=max_retries).max_attempts == max_attempts
    assert RetryPolicy.from_celery(max_retries=max_retries, retry_backoff=True).max_attempts == max_attempts


def test_from_celery_defaults_match_celery_task_defaults():
    policy = RetryPolicy.from_celery()
    assert policy.max_attempts == 4  # Task.max_retries = 3
    assert policy.backoff == Fixed(180)  # Task.default_retry_delay = 3 minutes
    backoff = RetryPolicy.from_celery(retry_backoff=True)
    assert backoff.max_delay == 600 and backoff.jitter == "full"


@pytest.mark.parametrize("max_retries", [-1, 1.5, "3", True])
def test_from_celery_bad_max_retries(max_retries):
    with pytest.raises(ConfigurationError, match="max_retries"):
        RetryPolicy.from_celery(max_retries=max_retries)


# --- bad input ---------------------------------------------------------------------------------


def test_configuration_error_is_a_value_error():
    assert issubclass(ConfigurationError, ValueError)
    assert issubclass(ConfigurationError, SafetynetError)


@pytest.mark.parametrize("delay", [-1, -0.001, float("nan"), "5", None, True])
def test_fixed_rejects_bad_delay(delay):
    with pytest.raises(ConfigurationError, match=r"Fixed\.delay"):
        Fixed(delay)


def test_negative_number_backoff_names_the_field():
    with pytest.raises(ConfigurationError, match=r"Fixed\.delay.*-1"):
        RetryPolicy(backoff=-1)


@pytest.mark.parametrize("backoff", ["linear", None, object(), True])
def test_unknown_backoff(backoff):
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.backoff"):
        RetryPolicy(backoff=backoff)


@pytest.mark.parametrize("max_attempts", [0, -1, 1.5, "3", True])
def test_bad_max_attempts(max_attempts):
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.max_attempts") as error:
        RetryPolicy(max_attempts=max_attempts)
    assert repr(max_attempts) in str(error.value)


def test_max_attempts_one_and_none_are_valid():
    assert RetryPolicy(max_attempts=1).max_attempts == 1
    assert RetryPolicy(max_attempts=None, deadline=60).max_attempts is None


def test_misspelt_jitter_suggests_the_right_one():
    with pytest.raises(ConfigurationError) as error:
        RetryPolicy(jitter="fulll")
    message = str(error.value)
    assert "RetryPolicy.jitter" in message
    for name in JITTERS:
        assert repr(name) in message
    assert "did you mean 'full'?" in message


def test_unknown_jitter_without_close_match_has_no_suggestion():
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.jitter") as error:
        RetryPolicy(jitter="xyz")
    assert "did you mean" not in str(error.value)


@pytest.mark.parametrize("jitter", [None, True, "FULL "])
def test_non_string_or_odd_jitter(jitter):
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.jitter"):
        RetryPolicy(jitter=jitter)


@pytest.mark.parametrize("max_delay", [-1, -0.5, float("nan"), "600", True])
def test_bad_max_delay(max_delay):
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.max_delay"):
        RetryPolicy(max_delay=max_delay)


@pytest.mark.parametrize("deadline", [0, 0.0, -1, float("nan"), "60"])
def test_bad_deadline(deadline):
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.deadline"):
        RetryPolicy(deadline=deadline)


@pytest.mark.parametrize("factor", [0.5, 0, -2, float("nan"), "2", True])
def test_exponential_factor_below_one(factor):
    with pytest.raises(ConfigurationError, match=r"Exponential\.factor"):
        Exponential(factor=factor)


@pytest.mark.parametrize("base", [-1, float("nan"), "1"])
def test_exponential_bad_base(base):
    with pytest.raises(ConfigurationError, match=r"Exponential\.base"):
        Exponential(base=base)


@pytest.mark.parametrize("factor", [0, -1, 1.5, True, "2"])
def test_celery_backoff_bad_factor(factor):
    with pytest.raises(ConfigurationError, match=r"CeleryBackoff\.factor"):
        CeleryBackoff(factor)


def test_replace_validates_again():
    policy = RetryPolicy()
    assert policy.replace(max_attempts=9).max_attempts == 9
    assert policy.max_attempts == 5
    with pytest.raises(ConfigurationError, match=r"RetryPolicy\.jitter.*did you mean 'equal'"):
        policy.replace(jitter="equl")


def test_policy_is_frozen_and_comparable():
    policy = RetryPolicy()
    with pytest.raises(dataclasses.FrozenInstanceError):
        policy.max_attempts = 3  # type: ignore[misc]
    assert policy == RetryPolicy()
    assert hash(policy) == hash(RetryPolicy())


def test_describe():
    assert RetryPolicy().describe() == "5 attempts, exponential backoff from 1 s (×2), full jitter, waits at most 10 min"
    assert (
        RetryPolicy(max_attempts=None, backoff=Fixed(3), jitter="none", max_delay=None, deadline=90).describe()
        == "unlimited attempts, a fixed 3 s between them, no jitter, deadline 1 min 30 s after the first attempt started"
    )
    assert RetryPolicy.from_celery(max_retries=2, retry_backoff=4).describe() == (
        "3 attempts, Celery's retry_backoff (4 s, ×2), full jitter, waits at most 10 min"
    )
    assert RetryPolicy(max_attempts=1).describe().startswith("1 attempt (no retry), ")


def test_durations_read_like_a_person_writes_them():
    from safetynet.core.durations import duration, duration_range

    assert [duration(value) for value in (0, 0.0004, 0.25, 1, 1.5, 59.9, 60, 90, 600, 3600, 3660, 5400, 86400, 90000)] \
        == ["0 s", "0.4 ms", "0.25 s", "1 s", "1.5 s", "59.9 s", "1 min", "1 min 30 s", "10 min", "1 h", "1 h 1 min",
            "1 h 30 min", "1 d", "1 d 1 h"]
    assert duration(3599.7) == "1 h" and duration(float("inf")) == "∞"
    assert duration_range(5, 5) == "5 s" and duration_range(0, 15) == "0 s–15 s"


def test_equal_jitter_never_rounds_past_the_delay():
    """A denormal delay (hypothesis found base=5e-324): half + uniform(0, half) rounded up past the delay."""
    policy = RetryPolicy(max_attempts=None, backoff=Exponential(base=5e-324, factor=3), jitter="equal")
    low, high = policy.delay_range(2)
    for seed in range(200):
        assert low <= policy.delay_for(2, rng=random.Random(seed)) <= high
