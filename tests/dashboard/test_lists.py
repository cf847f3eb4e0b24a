"""The dead-letter list's selection and bulk actions, sorting and filters; the frame; the 403 page; live replay."""

import re

import pytest
from django.urls import reverse

from safetynet.models import DeadLetter
from tests.fixtures.dead_letters import make_dead_letter, private_spool, queued_messages, throwaway_queue  # noqa: F401
from tests.fixtures.web import logged_in, person

pytestmark = pytest.mark.django_db


def url(name, *args):
    return reverse(f"safetynet_dashboard:{name}", args=args)


def listed(client, **filters):
    response = client.get(url("dead_letters"), filters)
    assert response.status_code == 200
    return [row.id for row in response.context["rows"]]


@pytest.fixture
def root():
    return logged_in(person("root", superuser=True))


def test_bulk_replay_asks_with_the_count_then_sends_only_the_ticked_rows(root, throwaway_queue):
    rows = [make_dead_letter(delivery_info={"routing_key": throwaway_queue}) for _ in range(3)]
    ticked = [rows[0].id, rows[2].id]
    asked = root.post(url("bulk_action", "replay"), {"ids": ticked, "back": "/safetynet/dead/?status=dead"})
    page = asked.content.decode()
    assert asked.status_code == 200 and "Replay 2 selected dead letters?" in page and "Yes, replay 2" in page
    assert queued_messages(throwaway_queue) == []  # asking sends nothing
    done = root.post(url("bulk_action", "replay"), {"ids": ticked, "confirm": "yes", "back": "/safetynet/dead/"})
    assert done.status_code == 302 and done["Location"] == "/safetynet/dead/"
    statuses = dict(DeadLetter.objects.values_list("id", "status"))
    assert [statuses[row.id] for row in rows] == ["replayed", "dead", "replayed"]
    assert len(queued_messages(throwaway_queue)) == 2
    message = [str(notice) for notice in root.get("/safetynet/dead/").context["notices"]][0]
    assert message.startswith("Replayed 2 dead letters: ") and f'href="{url("dead_letter", rows[0].id)}"' in message


def test_bulk_discard_asks_first_and_skips_rows_no_longer_waiting(root):
    rows = [make_dead_letter() for _ in range(2)]
    DeadLetter.objects.filter(pk=rows[1].pk).update(status="discarded")
    asked = root.post(url("bulk_action", "discard"), {"ids": [row.id for row in rows]})
    page = asked.content.decode()
    assert "Discard 1 selected dead letter?" in page and "1 of the ticked rows is not waiting any more" in page
    assert DeadLetter.objects.get(pk=rows[0].pk).status == "dead"
    root.post(url("bulk_action", "discard"), {"ids": [rows[0].id], "confirm": "yes"})
    assert DeadLetter.objects.get(pk=rows[0].pk).status == "discarded"


def test_bulk_actions_refuse_nothing_ticked_bad_ids_and_a_foreign_way_back(root):
    response = root.post(url("bulk_action", "replay"), {}, follow=True)
    assert any("Tick the rows" in str(notice) for notice in response.context["notices"])
    response = root.post(url("bulk_action", "replay"), {"ids": ["x"]})
    assert response.status_code == 302
    row = make_dead_letter()
    response = root.post(url("bulk_action", "discard"), {"ids": [row.id], "confirm": "yes",
                                                         "back": "https://evil.example/"})
    assert response["Location"] == url("dead_letters")
    viewer = logged_in(person("viewer", "view_deadletter"))
    assert viewer.post(url("bulk_action", "discard"), {"ids": [row.id]}).status_code == 403


def test_the_list_has_checkboxes_only_for_waiting_rows_and_for_those_who_may_act(root):
    waiting, done = make_dead_letter(), make_dead_letter()
    DeadLetter.objects.filter(pk=done.pk).update(status="replayed")
    page = root.get(url("dead_letters"), {"status": "all"}).content.decode()
    assert re.findall(r'name="ids" value="(\d+)"', page) == [str(waiting.id)]
    assert "data-select-all" in page and 'id="bulk-replay"' in page
    viewer = logged_in(person("viewer", "view_deadletter"))
    assert 'name="ids"' not in viewer.get(url("dead_letters")).content.decode()


