"""The dead-letter admin under hostile data: huge rows stay small on screen; actions ask first; replacement arguments."""

import base64
import json

import pytest
from django.urls import reverse

from safetynet.models import DeadLetter
from tests.admin.test_admin import CHANGELIST, act, confirmation_fields, messages_of, state, url, user
from tests.fixtures.dead_letters import HUGE, huge_old_row, make_dead_letter, queued_messages
from tests.fixtures.web import logged_in

pytestmark = pytest.mark.django_db


@pytest.fixture
def operator():
    return logged_in(user("operator", "view", "change"))


def sent(queue):
    return [tuple(json.loads(base64.b64decode(message["body"]))[:2]) for message in queued_messages(queue)]


def test_a_huge_old_row_is_shown_within_the_caps(operator, django_assert_max_num_queries):
    row = huge_old_row()
    listing = operator.get(reverse(CHANGELIST))
    detail = operator.get(url("change", row))
    asked = operator.post(url("replay", row))
    for response in (listing, detail, asked):
        assert response.status_code == 200
        assert len(response.content) < 250_000, len(response.content)
    assert f"{HUGE} characters in all, sha256" in detail.text and f"&quot;bytes&quot;: {HUGE + 2}" in detail.text
    assert "Too large to show here, stored whole" in detail.text
    # the list reads none of the long columns: its page is small whatever the rows hold
    with django_assert_max_num_queries(12):
        operator.get(reverse(CHANGELIST))


def test_a_row_whose_argument_was_cut_replays_with_replacements_from_its_page(operator, throwaway_queue):
    row = make_dead_letter("tests.fixtures.dead_letter_tasks.ok", args=["x" * 100_000],
                           delivery_info={"routing_key": throwaway_queue})
    detail = operator.get(url("change", row)).text
    assert "Cut when stored" in detail and "<code>args[0]</code>" in detail
    asked = operator.post(url("replay", row))
    assert 'id="refusal"' in asked.text and "args[0] were cut when stored" in asked.text
    bad = operator.post(url("replay", row), {"confirm": "yes", "args": '"ab"'})
    assert bad.status_code == 400 and "replacement args must be a list" in bad.text
    assert state(row)[0] == "dead" and queued_messages(throwaway_queue) == []
    done = operator.post(url("replay", row), {"confirm": "yes", "args": "[7]"}, follow=True)
    assert messages_of(done)[0].startswith("Replayed 1 dead letter")
    assert sent(throwaway_queue) == [([7], {})]


def test_the_list_action_names_the_rows_it_refuses_and_how_to_replay_them(operator, throwaway_queue):
    cut = make_dead_letter("tests.fixtures.dead_letter_tasks.ok", args=["x" * 100_000],
                           delivery_info={"routing_key": throwaway_queue})
    messages = messages_of(act(operator, "replay_selected", cut))
    assert messages == [f"Not replayed, left as it was: #{cut.pk}: arguments args[0] were cut when stored (over the "
                        "dead-letter size caps, DEAD_LETTER_MAX_ARGUMENT_BYTES); replay it with replacement args"]
    assert state(cut)[0] == "dead"


def test_select_all_is_confirmed_without_listing_every_id(operator, throwaway_queue):
    rows = [make_dead_letter("tests.fixtures.tasks.ping") for _ in range(3)]
    asked = operator.post(reverse(CHANGELIST), {"action": "discard_selected", "_selected_action": [rows[0].pk],
                                                "index": "0", "select_across": "1"})
    assert asked.status_code == 200 and "Discard 3 dead letters?" in asked.text
    fields = confirmation_fields(asked.text)
    assert fields["select_across"] == ["1"] and len(fields["_selected_action"]) == 1
    assert {state(row)[0] for row in rows} == {"dead"}
    done = operator.post(reverse(CHANGELIST), fields, follow=True)
    assert messages_of(done) == ["Discarded 3 dead letters."]
    assert set(DeadLetter.objects.filter(pk__in=[r.pk for r in rows]).values_list("status", flat=True)) == {"discarded"}


def test_an_odd_fingerprint_is_linked_encoded(operator):
    row = make_dead_letter("tests.fixtures.tasks.ping")
    DeadLetter.objects.filter(pk=row.pk).update(fingerprint="a&status__exact=discarded")
    page = operator.get(url("change", row)).text
    assert "?fingerprint=a%26status__exact%3Ddiscarded" in page
    assert operator.get(reverse(CHANGELIST), {"fingerprint": "a&status__exact=discarded"}).status_code == 200


@pytest.mark.parametrize("query", [{"fingerprint": "a\x00b"}, {"q": "a\x00b"}, {"task_name": "a\x00"}])
def test_a_nul_in_a_filter_or_search_is_an_invalid_lookup_not_a_server_error(operator, query):
    make_dead_letter("tests.fixtures.tasks.ping")
    response = operator.get(reverse(CHANGELIST), query)
    assert response.status_code == 302 and response["Location"].endswith("?e=1")
