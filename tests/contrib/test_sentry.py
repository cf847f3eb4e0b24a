"""safetynet.contrib.sentry with a real sentry_sdk client and a transport that keeps the envelopes.

In process: the simulator runs the worker's runtime code (with Sentry's Celery integration
wrapped around it when enabled). On real workers: prefork children report, Sentry initialised
as users do (default integrations, CeleryIntegration auto-enabled or disabled).
"""

import json
import time
import uuid

import celery.app.trace
import pytest
import sentry_sdk
import sentry_sdk.consts
import sentry_sdk.scope
from django.test import override_settings
from sentry_sdk.envelope import Envelope
from sentry_sdk.integrations.celery import CeleryIntegration
from sentry_sdk.integrations.dedupe import DedupeIntegration
from sentry_sdk.integrations.logging import LoggingIntegration
from sentry_sdk.transport import Transport

from safetynet import deadletter, redaction, signals
from safetynet.contrib import sentry as safetynet_sentry
from safetynet.testing import simulate, simulator
from tests.fixtures import secret_tasks, tasks
from tests.fixtures.consumer import bare_consumer, received
from tests.contrib.sentry_worker import SECRET, charge, charge_positional, die, poll, refund, slow, void

DSN = "http://public@127.0.0.1/1"


class CapturingTransport(Transport):
    """Keeps every envelope instead of sending it."""

    def __init__(self, options=None):
        super().__init__(options)
        self.envelopes = []

    def capture_envelope(self, envelope):
        self.envelopes.append(envelope)

    @property
    def events(self):
        return [event for event in (envelope.get_event() for envelope in self.envelopes) if event is not None]

    def serialized(self):
        return b"".join(envelope.serialize() for envelope in self.envelopes)


def _reset_sentry():
    client = sentry_sdk.get_client()
    if client.is_active():
        client.close()
    for scope in (sentry_sdk.get_global_scope(), sentry_sdk.get_isolation_scope(), sentry_sdk.get_current_scope()):
        scope.clear()
    sentry_sdk.get_global_scope().set_client(None)


@pytest.fixture(scope="module", autouse=True)
def undo_celery_integration_patches():
    """Leave the process as this module found it for the tests that run after it.

    Sentry's CeleryIntegration patches Celery once per process and for good: its build_tracer
    replaces ``task.run`` on every task instance it traces (client or not), which hides a
    later class-level ``run`` (``safetynet.testing.inject``) from eager runs and the simulator.
    """
    import sentry_sdk.integrations

    original = celery.app.trace.build_tracer
    yield
    celery.app.trace.build_tracer = original
    from tests.celery_app import app

    for task in app.tasks.values():
        if task.__dict__.pop("_sentry_is_patched", False):
            task.__dict__.pop("run", None)
    for registry in (sentry_sdk.integrations._processed_integrations, sentry_sdk.integrations._installed_integrations):
        registry.discard("celery")  # a later sentry_sdk.init(CeleryIntegration) patches afresh


@pytest.fixture
def init_sentry(monkeypatch):
    """``init_sentry(**options)`` → the transport; Sentry is reset after the test."""
    _reset_sentry()

    def init(**options):
        transport = CapturingTransport()
        options.setdefault("default_integrations", False)
        sentry_sdk.init(dsn=DSN, transport=transport, **options)
        safetynet_sentry.install()
        # The simulator imported build_tracer before CeleryIntegration patched it: run the tasks
        # through the patched one, as a worker does.
        monkeypatch.setattr(simulator, "build_tracer", celery.app.trace.build_tracer)
        return transport

    yield init
    _reset_sentry()


pytestmark = pytest.mark.filterwarnings("ignore:The send_default_pii option is deprecated:DeprecationWarning")

# Each with the most data Sentry collects: arguments in celery-job, local variables of frames.
CONFIGS = {
    "bare": lambda: {"send_default_pii": True},
    "celery": lambda: {"integrations": [CeleryIntegration(), LoggingIntegration()], "send_default_pii": True},
    "celery+dedupe": lambda: {
        "integrations": [CeleryIntegration(), LoggingIntegration(), DedupeIntegration()], "send_default_pii": True,
    },
    "logging+dedupe": lambda: {"integrations": [LoggingIntegration(), DedupeIntegration()], "send_default_pii": True},
}
if "data_collection" in sentry_sdk.consts.DEFAULT_OPTIONS:  # sentry-sdk 2.5x and later
    CONFIGS["celery+data_collection"] = lambda: {
        "integrations": [CeleryIntegration(), LoggingIntegration(), DedupeIntegration()],
        "data_collection": {"queues": True, "stack_frame_variables": True},
    }


