"""A failed task whose dead letter staff replay: the progress endpoint points its watcher at the replay."""

import time
import uuid

import pytest
from django.contrib.auth.models import User
from django.db import connection
from django.test.utils import CaptureQueriesContext
from django.urls import reverse

from safetynet import deadletter, progress
from safetynet.models import DeadLetter, TaskProgress
from tests.celery_app import app
from tests.fixtures import progress_tasks
from tests.fixtures.web import logged_in

pytestmark = pytest.mark.django_db

TASK = "tests.fixtures.progress_tasks.large_report"


@pytest.fixture(autouse=True)
def eager():
    app.conf.task_always_eager = True
    yield
    app.conf.task_always_eager = False


@pytest.fixture
def alice():
    return User.objects.create_user("alice", password="pw")


def status(client, task_id):
    return client.get(reverse("safetynet_progress:status", args=[task_id]))


def died(task_id):
    """A tracked task given up by a worker (a dead letter, and its progress row failed)."""
    deadletter.give_up(deadletter.Failure(
        task_name=TASK, task_id=task_id, reason="permanent_error", exception=progress_tasks.ReportTooLarge("9 GB"),
        headers={progress.HEADER: 1}, failed_at=time.time()), log=False)


def test_a_failed_task_points_at_its_replay_and_the_replay_at_the_next(alice):
    first = str(uuid.uuid4())
    progress.track(first, TASK, progress.owner_of(alice))
    died(first)
    watcher = logged_in(alice)
    before = status(watcher, first).json()
    assert before["state"] == "failed" and before["done"] and "replayed_as" not in before

    [outcome] = deadletter.replay(DeadLetter.objects.filter(task_id=first), by="ops")
    second = outcome.new_task_id
    answer = status(watcher, first).json()
    assert answer["state"] == "failed" and answer["done"]  # a widget that does not follow stops, as it did
    assert answer["replayed_as"] == second
    assert answer["replayed_url"] == reverse("safetynet_progress:status", args=[second])
    assert progress.status_of(first)["replayed_as"] == second
    # the replay ran (eagerly here) and failed again: it says so, under its own id, to the same user
    again = status(watcher, second).json()
    assert again["state"] == "failed" and again["error"] == progress_tasks.ReportTooLarge.public_message
    assert "replayed_as" not in again

    died(second)  # recorded by a worker this time, and replayed once more: the chain goes on
    [outcome] = deadletter.replay(DeadLetter.objects.filter(task_id=second), by="ops")
    assert status(watcher, second).json()["replayed_as"] == outcome.new_task_id
    assert status(watcher, first).json()["replayed_as"] == second  # one hop at a time


def test_no_pointer_for_someone_who_may_not_see_the_task_or_its_replay(alice, settings):
    first = str(uuid.uuid4())
    progress.track(first, TASK, progress.owner_of(alice))
    died(first)
    [outcome] = deadletter.replay(DeadLetter.objects.filter(task_id=first), by="ops")
    assert status(logged_in(User.objects.create_user("bob")), first).status_code == 404
    settings.SAFETYNET = {**settings.SAFETYNET, "PROGRESS_ACCESS": lambda request, row: row.task_id == first}
    answer = status(logged_in(alice), first).json()
    assert answer["state"] == "failed" and "replayed_as" not in answer
    assert TaskProgress.objects.filter(task_id=outcome.new_task_id).exists()


def test_a_task_that_did_not_fail_costs_no_dead_letter_lookup(alice):
    result = progress_tasks.build_report.apply_async((2,), progress_for=alice)
    watcher = logged_in(alice)
    with CaptureQueriesContext(connection) as queries:
        assert status(watcher, result.id).json()["state"] == "succeeded"
    assert not any("safetynet_deadletter" in query["sql"] for query in queries.captured_queries)
