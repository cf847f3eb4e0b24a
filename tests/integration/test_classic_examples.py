"""The classic Celery retry examples, unchanged, on a real worker, compared with the simulator."""

import smtplib

import pytest
from celery import states

from safetynet.testing import simulate
from tests.fixtures import recording, tasks
from tests.integration.conftest import wait_for

pytestmark = pytest.mark.integration


def comparable(history):
    return [(e["attempt"], e["action"], e["delay"], e["exception"]) for e in history]


@pytest.fixture(scope="module")
def sent(worker):
    """Send every case at once so their retries overlap in time."""
    q = {"queue": worker.queue}
    return {
        "a": tasks.send_welcome_email.apply_async(("ann@example.com",), **q),
        "b": tasks.send_digest.apply_async(("bob@example.com",), **q),
        "c": tasks.flaky_once.apply_async(("k",), **q),
        "alert": tasks.alerting_send.apply_async(("cy@example.com",), **q),
        "plain_a": tasks.plain_send_welcome_email.apply_async(("ann@example.com",), **q),
    }


def test_a_bind_and_self_retry_countdown(sent):
    result = sent["a"]
    wait_for(result, timeout=60)  # RETRY on the way is checked by test_celery_states_stay_right
    assert result.state == states.FAILURE
    assert isinstance(result.result, smtplib.SMTPException)
    [dead] = recording.read("dead", result.id)
    assert dead["reason"] == "retries_exhausted"
    assert comparable(dead["history"]) == [
        (1, "retry", 5.0, "smtplib.SMTPException"),
        (2, "retry", 5.0, "smtplib.SMTPException"),
        (3, "retry", 5.0, "smtplib.SMTPException"),
        (4, "dead", None, "smtplib.SMTPException"),
    ]
    # the attempts really were ~5 s apart
    starts = [e["started"] for e in dead["history"]]
    gaps = [later - earlier for earlier, later in zip(starts, starts[1:], strict=False)]
    assert all(4.5 <= gap <= 15 for gap in gaps), gaps


def test_a_simulator_trace_equals_worker_history(sent):
    result = sent["a"]
    wait_for(result, timeout=60)
    [dead] = recording.read("dead", result.id)
    trace = simulate(tasks.send_welcome_email, "ann@example.com")
    assert comparable(trace.history) == comparable(dead["history"])
    assert trace.delays == [5.0, 5.0, 5.0]
    assert trace.state == result.state == states.FAILURE
    assert type(trace.exception) is type(result.result)


def test_a_plain_celery_task_behaves_the_same(sent):
    result = sent["plain_a"]
    wait_for(result, timeout=60)
    assert result.state == states.FAILURE
    assert type(result.result) is type(sent["a"].get(propagate=False)) is smtplib.SMTPException


def test_b_autoretry_for_with_retry_backoff(sent):
    result = sent["b"]
    wait_for(result, timeout=90)
    assert result.state == states.FAILURE
    assert isinstance(result.result, smtplib.SMTPException)
    [dead] = recording.read("dead", result.id)
    history = dead["history"]
    assert [e["attempt"] for e in history] == [1, 2, 3, 4, 5, 6]
    assert [e["action"] for e in history] == ["retry"] * 5 + ["dead"]
    for entry in history[:-1]:
        # Celery's formula: min(retry_backoff_max, 2 ** retries), full jitter in whole seconds
        allowed = range(0, min(600, 2 ** (entry["attempt"] - 1)) + 1)
        assert entry["delay"] == int(entry["delay"]) and int(entry["delay"]) in allowed, entry


def test_c_succeeds_on_second_attempt(sent):
    result = sent["c"]
    wait_for(result, timeout=60)
    assert result.state == states.SUCCESS
    assert result.result == {"attempt": 2, "retries": 1}
    assert len(recording.read("retrying", result.id)) == 1
    assert recording.read("dead", result.id) == []


def test_on_failure_sees_the_original_exception(sent):
    result = sent["alert"]
    wait_for(result, timeout=60)
    assert result.state == states.FAILURE
    assert recording.read("on_failure", result.id) == [
        {"type": "SMTPException", "message": "421 service not available"}
    ]


def test_celery_states_stay_right(worker):
    result = tasks.tracked.apply_async(queue=worker.queue)
    seen = wait_for(result, timeout=60)
    assert result.result == 2
    # PENDING before a worker takes it, STARTED while it runs (track_started), RETRY between, SUCCESS at the end
    assert seen[0] in (states.PENDING, states.STARTED)
    assert [s for s in seen if s != states.PENDING][:1] == [states.STARTED]
    assert states.RETRY in seen and seen[-1] == states.SUCCESS
    assert seen.index(states.RETRY) < len(seen) - 1


@pytest.mark.django_db(transaction=True)
def test_a_is_dead_lettered_once_with_its_history(sent, worker):
    from safetynet.models import DeadLetter

    result = sent["a"]
    wait_for(result, timeout=60)
    [row] = DeadLetter.objects.filter(task_id=result.id)
    assert row.reason == "retries_exhausted" and row.task_name == "tests.fixtures.tasks.send_welcome_email"
    assert row.args == ["ann@example.com"] and row.attempts == 4
    assert comparable(row.history) == comparable(recording.read("dead", result.id)[0]["history"])
    assert row.exception_type == "smtplib.SMTPException" and "421" in row.exception_message
    assert row.worker and len(row.fingerprint) == 40 and row.queue == worker.queue
    # A transactional test flushes every table when it ends, the durable schedule included: let
    # the other tasks of the module (their long retries wait there) finish first.
    for other in sent.values():
        wait_for(other, timeout=90)
