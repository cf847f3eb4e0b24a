"""`manage.py safetynet explain`: what a task's policy will do, before anything runs."""

import io

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from tests.fixtures import explained_tasks, risky_tasks  # noqa: F401  (registers the tasks)


def explain(name, *extra):
    out = io.StringIO()
    call_command("safetynet", "explain", name, *extra, stdout=out)
    return out.getvalue()


def test_explain_prints_the_schedule():
    text = explain("tests.fixtures.tasks.send_digest")
    assert "6 attempts, Celery's retry_backoff (1 s, ×2), full jitter, waits at most 10 min" in text
    assert "5        +0 s–15 s                 0 s–16 s    retry" in text
    assert "Gives up after attempt 6, which starts 0 s–31 s after the first; the attempts' own run time" in text


def test_explain_shows_a_deadline():
    text = explain("tests.fixtures.tasks.until_deadline")
    assert "gives up: deadline" in text and "deadline 35 s after the first attempt started" in text


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
    assert "Idempotency key: charge-{order_id}  (claimed before each run; lease 30 s" in text
    assert "after 3 crashes it is dead-lettered as crash_loop" in text
    out = StringIO()
    call_command("safetynet", "explain", "tests.fixtures.idempotent_tasks.slow_first_time", stdout=out)
    text = out.getvalue()
    assert "Idempotency key: none" in text
    assert "acknowledged before it ran (acks_late=False)" in text
    assert "hard 1 s (uses up an attempt" in text


def test_explain_says_which_retries_wait_in_the_durable_schedule():
    def explained():
        out = io.StringIO()
        call_command("safetynet", "explain", "tests.fixtures.tasks.send_digest", stdout=out)
        return out.getvalue()

    rows = {line.split()[0]: line for line in explained().splitlines() if line[:1].isdigit()}
    assert rows["1"].endswith("ETA message")  # waits 0–1 s
    assert rows["4"].endswith("durable schedule if ≥ 5 s")  # waits 0–8 s
    assert "a retry delayed 5 s or more waits in the database" in explained()
    with override_settings(SAFETYNET={"DURABLE_RETRY_SECONDS": None, "ENQUEUE": "outbox"}):
        text = explained()
    assert "durable schedule" not in text and "every retry is an ETA message" in text
    assert "Enqueue: delay()/apply_async() write the message in the caller's transaction" in text


def test_explain_reads_a_literal_countdown_from_self_retry():
    """The issue's case: max_retries=3 and ``self.retry(countdown=5)``: the 5 s the code uses, not 3 min."""
    text = explain("tests.fixtures.explained_tasks.literal_countdown")
    assert "self.retry(exc=exc, countdown=5): waits 5 s; max_retries=3 (the task's)" in text
    assert "PartnerDown: caught, then self.retry() at line" in text
    assert "(PartnerDown): 4 attempts, a fixed 5 s between them, no jitter" in text
    rows = [line for line in text.splitlines() if "retry (self.retry)" in line]
    assert [row.split()[1:4] for row in rows] == [["+0", "s", "5"], ["+5", "s", "5"], ["+10", "s", "5"]]
    assert "Gives up after attempt 4, which starts 15 s after the first" in text
    # the automatic schedule is still there, for an exception the body lets out
    assert "When an attempt raises an exception the rules retry (the automatic schedule):" in text


def test_explain_reads_module_constants_arithmetic_and_max_retries():
    text = explain("tests.fixtures.explained_tasks.module_constant_and_max_retries")
    assert "waits 1 min 30 s; max_retries=6 (given)" in text
    assert "(PartnerDown, TimeoutError): 7 attempts, a fixed 1 min 30 s between them" in text
    assert "TimeoutError: caught, then self.retry()" in text


def test_explain_says_when_it_cannot_read_the_countdown():
    text = explain("tests.fixtures.explained_tasks.computed_countdown")
    assert "explain cannot read countdown=2 ** self.request.retries (computed when it runs)" in text
    assert "PartnerDown: caught, then self.retry() at line" in text and "(its waits cannot be read)" in text
    assert "retry (self.retry)" not in text  # no schedule made up for it


def test_explain_outcome_follows_the_classification_of_each_exception():
    text = explain("tests.fixtures.explained_tasks.limited")
    assert "HTTP 404: given up at once: permanent error (fail_on http_status(404))" in text
    assert "BadRow: given up at once: permanent error (fail_on BadRow)" in text  # made without its arguments
    assert 'ValueError: given up at once: permanent error (no rule matched; UNCLASSIFIED is "fail")' in text
    one = explain("tests.fixtures.explained_tasks.limited", "--exception", "HTTP 404")
    table = one[one.index("When an attempt raises HTTP 404"):]
    assert "1        +0 s                      -           gives up: permanent error" in table
    assert "Gives up after the first attempt." in table and "\n2  " not in table
    retried = explain("tests.fixtures.explained_tasks.literal_countdown", "--exception", "ConnectionError")
    assert "When every attempt raises ConnectionError: retried (DEFAULT_RETRY_ON is_network_error)" in retried
    caught = explain("tests.fixtures.explained_tasks.literal_countdown", "--exception", "PartnerDown")
    assert "When every attempt raises PartnerDown (caught, then self.retry(exc=exc, countdown=5)" in caught
    with pytest.raises(CommandError, match="no exception class of that name"):
        explain("tests.fixtures.explained_tasks.limited", "--exception", "NoSuchError")


def test_explain_deadline_accounts_for_time_limits():
    """With a 30 s hard limit an attempt may run 30 s before it fails: the 60 s deadline may come after attempt 2."""
    text = explain("tests.fixtures.explained_tasks.limited")
    rows = {line.split()[0]: line for line in text.splitlines() if line[:1].isdigit()}
    assert "+10 s–40 s" in rows["2"] and "may give up: deadline" in rows["2"]
    assert "the times include up to 30 s of run time per attempt (time_limit)" in text
    assert "The deadline (1 min) counts from the first attempt's start, run time included." in text
    without = explain("tests.fixtures.tasks.until_deadline")
    assert "the attempts' own run time comes on top (no time limit bounds it)" in without


@pytest.mark.parametrize("name", [
    "tests.fixtures.tasks.send_digest", "tests.fixtures.tasks.until_deadline", "tests.fixtures.risky_tasks.waits_two_hours",
    "tests.fixtures.explained_tasks.limited", "tests.fixtures.explained_tasks.literal_countdown",
    "tests.fixtures.tasks.idempotent_charge",
])
def test_explain_speaks_in_words_and_human_durations(name):
    import re

    text = explain(name)
    assert "none jitter" not in text and "UNCLASSIFIED=" not in text
    assert not re.search(r"\d\.\d{3}\s?s\b", text), text  # no "0.000 s"
    assert not re.search(r"\d(s|m|h)\b", text), text  # "5 s", "10 min", "2 h": never "600s"


def test_explain_says_when_the_source_cannot_be_read():
    import safetynet

    namespace = {"__name__": "tests.fixtures.made_without_a_file"}
    exec("def no_source(self, order):\n    raise self.retry(countdown=5)\n", namespace)  # no file to read back
    safetynet.task(bind=True, max_retries=2)(namespace["no_source"])
    text = explain("tests.fixtures.made_without_a_file.no_source")
    assert "self.retry(): the source of tests.fixtures.made_without_a_file.no_source cannot be read" in text
    assert "the schedule below is the automatic one" in text and "retry (self.retry)" not in text
