"""The staff dashboard: who may see it, what each page shows, and its actions (POST, CSRF, permission)."""

import re
import time
import uuid
from datetime import datetime, timedelta, timezone

import pytest
from django.urls import reverse

from safetynet import breakers, stats
from safetynet.models import DeadLetter, ScheduledMessage, TaskStats
from tests.fixtures.dead_letters import SECRET, make_dead_letter, queued_messages
from tests.fixtures.web import logged_in, person

pytestmark = pytest.mark.django_db

PAGES = ["overview", "failures", "dead_letters", "schedule", "breakers"]


def url(name, *args):
    return reverse(f"safetynet_dashboard:{name}", args=args)


def notices(response):
    return [str(message) for message in response.context["notices"]]


def text(response):
    return response.content.decode()


# -- who may see it -----------------------------------------------------------------------

@pytest.mark.parametrize("page", PAGES)
def test_anonymous_visitors_are_sent_to_log_in(client, page):
    response = client.get(url(page))
    assert response.status_code == 302
    assert response["Location"].startswith("/accounts/login/?next=/safetynet/")


@pytest.mark.parametrize("page", PAGES)
def test_a_user_who_is_not_staff_is_refused_even_with_the_permissions(page):
    user = person("shopper", "view_taskstats", "view_deadletter", "view_scheduledmessage", "view_breakerstate",
                  staff=False)
    assert logged_in(user).get(url(page)).status_code == 403


def test_staff_see_only_the_pages_their_permissions_allow():
    client = logged_in(person("support", "view_deadletter"))
    assert client.get(url("overview")).status_code == 403
    assert client.get(url("breakers")).status_code == 403
    response = client.get(url("dead_letters"))
    assert response.status_code == 200
    titles = [item["title"] for item in response.context["navigation"]]
    assert titles == ["Failures", "Dead letters"]


@pytest.mark.parametrize("page", PAGES)
def test_a_superuser_sees_every_page(admin_client_, page):
    response = admin_client_.get(url(page))
    assert response.status_code == 200
    assert response["Cache-Control"].startswith("max-age=0")


def test_an_inactive_staff_user_is_refused():
    user = person("gone", superuser=True)
    client = logged_in(user)
    user.is_active = False
    user.save()
    assert client.get(url("dead_letters")).status_code in (302, 403)


# -- overview -------------------------------------------------------------------------------

@pytest.fixture
def no_stats_yet():
    """Counts other tests of this process left pending are written, then every stats row is gone."""
    stats.flush()
    TaskStats.objects.all().delete()


def test_the_overview_shows_each_task_a_stacked_outcome_chart_and_a_latency_chart(admin_client_, no_stats_yet):
    now = time.time()
    for _ in range(8):
        stats.record("shop.send_mail", "success", runtime=0.2, at=now)
    stats.record("shop.send_mail", "retry", runtime=1.5, at=now)
    stats.record("shop.charge", "dead", runtime=0.1, reason="permanent_error", at=now)
    stats.record("shop.charge", "dead", runtime=0.1, reason="retries_exhausted", at=now)
    stats.flush()

    response = admin_client_.get(url("overview"), {"window": "1h"})
    assert response.status_code == 200
    page = text(response)
    outcomes = re.search(r'<svg class="chart" id="chart-outcomes".*?</svg>', page, re.S).group(0)
    # one column this minute, stacked: 8 succeeded, 1 retried, 2 given up; the rest of the hour is empty
    assert len(re.findall(r'<g class="column"', outcomes)) == 1
    assert re.findall(r'data-series="([a-z ]+)" data-value="(\d+)"', outcomes) == [
        ("succeeded", "8"), ("retried", "1"), ("given up", "2")]
    # axes: gridlines with labelled values, and time labels along the bottom; a legend with each total
    assert len(re.findall(r'<line class="grid"', outcomes)) >= 3
    assert re.search(r'text-anchor="end">(10|12)</text>', outcomes)  # the top of the y-axis, a round number
    assert len(re.findall(r'<text x="[0-9.]+" y="2[0-9.]+" text-anchor="start">\d\d:\d\d</text>', outcomes)) >= 5
    legend = re.search(r'<ul class="legend" id="chart-outcomes-legend">.*?</ul>', page, re.S).group(0)
    assert "succeeded <span class=\"muted\">8</span>" in legend and "given up <span class=\"muted\">2</span>" in legend
    latency = re.search(r'<svg class="chart" id="chart-latency".*?</svg>', page, re.S).group(0)
    assert 'data-series="p50"' in latency and 'data-series="p95"' in latency and "<circle" in latency
    table = re.search(r'<table id="task-table">.*?</table>', page, re.S).group(0)
    assert "shop.send_mail" in table and "shop.charge" in table
    assert "permanent_error" in table and "retries_exhausted" in table
    assert "0.000" not in table and re.search(r">\d+ ms</td>", table)  # human units
    # 8 of the 10 tasks that ended succeeded (the retried one has not ended)
    assert response.context["figures"]["total_success"] == "80 %"


