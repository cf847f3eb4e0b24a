"""Decoration-time validation and option resolution."""

import pytest
from django.test import override_settings

import safetynet
from safetynet import ConfigurationError, Exponential, Fixed, RetryPolicy
from safetynet.testing import simulate
from tests.fixtures import tasks


def test_unknown_option_suggests_the_closest():
    with pytest.raises(ConfigurationError, match=r"unknown task option 'retry_polcy'.*'retry_policy'"):
        @safetynet.task(retry_polcy=RetryPolicy())
        def f():
            pass


def test_unknown_celery_option_suggests_the_closest():
    with pytest.raises(ConfigurationError, match=r"'max_retry'.*'max_retries'"):
        @safetynet.task(max_retry=3)
        def f():
            pass


def test_reserved_name_is_refused():
    with pytest.raises(ConfigurationError, match="'policy' is not an option"):
        @safetynet.task(policy=RetryPolicy())
        def f():
            pass


def test_retry_policy_and_celery_options_together_are_refused():
    with pytest.raises(ConfigurationError, match="either retry_policy or Celery's max_retries"):
        @safetynet.task(retry_policy=RetryPolicy(), max_retries=3)
        def f():
            pass


@pytest.mark.parametrize(
    "options, message",
    [
        ({"retry_policy": {"max_attempts": 3}}, "retry_policy must be a safetynet.RetryPolicy"),
        ({"retry_on": "ConnectionError"}, "retry_on takes exception classes"),
        ({"autoretry_for": ConnectionError}, "autoretry_for must be a tuple of exception classes"),
        ({"max_retries": -1}, "max_retries must be a whole number >= 0"),
        ({"default_retry_delay": -5}, "Fixed.delay must be a number of seconds >= 0"),
        ({"retry_kwargs": [1]}, "retry_kwargs must be a dict"),
        ({"retry_policy": RetryPolicy(), "retry_kwargs": {"countdown": 5}}, "either retry_policy or Celery's retry_kwargs"),
    ],
)
def test_invalid_values_name_the_field(options, message):
    with pytest.raises(ConfigurationError, match=message):
        safetynet.task(**options)(lambda: None)


def test_base_must_be_a_celery_task_class():
    import celery

    with pytest.raises(ConfigurationError, match="base must be a Celery Task class"):
        safetynet.task(base=object)
    with pytest.raises(ConfigurationError, match="base must be a Celery Task class"):
        safetynet.task(base="celery.Task")
    from celery.contrib.django.task import DjangoTask

    from safetynet.runtime.task import adopt

    assert adopt(celery.Task) is adopt(DjangoTask) is safetynet.SafetyTask  # safetynet's base already is one


def test_class_based_task_validates_and_is_wrapped():
    with pytest.raises(ConfigurationError, match="retry_policy must be"):
        class Broken(safetynet.SafetyTask):
            retry_policy = 3

    from tests.celery_app import app

    class Charge(safetynet.SafetyTask):
        name = "tests.runtime.charge"
        retry_policy = RetryPolicy(max_attempts=3, backoff=Fixed(7), jitter="none")
        retry_on = [ConnectionError]

        def run(self, amount):
            raise ConnectionError("gateway timeout")

    charge = app.register_task(Charge())
    trace = simulate(charge, 10)
    assert trace.state == "FAILURE" and trace.delays == [7.0, 7.0]
    assert isinstance(trace.exception, ConnectionError)


def test_policy_resolution_precedence():
    assert tasks.call_api.policy == RetryPolicy(max_attempts=4, backoff=2, jitter="none")  # declared retry_policy
    assert tasks.send_digest.policy == RetryPolicy.from_celery(max_retries=5, retry_backoff=True)  # Celery options
    from safetynet import conf

    assert tasks.permanent.policy is conf.get().default_policy  # neither: the project default


def test_project_default_policy_comes_from_settings():
    with override_settings(SAFETYNET={"DEFAULT_POLICY": {"max_attempts": 2, "backoff": 3, "jitter": "none"}}):
        assert tasks.permanent.policy == RetryPolicy(max_attempts=2, backoff=Fixed(3), jitter="none")
    assert tasks.permanent.policy.max_attempts == 5  # the cache follows setting_changed


def test_unknown_setting_key_suggests_the_closest():
    from safetynet import conf

    with override_settings(SAFETYNET={"DEFAULT_POLICI": {}}):
        with pytest.raises(ConfigurationError, match="Unknown SAFETYNET setting 'DEFAULT_POLICI'.*'DEFAULT_POLICY'"):
            conf.get()