@pytest.fixture(params=sorted(CONFIGS))
def transport(request, init_sentry):
    return init_sentry(**CONFIGS[request.param]())


def error_events(transport):
    return [event for event in transport.events if event.get("type") in (None, "event")]


# -- one event per final failure ----------------------------------------------------------

def test_retried_twice_then_dead_is_one_event_with_the_tags(transport):
    seen_at_retries = []
    signals.task_retrying.connect(receiver := lambda sender, **kw: seen_at_retries.append(len(transport.events)),
                                  weak=False)
    try:
        trace = simulate(charge, 42, card_token=SECRET)
    finally:
        signals.task_retrying.disconnect(receiver)
    assert [attempt.action for attempt in trace.attempts] == ["retry", "retry", "dead"]
    [event] = error_events(transport)
    assert seen_at_retries == [0, 0]
    fingerprint = event["tags"]["fingerprint"]
    assert {key: event["tags"][key] for key in ("task", "attempts", "reason")} == {
        "task": charge.name, "attempts": "3", "reason": "retries_exhausted",
    }
    assert len(fingerprint) == 40
    assert event["fingerprint"] == ["safetynet", charge.name, "retries_exhausted", fingerprint]
    [value] = event["exception"]["values"]
    assert value["type"] == "ConnectionError"
    assert value["mechanism"] == {"type": "safetynet", "handled": False}
    assert value["stacktrace"]["frames"][-1]["function"] == "charge"  # the user's frame, with its variables
    context = event["contexts"]["safetynet"]
    assert context["detail"] == "attempt 3 of 3 failed (retry_on ConnectionError)"
    assert [entry["action"] for entry in context["history"]] == ["retry", "retry", "dead"]


def test_a_classic_celery_task_dying_after_three_retries(transport):
    trace = simulate(tasks.send_welcome_email, "ann@example.com")
    assert len(trace.attempts) == 4
    [event] = error_events(transport)
    assert event["tags"]["attempts"] == "4"
    assert event["exception"]["values"][0]["type"] == "SMTPException"


def test_a_permanent_error_is_reported_at_once(transport):
    simulate(void, 7, card_token=SECRET)
    [event] = error_events(transport)
    assert event["tags"]["reason"] == "permanent_error"
    assert event["tags"]["attempts"] == "1"


def test_self_retry_with_exc_reports_the_original_exception_once(transport):
    trace = simulate(refund, 44, card_token=SECRET)
    assert type(trace.exception) is ConnectionError
    [event] = error_events(transport)
    assert event["exception"]["values"][0]["type"] == "ConnectionError"
    assert event["tags"]["attempts"] == "3"


def test_self_retry_without_exc_is_one_event_not_two(transport):
    # Celery raises MaxRetriesExceededError after safetynet gave up: its own report of it is dropped.
    trace = simulate(poll, card_token=SECRET)
    assert type(trace.exception).__name__ == "MaxRetriesExceededError"
    [event] = error_events(transport)
    assert event["tags"]["reason"] == "retries_exhausted"
    assert event["exception"]["values"][-1]["type"] == "MaxRetriesExceededError"


def test_a_success_and_a_snooze_report_nothing(transport):
    simulate(tasks.call_api, 2)  # two failures retried, then success
    simulate(tasks.snoozer, 2)
    assert error_events(transport) == []


def test_without_an_active_client_nothing_happens(init_sentry):
    safetynet_sentry.install()
    trace = simulate(charge, 42, card_token=SECRET)
    assert trace.state == "FAILURE"


