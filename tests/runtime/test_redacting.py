"""Secrets outside safetynet's own store, in process: the result backend proxy, Celery's log lines, argsrepr.

The result backend is the real Redis one (db 14) and the broker the real Redis (db 15); each test
reads what was really stored or queued. The real-worker versions are in tests/integration/test_secrets.py.
"""

import base64
import json
import logging
import sys
import uuid

import pytest
import redis
from celery.app.task import Context
from celery.app.trace import LOG_FAILURE, LOG_RECEIVED, LOG_SUCCESS

from safetynet.runtime import logs, results, sending
from tests.celery_app import app
from tests.fixtures import secret_tasks, tasks
from tests.fixtures.secret_tasks import SECRET

pytestmark = pytest.mark.django_db


def stored(task_id):
    """The raw ``celery-task-meta-<id>`` value in the Redis result backend."""
    raw = redis.Redis.from_url(app.conf.result_backend).get(f"celery-task-meta-{task_id}")
    assert raw is not None
    return raw


def request_for(task_id, args=(), kwargs=None, **extra):
    return Context(id=task_id, args=list(args), kwargs=kwargs or {}, delivery_info={}, headers={}, **extra)


def raised(kind, card_token=SECRET):
    try:
        secret_tasks._raise(kind, card_token)
    except Exception as error:
        return error
    raise AssertionError(kind)


# -- the result backend ------------------------------------------------------------------

def test_a_safetynet_tasks_backend_stores_the_failure_redacted_and_leaves_the_live_exception():
    task = secret_tasks.fail._get_current_object()
    task_id = str(uuid.uuid4())
    error = raised("echo")
    task.backend.mark_as_failure(task_id, error, f"Traceback ...\nConnectionError: gateway refused {SECRET}",
                                 request=request_for(task_id, ("echo", SECRET)))
    raw = stored(task_id)
    assert SECRET.encode() not in raw and b"gateway refused [redacted]" in raw and b"ConnectionError" in raw
    assert json.loads(raw)["traceback"].endswith("ConnectionError: gateway refused [redacted]")
    assert str(error) == f"gateway refused {SECRET}"  # the live exception is the task's own
    result = task.AsyncResult(task_id)
    with pytest.raises(ConnectionError, match=r"^gateway refused \[redacted\]$"):
        result.get(timeout=5)


def test_a_plain_celery_tasks_backend_is_celerys():
    assert not isinstance(secret_tasks.plain_fail.backend, results.RedactingBackend)
    assert isinstance(secret_tasks.fail.backend, results.RedactingBackend)
    assert secret_tasks.fail.backend.wrapped is app.backend  # one proxy per backend, kept
    assert secret_tasks.fail.backend is secret_tasks.fail.backend
    # What a client reads with is the real backend: the proxy only stores.
    assert secret_tasks.fail.AsyncResult("x").backend is app.backend


def test_the_retry_state_is_stored_redacted():
    task = secret_tasks.retry_later._get_current_object()
    task_id = str(uuid.uuid4())
    task.backend.mark_as_retry(task_id, ConnectionError(f"declined card_token={SECRET}"),
                               f"celery.exceptions.Retry: Retry in 60s: ConnectionError('declined {SECRET}')",
                               request=request_for(task_id, (SECRET,)))
    meta = json.loads(stored(task_id))
    assert meta["status"] == "RETRY" and meta["result"]["exc_type"] == "ConnectionError"
    assert meta["result"]["exc_message"] == ["declined card_token='[redacted]'"]
    assert SECRET not in meta["traceback"] and "[redacted]" in meta["traceback"]


def test_store_result_redacts_exception_states_only():
    task = secret_tasks.fail._get_current_object()
    failed, progress = str(uuid.uuid4()), str(uuid.uuid4())
    task.backend.store_result(failed, ValueError(f"card_token={SECRET}"), "FAILURE", request=request_for(failed))
    task.backend.store_result(progress, {"step": "card_token=visible"}, "PROGRESS", request=request_for(progress))
    assert SECRET.encode() not in stored(failed)
    assert json.loads(stored(progress))["result"] == {"step": "card_token=visible"}  # the user's own state


def test_errbacks_get_the_live_exception_while_the_backend_gets_the_redacted_one():
    task = secret_tasks.fail._get_current_object()
    task_id = str(uuid.uuid4())
    secret_tasks.ERRBACK_SEEN.clear()
    errback = secret_tasks.seen_by_errback.s()
    task.backend.mark_as_failure(task_id, raised("echo"), "tb", request=request_for(task_id, ("echo", SECRET),
                                                                                      errbacks=[dict(errback)]))
    assert secret_tasks.ERRBACK_SEEN == [(ConnectionError, f"gateway refused {SECRET}", "tb")]
    assert SECRET.encode() not in stored(task_id)