def test_a_given_up_figure_links_to_its_rows_of_every_status(admin_client_, no_stats_yet):
    stats.record("shop.charge", "dead", runtime=0.1, reason="permanent_error")
    stats.flush()
    page = text(admin_client_.get(url("overview"), {"window": "24h"}))
    links = re.findall(r'href="(/safetynet/dead/\?[^"]+)"', page)
    given_up = [link for link in links if "task=%3Dshop.charge" in link]
    assert given_up and all("status=all" in link and "since=" in link and "until=" in link for link in given_up)
    # an hour's column that holds a death links to its dead letters too
    assert re.search(r'<a href="/safetynet/dead/\?status=all&amp;since=', page)


def test_the_overview_of_one_task(admin_client_, no_stats_yet):
    stats.record("shop.a", "success", runtime=0.1)
    stats.record("shop.b", "success", runtime=0.1)
    stats.flush()
    response = admin_client_.get(url("overview"), {"window": "7d", "task": "shop.a"})
    assert [row.task_name for row in response.context["data"].tasks] == ["shop.a"]
    assert len(response.context["data"].points) == 168


def test_a_custom_range_and_its_mistakes(admin_client_, no_stats_yet):
    stats.record("shop.a", "success", runtime=0.1)
    stats.flush()
    now = datetime.now(tz=timezone.utc)
    since = (now - timedelta(minutes=30)).isoformat()
    response = admin_client_.get(url("overview"), {"since": since, "until": now.isoformat()})
    assert response.status_code == 200 and response.context["window"] == "custom"
    assert response.context["data"].step == 60 and len(response.context["data"].points) in (30, 31)
    assert response.context["figures"]["total_runs"] == 1
    for bad in ({"since": "yesterday"}, {"since": now.isoformat(), "until": since},
                {"since": (now - timedelta(days=40)).isoformat()}):
        response = admin_client_.get(url("overview"), bad)
        assert response.status_code == 400 and response.context["window"] == "24h"


def test_the_live_figures_of_the_overview(admin_client_, no_stats_yet):
    stats.record("shop.a", "dead", runtime=0.1, reason="permanent_error")
    stats.flush()
    figures = admin_client_.get(url("live", "overview"), {"window": "1h"}).json()["figures"]
    assert figures["total_runs"] == 1 and figures["total_dead"] == 1 and figures["total_success"] == "0 %"


def test_an_unknown_window_is_refused_with_a_message(admin_client_):
    response = admin_client_.get(url("overview"), {"window": "5y"})
    assert response.status_code == 400
    assert "Unknown window '5y'" in notices(response)[0]
    assert response.context["window"] == "24h"


# -- dead letters ----------------------------------------------------------------------------

def test_the_list_filters_by_reason_task_and_search(admin_client_):
    make_dead_letter("tests.fixtures.tasks.ping", reason="retries_exhausted", exception=ConnectionError("smtp refused"))
    make_dead_letter("tests.fixtures.tasks.ping", reason="permanent_error", exception=ValueError("order 12 is gone"))
    make_dead_letter("tests.fixtures.tasks.other", reason="permanent_error", exception=ValueError("bad sku"))

    def listed(**filters):
        response = admin_client_.get(url("dead_letters"), filters)
        assert response.status_code == 200
        return sorted((row.task_name, row.reason) for row in response.context["rows"])

    assert len(listed()) == 3
    assert listed(reason="permanent_error") == [("tests.fixtures.tasks.other", "permanent_error"),
                                                ("tests.fixtures.tasks.ping", "permanent_error")]
    assert listed(reason="permanent_error", task="tests.fixtures.tasks.ping") == [("tests.fixtures.tasks.ping", "permanent_error")]
    assert listed(task="tests.fixtures.tasks.*") == listed()
    assert listed(q="gone") == [("tests.fixtures.tasks.ping", "permanent_error")]
    assert listed(q="SMTP") == [("tests.fixtures.tasks.ping", "retries_exhausted")]