@pytest.mark.django_db
def test_the_fingerprint_tag_is_the_dead_letter_fingerprint(transport):
    seen = {}

    def on_dead(sender, **kwargs):
        seen.update(kwargs, task=sender)

    signals.task_dead.connect(on_dead, weak=False)
    try:
        simulate(charge, 42, card_token=SECRET)
    finally:
        signals.task_dead.disconnect(on_dead)
    [event] = error_events(transport)
    # What the worker records (the simulator runs eagerly, where the runtime records nothing).
    deadletter.record(deadletter.Failure(
        task_name=seen["task"].name, task_id=seen["task_id"], reason=seen["reason"], args=seen["args"],
        kwargs=seen["kwargs"], parameters=redaction.parameter_names(seen["task"]), exception=seen["exception"],
        detail=seen["detail"], history=seen["history"],
    ))
    from safetynet.models import DeadLetter

    row = DeadLetter.objects.get(task_id=seen["task_id"])
    assert event["tags"]["fingerprint"] == row.fingerprint
    assert event["tags"]["attempts"] == str(row.attempts)
    assert len(error_events(transport)) == 1  # storing the row does not report the death again


@pytest.mark.django_db
def test_other_dead_letters_are_reported_from_the_stored_row(transport):
    from celery.exceptions import TimeLimitExceeded

    from safetynet.models import DeadLetter

    try:
        raise TimeLimitExceeded(1.0)
    except TimeLimitExceeded as exc:
        deadletter.give_up(deadletter.Failure(task_name=slow.name, task_id="tl-1", reason="time_limit",
                                              kwargs={"card_token": SECRET}, exception=exc,
                                              detail="hard time limit of 1s exceeded"), log=False)
    deadletter.give_up(deadletter.Failure(task_name="nope.missing", task_id="unknown-1", reason="unknown_task",
                                          exception_type="KeyError", exception_message="'nope.missing'",
                                          detail="no task named"), log=False)
    rows = {row.task_id: row for row in DeadLetter.objects.filter(task_id__in=["tl-1", "unknown-1"])}
    events = {event["contexts"]["safetynet"]["task_id"]: event for event in error_events(transport)}
    assert sorted(events) == ["tl-1", "unknown-1"]
    for task_id, event in events.items():
        row = rows[task_id]
        assert event["tags"] == {**event["tags"], "task": row.task_name, "attempts": "1", "reason": row.reason,
                                 "fingerprint": row.fingerprint}
        assert event["fingerprint"] == ["safetynet", row.task_name, row.reason, row.fingerprint]
    assert events["tl-1"]["exception"]["values"][0]["type"] == "TimeLimitExceeded"
    assert events["tl-1"]["exception"]["values"][0]["module"] == "billiard.exceptions"
    assert SECRET.encode() not in transport.serialized()


def test_celerys_hard_time_limit_error_line_is_left_to_safetynet(init_sentry):
    import logging

    transport = init_sentry(integrations=[LoggingIntegration()])
    log = logging.getLogger("celery.worker.request")
    log.error("Hard time limit (%ss) exceeded for %s[%s]", 1.0, slow.name, "tl-2")  # safetynet records + reports
    log.error("Hard time limit (%ss) exceeded for %s[%s]", 1.0, tasks.plain_send_welcome_email.name, "tl-3")
    [event] = error_events(transport)
    assert event["logentry"]["params"][1] == tasks.plain_send_welcome_email.name


# -- nothing sensitive reaches Sentry -----------------------------------------------------

@pytest.mark.parametrize("task, args, kwargs", [
    (charge, (42,), {"card_token": SECRET}),
    (charge_positional, (SECRET, 43), {}),  # positional, and echoed in the exception message
    (refund, (44,), {"card_token": SECRET}),
    (void, (45,), {"card_token": SECRET}),
], ids=["kwarg", "positional-and-message", "self.retry", "permanent"])
def test_a_secret_argument_is_nowhere_in_the_envelope(transport, task, args, kwargs):
    simulate(task, *args, **kwargs)
    assert len(error_events(transport)) == 1
    serialized = transport.serialized()
    assert SECRET.encode() not in serialized
    assert b"[redacted]" in serialized