def test_with_result_extended_the_stored_arguments_are_redacted(settings):
    task = secret_tasks.fail._get_current_object()
    task_id, done_id = str(uuid.uuid4()), str(uuid.uuid4())
    app.conf.result_extended = True
    task.__dict__.pop("_safetynet_backend", None)  # read once per backend
    try:
        task.backend.mark_as_failure(task_id, raised("text"), None,
                                     request=request_for(task_id, ("text", SECRET), task=task.name))
        task.backend.mark_as_done(done_id, 1, request=request_for(done_id, ("text",), {"card_token": SECRET},
                                                                    task=task.name))
    finally:
        app.conf.result_extended = False
        task.__dict__.pop("_safetynet_backend", None)
    failed, done = json.loads(stored(task_id)), json.loads(stored(done_id))
    assert failed["args"] == ["text", "[redacted]"] and failed["name"] == task.name
    assert done["kwargs"] == {"card_token": "[redacted]"} and done["status"] == "SUCCESS"


def test_redacted_exception_keeps_the_type_and_what_is_not_secret():
    clean = results.text_cleaner(secret_tasks.fail, ("x", SECRET), {})
    untouched = ValueError("nothing to hide")
    assert results.redacted_exception(untouched, clean) is untouched
    refused = ConnectionRefusedError(111, f"refused card_token={SECRET}")
    copy = results.redacted_exception(refused, clean)
    assert type(copy) is ConnectionRefusedError and copy.errno == 111 and copy.args == (111, "refused card_token='[redacted]'")
    declined = results.redacted_exception(raised("reduce"), clean)
    assert type(declined) is secret_tasks.DeclinedError and declined.card_token == "[redacted]" and declined.code == "E42"
    unusual = results.redacted_exception(raised("unusual"), clean)
    assert type(unusual) is secret_tasks.GatewayError and unusual.status == 502 and SECRET not in repr(vars(unusual))


# -- the message's argsrepr/kwargsrepr ---------------------------------------------------

@pytest.fixture
def queue():
    name = f"safetynet-test-{uuid.uuid4().hex}"
    yield name
    client = redis.Redis.from_url(app.conf.broker_url)
    for key in client.scan_iter(match=f"*{name}*"):
        client.delete(key)


def queued(queue):
    client = redis.Redis.from_url(app.conf.broker_url)
    return [json.loads(item) for item in reversed(client.lrange(queue, 0, -1))]


def test_argsrepr_and_kwargsrepr_are_redacted_when_sent(queue):
    secret_tasks.fail.apply_async(("text", SECRET), queue=queue)
    secret_tasks.fail.apply_async(kwargs={"kind": "text", "card_token": SECRET}, queue=queue)
    secret_tasks.plain_arguments.apply_async((7,), {"note": "card_token=visible"}, queue=queue)
    first, second, plain = (message["headers"] for message in queued(queue))
    assert (first["argsrepr"], first["kwargsrepr"]) == ("('text', '[redacted]')", "{}")
    assert (second["argsrepr"], second["kwargsrepr"]) == ("()", "{'kind': 'text', 'card_token': '[redacted]'}")
    assert (plain["argsrepr"], plain["kwargsrepr"]) == ("(7,)", "{'note': 'card_token=visible'}")  # Celery's own


def test_a_retry_published_directly_has_redacted_reprs_too(queue):
    signature = secret_tasks.retry_later.signature((SECRET,), queue=queue)
    signature.apply_async(**{sending.DIRECT: True})
    [message] = queued(queue)
    assert message["headers"]["argsrepr"] == "('[redacted]',)"
    assert SECRET in base64.b64decode(message["body"]).decode()  # the body keeps what the task needs to run


def test_reprs_given_by_the_caller_are_kept(queue):
    secret_tasks.fail.apply_async(("text", SECRET), queue=queue, argsrepr="(mine)", kwargsrepr="{}")
    [message] = queued(queue)
    assert message["headers"]["argsrepr"] == "(mine)"


# -- Celery's log lines ------------------------------------------------------------------

def record(logger, level, msg, args, exc_info=None, data=None):
    """A record as Celery's loggers make it (a context dict is the record's args, and its ``data`` extra)."""
    made = logging.getLogger(logger).makeRecord(logger, level, "trace.py", 1, msg, (args,) if isinstance(args, dict)
                                                else args, exc_info, extra={"data": data} if data is not None else None)
    logs.FILTER.filter(made)
    return made


def formatted(made):
    return logging.Formatter("%(message)s").format(made)


def test_the_filter_is_on_celerys_task_loggers():
    for name in logs.CELERY_LOGGERS:
        assert logs.FILTER in logging.getLogger(name).filters


def test_a_failure_line_of_a_safetynet_task_is_redacted_in_its_text_data_and_traceback():
    task = secret_tasks.fail._get_current_object()
    task_id = str(uuid.uuid4())
    error = raised("echo")
    context = {"hostname": "w", "id": task_id, "name": task.name, "exc": repr(error), "traceback": f"... {SECRET}",
               "args": f"('echo', '{SECRET}')", "kwargs": "{}", "description": "raised unexpected", "internal": False}
    task.push_request(id=task_id, args=["echo", SECRET], kwargs={})
    try:
        made = record("celery.app.trace", logging.ERROR, LOG_FAILURE, context, (type(error), error, error.__traceback__),
                      data=context)
    finally:
        task.pop_request()
    text = formatted(made)
    assert SECRET not in text and f"Task {task.name}[{task_id}] raised unexpected" in text
    assert "ConnectionError('gateway refused [redacted]')" in text and "ConnectionError: gateway refused [redacted]" in text
    assert made.data["args"] == "('echo', '[redacted]')" and SECRET not in repr(made.data)
    assert made.exc_info[1] is error  # Sentry's logging integration still sees the exception itself