def test_a_bad_filter_is_reported_and_left_out(admin_client_):
    make_dead_letter()
    response = admin_client_.get(url("dead_letters"), {"reason": "bored", "page": "x"})
    assert response.status_code == 200
    assert len(response.context["rows"]) == 1
    assert any("Filter 'reason' left out" in notice for notice in notices(response))


def test_the_list_shows_dead_rows_by_default_and_every_row_when_asked(admin_client_):
    dead, handled = make_dead_letter(), make_dead_letter()
    handled.status = DeadLetter.Status.DISCARDED
    handled.save()
    assert [row.id for row in admin_client_.get(url("dead_letters")).context["rows"]] == [dead.id]
    every = admin_client_.get(url("dead_letters"), {"status": "all"}).context["rows"]
    assert sorted(row.id for row in every) == sorted([dead.id, handled.id])


def test_the_list_is_paginated_in_the_database(admin_client_, django_assert_max_num_queries):
    for _ in range(55):
        make_dead_letter()
    first = admin_client_.get(url("dead_letters"))
    assert len(first.context["rows"]) == 50
    assert first.context["page_obj"].paginator.count == 55
    assert len(admin_client_.get(url("dead_letters"), {"page": 2}).context["rows"]) == 5
    # session, user, count, page: the list does not load rows one by one
    with django_assert_max_num_queries(6):
        admin_client_.get(url("dead_letters"), {"page": 2})


def test_the_detail_shows_the_timeline_and_never_a_redacted_value(admin_client_):
    row = make_dead_letter(kwargs={"order_id": 7, "card_token": SECRET})
    response = admin_client_.get(url("dead_letter", row.id))
    page = text(response)
    assert response.status_code == 200
    assert SECRET not in page
    assert "[redacted]" in page and "kwargs.card_token" in page
    assert page.count("<tr>") >= 2  # one timeline row an attempt
    assert "ConnectionError" in page and 'id="replay-form"' in page


def test_staff_who_may_only_look_get_no_buttons_and_cannot_post():
    row = make_dead_letter()
    client = logged_in(person("viewer", "view_deadletter"))
    page = text(client.get(url("dead_letter", row.id)))
    assert 'id="replay-form"' not in page
    assert client.post(url("dead_letter_action", row.id, "replay")).status_code == 403
    assert client.post(url("dead_letter_action", row.id, "discard")).status_code == 403
    assert DeadLetter.objects.get(pk=row.pk).status == DeadLetter.Status.DEAD


def test_actions_are_post_only_and_csrf_checked(throwaway_queue):
    row = make_dead_letter(delivery_info={"routing_key": throwaway_queue})
    client = logged_in(person("operator", "view_deadletter", "change_deadletter"), enforce_csrf_checks=True)
    assert client.get(url("dead_letter_action", row.id, "replay")).status_code == 405
    assert client.post(url("dead_letter_action", row.id, "replay")).status_code == 403  # no CSRF token
    assert DeadLetter.objects.get(pk=row.pk).status == DeadLetter.Status.DEAD
    assert queued_messages(throwaway_queue) == []


def test_replay_from_the_detail_page_sends_the_task_and_shows_it(throwaway_queue):
    row = make_dead_letter("tests.fixtures.tasks.ping", delivery_info={"routing_key": throwaway_queue})
    client = logged_in(person("operator", "view_deadletter", "change_deadletter"))
    asked = client.post(url("dead_letter_action", row.id, "replay"))  # the button: a confirmation page first
    assert asked.status_code == 200 and 'id="confirm-form"' in text(asked)
    assert DeadLetter.objects.get(pk=row.pk).status == DeadLetter.Status.DEAD
    assert queued_messages(throwaway_queue) == []
    response = client.post(url("dead_letter_action", row.id, "replay"), {"confirm": "yes"}, follow=True)
    fresh = DeadLetter.objects.get(pk=row.pk)
    assert fresh.status == DeadLetter.Status.REPLAYED
    assert fresh.replayed_by == "operator (dashboard)"
    assert [message["headers"]["id"] for message in queued_messages(throwaway_queue)] == [fresh.replayed_task_id]
    # the message links the letter's page (which follows the new task) and names the new task id
    link = url("dead_letter", row.id)
    assert any(f'<a href="{link}">#{row.id}</a> as <code>{fresh.replayed_task_id}</code>' in notice
               for notice in notices(response))
    page = text(response)
    assert 'class="status status-replayed"' in page and fresh.replayed_task_id in page
    assert 'id="replay-outcome"' in page