def test_the_task_filter_matches_part_of_a_name_a_prefix_or_exactly(root):
    row = make_dead_letter("tests.fixtures.tasks.ping")
    other = make_dead_letter("tests.fixtures.dead_letter_tasks.ok")
    assert listed(root, task="ping") == [row.id]  # part of the name: what people type
    assert listed(root, task="PING") == [row.id]
    assert set(listed(root, task="tests.fixtures.*")) == {row.id, other.id}
    assert listed(root, task="=tests.fixtures.tasks.ping") == [row.id]
    assert listed(root, task="=ping") == []
    page = root.get(url("dead_letters")).content.decode()
    assert '<option value="tests.fixtures.tasks.ping">' in page  # suggested
    assert "import_row finds shop.tasks.import_row" in page  # the hint


def test_sorting_by_a_column_and_back(root):
    first = make_dead_letter("tests.fixtures.tasks.ping", attempts=3)
    second = make_dead_letter("tests.fixtures.dead_letter_tasks.ok", attempts=1)
    assert listed(root) == [second.id, first.id]  # newest first
    assert listed(root, sort="attempts") == [second.id, first.id]
    assert listed(root, sort="-attempts") == [first.id, second.id]
    assert listed(root, sort="task") == [second.id, first.id]
    page = root.get(url("dead_letters"), {"sort": "task"}).content.decode()
    assert 'href="?sort=-task" class="sorted up"' in page
    assert listed(root, sort="nonsense") == [second.id, first.id]  # left out, with a message


def test_the_queue_and_time_filters_and_status_all(root):
    row = make_dead_letter(delivery_info={"routing_key": "imports"})
    make_dead_letter()
    DeadLetter.objects.filter(pk=row.pk).update(queue="imports", status="discarded")
    assert listed(root, queue="imports") == []  # only waiting letters by default
    assert listed(root, queue="imports", status="all") == [row.id]
    since = row.last_failed_at.isoformat()
    assert row.id in listed(root, status="all", since=since)
    assert listed(root, status="all", until=since) == []


def test_the_frame_names_the_user_and_links_the_admin_the_site_and_log_out(root):
    page = root.get(url("failures")).content.decode()
    assert 'id="user-name">root<' in page
    assert f'href="{reverse("admin:index")}">Admin<' in page and 'href="/">Site<' in page
    assert f'action="{reverse("admin:logout")}"' in page and 'id="log-out"' in page
    assert 'name="viewport" content="width=device-width, initial-scale=1"' in page
    assert "prefers-color-scheme: dark" in page and ':root[data-theme="dark"]' in page


def test_someone_without_the_permission_gets_a_page_that_says_why():
    client = logged_in(person("clerk", staff=True))
    response = client.get(url("dead_letters"))
    page = response.content.decode()
    assert response.status_code == 403 and 'id="refused"' in page
    assert "safetynet.view_deadletter" in page and "clerk" in page
    assert response["X-Frame-Options"] == "DENY"
    shopper = logged_in(person("shopper", staff=False))
    assert "which is not a staff account" in shopper.get(url("overview")).content.decode()


def test_the_detail_page_follows_a_replay_through_its_live_endpoint(root, throwaway_queue):
    row = make_dead_letter(delivery_info={"routing_key": throwaway_queue})
    assert root.get(url("dead_letter_live", row.id)).json()["states"] == {"replay": "NONE"}
    root.post(url("dead_letter_action", row.id, "replay"), {"confirm": "yes"})
    page = root.get(url("dead_letter", row.id)).content.decode()
    assert f'data-live="{url("dead_letter_live", row.id)}"' in page
    live = root.get(url("dead_letter_live", row.id)).json()
    assert live["states"]["replay"] == "PENDING" and live["done"] is False
    # the replay dies again: the page's next poll says so, with a link to the new letter
    fresh = DeadLetter.objects.get(pk=row.pk)
    again = make_dead_letter()
    DeadLetter.objects.filter(pk=again.pk).update(task_id=fresh.replayed_task_id)
    live = root.get(url("dead_letter_live", row.id)).json()
    assert live["states"]["replay"] == "FAILURE" and live["done"] is True
    assert live["links"]["replay-dead-letter"]["url"] == url("dead_letter", again.id)


def test_an_alike_count_does_not_count_the_letter_itself(root):
    row = make_dead_letter()
    assert "no other alike" in root.get(url("dead_letter", row.id)).content.decode()
    make_dead_letter()
    assert "1 other alike" in root.get(url("dead_letter", row.id)).content.decode()