def test_unclassified_setting_changes_what_unknown_errors_do(inject_fault):
    inject_fault(tasks.ping, times=2, exception=ValueError("odd"))
    assert simulate(tasks.ping).state == "FAILURE"  # default: fail at once
    with override_settings(SAFETYNET={"UNCLASSIFIED": "retry",
                                      "DEFAULT_POLICY": safetynet.RetryPolicy(backoff=Exponential(1, 2), jitter="none")}):
        trace = simulate(tasks.ping)
    assert trace.state == "SUCCESS" and trace.result == "pong"
    assert len(trace.attempts) == 2  # the plan had one failure left; the first simulate used one


def test_alert_mail_admins_must_be_a_boolean():
    from safetynet import conf

    with override_settings(SAFETYNET={"ALERT_MAIL_ADMINS": "no"}):
        with pytest.raises(ConfigurationError, match="ALERT_MAIL_ADMINS'\\] must be True or False"):
            conf.get()


def test_a_base_with_its_own_request_class_keeps_safetynets_behind_it():
    import celery
    from celery.worker.request import Request

    from safetynet.runtime.worker import SafetyRequest

    class AuditedRequest(Request):
        def on_failure(self, exc_info, send_failed_event=True, return_ok=False):
            return super().on_failure(exc_info, send_failed_event, return_ok)

    class AuditedTask(celery.Task):
        Request = AuditedRequest

    @safetynet.task(base=AuditedTask, name="tests.runtime.audited")
    def audited():
        return 1

    request_class = audited.Request
    assert issubclass(request_class, AuditedRequest) and issubclass(request_class, SafetyRequest)
    mro = request_class.__mro__
    assert mro.index(AuditedRequest) < mro.index(SafetyRequest)  # the user's methods first, as under Celery
    assert audited.Request is request_class  # made once

    class ByPath(safetynet.SafetyTask):  # a dotted path, resolved when a worker asks
        name = "tests.runtime.by_path"
        Request = "celery.worker.request:Request"

        def run(self):
            return 1

    assert ByPath.Request == safetynet.SafetyTask.Request  # Celery's own request: safetynet's takes its place

    class Own(safetynet.SafetyTask):
        name = "tests.runtime.own_request"
        Request = AuditedRequest

        def run(self):
            return 1

    assert issubclass(Own.Request, SafetyRequest) and issubclass(Own.Request, AuditedRequest)

    class NotARequest(safetynet.SafetyTask):
        name = "tests.runtime.not_a_request"
        Request = dict

        def run(self):
            return 1

    with pytest.raises(ConfigurationError, match="Request must be a subclass"):
        _ = NotARequest.Request


def test_time_limit_retries_is_validated_in_the_task_and_the_settings():
    with pytest.raises(ConfigurationError, match="time_limit_retries must be a whole number >= 0"):
        safetynet.task(time_limit_retries=-1)
    with pytest.raises(ConfigurationError, match="time_limit_retries must be a whole number >= 0"):
        safetynet.task(time_limit_retries=True)
    from safetynet import conf

    assert conf.build({}).time_limit_retries == 1
    assert conf.build({"TIME_LIMIT_RETRIES": None}).time_limit_retries is None
    with pytest.raises(ConfigurationError, match="TIME_LIMIT_RETRIES"):
        conf.build({"TIME_LIMIT_RETRIES": "2"})


def test_late_acknowledgement_implies_redelivery_when_the_worker_is_lost():
    """acks_late=True (declared or from task_acks_late) means reject_on_worker_lost=True, unless set False."""
    import celery

    app = celery.Celery("acks-late", set_as_current=False)
    app.conf.task_acks_late = True

    @app.task(base=safetynet.SafetyTask, name="tests.acks.from_config")
    def from_config():
        return 1

    @app.task(base=safetynet.SafetyTask, name="tests.acks.kept_off", reject_on_worker_lost=False)
    def kept_off():
        return 1

    @app.task(name="tests.acks.plain")
    def plain():
        return 1

    assert (from_config.acks_late, from_config.reject_on_worker_lost) == (True, True)
    assert kept_off.reject_on_worker_lost is False
    assert plain.reject_on_worker_lost is None  # a plain Celery task keeps Celery's meaning

    early = celery.Celery("acks-early", set_as_current=False)
    early.conf.task_reject_on_worker_lost = False

    @early.task(base=safetynet.SafetyTask, name="tests.acks.declared", acks_late=True)
    def declared():
        return 1

    @early.task(base=safetynet.SafetyTask, name="tests.acks.early")
    def acknowledged_early():
        return 1

    assert declared.reject_on_worker_lost is False  # the config said no
    assert (acknowledged_early.acks_late, acknowledged_early.reject_on_worker_lost) == (False, False)
