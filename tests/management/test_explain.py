"""`manage.py safetynet explain`: what a task's policy will do, before anything runs."""

import io

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from tests.fixtures import risky_tasks  # noqa: F401  (registers the risky tasks)


def explain(name, *extra):
    out = io.StringIO()
    call_command("safetynet", "explain", name, *extra, stdout=out)
    return out.getvalue()


def test_explain_prints_the_schedule():
    text = explain("tests.fixtures.tasks.send_digest")
    assert "6 attempts, celery retry_backoff factor 1, full jitter, cap 600s" in text
    assert "5        +0s–15s                      0s–16s      retry" in text
    assert "Gives up after attempt 6, 0s–31s after the first attempt started." in text


def test_explain_shows_a_deadline():
    text = explain("tests.fixtures.tasks.until_deadline")
    assert "gives up: deadline" in text and "deadline 35s" in text


def test_explain_unbounded_policy_stops_at_the_limit():
    text = explain("tests.fixtures.risky_tasks.retries_forever", "--limit", "4")
    assert "listed 4 attempts" in text


def test_explain_unknown_task_lists_close_matches():
    with pytest.raises(CommandError, match=r"No task named 'tests.fixtures.tasks.send_welcom'.*tests.fixtures.tasks.send_welcome_email"):
        explain("tests.fixtures.tasks.send_welcom")


def test_explain_plain_celery_task_says_so():
    with pytest.raises(CommandError, match="plain Celery task"):
        explain("tests.fixtures.tasks.plain_send_welcome_email")


def test_explain_bad_limit():
    with pytest.raises(CommandError, match="--limit must be at least 1"):
        explain("tests.fixtures.tasks.send_digest", "--limit", "0")


def test_explain_tells_how_an_idempotent_task_survives_duplicates_and_crashes():
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("safetynet", "explain", "tests.fixtures.tasks.idempotent_charge", stdout=out)
    text = out.getvalue()
    assert "Idempotency key: charge-{order_id}  (claimed before each run; lease 30s" in text
    assert "after 3 crashes it is dead-lettered as crash_loop" in text
    out = StringIO()
    call_command("safetynet", "explain", "tests.fixtures.idempotent_tasks.slow_first_time", stdout=out)
    text = out.getvalue()
    assert "Idempotency key: none" in text
    assert "acknowledged before it ran (acks_late=False)" in text
    assert "hard 1s (uses up an attempt" in text


def test_explain_says_which_retries_wait_in_the_durable_schedule():
    def explained():
        out = io.StringIO()
        call_command("safetynet", "explain", "tests.fixtures.tasks.send_digest", stdout=out)
        return out.getvalue()

    rows = {line.split()[0]: line for line in explained().splitlines() if line[:1].isdigit()}
    assert rows["1"].endswith("ETA message")  # waits 0–1 s
    assert rows["4"].endswith("durable schedule if ≥ 5s")  # waits 0–8 s
    assert "a retry delayed 5s or more waits in the database" in explained()
    with override_settings(SAFETYNET={"DURABLE_RETRY_SECONDS": None, "ENQUEUE": "outbox"}):
        text = explained()
    assert "durable schedule" not in text and "every retry is an ETA message" in text
    assert "Enqueue: delay()/apply_async() write the message in the caller's transaction" in text
