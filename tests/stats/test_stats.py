"""The dashboard's aggregates: counted in memory, added to TaskStats in batches, read back per window."""

import threading
import time
from datetime import datetime, timedelta, timezone

import pytest
from django.db import DatabaseError, connection

from safetynet import signals, stats
from safetynet.background import runner
from safetynet.stats import _counting as counting
from safetynet.models import TaskStats
from tests.fixtures import tasks
from tests.fixtures.dead_letters import make_dead_letter, private_spool  # noqa: F401  (a fixture)

NOW = datetime(2026, 12, 4, 15, 30, 20, tzinfo=timezone.utc)
AT = NOW.timestamp()


@pytest.fixture(autouse=True)
def empty(request):
    """Counts left pending by other tests of this process are dropped, and rows that workers of the
    integration tests wrote are gone, so each test counts its own."""
    signals.drain_successes()
    counting._take_pending()
    if "django_db" in request.keywords:
        request.getfixturevalue("django_db_setup")
        TaskStats.objects.all().delete()
    yield
    counting._take_pending()


def rows(period):
    return {row.task_name: row for row in TaskStats.objects.filter(period=period)}


@pytest.mark.django_db
def test_counts_land_in_the_minute_row_and_the_hour_row():
    for _ in range(3):
        stats.record("shop.mail", "success", runtime=0.2, at=AT)
    stats.record("shop.mail", "retry", runtime=1.0, at=AT)
    stats.record("shop.mail", "snooze", at=AT)
    stats.record("shop.mail", "dead", reason="permanent_error", runtime=0.1, at=AT + 60)
    assert stats.flush() == 3  # minutes :30 and :31, and their hour
    minutes = TaskStats.objects.filter(period=60, task_name="shop.mail").order_by("start")
    assert [(row.start.minute, row.runs, row.successes, row.retries, row.snoozes, row.dead) for row in minutes] == [
        (30, 4, 3, 1, 1, 0), (31, 1, 0, 0, 0, 1)]
    hour = rows(3600)["shop.mail"]
    assert hour.start == NOW.replace(minute=0, second=0)
    assert (hour.runs, hour.successes, hour.retries, hour.snoozes, hour.dead) == (5, 3, 1, 1, 1)
    assert hour.dead_by_reason == {"permanent_error": 1}
    assert sum(hour.runtime_buckets) == 5 and hour.runtime_sum == pytest.approx(1.7)
    assert stats.flush() == 0  # nothing pending twice


@pytest.mark.django_db
def test_flushes_add_to_what_is_there():
    stats.record("shop.mail", "success", runtime=0.2, at=AT)
    stats.flush()
    stats.record("shop.mail", "success", runtime=0.2, at=AT)
    stats.record("shop.mail", "dead", reason="crash_loop", at=AT)
    stats.flush()
    minute = rows(60)["shop.mail"]
    assert (minute.successes, minute.dead, minute.dead_by_reason) == (2, 1, {"crash_loop": 1})


