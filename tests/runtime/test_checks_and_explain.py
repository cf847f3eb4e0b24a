"""System checks and `manage.py safetynet explain`."""

import io

import pytest
from django.core.management import CommandError, call_command
from django.test import override_settings

from safetynet import checks
from tests import risky_tasks  # noqa: F401  (registers the risky tasks)
from tests.celery_app import app


def messages_for(name):
    return {m.id for m in checks.check_tasks() if m.obj == f"tests.risky_tasks.{name}"}


def test_catch_all_without_bound_warns():
    assert messages_for("retries_everything_forever") == {"safetynet.W001"}


def test_unbounded_retries_without_deadline_warn():
    assert messages_for("retries_forever") == {"safetynet.W002"}


def test_a_bounded_catch_all_is_fine():
    assert messages_for("bounded_catch_all") == set()


def test_delay_longer_than_visibility_timeout_warns():
    with override_settings(SAFETYNET={"DURABLE_RETRY_SECONDS": None}):  # every retry an ETA message
        assert "safetynet.W003" in messages_for("waits_two_hours")  # the test broker is Redis, 3600 s
        app.conf.broker_transport_options = {"visibility_timeout": 10 * 3600}
        try:
            assert "safetynet.W003" not in messages_for("waits_two_hours")
        finally:
            app.conf.broker_transport_options = {}


def test_long_retries_in_the_durable_schedule_do_not_outlast_the_visibility_timeout():
    assert "safetynet.W003" not in messages_for("waits_two_hours")  # 2 h retries wait in the database
    with override_settings(SAFETYNET={"DURABLE_RETRY_SECONDS": 7200}):  # above the 3600 s timeout
        assert "safetynet.W003" in messages_for("waits_two_hours")


def test_pickle_accepted_warns():
    assert "safetynet.W004" not in {m.id for m in checks.check_tasks()}
    app.conf.accept_content = ["json", "pickle"]
    try:
        assert "safetynet.W004" in {m.id for m in checks.check_tasks()}
    finally:
        app.conf.accept_content = ["json"]


def test_invalid_settings_are_an_error_at_startup():
    with override_settings(SAFETYNET={"DEFAULT_POLICY": {"jitter": "sometimes"}}):
        [message] = checks.check_settings()
    assert message.id == "safetynet.E001" and "jitter must be one of" in message.msg


def test_naive_times_are_an_error():
    assert checks.check_settings() == []
    with override_settings(USE_TZ=False):
        [message] = checks.check_settings()
    assert message.id == "safetynet.E005" and "USE_TZ" in message.msg


def test_invalid_celery_retry_options_on_a_plain_task_are_an_error():
    import celery

    class NegativeRetries(celery.Task):
        name = "tests.risky_tasks.negative_retries"
        autoretry_for = (OSError,)
        max_retries = -2

        def run(self):
            pass

    app.register_task(NegativeRetries())
    try:
        assert messages_for("negative_retries") == {"safetynet.E002"}
    finally:
        app.tasks.pop("tests.risky_tasks.negative_retries", None)


def explain(name, *extra):
    out = io.StringIO()
    call_command("safetynet", "explain", name, *extra, stdout=out)
    return out.getvalue()


def test_explain_prints_the_schedule():
    text = explain("tests.tasks.send_digest")
    assert "6 attempts, celery retry_backoff factor 1, full jitter, cap 600s" in text
    assert "5        +0s–15s                      0s–16s      retry" in text
    assert "Gives up after attempt 6, 0s–31s after the first attempt started." in text


def test_explain_shows_a_deadline():
    text = explain("tests.tasks.until_deadline")
    assert "gives up: deadline" in text and "deadline 35s" in text


def test_explain_unbounded_policy_stops_at_the_limit():
    text = explain("tests.risky_tasks.retries_forever", "--limit", "4")
    assert "listed 4 attempts" in text


def test_explain_unknown_task_lists_close_matches():
    with pytest.raises(CommandError, match=r"No task named 'tests.tasks.send_welcom'.*tests.tasks.send_welcome_email"):
        explain("tests.tasks.send_welcom")


def test_explain_plain_celery_task_says_so():
    with pytest.raises(CommandError, match="plain Celery task"):
        explain("tests.tasks.plain_send_welcome_email")


def test_explain_bad_limit():
    with pytest.raises(CommandError, match="--limit must be at least 1"):
        explain("tests.tasks.send_digest", "--limit", "0")


def test_explain_tells_how_an_idempotent_task_survives_duplicates_and_crashes():
    from io import StringIO

    from django.core.management import call_command

    out = StringIO()
    call_command("safetynet", "explain", "tests.tasks.idempotent_charge", stdout=out)
    text = out.getvalue()
    assert "Idempotency key: charge-{order_id}  (claimed before each run; lease 30s" in text
    assert "after 3 crashes it is dead-lettered as crash_loop" in text
    out = StringIO()
    call_command("safetynet", "explain", "tests.idem_tasks.slow_first_time", stdout=out)
    text = out.getvalue()
    assert "Idempotency key: none" in text
    assert "acknowledged before it ran (acks_late=False)" in text
    assert "hard 1s (uses up an attempt" in text


@pytest.mark.django_db
def test_keys_show_and_purge():
    import time
    from io import StringIO

    from django.core.management import CommandError, call_command

    from safetynet import idempotency
    from safetynet.models import IdempotencyClaim

    held = idempotency.claim("show-1", task_name="t", task_id="tid-1", lease=30, max_deliveries=3)
    idempotency.mark_succeeded(held, {"charge": "ch_9"})
    idempotency.claim("show-2", task_name="t", task_id="tid-2", lease=30, max_deliveries=3)
    out = StringIO()
    call_command("safetynet", "keys", "show", "show-1", stdout=out)
    assert "succeeded" in out.getvalue() and "ch_9" in out.getvalue()
    with pytest.raises(CommandError, match="No claim for idempotency key 'nope'"):
        call_command("safetynet", "keys", "show", "nope")
    IdempotencyClaim.objects.update(updated_at=time.time() - 10 * 86400)
    out = StringIO()
    call_command("safetynet", "keys", "purge", "--older-than", "7d", "--dry-run", stdout=out)
    assert "would delete 1 settled claims" in out.getvalue()
    call_command("safetynet", "keys", "purge", "--older-than", "7d", stdout=StringIO())
    assert list(IdempotencyClaim.objects.values_list("key", flat=True)) == ["show-2"]  # in progress: kept


def test_explain_says_which_retries_wait_in_the_durable_schedule():
    def explained():
        out = io.StringIO()
        call_command("safetynet", "explain", "tests.tasks.send_digest", stdout=out)
        return out.getvalue()

    rows = {line.split()[0]: line for line in explained().splitlines() if line[:1].isdigit()}
    assert rows["1"].endswith("ETA message")  # waits 0–1 s
    assert rows["4"].endswith("durable schedule if ≥ 5s")  # waits 0–8 s
    assert "a retry delayed 5s or more waits in the database" in explained()
    with override_settings(SAFETYNET={"DURABLE_RETRY_SECONDS": None, "ENQUEUE": "outbox"}):
        text = explained()
    assert "durable schedule" not in text and "every retry is an ETA message" in text
    assert "Enqueue: delay()/apply_async() write the message in the caller's transaction" in text


def test_a_task_through_an_undeclared_breaker_is_an_error():
    assert messages_for("through_an_unknown_breaker") == {"safetynet.E004"}
    with override_settings(SAFETYNET={"BREAKERS": {"nowhere": {}}}):
        assert messages_for("through_an_unknown_breaker") == set()
