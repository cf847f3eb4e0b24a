"""What Django documents of its tasks API (``django.tasks``: the topic guide's examples and the reference's
attributes and statuses), run against safetynet's ``CeleryBackend`` on a real worker (Redis, and RabbitMQ with
PostgreSQL) and against Django's own ``ImmediateBackend``: the same test means the same thing on both.

Where Django defines a behaviour only for backends with a feature (``supports_get_result``, ``supports_defer``)
the test says so with ``needs(...)``, and is skipped, with that reason, for a backend without it. A test that
only holds for a backend that runs tasks later (``READY`` until a worker takes it) is marked ``deferred_only``.
"""

import asyncio
import time
import uuid
from datetime import timedelta

import pytest
from django.test import override_settings
from django.utils import timezone

from tests.integration.conftest import BROKERS, Worker, configure_app, release_app

compat = pytest.importorskip("safetynet.taskrecords._compat")
if not compat.AVAILABLE:
    pytest.skip(compat.MISSING, allow_module_level=True)

from tests.fixtures import django_tasks as tasks  # noqa: E402  (needs Django's tasks API)

from safetynet.taskrecords._compat import (  # noqa: E402
    InvalidTask,
    TaskError,
    TaskResultDoesNotExist,
    TaskResultMismatch,
    TaskResultStatus,
    api,
)

pytestmark = pytest.mark.django_db(transaction=True)

IMMEDIATE = ("django.tasks.backends.immediate.ImmediateBackend" if api.__name__ == "django.tasks"
             else "django_tasks.backends.immediate.ImmediateBackend")
CELERY = "safetynet.tasks.CeleryBackend"


@pytest.fixture(scope="module", params=[
    "immediate",
    pytest.param("celery/redis", marks=pytest.mark.integration),
    pytest.param("celery/rabbitmq+postgresql", marks=pytest.mark.integration),
])
def backend_kind(request, tmp_path_factory, worker_database, spool_dir):
    """Which backend ``TASKS["default"]`` is, and (for Celery) a worker running the fixtures' tasks."""
    if request.param == "immediate":
        yield {"kind": "immediate", "other_queue": "other"}
        return
    broker, result_backend = BROKERS[request.param.split("/", 1)[1]]
    app = configure_app(broker, result_backend)
    worker = Worker(request.param.replace("/", "-"), broker, result_backend, tmp_path_factory.mktemp("djtasks"),
                    concurrency=2, database=worker_database, spool_dir=spool_dir,
                    extra_env={"SAFETYNET_TEST_INCLUDE": "tests.fixtures.django_tasks"})
    other = f"{worker.queue}-other"
    worker.command[worker.command.index("-Q") + 1] = f"{worker.queue},{other}"
    worker.start(app)
    default_queue = app.conf.task_default_queue
    app.conf.task_default_queue = worker.queue  # Django's "default" queue is Celery's default queue
    yield {"kind": "celery", "other_queue": other, "worker": worker}
    app.conf.task_default_queue = default_queue
    worker.stop()
    release_app(app)


@pytest.fixture
def backend(backend_kind):
    """``TASKS["default"]`` for this test: the backend under test, with the queues the tests name."""
    path = IMMEDIATE if backend_kind["kind"] == "immediate" else CELERY
    queues = ["default", backend_kind["other_queue"]]
    with override_settings(TASKS={"default": {"BACKEND": path, "QUEUES": queues}}):
        yield api.task_backends["default"]


def needs(backend, feature):
    if not getattr(backend, feature):
        pytest.skip(f"Django defines this only for backends with {feature}; {type(backend).__name__} has not")


def deferred_only(backend):
    if type(backend).__name__ == "ImmediateBackend":
        pytest.skip("ImmediateBackend runs the task inside enqueue(): it is never READY afterwards")


def finished(result, timeout=30):
    """``result`` once it has finished: at once for a backend that runs it in ``enqueue``, else refreshed."""
    if not result.task.get_backend().supports_get_result:
        assert result.is_finished
        return result
    deadline = time.monotonic() + timeout
    while not result.is_finished:
        assert time.monotonic() < deadline, f"{result.id} not finished after {timeout}s: {result.status}"
        time.sleep(0.05)
        result.refresh()
    return result


# -- the topic guide ----------------------------------------------------------------------------------------------