def test_a_replay_that_died_again_is_shown_as_such(admin_client_):
    row = make_dead_letter()
    again = make_dead_letter()
    row.status, row.replayed_task_id = DeadLetter.Status.REPLAYED, again.task_id
    row.save()
    response = admin_client_.get(url("dead_letter", row.id))
    assert response.context["replay"] == {"state": "FAILURE", "text": "died again", "dead_letter": str(again.id)}


def test_a_replay_refused_leaves_the_row_and_says_why(admin_client_):
    row = make_dead_letter("tests.fixtures.tasks.no_such_task")
    asked = admin_client_.post(url("dead_letter_action", row.id, "replay"))
    assert "not registered any more" in text(asked)  # the confirmation page says so before anything is tried
    response = admin_client_.post(url("dead_letter_action", row.id, "replay"), {"confirm": "yes"}, follow=True)
    assert DeadLetter.objects.get(pk=row.pk).status == DeadLetter.Status.DEAD
    assert any("Not replayed" in notice for notice in notices(response))


def test_discard_from_the_detail_page(admin_client_):
    row = make_dead_letter()
    asked = admin_client_.post(url("dead_letter_action", row.id, "discard"))
    assert asked.status_code == 200 and DeadLetter.objects.get(pk=row.pk).status == DeadLetter.Status.DEAD
    admin_client_.post(url("dead_letter_action", row.id, "discard"), {"confirm": "yes"})
    fresh = DeadLetter.objects.get(pk=row.pk)
    assert fresh.status == DeadLetter.Status.DISCARDED
    assert fresh.audit[-1]["by"] == "root (dashboard)"
    response = admin_client_.post(url("dead_letter_action", row.id, "discard"), {"confirm": "yes"}, follow=True)
    assert any("already discarded" in notice for notice in notices(response))


def test_an_unknown_action_or_row_is_not_found(admin_client_):
    row = make_dead_letter()
    assert admin_client_.post(f"/safetynet/dead/{row.id}/explode/").status_code == 404
    assert admin_client_.post(url("dead_letter_action", row.id + 1000, "replay")).status_code == 404
    assert admin_client_.get(url("dead_letter", row.id + 1000)).status_code == 404


# -- failures grouped by fingerprint ---------------------------------------------------------

def test_failures_are_grouped_by_fingerprint_with_an_example(admin_client_):
    for number in range(3):
        make_dead_letter("tests.fixtures.tasks.ping", exception=ConnectionError(f"connection {number} refused"))
    make_dead_letter("tests.fixtures.tasks.ping", exception=ValueError("order is gone"))
    response = admin_client_.get(url("failures"))
    groups = response.context["groups"]
    assert [(group["count"], group["exception_type"]) for group in groups] == [(3, "ConnectionError"),
                                                                               (1, "ValueError")]
    assert groups[0]["first_seen"] <= groups[0]["last_seen"]
    assert "Traceback" in groups[0]["example_traceback"]
    assert "traceback</summary>" in text(response)


def test_a_group_is_replayed_or_discarded_whole(admin_client_, throwaway_queue):
    routed = {"delivery_info": {"routing_key": throwaway_queue}}
    alike = [make_dead_letter("tests.fixtures.tasks.ping", exception=ConnectionError(f"refused {n}"), **routed)
             for n in range(3)]
    other = make_dead_letter("tests.fixtures.tasks.ping", exception=ValueError("gone"), **routed)
    fingerprint = alike[0].fingerprint
    asked = admin_client_.post(url("failure_group_action", "replay"), {"fingerprint": fingerprint})
    assert asked.status_code == 200 and "Replay 3 dead letters?" in text(asked)
    assert {row.status for row in DeadLetter.objects.filter(fingerprint=fingerprint)} == {"dead"}
    assert queued_messages(throwaway_queue) == []
    response = admin_client_.post(url("failure_group_action", "replay"), {"fingerprint": fingerprint, "confirm": "yes"},
                                  follow=True)
    assert {row.status for row in DeadLetter.objects.filter(fingerprint=fingerprint)} == {"replayed"}
    assert len(queued_messages(throwaway_queue)) == 3
    assert DeadLetter.objects.get(pk=other.pk).status == "dead"
    assert any(notice.startswith("Replayed 3 dead letters") for notice in notices(response))

    admin_client_.post(url("failure_group_action", "discard"), {"fingerprint": other.fingerprint})
    assert DeadLetter.objects.get(pk=other.pk).status == "dead"
    admin_client_.post(url("failure_group_action", "discard"), {"fingerprint": other.fingerprint, "confirm": "yes"})
    assert DeadLetter.objects.get(pk=other.pk).status == "discarded"
    response = admin_client_.post(url("failure_group_action", "discard"),
                                  {"fingerprint": other.fingerprint, "confirm": "yes"}, follow=True)
    assert any("nothing done" in notice for notice in notices(response))