def test_the_received_line_of_every_task_is_left_to_the_redacted_argsrepr_it_was_sent_with():
    context = {"id": "t1", "name": secret_tasks.fail.name, "args": "('text', '[redacted]')", "kwargs": "{}", "eta": None}
    made = record("celery.worker.strategy", logging.INFO, LOG_RECEIVED, context, data=context)
    assert made.args is context and formatted(made) == f"Task {secret_tasks.fail.name}[t1] received"


def test_a_bad_eta_line_with_a_raw_argsrepr_is_redacted_by_parameter_name():
    info = {"id": "t1", "name": secret_tasks.fail.name, "args": f"('text', '{SECRET}')",
            "kwargs": f"{{'note': 'card_token={SECRET}'}}"}
    made = record("celery.worker.strategy", logging.ERROR, "Couldn't convert ETA %r to timestamp: %r. Task: %r",
                  ("soon", ValueError("bad"), info))
    assert SECRET not in formatted(made) and "[redacted]" in formatted(made)


def test_a_cut_argsrepr_of_a_task_with_a_sensitive_parameter_is_withheld():
    context = {"id": "t1", "name": secret_tasks.fail.name, "exc": "x", "args": f"('text', '{SECRET}...",
               "kwargs": "{}", "description": "raised unexpected", "internal": False, "traceback": "", "hostname": "w"}
    assert record("celery.app.trace", logging.ERROR, LOG_FAILURE, context, data=context).data["args"] == "[redacted]"


def test_a_retry_line_in_the_main_process_is_redacted_as_its_conversion_shows_it():
    made = record("celery.worker.request", logging.INFO, "Task %s[%s] retry: %s",
                  (secret_tasks.fail.name, "t2", ConnectionError(f"token={SECRET}")))
    assert formatted(made) == f"Task {secret_tasks.fail.name}[t2] retry: token='[redacted]'"
    made = record("celery.worker.request", logging.ERROR, "Task handler raised error: %r",
                  (ValueError(f"password={SECRET}"),))
    assert formatted(made) == "Task handler raised error: ValueError('password='[redacted]')"  # %r: no quotes added


def test_an_unknown_tasks_body_is_redacted_by_the_text_patterns():
    made = record("celery.worker.consumer.consumer", logging.ERROR, "Received unregistered task of type %s.\n%s",
                  ("'nope'", f"[[], {{'card_token': '{SECRET}'}}]"))
    assert SECRET not in formatted(made) and "'card_token': '[redacted]'" in formatted(made)


def test_a_plain_celery_tasks_lines_and_success_lines_are_left_as_celery_wrote_them():
    context = {"hostname": "w", "id": "t3", "name": secret_tasks.plain_fail.name, "exc": f"ValueError('token={SECRET}')",
               "traceback": "", "args": "()", "kwargs": "{}", "description": "raised unexpected", "internal": False}
    assert SECRET in formatted(record("celery.app.trace", logging.ERROR, LOG_FAILURE, context))
    success = {"id": "t4", "name": secret_tasks.fail.name, "return_value": f"token={SECRET}", "runtime": 0.1}
    made = record("celery.app.trace", logging.INFO, LOG_SUCCESS, success)
    assert made.args is success


def test_a_line_that_cannot_be_redacted_is_withheld(monkeypatch):
    def broken(*args):
        raise RuntimeError("boom")

    monkeypatch.setattr(logs, "_redact", broken)
    try:
        raise ValueError(f"token={SECRET}")
    except ValueError:
        made = record("celery.app.trace", logging.ERROR, "Task %(name)s failed: %(exc)s",
                      {"name": tasks.ping.name, "exc": SECRET}, sys.exc_info())
    text = formatted(made)
    assert SECRET not in text and "values withheld" in text and "traceback withheld" in text


def test_a_backend_given_as_a_task_option_is_stored_through_too():
    from safetynet import SafetyTask

    own = app.backend

    @app.task(base=SafetyTask, name="tests.runtime.test_redacting.own_backend", backend=own, shared=False)
    def own_backend(card_token):
        return card_token

    task = app.tasks["tests.runtime.test_redacting.own_backend"]
    assert isinstance(task.backend, results.RedactingBackend) and task.backend.wrapped is own
    task_id = str(uuid.uuid4())
    task.backend.mark_as_failure(task_id, ValueError(f"declined {SECRET}"), None, request=request_for(task_id, (SECRET,)))
    assert SECRET.encode() not in stored(task_id)
