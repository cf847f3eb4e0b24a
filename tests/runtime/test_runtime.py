"""The runtime in-process: the simulator, history, Retry-After, deadlines, Celery's calling conventions."""

import json
import smtplib
from datetime import datetime, timedelta, timezone

import pytest
from django.test import override_settings

from safetynet import signals
from safetynet.protocol.headers import HISTORY as HEADER
from safetynet.testing import Simulator, http_error, inject, simulate
from tests.fixtures import tasks


def test_simulated_classic_example_a(simulate):
    trace = simulate(tasks.send_welcome_email, "ann@example.com")
    assert [a.number for a in trace.attempts] == [1, 2, 3, 4]
    assert [a.retries for a in trace.attempts] == [0, 1, 2, 3]
    assert trace.delays == [5.0, 5.0, 5.0]
    assert trace.state == "FAILURE" and isinstance(trace.exception, smtplib.SMTPException)
    table = trace.table(file=None)
    assert table.splitlines()[0].split() == [
        "attempt", "at", "action", "exception", "raised", "retries", "next", "step", "delay", "state"]
    assert "give up: retries_exhausted" in table.splitlines()[-1]


def test_simulated_celery_backoff_is_seeded_and_within_celery_bounds():
    first = Simulator(seed=7).run(tasks.send_digest, "x")
    again = Simulator(seed=7).run(tasks.send_digest, "x")
    assert first.delays == again.delays
    assert len(first.attempts) == 6
    for n, delay in enumerate(first.delays, start=1):
        assert delay == int(delay) and 0 <= delay <= min(600, 2 ** (n - 1))


def test_table_prints(capsys):
    simulate(tasks.flaky_once, "k").table()
    out = capsys.readouterr().out
    assert "success" in out and "SUCCESS" in out


def test_snooze_does_not_use_up_attempts():
    trace = simulate(tasks.snoozer, 3)
    assert trace.state == "SUCCESS" and trace.result == 1  # still attempt 1 after three snoozes
    assert [a.action for a in trace.attempts] == ["snooze", "snooze", "snooze", "success"]
    assert trace.delays == [10.0, 10.0, 10.0]


def test_retry_after_from_a_429_is_honoured(inject_fault):
    inject_fault(tasks.rate_limited_call, times=2, exception=http_error(429, retry_after=30))
    trace = simulate(tasks.rate_limited_call)
    assert trace.state == "SUCCESS" and trace.result == 3
    assert trace.delays == [30.0, 30.0]


def test_retry_after_http_date_and_cap(virtual_clock):
    when = datetime.fromtimestamp(virtual_clock.now(), tz=timezone.utc) + timedelta(seconds=45)
    with inject(tasks.rate_limited_call, times=1, exception=http_error(429, retry_after=when)):
        assert simulate(tasks.rate_limited_call).delays == [45.0]
    with inject(tasks.rate_limited_call, times=1, exception=http_error(429, retry_after=3600)):
        assert simulate(tasks.rate_limited_call).delays == [60.0]  # capped by max_delay


def test_a_deadline_is_never_passed():
    trace = simulate(tasks.until_deadline)
    assert trace.state == "FAILURE"
    assert trace.attempts[-1].next_step == "give up: deadline_exceeded"
    assert trace.elapsed <= 35 and trace.delays == [10.0, 10.0, 10.0]


def test_permanent_error_on_first_attempt():
    trace = simulate(tasks.permanent)
    assert len(trace.attempts) == 1 and trace.attempts[0].next_step == "give up: permanent_error"


def test_history_in_headers_is_bounded():
    published = []

    def grab(sender, entry=None, **kwargs):
        published.append(entry)

    dead = []
    signals.task_retrying.connect(grab)
    signals.task_dead.connect(lambda sender, **kw: dead.append(kw), weak=False, dispatch_uid="t-dead")
    try:
        with override_settings(SAFETYNET={"HISTORY_MAX_ENTRIES": 5, "HISTORY_MAX_BYTES": 4000}):
            trace = simulate(tasks.many_retries)
    finally:
        signals.task_retrying.disconnect(grab)
        signals.task_dead.disconnect(dispatch_uid="t-dead")
    assert len(trace.attempts) == 60 and trace.state == "FAILURE"
    final = dead[-1]
    assert final["reason"] == "retries_exhausted"
    kept = final["history"]
    assert kept[0]["attempt"] == 1 and kept[-1]["attempt"] == 60
    assert len(kept) <= 6 and final["omitted"] >= 54
    assert len(json.dumps(kept[:-1])) <= 4000
    assert kept[-1]["traceback"]  # the final attempt keeps its traceback


