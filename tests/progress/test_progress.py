"""User-facing progress: who may read it, what it shows (never a traceback or a secret), and how tasks report it."""

import pytest
from django.contrib.auth.models import Permission, User
from django.template import Context, Template
from django.test import Client
from django.urls import reverse

from safetynet import progress
from safetynet.models import DeadLetter, TaskProgress
from tests.fixtures import progress_tasks
from tests.celery_app import app
from tests.fixtures.web import logged_in

pytestmark = pytest.mark.django_db

SECRETS = ("tok_live_SECRET", "tok_result_SECRET", "hunter2", "Traceback", "cannot parse row", "card_token=")


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


def test_the_owner_sees_a_report_run_to_the_end(alice):
    result = progress_tasks.build_report.apply_async((3,), progress_for=alice)
    response = status(logged_in(alice), result.id)
    assert response.status_code == 200 and "no-store" in response["Cache-Control"]
    assert response.json() == {
        "task_id": result.id, "state": "succeeded", "current": 3.0, "total": 3.0, "percent": 100.0,
        "message": "step 3 of 3", "attempt": 1, "next_attempt_at": None, "done": True,
        "result": {"rows": 3, "token": "[redacted]"},
    }


def test_another_user_gets_the_same_404_as_for_an_unknown_task(alice):
    result = progress_tasks.build_report.apply_async((1,), progress_for=alice)
    bob = logged_in(User.objects.create_user("bob"))
    theirs, unknown = status(bob, result.id), status(bob, "no-such-task")
    assert theirs.status_code == unknown.status_code == 404
    assert theirs.content == unknown.content == b'{"error": "not found"}'
    for odd in ("a\x00b", "x" * 300):
        assert status(bob, odd).content == unknown.content


def test_anonymous_visitors_and_posts_are_refused(alice):
    result = progress_tasks.build_report.apply_async((1,), progress_for=alice)
    assert status(Client(), result.id).status_code == 403
    assert logged_in(alice).post(reverse("safetynet_progress:status", args=[result.id])).status_code == 405


def test_staff_need_the_view_permission(alice):
    result = progress_tasks.build_report.apply_async((1,), progress_for=alice)
    staff = User.objects.create_user("ops", is_staff=True)
    assert status(logged_in(staff), result.id).status_code == 404
    staff.user_permissions.add(Permission.objects.get(codename="view_taskprogress"))
    staff = User.objects.get(pk=staff.pk)
    assert status(logged_in(staff), result.id).status_code == 200


def test_progress_access_decides_when_set(alice, settings):
    result = progress_tasks.build_report.apply_async((1,), progress_for=alice)
    settings.SAFETYNET = {**settings.SAFETYNET, "PROGRESS_ACCESS": lambda request, row: row.task_name.endswith("report")}
    assert status(Client(), result.id).status_code == 200


def test_a_failure_shows_the_safe_message_and_nothing_else(alice):
    result = progress_tasks.leaky_report.apply_async(kwargs={"card_token": "tok_live_SECRET"}, progress_for=alice)
    response = status(logged_in(alice), result.id)
    body = response.content.decode()
    assert response.json()["state"] == "failed" and response.json()["done"] is True
    assert response.json()["error"] == "Sorry, this did not work. The team has been told."
    for secret in SECRETS:
        assert secret not in body
    assert "args" not in response.json() and "kwargs" not in response.json()


def test_a_public_message_is_shown(alice):
    result = progress_tasks.large_report.apply_async(progress_for=alice)
    assert status(logged_in(alice), result.id).json()["error"] == "Your report is too large; pick fewer months."
    assert "9 GB" not in status(logged_in(alice), result.id).content.decode()


def test_the_tracking_header_survives_retries(alice):
    result = progress_tasks.flaky_report.apply_async((2,), progress_for=alice)
    row = TaskProgress.objects.get(task_id=result.id)
    assert (row.state, row.attempt, row.owner) == ("succeeded", 3, f"user:{alice.pk}")


def test_progress_writes_are_throttled_and_the_last_values_land(alice, settings, django_assert_max_num_queries):
    settings.SAFETYNET = {**settings.SAFETYNET, "PROGRESS_MIN_INTERVAL": 60}
    # 50 progress calls within the interval: the first is written, the rest land once at the end
    with django_assert_max_num_queries(14):
        result = progress_tasks.build_report.apply_async((50,), progress_for=alice)
    row = TaskProgress.objects.get(task_id=result.id)
    assert (row.current, row.message, row.state) == (50.0, "step 50 of 50", "succeeded")


def test_an_untracked_task_reports_for_staff_only(alice):
    result = progress_tasks.untracked_report.apply_async()
    row = TaskProgress.objects.get(task_id=result.id)
    assert (row.owner, row.state, row.current, row.total, row.message) == ("", "succeeded", 10.0, 10.0, "on my own")
    assert status(logged_in(alice), result.id).status_code == 404


def test_a_task_sent_without_progress_for_and_never_reporting_writes_nothing():
    progress_tasks.flaky_report.apply_async((0,))  # reports progress: a row, owned by nobody
    from tests.fixtures import tasks

    tasks.ping.apply_async()
    assert not TaskProgress.objects.filter(task_name="tests.fixtures.tasks.ping").exists()


@pytest.mark.parametrize(("args", "error"), [
    (("many",), TypeError), ((-1,), ValueError), ((5, 2), ValueError), ((1, 2, 3), TypeError), ((True,), TypeError),
])
def test_bad_progress_values_are_refused_clearly(args, error):
    from safetynet.progress.plugin import report

    with pytest.raises(error, match="progress\\(\\)"):
        report(None, *args)  # checked before anything else, even outside a run