# -- schedule and breakers -----------------------------------------------------------------------

def _scheduled(key, due_in, kind="retry"):
    now = time.time()
    return ScheduledMessage.objects.create(key=key, kind=kind, task_name="tests.fixtures.tasks.ping", task_id=key,
                                           broker="b", due_at=now + due_in, message="{}", created_at=now,
                                           updated_at=now)


def test_the_schedule_lists_what_waits_soonest_first_and_brings_one_forward(admin_client_):
    later, sooner = _scheduled(f"{uuid.uuid4()}#1", 3600), _scheduled(f"{uuid.uuid4()}", 60, kind="outbox")
    response = admin_client_.get(url("schedule"))
    assert [item["row"].key for item in response.context["rows"]] == [sooner.key, later.key]
    assert response.context["counts"] == {"retry": 1, "outbox": 1}
    assert [item["row"].key for item in admin_client_.get(url("schedule"), {"kind": "retry"}).context["rows"]] \
        == [later.key]
    admin_client_.post(url("schedule_due_now"), {"key": later.key})
    assert ScheduledMessage.objects.get(key=later.key).due_at <= time.time()


def test_breakers_are_shown_and_opened_and_closed_by_hand(admin_client_):
    breakers.force("upstream", breakers.CLOSED)
    response = admin_client_.get(url("breakers"))
    shown = {item["name"]: item for item in response.context["breakers"]}
    assert shown["upstream"]["state"] == "closed"

    admin_client_.post(url("breaker_action", "upstream", "open"), {"seconds": "120"})
    shown = {item["name"]: item for item in admin_client_.get(url("breakers")).context["breakers"]}
    assert shown["upstream"]["state"] == "open"
    assert 100 < shown["upstream"]["half_open_in"] <= 120
    overview = admin_client_.get(url("overview"))
    assert [item["name"] for item in overview.context["breakers"]] == ["upstream"]

    response = admin_client_.post(url("breaker_action", "upstream", "open"), {"seconds": "forever"}, follow=True)
    assert any("seconds must be a number" in notice for notice in notices(response))
    admin_client_.post(url("breaker_action", "upstream", "close"))
    assert breakers.state_of("upstream")["state"] == "closed"
    assert admin_client_.post(url("breaker_action", "nope", "close")).status_code == 404


def test_breaker_actions_need_the_change_permission():
    client = logged_in(person("viewer", "view_breakerstate"))
    assert client.get(url("breakers")).status_code == 200
    assert client.post(url("breaker_action", "upstream", "open")).status_code == 403


def test_odd_input_gets_an_answer_not_a_server_error(admin_client_):
    make_dead_letter("tests.fixtures.tasks.ping")
    for page in ("99999999999999999999", "-3", "x"):
        assert admin_client_.get(url("failures"), {"page": page}).status_code == 200
        assert admin_client_.get(url("dead_letters"), {"page": page}).status_code == 200
    response = admin_client_.get(url("overview"), {"task": "tests.fixtures.tasks.ping\x00"})
    assert response.status_code == 400 and "cannot exist" in response.content.decode()
    assert admin_client_.post(url("schedule_due_now"), {"key": "a\x00b"}).status_code == 404


def test_the_detail_shows_header_values_through_the_message_patterns(admin_client_):
    row = make_dead_letter(headers={"tenant": "acme"})
    DeadLetter.objects.filter(pk=row.pk).update(headers={"x-note": f"card_token={SECRET}", "tenant": "acme"})
    page = text(admin_client_.get(url("dead_letter", row.id)))
    assert SECRET not in page and "acme" in page and "x-note" in page
