"""The dashboard under hostile data: huge rows, odd fingerprints and keys, no framing, no script, confirmed actions."""

import base64
import json
import re
import time

import pytest
from django.urls import reverse

from safetynet import deadletter
from safetynet.models import DeadLetter, ScheduledMessage
from tests.fixtures.dead_letters import HUGE, huge_old_row, make_dead_letter, queued_messages
from tests.fixtures.web import logged_in, person

pytestmark = pytest.mark.django_db


def url(name, *args):
    return reverse(f"safetynet_dashboard:{name}", args=args)


def notices(response):
    return [str(message) for message in response.context["notices"]]


def sent(queue):
    """The (args, kwargs) of each message waiting in ``queue``."""
    return [tuple(json.loads(base64.b64decode(message["body"]))[:2]) for message in queued_messages(queue)]


# -- headers: no framing, no script, the page's own stylesheet only -----------------------------------

def _pages(client):
    row = make_dead_letter("tests.fixtures.tasks.ping")
    for name in ("overview", "queues", "failures", "dead_letters", "schedule", "breakers"):
        yield name, client.get(url(name))
    yield "dead_letter", client.get(url("dead_letter", row.id))
    yield "confirm replay", client.post(url("dead_letter_action", row.id, "replay"))
    yield "confirm group", client.post(url("failure_group_action", "discard"), {"fingerprint": row.fingerprint})


def test_every_page_carries_its_own_security_headers_and_needs_no_inline_script(admin_client_):
    for name, response in _pages(admin_client_):
        assert response.status_code == 200, name
        page = response.content.decode()
        assert response["X-Frame-Options"] == "DENY", name
        assert response["X-Content-Type-Options"] == "nosniff" and response["Referrer-Policy"] == "same-origin"
        policy = response["Content-Security-Policy"]
        nonce = re.search(r"style-src 'nonce-([A-Za-z0-9_-]+)'", policy)[1]
        assert "default-src 'none'" in policy and "frame-ancestors 'none'" in policy
        # scripts only by the same nonce (the dashboard's one file); fetches only to this site
        assert f"script-src 'nonce-{nonce}'" in policy and "connect-src 'self'" in policy and "unsafe" not in policy
        # the one stylesheet and the one script carry the nonce; nothing the policy would block is on the page
        assert re.findall(r"<style[^>]*>", page) == [f'<style nonce="{nonce}">'], name
        assert re.findall(r"<script[^>]*>", page) == [
            f'<script nonce="{nonce}" src="/static/safetynet/dashboard.js">'], name
        assert "</script>" in page and not re.search(r"<script[^>]*>[^<]", page), name  # no inline code
        assert not re.search(r"\son[a-z]+=", page) and ' style="' not in page, name


def test_a_new_nonce_for_every_response(admin_client_):
    first, second = (admin_client_.get(url("failures"))["Content-Security-Policy"] for _ in range(2))
    assert first != second


def test_a_redirect_to_log_in_is_not_framed_either(client):
    response = client.get(url("dead_letters"))
    assert response.status_code == 302 and response["X-Frame-Options"] == "DENY"


# -- confirmation: the button asks, only the confirmation acts, a GET never does ---------------------------

def test_a_get_never_acts_and_the_first_post_only_asks(admin_client_, throwaway_queue):
    row = make_dead_letter("tests.fixtures.tasks.ping", delivery_info={"routing_key": throwaway_queue})
    for action in ("replay", "discard"):
        assert admin_client_.get(url("dead_letter_action", row.id, action)).status_code == 405
        assert admin_client_.get(url("failure_group_action", action), {"fingerprint": row.fingerprint}).status_code == 405
        asked = admin_client_.post(url("dead_letter_action", row.id, action))
        assert asked.status_code == 200 and f"{action.capitalize()} dead letter #{row.id}?" in asked.content.decode()
        group = admin_client_.post(url("failure_group_action", action), {"fingerprint": row.fingerprint})
        assert group.status_code == 200 and "confirm-form" in group.content.decode()
        assert admin_client_.post(url("dead_letter_action", row.id, action), {"confirm": "no"}).status_code == 200
    assert DeadLetter.objects.get(pk=row.pk).status == "dead" and queued_messages(throwaway_queue) == []