def test_enqueue_returns_a_result_and_the_task_runs(backend):
    result = tasks.email_users.enqueue(emails=["a@example.com", "b@example.com"], subject="You have a message",
                                       message="Hello there!")
    assert isinstance(result.id, str) and result.id
    assert result.task.func is tasks.email_users.func
    assert result.args == [] and result.kwargs == {"emails": ["a@example.com", "b@example.com"],
                                                   "subject": "You have a message", "message": "Hello there!"}
    assert result.backend == "default"
    finished(result)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.return_value == 2
    assert result.errors == []


def test_a_new_result_is_ready_and_its_value_not_yet_there(backend):
    deferred_only(backend)
    result = tasks.sleeps.enqueue(0.5)
    assert result.status == TaskResultStatus.READY
    assert not result.is_finished
    assert result.started_at is None and result.finished_at is None and result.worker_ids == []
    with pytest.raises(ValueError, match="not finished"):
        result.return_value  # noqa: B018
    finished(result)
    assert result.return_value == 0.5


def test_running_while_it_runs(backend):
    deferred_only(backend)
    result = tasks.sleeps.enqueue(1.5)
    deadline = time.monotonic() + 20
    while result.status != TaskResultStatus.RUNNING:
        assert not result.is_finished, "finished without being seen RUNNING"
        assert time.monotonic() < deadline
        time.sleep(0.05)
        result.refresh()
    assert result.started_at is not None and result.finished_at is None
    finished(result)
    assert result.status == TaskResultStatus.SUCCESSFUL


def test_the_result_attributes_after_a_run(backend):
    before = timezone.now()
    result = finished(tasks.calculate_meaning_of_life.enqueue())
    after = timezone.now()
    assert result.return_value == 42
    assert result.is_finished
    assert result.attempts == 1 and len(result.worker_ids) == 1 and result.worker_ids[0]
    for name in ("enqueued_at", "started_at", "last_attempted_at", "finished_at"):
        value = getattr(result, name)
        assert value is not None and timezone.is_aware(value), name
        assert before - timedelta(seconds=1) <= value <= after + timedelta(seconds=1), name
    assert result.enqueued_at <= result.started_at <= result.finished_at
    assert result.last_attempted_at == result.started_at


def test_a_failure_is_failed_with_its_error(backend):
    result = finished(tasks.fails.enqueue("boom"))
    assert result.status == TaskResultStatus.FAILED
    assert result.is_finished
    with pytest.raises(ValueError, match="failed"):
        result.return_value  # noqa: B018
    assert len(result.errors) == 1
    error = result.errors[0]
    assert isinstance(error, TaskError)
    assert error.exception_class_path == "builtins.ValueError"
    assert error.exception_class is ValueError
    assert "ValueError: boom" in error.traceback and "Traceback" in error.traceback
    assert result.finished_at is not None and result.attempts == 1


def test_return_values_are_json_normalised(backend):
    assert finished(tasks.returns_tuple.enqueue()).return_value == [1, 2, 3]


def test_a_return_value_that_is_not_json_fails_the_task(backend):
    result = finished(tasks.not_json.enqueue())
    assert result.status == TaskResultStatus.FAILED
    assert result.errors[-1].exception_class_path == "builtins.TypeError"


def test_arguments_are_json_normalised(backend):
    result = tasks.add_to_list.enqueue((1, 2), value=3)
    assert result.args == [[1, 2]]
    assert finished(result).return_value == [1, 2, 3]


def test_arguments_that_are_not_json_are_refused_at_enqueue(backend):
    with pytest.raises(TypeError):
        tasks.add.enqueue(object(), 1)


def test_using_makes_a_new_task_and_keeps_the_old(backend, backend_kind):
    other = tasks.calculate_meaning_of_life.using(priority=10, queue_name=backend_kind["other_queue"])
    assert other is not tasks.calculate_meaning_of_life
    assert (other.priority, other.queue_name) == (10, backend_kind["other_queue"])
    assert (tasks.calculate_meaning_of_life.priority, tasks.calculate_meaning_of_life.queue_name) == (0, "default")
    assert other.func is tasks.calculate_meaning_of_life.func
    result = finished(other.enqueue())
    assert result.task.priority == 10 and result.task.queue_name == backend_kind["other_queue"]
    assert result.return_value == 42


def test_priorities_are_whole_numbers_from_minus_100_to_100(backend):
    for priority in (-100, -1, 0, 1, 100):
        assert finished(tasks.calculate_meaning_of_life.using(priority=priority).enqueue()).return_value == 42
    assert tasks.prioritised.priority == 2
    for priority in (-101, 101, 1.5):
        with pytest.raises(InvalidTask, match="priority"):
            tasks.calculate_meaning_of_life.using(priority=priority)