def test_apply_runs_the_retries_eagerly_and_fails_with_the_original_exception():
    result = tasks.send_welcome_email.apply(("ann@example.com",))
    assert result.state == "FAILURE" and isinstance(result.result, smtplib.SMTPException)


def test_direct_call_raises_the_original_exception_like_celery():
    with pytest.raises(smtplib.SMTPException):
        tasks.send_welcome_email("ann@example.com")
    with pytest.raises(smtplib.SMTPException):
        tasks.send_digest("ann@example.com")


def test_attempt_and_policy_are_available_when_bound():
    assert tasks.call_api.apply((2,)).get() == 3


def test_header_name_is_stable():
    assert HEADER == "safetynet"


def test_a_failing_task_dead_receiver_does_not_change_the_outcome(caplog):
    def broken(sender, **kwargs):
        raise RuntimeError("receiver bug")

    signals.task_dead.connect(broken)
    try:
        trace = simulate(tasks.permanent)
    finally:
        signals.task_dead.disconnect(broken)
    assert trace.state == "FAILURE"
    assert "receiver bug" in caplog.text


def test_urllib_connection_failures_are_network_errors():
    import socket
    import urllib.error

    from safetynet import is_network_error

    assert is_network_error(urllib.error.URLError(ConnectionRefusedError(111, "refused")))
    assert is_network_error(urllib.error.URLError(socket.timeout("timed out")))
    assert not is_network_error(urllib.error.URLError("unknown url type: foo"))


def test_history_bound_of_one_keeps_the_latest_entry():
    from safetynet.protocol.history import _bounded

    entries = [{"attempt": n, "traceback": "t" * 50} for n in range(1, 6)]
    kept, dropped = _bounded(entries, 1, 10_000)
    assert [e["attempt"] for e in kept] == [5] and dropped == 4


def test_ignore_is_shown_as_such_not_as_a_death():
    trace = simulate(tasks.ignored)
    assert trace.state == "IGNORED" and trace.attempts[-1].action == "ignored"
    assert trace.attempts[-1].next_step == "stop (Ignore)"


def test_dont_autoretry_for_alone_keeps_the_default_policy():
    from safetynet import conf

    assert tasks.only_dont_autoretry.policy is conf.get().default_policy
    assert simulate(tasks.only_dont_autoretry).attempts[-1].next_step == "give up: permanent_error"


def test_a_dotted_matcher_that_does_not_import_names_the_key():
    from safetynet import ConfigurationError, conf

    with override_settings(SAFETYNET={"DEFAULT_RETRY_ON": ["nope.missing"]}):
        with pytest.raises(ConfigurationError, match="SAFETYNET\\['DEFAULT_RETRY_ON'\\]: cannot import"):
            conf.get()


def test_self_retry_without_exc_gives_up_with_max_retries_exceeded():
    from celery.exceptions import MaxRetriesExceededError

    dead = []
    signals.task_dead.connect(lambda sender, **kw: dead.append(kw), weak=False, dispatch_uid="t-noexc")
    try:
        trace = simulate(tasks.retries_without_exc)
    finally:
        signals.task_dead.disconnect(dispatch_uid="t-noexc")
    assert trace.state == "FAILURE" and isinstance(trace.exception, MaxRetriesExceededError)
    assert trace.delays == [1.0]
    assert isinstance(dead[0]["exception"], MaxRetriesExceededError)
    assert dead[0]["history"][-1]["exception"] == "celery.exceptions.MaxRetriesExceededError"


def test_a_task_that_calls_itself_is_decided_once_by_the_outer_run_with_one_warning(simulate, caplog):
    """The anti-pattern ``fetch_feed(url)`` inside fetch_feed: every inner call is a plain call (no decision, no
    record, no retry of its own); the outer run alone decides, and one WARNING names the anti-pattern."""
    from tests.fixtures import risky_tasks

    dead = []
    signals.task_dead.connect(lambda sender, **kwargs: dead.append(kwargs["reason"]), weak=False,
                              dispatch_uid="test-reentrant-dead")
    try:
        trace = simulate(risky_tasks.fetch_feed, "https://example.com/feed")
    finally:
        signals.task_dead.disconnect(dispatch_uid="test-reentrant-dead")
    assert len(trace.attempts) == 1 and isinstance(trace.exception, RecursionError)
    assert dead == ["permanent_error"]  # one decision, though the body nested hundreds of calls
    warnings = [record for record in caplog.records if "called itself synchronously" in record.getMessage()]
    assert len(warnings) == 1 and warnings[0].levelname == "WARNING"