@pytest.mark.django_db(transaction=True)
def test_concurrent_flushes_add_up_exactly():
    errors = []

    def work(order):
        try:
            for _ in range(20):
                for n in order:  # several rows, new ones in each flush, as in separate worker processes
                    stats.record(f"shop.mail.{n}", "success", runtime=0.01, at=AT + 60 * (n % 3))
                    stats.record("shop.mail", "success", runtime=0.01, at=AT)
                counting._flush()  # not flush(): past the process's own lock, as separate processes are
        except Exception as error:  # a deadlock between two flushes, say
            errors.append(error)
        finally:
            connection.close()

    # Each thread meets the rows in another order: only sorted inserts and locks keep them from a deadlock.
    threads = [threading.Thread(target=work, args=(list(range(5))[::1 if i % 2 else -1],)) for i in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert errors == []
    stats.flush()
    assert TaskStats.objects.filter(period=60, task_name="shop.mail").get().successes == 600
    assert rows(3600)["shop.mail"].successes == 600
    assert sum(rows(3600)[f"shop.mail.{n}"].successes for n in range(5)) == 600


@pytest.mark.django_db
def test_counts_whose_row_vanished_before_the_lock_are_kept_for_the_next_flush(monkeypatch):
    from django.db.models import Q

    stats.record("shop.mail", "success", runtime=0.2, at=AT)
    original = counting._rows_matching
    monkeypatch.setattr(counting, "_rows_matching", lambda keys: Q(pk__in=[]))  # as if a prune deleted them
    with pytest.raises(counting._RowsVanished):
        stats.flush()
    monkeypatch.setattr(counting, "_rows_matching", original)
    assert stats.flush() == 2
    assert rows(60)["shop.mail"].successes == rows(3600)["shop.mail"].successes == 1


def test_the_first_count_of_a_process_starts_its_flush_job(monkeypatch):
    monkeypatch.setattr(counting, "_flushing_job", False)  # as in a process that has counted nothing yet (a child)
    runner.stop()
    assert not runner.has("stats flush")
    stats.record("shop.mail", "success", runtime=0.2, at=AT)
    assert runner.has("stats flush")
    assert any(thread.name == "safetynet-background" and thread.is_alive() for thread in threading.enumerate())


@pytest.mark.django_db
def test_a_flush_the_database_refuses_keeps_its_counts(monkeypatch):
    stats.record("shop.mail", "success", runtime=0.2, at=AT)
    original = TaskStats.objects.bulk_create

    def refuse(*args, **kwargs):
        raise DatabaseError("the database is away")

    monkeypatch.setattr(TaskStats.objects, "bulk_create", refuse)
    with pytest.raises(DatabaseError):
        stats.flush()
    monkeypatch.setattr(TaskStats.objects, "bulk_create", original)
    stats.record("shop.mail", "success", runtime=0.2, at=AT)
    stats.flush()
    assert rows(60)["shop.mail"].successes == 2


@pytest.mark.django_db
def test_the_overview_window_is_aligned_and_has_a_point_per_step():
    stats.record("shop.mail", "success", runtime=0.2, at=AT)
    stats.record("shop.mail", "success", runtime=0.2, at=AT - 3 * 3600)  # outside 1h, inside 24h
    stats.record("shop.charge", "dead", reason="retries_exhausted", at=AT - 120)
    stats.flush()
    hour = stats.overview(3600, now=NOW)
    assert hour.step == 60 and len(hour.points) == 60
    assert hour.end == NOW.replace(minute=31, second=0) and hour.start == hour.end - timedelta(hours=1)
    assert hour.successes[-1] == 1 and sum(hour.successes) == 1 and hour.dead[-3] == 1
    assert [task.task_name for task in hour.tasks] == ["shop.charge", "shop.mail"]  # as many runs: by name
    assert hour.totals.success_rate == 0.5
    day = stats.overview(86_400, now=NOW)
    assert day.step == 3600 and len(day.points) == 24 and sum(day.successes) == 2
    week = stats.overview(7 * 86_400, now=NOW, task_name="shop.charge")
    assert len(week.points) == 168 and [task.task_name for task in week.tasks] == ["shop.charge"]
    assert week.totals.dead_by_reason == {"retries_exhausted": 1}


@pytest.mark.django_db
def test_percentiles_come_from_the_histogram():
    for index in range(1, 101):  # 10 ms .. 1 s
        stats.record("shop.mail", "success", runtime=index / 100, at=AT)
    stats.flush()
    summary = stats.overview(3600, now=NOW).tasks[0]
    assert summary.p50 == pytest.approx(0.5, rel=0.2)
    assert summary.p95 == pytest.approx(0.95, rel=0.2)
    assert stats.percentile([], 0.5) is None


@pytest.mark.django_db
def test_prune_deletes_only_rows_past_their_keep(settings):
    settings.SAFETYNET = {**settings.SAFETYNET, "STATS_MINUTE_KEEP_SECONDS": 3600, "STATS_HOUR_KEEP_SECONDS": 86_400}
    stats.record("shop.mail", "success", at=AT - 2 * 3600)
    stats.record("shop.mail", "success", at=AT)
    stats.flush()
    assert stats.prune(now=NOW) == 1  # the old minute row; its hour row is kept for a day
    assert TaskStats.objects.filter(period=60).count() == 1
    assert TaskStats.objects.filter(period=3600).count() == 2
    assert stats.prune(now=NOW + timedelta(days=2)) == 3


@pytest.mark.django_db
def test_nothing_is_counted_when_stats_are_off(settings):
    settings.SAFETYNET = {**settings.SAFETYNET, "STATS": False}
    stats.record("shop.mail", "success", at=AT)
    assert stats.flush() == 0


def test_a_bad_outcome_is_refused():
    with pytest.raises(ValueError, match="outcome must be one of"):
        stats.record("shop.mail", "exploded")


@pytest.mark.django_db
def test_real_tasks_are_counted_once_per_outcome():
    tasks.call_api.apply((2,))  # two retries, then a success
    tasks.permanent.apply()  # given up at once
    tasks.snoozer.apply((1,))  # a snooze, then a success
    stats.flush()
    counted = rows(60)
    api, dead, snoozed = counted["tests.fixtures.tasks.call_api"], counted["tests.fixtures.tasks.permanent"], counted["tests.fixtures.tasks.snoozer"]
    assert (api.runs, api.successes, api.retries, api.dead) == (3, 1, 2, 0)
    assert sum(api.runtime_buckets) == 3
    assert (dead.runs, dead.dead, dead.dead_by_reason) == (1, 1, {"permanent_error": 1})
    assert (snoozed.successes, snoozed.snoozes) == (1, 1)


@pytest.mark.django_db
def test_every_death_is_counted_once_whatever_its_reason(private_spool):
    from safetynet import deadletter

    crash = make_dead_letter("tests.fixtures.tasks.ping", reason="crash_loop", failed_at=time.time())
    make_dead_letter("tests.fixtures.tasks.ping", reason="retries_exhausted")
    # The same task given up again (a redelivered message that died again): stored and counted once.
    assert deadletter.give_up(deadletter.Failure(task_name="tests.fixtures.tasks.ping", task_id=crash.task_id,
                                                 reason="crash_loop"), log=False) is None
    stats.flush()
    assert rows(60)["tests.fixtures.tasks.ping"].dead_by_reason == {"crash_loop": 1, "retries_exhausted": 1}


@pytest.mark.django_db
def test_names_only_a_message_gave_are_counted_as_one_unregistered_task(private_spool):
    """Names from the broker (any text: NUL, 10 kB) neither block the flush nor make a row each."""
    from safetynet import deadletter

    for n, reason in enumerate(["unknown_task", "undecodable", "malformed"] * 20):
        deadletter.give_up(deadletter.Failure(task_name=f"garbage\x00{n}" + "x" * 10_000, task_id=f"garbage-{n}",
                                              reason=reason), log=False)
    deadletter.give_up(deadletter.Failure(task_name=tasks.ping.name, task_id="malformed-ping", reason="malformed"),
                       log=False)
    assert stats.flush() == 4  # two names, a minute row and an hour row each
    minute = rows(60)
    assert set(minute) == {stats.UNREGISTERED, tasks.ping.name}
    assert minute[stats.UNREGISTERED].dead_by_reason == {"unknown_task": 20, "undecodable": 20, "malformed": 20}
    assert minute[tasks.ping.name].dead_by_reason == {"malformed": 1}