def test_an_unknown_queue_is_refused(backend):
    with pytest.raises(InvalidTask, match="not valid"):
        tasks.calculate_meaning_of_life.using(queue_name="no-such-queue")


def test_a_function_not_at_module_level_is_refused(backend):
    def local():
        pass

    with pytest.raises(InvalidTask, match="module level"):
        api.task(local)


def test_takes_context_needs_a_context_argument(backend):
    def no_context(x):
        pass

    no_context.__qualname__ = "no_context"  # as if at module level
    with pytest.raises(InvalidTask, match="context"):
        api.task(takes_context=True)(no_context)


def test_takes_context_gives_the_result_and_the_attempt(backend):
    result = finished(tasks.context_info.enqueue())
    assert result.status == TaskResultStatus.SUCCESSFUL
    seen = result.return_value
    assert seen["attempt"] == 1 and seen["id"] == result.id and seen["status"] == "RUNNING"
    assert seen["args"] == [] and seen["kwargs"] == {} and seen["worker_ids"] == 1


def test_run_after_waits(backend):
    needs(backend, "supports_defer")
    run_after = timezone.now() + timedelta(seconds=3)
    result = tasks.calculate_meaning_of_life.using(run_after=run_after).enqueue()
    assert result.task.run_after == run_after
    time.sleep(1.5)
    result.refresh()
    assert result.status == TaskResultStatus.READY
    finished(result, timeout=30)
    assert result.status == TaskResultStatus.SUCCESSFUL
    assert result.started_at >= run_after


def test_run_after_is_refused_without_defer(backend):
    if backend.supports_defer:
        pytest.skip("the backend supports run_after")
    with pytest.raises(InvalidTask, match="run_after"):
        tasks.calculate_meaning_of_life.using(run_after=timezone.now() + timedelta(seconds=1))


def test_run_after_must_be_aware(backend):
    needs(backend, "supports_defer")
    with pytest.raises(InvalidTask, match="aware"):
        tasks.calculate_meaning_of_life.using(run_after=timezone.now().replace(tzinfo=None))


def test_run_after_cannot_be_given_to_the_decorator(backend):
    if api.__name__ != "django.tasks":
        pytest.skip("Django 6.0's @task refuses run_after; the django-tasks backport does not check it")
    with pytest.raises(TypeError, match="run_after"):
        api.task(run_after=timezone.now())


# -- results ------------------------------------------------------------------------------------------------------


def test_get_result_from_the_task_and_from_the_backend(backend):
    needs(backend, "supports_get_result")
    result = finished(tasks.add.enqueue(2, 3))
    again = tasks.add.get_result(result.id)
    assert again.id == result.id and again.status == TaskResultStatus.SUCCESSFUL and again.return_value == 5
    assert again.args == [2, 3] and again.enqueued_at == result.enqueued_at
    from_backend = api.default_task_backend.get_result(result.id)
    assert from_backend.return_value == 5 and from_backend.task.func is tasks.add.func


def test_get_result_of_another_task_is_a_mismatch(backend):
    needs(backend, "supports_get_result")
    result = tasks.add.enqueue(1, 1)
    with pytest.raises(TaskResultMismatch):
        tasks.noop.get_result(result.id)


def test_get_result_of_an_unknown_id(backend):
    needs(backend, "supports_get_result")
    with pytest.raises(TaskResultDoesNotExist):
        api.default_task_backend.get_result(uuid.uuid4().hex)


def test_get_result_is_refused_without_the_feature(backend):
    if backend.supports_get_result:
        pytest.skip("the backend keeps results")
    result = tasks.add.enqueue(1, 1)
    with pytest.raises(NotImplementedError):
        tasks.add.get_result(result.id)


# -- async --------------------------------------------------------------------------------------------------------


def test_an_async_task_function_runs(backend):
    needs(backend, "supports_async_task")
    assert finished(tasks.async_add.enqueue(2, 5)).return_value == 7


def test_aenqueue_aget_result_and_arefresh(backend):
    async def scenario():
        result = await tasks.add.aenqueue(20, 22)
        if backend.supports_get_result:
            deadline = time.monotonic() + 30
            while not result.is_finished:
                assert time.monotonic() < deadline
                await asyncio.sleep(0.05)
                await result.arefresh()
            again = await tasks.add.aget_result(result.id)
            assert again.return_value == 42
        return result

    result = asyncio.run(scenario())
    assert result.status == TaskResultStatus.SUCCESSFUL and result.return_value == 42