def test_every_part_of_any_event_is_redacted(init_sentry):
    transport = init_sentry(integrations=[LoggingIntegration()], send_default_pii=True)

    def add_request(event, hint):
        event["request"] = {
            "url": "https://shop.example/pay", "method": "POST", "query_string": f"token={SECRET}&page=2",
            "data": {"card_token": SECRET, "items": [{"sku": "A1", "password": SECRET}]},
            "headers": {"Authorization": f"Bearer {SECRET}", "Accept": "text/html"},
        }
        return event

    sentry_sdk.get_isolation_scope().add_event_processor(add_request)  # as Django's integration does
    sentry_sdk.add_breadcrumb(category="http", message=f"POST /pay card_token={SECRET}",
                              data={"card_token": SECRET, "body": json.dumps({"card_token": SECRET})})
    sentry_sdk.set_context("payment", {"card_token": SECRET, "amount": 12})
    sentry_sdk.set_extra("celery-job", {"task_name": charge_positional.name, "args": [SECRET, 43], "kwargs": {}})
    sentry_sdk.set_tag("api_key", SECRET)

    def pay(order_id, card_token):
        customer_secret = SECRET  # noqa: F841  (a local variable, matched by REDACT_PATTERNS)
        raise ValueError(f"declined card_token={card_token}")

    try:
        pay(1, SECRET)
    except ValueError:
        sentry_sdk.capture_exception()
    [event] = transport.events
    assert SECRET.encode() not in transport.serialized()
    assert event["request"]["data"] == {"card_token": "[redacted]", "items": [{"sku": "A1", "password": "[redacted]"}]}
    assert event["request"]["headers"] == {"Authorization": "[redacted]", "Accept": "text/html"}
    assert event["contexts"]["payment"] == {"card_token": "[redacted]", "amount": 12}
    assert event["extra"]["celery-job"]["args"] == ["[redacted]", 43]
    assert event["tags"]["api_key"] == "[redacted]"
    frame = event["exception"]["values"][0]["stacktrace"]["frames"][-1]
    assert frame["vars"]["card_token"] == frame["vars"]["customer_secret"] == "[redacted]"
    assert frame["vars"]["order_id"] == "1"
    assert "card_token" in frame["context_line"]  # source code is left readable


def test_positional_task_arguments_in_celery_log_data_are_redacted(init_sentry):
    transport = init_sentry()
    sentry_sdk.add_breadcrumb(category="celery.worker.strategy", message="Task received", data={"data": {
        "name": charge_positional.name, "args": repr((SECRET, 43)), "kwargs": "{}",
    }})
    sentry_sdk.add_breadcrumb(message="truncated", data={"name": charge_positional.name, "args": f"('{SECRET}..."})
    sentry_sdk.add_breadcrumb(message="another task", data={"name": charge.name, "args": "(42,)"})
    sentry_sdk.capture_message("later")
    [event] = transport.events
    crumbs = event["breadcrumbs"]["values"]
    assert crumbs[0]["data"]["data"]["args"] == "('[redacted]', 43)"
    assert crumbs[1]["data"]["args"] == "[redacted]"
    assert crumbs[2]["data"]["args"] == "(42,)"


def test_a_secret_echoed_by_a_retried_task_is_scrubbed_from_later_events(init_sentry):
    # Celery logs each retry with the exception's message: a breadcrumb that outlives the task.
    # (Written here as the logging integration would: once CeleryIntegration has been set up in a
    # process, it ignores the celery.app.trace logger for good.)
    transport = init_sentry(integrations=[LoggingIntegration()])
    simulate(charge_positional, SECRET, 43)
    sentry_sdk.add_breadcrumb(type="log", category="celery.app.trace", level="info", message=(
        f"Task {charge_positional.name}[1] retry: Retry in 0.2s: ConnectionError('declined: {SECRET}')"))
    sentry_sdk.capture_message("an unrelated error, later, in the same worker")
    later = transport.events[-1]
    assert later["message"].startswith("an unrelated error")
    assert any("declined: [redacted]" in (crumb.get("message") or "") for crumb in later["breadcrumbs"]["values"])
    assert SECRET.encode() not in transport.serialized()


def test_the_projects_redact_settings_are_used(init_sentry):
    transport = init_sentry()
    with override_settings(SAFETYNET={"REDACT_KEYS": ["pin"], "REDACT_PATTERNS": [r"^x_"]}):
        sentry_sdk.capture_event({"message": "hi", "extra": {"pin": "1234", "x_session": "abcd", "note": "t"}})
    [event] = transport.events
    assert event["extra"] == {"pin": "[redacted]", "x_session": "[redacted]", "note": "t"}