def test_progress_for_must_be_a_user_or_an_id():
    from django.contrib.auth.models import AnonymousUser

    with pytest.raises(ValueError, match="logged-in user"):
        progress_tasks.build_report.apply_async((1,), progress_for=AnonymousUser())
    assert progress.owner_of(7) == "user:7"


def test_the_widget_markup(alice):
    html = Template("{% load safetynet_progress %}{% progress_widget task_id %}").render(
        Context({"task_id": 'abc"<x>'}))
    assert 'class="safetynet-progress"' in html and 'data-state="queued"' in html
    assert 'data-url="/tasks/abc%22%3Cx%3E/"' in html and "<x>" not in html
    assert '<progress class="safetynet-progress-bar">' in html and "safetynet/progress.js" in html
    assert "safetynet-progress-done" in html and "safetynet-progress-error" in html
    # the default stylesheet, the result's slot and the reference shown on failure
    assert '<link rel="stylesheet" href="/static/safetynet/progress.css">' in html
    assert '<a class="safetynet-progress-result" hidden></a>' in html
    assert 'class="safetynet-progress-reference" hidden' in html and 'data-unit=""' in html


def test_the_widget_without_its_stylesheet_and_with_a_unit(alice):
    html = Template('{% load safetynet_progress %}{% progress_widget "t1" css=False unit="parts" %}').render(Context())
    assert "progress.css" not in html and 'data-unit="parts"' in html


def test_the_default_stylesheet_weighs_nothing():
    from pathlib import Path

    import safetynet

    import re

    css = re.sub(r"/\*.*?\*/", "", (Path(safetynet.__file__).parent / "static/safetynet/progress.css").read_text(),
                 flags=re.S)
    rules = [line.split("{")[0].strip() for line in css.splitlines() if "{" in line and not line.startswith("@")]
    assert rules and all(rule.startswith(":where(") for rule in rules)  # any project rule overrides it


def test_purge_deletes_old_rows(alice):
    from datetime import datetime, timedelta, timezone

    progress_tasks.build_report.apply_async((1,), progress_for=alice)
    assert progress.purge(datetime.now(tz=timezone.utc) - timedelta(days=1)) == 0
    assert progress.purge(datetime.now(tz=timezone.utc) + timedelta(seconds=1)) == 1


def _age_rows(days: float) -> None:
    from datetime import datetime, timedelta, timezone

    TaskProgress.objects.update(updated_at=datetime.now(tz=timezone.utc) - timedelta(days=days))


def test_purge_defaults_to_progress_keep_seconds(alice, settings):
    settings.SAFETYNET = {**getattr(settings, "SAFETYNET", {}), "PROGRESS_KEEP_SECONDS": 2 * 86_400}
    progress_tasks.build_report.apply_async((1,), progress_for=alice)
    _age_rows(1)
    assert progress.purge() == 0
    _age_rows(3)
    assert progress.purge() == 1
    assert not TaskProgress.objects.exists()


def test_the_purge_command(alice):
    from io import StringIO

    from django.core.management import CommandError, call_command

    progress_tasks.build_report.apply_async((1,), progress_for=alice)
    _age_rows(10)  # older than the default 7 days
    out = StringIO()
    call_command("safetynet", "progress", "purge", "--dry-run", stdout=out)
    assert "would delete 1 progress rows" in out.getvalue() and TaskProgress.objects.count() == 1
    call_command("safetynet", "progress", "purge", "--older-than", "30d", stdout=out)
    assert "Deleted 0 progress rows" in out.getvalue() and TaskProgress.objects.count() == 1
    call_command("safetynet", "progress", "purge", stdout=out)
    assert "Deleted 1 progress rows" in out.getvalue() and not TaskProgress.objects.exists()
    with pytest.raises(CommandError, match="older-than"):
        call_command("safetynet", "progress", "purge", "--older-than", "soon")


def test_worker_housekeeping_purges_progress_and_survives_errors(alice, monkeypatch, caplog):
    from safetynet import stats
    from safetynet.runtime import consumer

    progress_tasks.build_report.apply_async((1,), progress_for=alice)
    _age_rows(10)

    def broken_prune(**_):
        raise RuntimeError("stats table away")

    monkeypatch.setattr(stats, "prune", broken_prune)
    with caplog.at_level("INFO", logger="safetynet"):
        consumer._housekeeping()
    assert not TaskProgress.objects.exists()  # the progress purge ran although the prune failed
    assert "stats prune postponed" in caplog.text


def test_a_replayed_dead_letter_is_shown_to_the_same_user(alice):
    import time
    import uuid

    from safetynet import deadletter

    first = str(uuid.uuid4())
    progress.track(first, "tests.fixtures.progress_tasks.build_report", progress.owner_of(alice))
    assert deadletter.record(deadletter.Failure(
        task_name="tests.fixtures.progress_tasks.build_report", task_id=first, reason="retries_exhausted", args=[2],
        exception=ConnectionError("warehouse down"), failed_at=time.time(), worker="celery@worker-1",
        headers={progress.HEADER: 1}))
    [outcome] = deadletter.replay(DeadLetter.objects.filter(task_id=first), by="ops")
    assert outcome.new_task_id
    replayed = TaskProgress.objects.get(task_id=outcome.new_task_id)
    assert replayed.owner == progress.owner_of(alice)
    answer = status(logged_in(alice), outcome.new_task_id).json()
    assert answer["state"] == "succeeded" and answer["message"] == "step 2 of 2"
    assert status(logged_in(User.objects.create_user("bob")), outcome.new_task_id).status_code == 404
