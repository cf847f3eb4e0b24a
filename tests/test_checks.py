"""System checks: risky task configuration and settings caught at startup."""


from django.test import override_settings

from safetynet import checks
from tests.fixtures import risky_tasks  # registers the risky tasks
from tests.celery_app import app


def messages_for(name):
    return {m.id for m in checks.check_tasks() if m.obj == f"tests.fixtures.risky_tasks.{name}"}


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


def test_rows_kept_no_longer_than_a_lost_message_waits_are_an_error():
    with override_settings(SAFETYNET={"SCHEDULE_KEEP_SECONDS": 600, "LOST_MESSAGE_SECONDS": 900}):
        [message] = checks.check_settings()
    assert message.id == "safetynet.E001" and "must be longer than LOST_MESSAGE_SECONDS (900)" in message.msg
    with override_settings(SAFETYNET={"SCHEDULE_KEEP_SECONDS": 600, "LOST_MESSAGE_SECONDS": None}):
        assert checks.check_settings() == []


def test_naive_times_are_an_error():
    assert checks.check_settings() == []
    with override_settings(USE_TZ=False):
        [message] = checks.check_settings()
    assert message.id == "safetynet.E005" and "USE_TZ" in message.msg


def test_invalid_celery_retry_options_on_a_plain_task_are_an_error():
    import celery

    class NegativeRetries(celery.Task):
        name = "tests.fixtures.risky_tasks.negative_retries"
        autoretry_for = (OSError,)
        max_retries = -2

        def run(self):
            pass

    app.register_task(NegativeRetries())
    try:
        assert messages_for("negative_retries") == {"safetynet.E002"}
    finally:
        app.tasks.pop("tests.fixtures.risky_tasks.negative_retries", None)


def test_a_task_through_an_undeclared_breaker_is_an_error():
    assert messages_for("through_an_unknown_breaker") == {"safetynet.E004"}
    with override_settings(SAFETYNET={"BREAKERS": {"nowhere": {}}}):
        assert messages_for("through_an_unknown_breaker") == set()


def test_a_task_that_calls_itself_synchronously_warns_with_the_line():
    source = open(risky_tasks.__file__).read().splitlines()
    for name, call in (("fetch_feed", "fetch_feed(url, depth + 1)"), ("fetch_feed_bound", "self.run(url)")):
        [message] = [m for m in checks.check_tasks() if m.obj == f"tests.fixtures.risky_tasks.{name}"]
        line = next(number for number, text in enumerate(source, 1) if call in text)
        assert message.id == "safetynet.W007"
        assert f"risky_tasks.py:{line}: {call}" in message.msg
    assert messages_for("fetch_feed_later") == set()  # .delay() and .apply_async() send a new message


def test_a_task_naming_an_undeclared_limit_or_partitioned_by_a_missing_argument_is_an_error():
    assert messages_for("through_an_unknown_limit") == {"safetynet.E007"}
    with override_settings(SAFETYNET={"LIMITS": {"nowhere-limit": {"rate": "1/s"},
                                                 "per-customer": {"rate": "1/s", "partition_by": "customer_id"}}}):
        assert messages_for("through_an_unknown_limit") == set()
        [message] = [m for m in checks.check_tasks()
                     if m.obj == "tests.fixtures.risky_tasks.partitioned_by_a_missing_argument"]
        assert message.id == "safetynet.E008" and "'customer_id'" in message.msg and "order_id" in message.msg
    with override_settings(SAFETYNET={"LIMITS": {"per-customer": {"rate": "1/s", "partition_by": "order_id"}}}):
        assert messages_for("partitioned_by_a_missing_argument") == set()