def test_the_confirmation_needs_the_csrf_token(throwaway_queue):
    row = make_dead_letter("tests.fixtures.tasks.ping", delivery_info={"routing_key": throwaway_queue})
    client = logged_in(person("operator", "view_deadletter", "change_deadletter"), enforce_csrf_checks=True)
    assert client.post(url("dead_letter_action", row.id, "replay"), {"confirm": "yes"}).status_code == 403
    assert client.post(url("failure_group_action", "replay"),
                       {"fingerprint": row.fingerprint, "confirm": "yes"}).status_code == 403
    assert DeadLetter.objects.get(pk=row.pk).status == "dead" and queued_messages(throwaway_queue) == []


# -- replacement arguments --------------------------------------------------------------------------

def test_a_row_whose_argument_was_cut_says_why_and_replays_with_replacements(admin_client_, throwaway_queue):
    row = make_dead_letter("tests.fixtures.dead_letter_tasks.ok", args=["x" * 100_000],
                           delivery_info={"routing_key": throwaway_queue})
    detail = admin_client_.get(url("dead_letter", row.id)).content.decode()
    assert "Cut when stored" in detail and "<code>args[0]</code>" in detail and "__safetynet_truncated__" in detail
    asked = admin_client_.post(url("dead_letter_action", row.id, "replay")).content.decode()
    assert 'id="refusal"' in asked and "args[0] were cut when stored" in asked
    refused = admin_client_.post(url("dead_letter_action", row.id, "replay"), {"confirm": "yes"}, follow=True)
    assert any("were cut when stored" in notice for notice in notices(refused))
    assert DeadLetter.objects.get(pk=row.pk).status == "dead" and queued_messages(throwaway_queue) == []

    done = admin_client_.post(url("dead_letter_action", row.id, "replay"), {"confirm": "yes", "args": "[5]"},
                              follow=True)
    assert any(notice.startswith("Replayed 1 dead letter") for notice in notices(done))
    assert sent(throwaway_queue) == [([5], {})]
    assert DeadLetter.objects.get(pk=row.pk).audit[-1]["edited"] == {"args": [5], "kwargs": None}


@pytest.mark.parametrize(("field", "text", "error"), [
    ("args", '"ab"', "replacement args must be a list (or tuple) of positional arguments, got str"),
    ("args", "[1,", "not JSON"),
    ("kwargs", "[1, 2]", "replacement kwargs must be a dict of keyword arguments, got list"),
    ("args", '[{"__safetynet_truncated__": true, "bytes": 1, "sha256": "x", "head": "y"}]',
     "is a marker of a value cut when stored, not a value"),
])
def test_bad_replacement_arguments_are_shown_on_the_form_and_nothing_is_sent(admin_client_, throwaway_queue, field,
                                                                            text, error):
    row = make_dead_letter("tests.fixtures.dead_letter_tasks.ok", args=[1], delivery_info={"routing_key": throwaway_queue})
    response = admin_client_.post(url("dead_letter_action", row.id, "replay"), {"confirm": "yes", field: text})
    assert response.status_code == 400
    assert error in response.content.decode().replace("&#x27;", "'").replace("&quot;", '"')
    assert DeadLetter.objects.get(pk=row.pk).status == "dead" and queued_messages(throwaway_queue) == []


# -- odd data: no 500 ------------------------------------------------------------------------------

@pytest.mark.parametrize("fingerprint", ["", "not/hex?&x=1#y", "ünïcode ✓", "x" * 40, "%2F..%2F"])
def test_a_fingerprint_that_is_not_hex_keeps_its_page_and_buttons(admin_client_, fingerprint):
    row = make_dead_letter("tests.fixtures.tasks.ping")
    DeadLetter.objects.filter(pk=row.pk).update(fingerprint=fingerprint)
    failures = admin_client_.get(url("failures"))
    assert failures.status_code == 200
    page = failures.content.decode()
    assert 'name="fingerprint" value="' in page
    listed = admin_client_.get(url("dead_letters"), {"fingerprint": fingerprint, "status": "all"})
    assert [item.id for item in listed.context["rows"]] == [row.id]
    assert admin_client_.get(url("dead_letter", row.id)).status_code == 200
    asked = admin_client_.post(url("failure_group_action", "discard"), {"fingerprint": fingerprint})
    assert asked.status_code == 200
    admin_client_.post(url("failure_group_action", "discard"), {"fingerprint": fingerprint, "confirm": "yes"})
    assert DeadLetter.objects.get(pk=row.pk).status == "discarded"