def test_the_users_before_send_still_runs_and_is_redacted_after(init_sentry):
    calls = []

    def before_send(event, hint):
        calls.append(event["message"])
        event.setdefault("extra", {})["token"] = SECRET
        return None if event["message"] == "drop me" else event

    transport = init_sentry(before_send=before_send)
    sentry_sdk.capture_message("keep me")
    sentry_sdk.capture_message("drop me")
    assert calls == ["keep me", "drop me"]
    [event] = transport.events
    assert event["extra"]["token"] == "[redacted]"


def test_install_is_idempotent_and_works_before_init(init_sentry):
    _reset_sentry()
    safetynet_sentry.install()
    safetynet_sentry.install()
    assert sentry_sdk.scope.global_event_processors.count(safetynet_sentry._global_processor) == 1
    assert signals._for_deaths.count(safetynet_sentry._on_task_ended) == 1
    assert safetynet_sentry._on_task_ended not in signals._for_successes  # final failures only
    transport = init_sentry()  # a client made after install() gets the final pass at its first event
    sentry_sdk.capture_event({"message": "x", "extra": {"card_token": SECRET}})
    safetynet_sentry.install()
    hook = sentry_sdk.get_client().options["before_send"]
    assert getattr(hook, "_safetynet_final_pass", False) and hook.user_hook is None  # wrapped once
    assert SECRET.encode() not in transport.serialized()


def test_positional_parameters_are_read_from_the_class_even_when_sentry_wrapped_run(init_sentry):
    init_sentry(integrations=[CeleryIntegration()])
    simulate(charge_positional, SECRET, 43)  # the Celery integration has now replaced task.run
    task = charge_positional._get_current_object()
    assert getattr(task, "_sentry_is_patched", False)
    assert redaction.parameter_names(task) == ["card_token", "order_id"]
    assert redaction.parameter_names(tasks.send_welcome_email._get_current_object()) == ["to"]


def test_redaction_parameter_names_under_the_celery_integration(init_sentry):
    init_sentry(integrations=[CeleryIntegration()])
    simulate(charge_positional, SECRET, 43)
    assert redaction.parameter_names(charge_positional._get_current_object()) == ["card_token", "order_id"]


def test_uninstall_puts_everything_back(init_sentry):
    def before_send(event, hint):
        return event

    transport = init_sentry(before_send=before_send)
    sentry_sdk.capture_message("wrapped")
    assert sentry_sdk.get_client().options["before_send"].user_hook is before_send
    try:
        safetynet_sentry.uninstall()
        assert sentry_sdk.get_client().options["before_send"] is before_send
        assert safetynet_sentry._global_processor not in sentry_sdk.scope.global_event_processors
        simulate(charge, 42, card_token=SECRET)
        sentry_sdk.capture_event({"message": "raw", "extra": {"card_token": "tok_x_1234"}})
        assert [event["message"] for event in transport.events] == ["wrapped", "raw"]
        assert transport.events[-1]["extra"]["card_token"] == "tok_x_1234"
    finally:
        safetynet_sentry.install()


def test_inject_still_works_once_sentry_traced_the_task(init_sentry):
    from safetynet.testing import inject

    init_sentry(integrations=[CeleryIntegration()])
    tasks.ping.apply()  # an eager run: Celery's (Sentry-patched) build_tracer wraps ping.run on the instance
    with inject(tasks.ping, times=1, exception=ValueError("odd")):
        assert simulate(tasks.ping).state == "FAILURE"


def test_the_integration_form(init_sentry):
    transport = init_sentry(integrations=[safetynet_sentry.SafetynetIntegration()])
    simulate(charge, 42, card_token=SECRET)
    [event] = error_events(transport)
    assert event["tags"]["reason"] == "retries_exhausted"


# -- real workers ------------------------------------------------------------------------

from tests.integration.conftest import (  # noqa: E402,F401  (fixtures: the workers' database and spool)
    Worker, configure_app, spool_dir, wait_for, worker_database,
)

