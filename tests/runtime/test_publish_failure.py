"""A retry the broker refuses is not lost: the message goes back (late acks) or becomes a dead letter (rejected)."""

import pytest
from celery import uuid
from celery.app.trace import build_tracer
from kombu.exceptions import OperationalError

from safetynet.models import DeadLetter
from tests.fixtures import tasks


def _attempt_with_the_broker_down(monkeypatch, task, n):
    """Run one attempt of ``task(n)`` as a worker would, with publishing failing as when the broker is down."""
    def broker_down(self, *args, **kwargs):
        raise OperationalError("Error 111 connecting to 127.0.0.1:6379. Connection refused.")

    monkeypatch.setattr("celery.canvas.Signature.apply_async", broker_down)
    task_id = uuid()
    tracer = build_tracer(task.name, task, eager=False, propagate=False, app=task._get_app())
    request = {"id": task_id, "task": task.name, "args": [n], "kwargs": {}, "retries": 0, "is_eager": False,
               "hostname": "test-worker", "delivery_info": {"routing_key": "celery"}, "called_directly": False}
    return task_id, tracer(task_id, [n], {}, request)


@pytest.mark.django_db
def test_a_retry_that_cannot_be_published_is_dead_lettered(monkeypatch):
    task_id, outcome = _attempt_with_the_broker_down(monkeypatch, tasks.call_api._get_current_object(), 5)
    assert outcome.info.state == "REJECTED"
    [row] = DeadLetter.objects.filter(task_id=task_id)
    assert row.reason == "rejected" and "could not be published" in row.detail
    assert row.args == [5] and row.exception_type == "ConnectionError"


@pytest.mark.django_db
def test_a_late_acknowledged_task_whose_retry_cannot_be_published_goes_back_to_the_queue(monkeypatch):
    task = tasks.call_api._get_current_object()
    monkeypatch.setattr(type(task), "acks_late", True)
    task_id, outcome = _attempt_with_the_broker_down(monkeypatch, task, 6)
    assert outcome.info.state == "REJECTED"
    assert outcome.retval.exception.exc.requeue is True  # the unacknowledged message comes back: nothing recorded
    assert not DeadLetter.objects.filter(task_id=task_id).exists()