def test_the_failures_link_encodes_the_fingerprint(admin_client_):
    row = make_dead_letter("tests.fixtures.tasks.ping")
    DeadLetter.objects.filter(pk=row.pk).update(fingerprint="a&status=discarded")
    deadletter.rebuild_failure_groups()  # changed by hand: the failures page's summary is told
    page = admin_client_.get(url("failures")).content.decode()
    assert "?fingerprint=a%26status%3Ddiscarded" in page


def test_a_schedule_row_with_an_odd_key_keeps_its_button(admin_client_):
    now = time.time()
    for key in ("", "a/b c?&d"):
        ScheduledMessage.objects.create(key=key, kind="retry", task_name="tests.fixtures.tasks.ping", task_id=key,
                                        broker="b", due_at=now + 3600, message="{}", created_at=now, updated_at=now)
    assert admin_client_.get(url("schedule")).status_code == 200
    admin_client_.post(url("schedule_due_now"), {"key": "a/b c?&d"})
    assert ScheduledMessage.objects.get(key="a/b c?&d").due_at <= time.time()
    assert admin_client_.post(url("schedule_due_now"), {}).status_code == 404


def test_an_id_too_large_for_the_database_is_not_found(admin_client_):
    for path in ("/safetynet/dead/99999999999999999999/", "/safetynet/dead/99999999999999999999/replay/"):
        response = admin_client_.get(path) if "replay" not in path else admin_client_.post(path)
        assert response.status_code == 404


# -- huge rows: nothing larger than the cap of one field -------------------------------------------------

def test_a_huge_old_row_is_shown_within_the_caps(admin_client_):
    row = huge_old_row()
    pages = {
        "detail": admin_client_.get(url("dead_letter", row.id)),
        "confirm": admin_client_.post(url("dead_letter_action", row.id, "replay")),
        "list": admin_client_.get(url("dead_letters")),
        "failures": admin_client_.get(url("failures")),
        "group": admin_client_.post(url("failure_group_action", "replay"), {"fingerprint": row.fingerprint}),
    }
    for name, response in pages.items():
        assert response.status_code == 200, name
        assert len(response.content) < 250_000, (name, len(response.content))
    detail = pages["detail"].content.decode()
    assert f"{HUGE} characters in all, sha256" in detail  # the message, cut with its size and hash
    assert f"&quot;bytes&quot;: {HUGE + 2}" in detail  # the argument, as a marker
    # stored whole (an old row): shown cut, and replayable as it is
    assert "Too large to show here, stored whole" in detail and "Cut when stored" not in detail
    assert "<code>args[0]</code>" in detail and "<code>headers.blob</code>" in detail
    assert "ValueError: m" in detail  # a traceback keeps its end
    assert "characters in all; the rest is not shown here" in pages["failures"].content.decode()
    assert 'id="refusal"' not in pages["confirm"].content.decode()


@pytest.mark.parametrize("query", [{"fingerprint": "a\x00b"}, {"q": "a\x00b"}, {"task": "a\x00"}])
def test_a_nul_in_a_filter_is_reported_not_a_server_error(admin_client_, query):
    make_dead_letter("tests.fixtures.tasks.ping")
    response = admin_client_.get(url("dead_letters"), query)
    assert response.status_code == 200 and any("left out" in notice for notice in notices(response))
    asked = admin_client_.post(url("failure_group_action", "replay"), {"fingerprint": "a\x00"}, follow=True)
    assert asked.status_code == 200 and any("a fingerprint is needed" in notice for notice in notices(asked))