REAL_CASES = {
    # name: (task, args, kwargs, reason, attempts, exception type)
    "charge": (charge, (42,), {"card_token": SECRET}, "retries_exhausted", "3", "ConnectionError"),
    "positional": (charge_positional, (SECRET, 43), {}, "retries_exhausted", "3", "ConnectionError"),
    "refund": (refund, (44,), {"card_token": SECRET}, "retries_exhausted", "3", "ConnectionError"),
    "poll": (poll, (), {"card_token": SECRET}, "retries_exhausted", "2", None),
    "void": (void, (45,), {"card_token": SECRET}, "permanent_error", "1", "Permanent"),
    "slow": (slow, (), {"card_token": SECRET}, "time_limit", "2", "TimeLimitExceeded"),
    "die": (die, (), {"card_token": SECRET}, "worker_lost", "1", "WorkerLostError"),
}


# Sentry's own report of each of the 5 failures in the children (CeleryIntegration's, or the
# celery.app.trace error line), the 3 error lines of the final hard time limit in the main
# process, the killed child of the first one (retried), and the 2 error lines of the child killed
# running ``die`` (the pool's "Process … exited", Celery's "Task handler raised error"), and the worker
# consumer's error line for the unknown task.
EXPECTED_DROPPED = 12
UNKNOWN = "tests.contrib.sentry_unknown"


@pytest.fixture(scope="module", params=["celery", "no-celery"])
def real_run(request, tmp_path_factory, worker_database, spool_dir, django_db_blocker):
    """One worker with Sentry initialised as a project would; every case sent at once."""
    from tests.fixtures import recording

    broker, backend = "redis://127.0.0.1:6379/15", "redis://127.0.0.1:6379/14"
    app = configure_app(broker, backend)
    key = f"safetynet-tests:sentry:{uuid.uuid4().hex}"
    worker = Worker(f"sentry-{request.param}", broker, backend, tmp_path_factory.mktemp(f"sentry-{request.param}"),
                    database=worker_database, spool_dir=spool_dir,
                    extra_env={"SAFETYNET_TEST_SENTRY": request.param, "SAFETYNET_TEST_SENTRY_KEY": key})
    worker.command[worker.command.index("tests.celery_app")] = "tests.contrib.sentry_worker"
    worker.start(app)
    ids = set()
    try:
        results = {name: task.apply_async(args, kwargs, queue=worker.queue)
                   for name, (task, args, kwargs, *_) in REAL_CASES.items()}
        unknown = app.send_task(UNKNOWN, args=(46,), kwargs={"card_token": SECRET}, queue=worker.queue)
        ok = tasks.ping.apply_async(queue=worker.queue)
        for result in results.values():
            wait_for(result, timeout=60)
        assert ok.get(timeout=30) == "pong"
        ids.update(result.id for result in results.values())
        ids.add(unknown.id)
        deadline = time.monotonic() + 20
        while time.monotonic() < deadline:
            raw = recording.client().lrange(key, 0, -1)
            found = {(Envelope.deserialize(item).get_event() or {}).get("contexts", {}).get("safetynet", {})
                     .get("task_id") for item in raw}
            if ids <= found and recording.client().llen(f"{key}:dropped") >= EXPECTED_DROPPED:
                break
            time.sleep(0.2)
        time.sleep(2)  # anything a duplicate would send comes within this
        raw = recording.client().lrange(key, 0, -1)
        dropped = [reason.decode() for reason in recording.client().lrange(f"{key}:dropped", 0, -1)]
        with django_db_blocker.unblock():
            from safetynet.models import DeadLetter

            rows = {row.task_id: row for row in DeadLetter.objects.filter(task_id__in=ids)}
        yield {"variant": request.param, "results": results, "envelopes": raw, "dropped": dropped, "rows": rows,
               "unknown": unknown.id}
    finally:
        worker.stop()
        recording.client().delete(key, f"{key}:dropped")
        with django_db_blocker.unblock():
            from safetynet.models import DeadLetter

            from safetynet import deadletter

            doomed = DeadLetter.objects.filter(task_id__in=ids)
            fingerprints = list(doomed.values_list("fingerprint", flat=True))
            doomed.delete()
            deadletter.recount_failure_groups(fingerprints)  # the failures page's summary follows the rows


def real_error_events(run):
    events = [Envelope.deserialize(raw).get_event() for raw in run["envelopes"]]
    return [event for event in events if event is not None and event.get("type") in (None, "event")]


@pytest.mark.integration
@pytest.mark.django_db  # so that pytest-django makes the test database the worker writes to
def test_real_worker_one_event_per_final_failure_and_none_for_retries(real_run):
    events = real_error_events(real_run)
    by_task = {}
    for event in events:
        task_id = event.get("contexts", {}).get("safetynet", {}).get("task_id")
        by_task.setdefault(task_id, []).append(event)
    summary = [(e.get("logger"), e.get("message") or e.get("exception", {}).get("values", [{}])[-1].get("type"))
               for e in by_task.get(None, [])]
    assert None not in by_task, f"events safetynet did not send: {summary}"
    for name, (task, _, _, reason, attempts, exception_type) in REAL_CASES.items():
        result = real_run["results"][name]
        assert result.state == "FAILURE", name
        [event] = by_task.pop(result.id)
        row = real_run["rows"][result.id]
        assert event["tags"]["task"] == task.name
        assert (event["tags"]["reason"], event["tags"]["attempts"]) == (reason, attempts) == (row.reason,
                                                                                                str(row.attempts))
        assert event["tags"]["fingerprint"] == row.fingerprint, name
        assert event["fingerprint"] == ["safetynet", task.name, reason, row.fingerprint]
        if exception_type:
            assert event["exception"]["values"][-1]["type"] == exception_type, name
    [event] = by_task.pop(real_run["unknown"])  # one event for an unknown task, not Celery's line too
    assert (event["tags"]["task"], event["tags"]["reason"]) == (UNKNOWN, "unknown_task")
    assert by_task == {}
    # The duplicates were really made, and dropped.
    assert len(real_run["dropped"]) == EXPECTED_DROPPED, real_run["dropped"]
    charge_event = next(e for e in events if e["tags"]["task"] == charge.name)
    if real_run["variant"] == "celery":  # Sentry's Celery integration added its context to ours
        assert charge_event["tags"]["celery_task_id"] == real_run["results"]["charge"].id
        assert charge_event["extra"]["celery-job"]["kwargs"] == {"card_token": "[redacted]"}
    else:
        assert "celery-job" not in charge_event.get("extra", {})


@pytest.mark.integration
@pytest.mark.django_db
def test_real_worker_no_secret_in_any_envelope(real_run):
    assert real_run["envelopes"]
    for raw in real_run["envelopes"]:
        assert SECRET.encode() not in raw
    assert any(b"[redacted]" in raw for raw in real_run["envelopes"])



@pytest.mark.parametrize("exception", ["WorkerLostError", "CrashLoop"])
def test_celerys_error_line_for_a_lost_worker_is_left_to_safetynet(init_sentry, exception):
    import logging

    from billiard.exceptions import WorkerLostError

    from safetynet import CrashLoop
    from safetynet.runtime.worker import SafetyRequest

    transport = init_sentry(integrations=[LoggingIntegration()])
    log = logging.getLogger("celery.worker.request")
    klass = {"WorkerLostError": WorkerLostError, "CrashLoop": CrashLoop}[exception]

    def on_failure(self):  # the shape of Celery's Request.on_failure, which logs the line
        try:
            raise klass("Worker exited prematurely: signal 9 (SIGKILL).")
        except klass as error:
            log.error("Task handler raised error: %r", error, exc_info=True)

    on_failure(SafetyRequest.__new__(SafetyRequest))  # a safetynet task: requeued or recorded, not reported here
    on_failure(object())  # another request: Sentry keeps it
    assert len(error_events(transport)) == 1


def test_the_pools_exit_line_for_a_child_running_a_safetynet_task_is_not_an_event_of_its_own(init_sentry):
    """billiard logs "Process … exited with 'signal 9 (SIGKILL)'" before the task's request hears of the death;
    safetynet then requeues it (never reported, like a retry) or reports worker_lost / crash_loop once."""
    import logging

    from celery.worker import state

    from safetynet.runtime.worker import SafetyRequest

    transport = init_sentry(integrations=[LoggingIntegration()])
    pool = logging.getLogger("multiprocessing")
    request = SafetyRequest.__new__(SafetyRequest)
    request._task, request.worker_pid = void._get_current_object(), 4242
    plain = SafetyRequest.__new__(SafetyRequest)  # a request of a plain Celery task
    plain._task, plain.worker_pid = secret_tasks.plain_fail, 4343
    state.active_requests.update({request, plain})
    try:
        pool.error("Process %r pid:%r exited with %r", "ForkPoolWorker-1", 4242, "signal 9 (SIGKILL)")
        pool.error("Process %r pid:%r exited with %r", "ForkPoolWorker-2", 4343, "signal 9 (SIGKILL)")
        pool.error("Process %r pid:%r exited with %r", "ForkPoolWorker-3", 4444, "signal 9 (SIGKILL)")  # idle child
    finally:
        state.active_requests.difference_update({request, plain})
    kept = [event["logentry"]["params"][1] for event in error_events(transport)]
    assert kept == [4343, 4444]


@pytest.mark.django_db
def test_a_secret_in_a_custom_header_value_reaches_no_event(init_sentry):
    transport = init_sentry(integrations=[LoggingIntegration()])
    for reason, exception in (("unknown_task", None), ("permanent_error", ValueError("declined"))):
        deadletter.give_up(deadletter.Failure(
            task_name=void.name, task_id=str(uuid.uuid4()), reason=reason, detail="x", args=(7,), kwargs={},
            headers={"x-note": f"card_token={SECRET}", "x-echo": SECRET}, exception=exception,
            exception_type="" if exception else "celery.exceptions.NotRegistered",
        ), task=void._get_current_object() if exception else None)
    assert len(error_events(transport)) == 2
    assert SECRET.encode() not in transport.serialized()


# -- messages no task can run -------------------------------------------------------------

def _received(headers, body):
    return received(headers, body)


def _consumer():
    return bare_consumer(tasks.ping.name)


@pytest.mark.django_db
def test_an_unknown_task_is_one_event(init_sentry):
    from celery.worker.consumer.consumer import Consumer

    transport = init_sentry(integrations=[LoggingIntegration()])
    task_id = f"unknown-{uuid.uuid4()}"
    message = _received({"task": "nope.missing", "id": task_id, "lang": "py"}, [[1], {}, None])
    consumer = _consumer()
    try:
        raise KeyError("nope.missing")
    except KeyError as exc:  # Celery's own handling: its error line with the traceback, the task_unknown signal
        Consumer.on_unknown_task(consumer, None, message, exc)
    [event] = error_events(transport)
    assert event["contexts"]["safetynet"]["task_id"] == task_id
    assert event["tags"]["reason"] == "unknown_task"


@pytest.mark.django_db
def test_a_malformed_and_an_undecodable_message_are_one_event_each(init_sentry):
    from safetynet.runtime.consumer import guard_consumer, guard_task_handler

    transport = init_sentry(integrations=[LoggingIntegration()])
    consumer = _consumer()
    malformed_id, undecodable_id = f"malformed-{uuid.uuid4()}", f"undecodable-{uuid.uuid4()}"
    handler = guard_task_handler(consumer, lambda message: pytest.fail("Celery must not see it"))
    handler(_received({"task": tasks.ping.name, "id": malformed_id, "lang": "py"}, "just a string"))
    consumer.create_task_handler = lambda: None
    consumer.on_decode_error = lambda message, exc: message.ack()
    guard_consumer(consumer)  # Celery's decode callback, behind safetynet's
    undecodable = _received({"task": tasks.ping.name, "id": undecodable_id, "lang": "py"}, [[], {}, None])
    try:
        raise ValueError("cannot decode")
    except ValueError as exc:
        import logging

        from celery.worker.consumer import consumer as celery_consumer

        logging.getLogger("celery.worker.consumer.consumer").critical(
            celery_consumer.MESSAGE_DECODE_ERROR, exc, "application/json", "utf-8", "{}", "...", exc_info=True)
        consumer.on_decode_error(undecodable, exc)
    events = {event["contexts"]["safetynet"]["task_id"]: event["tags"]["reason"] for event in error_events(transport)}
    assert events == {malformed_id: "malformed", undecodable_id: "undecodable"}
