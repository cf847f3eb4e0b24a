"""The dead-letter admin: read-only rows; replay and discard for staff with the change permission."""

import re
import time

import pytest
from django.contrib.admin.models import LogEntry
from django.contrib.auth.models import User
from django.test import Client
from django.urls import reverse

from safetynet.protocol import headers as header_names
from safetynet import deadletter
from safetynet.models import DeadLetter
from tests.fixtures.dead_letters import SECRET, make_dead_letter, queued_messages
from tests.fixtures.web import logged_in, person

pytestmark = pytest.mark.django_db

CHANGELIST = "admin:safetynet_deadletter_changelist"


def url(name, row=None):
    return reverse(f"admin:safetynet_deadletter_{name}", args=[row.pk] if row is not None else [])


def user(name, *permissions, staff=True):
    """A user with these permissions on dead letters (``view``, ``change``, ``delete``)."""
    return person(name, *(f"{p}_deadletter" for p in permissions), staff=staff)


@pytest.fixture
def operator():
    """Staff with view and change permissions: may look, replay and discard."""
    return logged_in(user("operator", "view", "change"))


@pytest.fixture
def row(throwaway_queue):
    """A dead ping that died on the throwaway queue, so a replay is published there."""
    return make_dead_letter("tests.fixtures.tasks.ping", delivery_info={"routing_key": throwaway_queue},
                            headers={"tenant": "acme"})


def state(row):
    fresh = DeadLetter.objects.get(pk=row.pk)
    return fresh.status, fresh.replay_count, fresh.replayed_task_id, fresh.audit


def messages_of(response):
    return [str(message) for message in response.context["messages"]]


def confirmation_fields(page):
    """The fields the confirmation page's form posts (as a browser would send them)."""
    form = page[page.index('id="confirm-form"'):]
    form = form[:form.index("</form>")]
    fields = {}
    for name, value in re.findall(r'<input type="hidden" name="([^"]+)" value="([^"]*)"', form):
        fields.setdefault(name, []).append(value)
    return fields


def act(client, action, *rows):
    """A list action, confirmed: the first POST only asks (nothing changes), the page's form acts.

    A first POST that is refused (no permission) is returned as it is, for the caller to check.
    """
    before = {row.pk: state(row) for row in rows}
    asked = client.post(reverse(CHANGELIST), {"action": action, "_selected_action": [r.pk for r in rows],
                                              "index": "0", "select_across": "0"}, follow=True)
    if "Are you sure?" not in asked.text:
        return asked
    assert asked.status_code == 200 and not asked.redirect_chain
    assert {row.pk: state(row) for row in rows} == before
    return client.post(reverse(CHANGELIST), confirmation_fields(asked.text), follow=True)


def press(client, button, row, **fields):
    """A detail-page button, confirmed: its POST shows a confirmation page; the page's form acts."""
    before = state(row)
    asked = client.post(url(button, row))
    assert asked.status_code == 200 and 'id="confirm-form"' in asked.text
    assert state(row) == before
    return client.post(url(button, row), {"confirm": "yes", **fields}, follow=True)


# -- who may do what -------------------------------------------------------------------

def test_anonymous_is_sent_to_the_login_page(row):
    client = Client()
    before = state(row)
    for response in (client.get(reverse(CHANGELIST)), client.get(url("change", row)),
                     client.post(url("replay", row)), client.post(url("discard", row))):
        assert response.status_code == 302 and response["Location"].startswith(reverse("admin:login"))
    assert state(row) == before


def test_a_user_who_is_not_staff_is_refused_even_with_the_permissions(row):
    client = logged_in(user("customer", "view", "change", "delete", staff=False))
    before = state(row)
    for response in (client.get(reverse(CHANGELIST)), client.post(url("replay", row)),
                     client.post(url("discard", row)), act(client, "replay_selected", row)):
        assert response.status_code == 302 or response.redirect_chain[-1][0].startswith(reverse("admin:login"))
    assert state(row) == before


def test_staff_without_the_model_permissions_is_refused(row):
    client = logged_in(user("intern"))
    before = state(row)
    assert client.get(reverse(CHANGELIST)).status_code == 403
    assert client.get(url("change", row)).status_code == 403
    assert client.post(url("replay", row)).status_code == 403
    assert client.post(url("discard", row)).status_code == 403
    assert act(client, "replay_selected", row).status_code == 403
    assert state(row) == before


def test_view_permission_shows_rows_but_cannot_replay_or_discard(row, throwaway_queue):
    client = logged_in(user("auditor", "view"))
    before = state(row)
    listing = client.get(reverse(CHANGELIST))
    assert listing.status_code == 200 and "tests.fixtures.tasks.ping" in listing.text
    assert "replay_selected" not in listing.text and "discard_selected" not in listing.text
    detail = client.get(url("change", row))
    assert detail.status_code == 200 and url("replay", row) not in detail.text
    assert client.post(url("replay", row)).status_code == 403
    assert client.post(url("discard", row)).status_code == 403
    response = act(client, "replay_selected", row)  # not offered to them: the post does nothing
    assert response.status_code == 200 and messages_of(response) == []
    assert state(row) == before and queued_messages(throwaway_queue) == []


def test_rows_are_read_only(row, operator):
    assert operator.get(url("add")).status_code == 403
    detail = operator.get(url("change", row))
    assert 'name="_save"' not in detail.text and 'name="task_name"' not in detail.text
    before = state(row)
    assert operator.post(url("change", row), {"status": "discarded", "task_name": "x"}).status_code == 403
    assert state(row) == before


def test_delete_needs_the_delete_permission(row, operator):
    assert operator.get(url("delete", row)).status_code == 403
    deleter = logged_in(user("janitor", "view", "delete"))
    assert deleter.post(url("delete", row), {"post": "yes"}).status_code == 302
    assert not DeadLetter.objects.filter(pk=row.pk).exists()


def test_the_buttons_only_take_post(row, operator):
    before = state(row)
    assert operator.get(url("replay", row)).status_code == 405
    assert operator.get(url("discard", row)).status_code == 405
    assert state(row) == before


def test_a_post_without_the_csrf_token_is_rejected(row, throwaway_queue):
    client = logged_in(user("operator", "view", "change"), enforce_csrf_checks=True)
    before = state(row)
    assert client.post(url("replay", row)).status_code == 403
    assert client.post(url("discard", row)).status_code == 403
    assert state(row) == before and queued_messages(throwaway_queue) == []
    # With the token from the detail page's form, the same button asks to confirm; the confirmation needs it too.
    page = client.get(url("change", row)).text
    replay_form = page[page.index(f'action="{url("replay", row)}"'):]
    token = re.search(r'name="csrfmiddlewaretoken" value="([^"]+)"', replay_form)[1]
    asked = client.post(url("replay", row), {"csrfmiddlewaretoken": token})
    assert asked.status_code == 200 and state(row) == before
    assert client.post(url("replay", row), {"confirm": "yes"}).status_code == 403
    assert state(row) == before
    assert client.post(url("replay", row), {"csrfmiddlewaretoken": token, "confirm": "yes"}).status_code == 302
    assert state(row)[0] == "replayed"


# -- the list --------------------------------------------------------------------------

def test_the_list_shows_the_columns(row, operator):
    deadletter.discard(make_dead_letter("shop.tasks.charge", exception=ValueError("declined")), by="x")
    response = operator.get(reverse(CHANGELIST))
    assert response.status_code == 200
    headers = re.findall(r'<th scope="col" class="[^"]*column-(\w+)', response.text)
    assert headers == ["id", "task_name", "reason", "status", "attempts", "exception_type", "last_failed_at",
                       "replay_count"]
    assert "tests.fixtures.tasks.ping" in response.text and "shop.tasks.charge" in response.text
    assert "retries exhausted" in response.text and "ConnectionError" in response.text
    # the date hierarchy on last_failed_at (Django 6.1 gives its <nav> an aria-labelledby)
    assert re.search(r'<nav class="toplinks"[ >]', response.text)
    assert all(f"By {name}" in response.text for name in ("task name", "reason", "status", "fingerprint"))


def ids_listed(client, **query):
    response = client.get(reverse(CHANGELIST), query)
    assert response.status_code == 200
    return sorted(obj.pk for obj in response.context["cl"].result_list)


def test_filters_and_search(operator, throwaway_queue):
    ping = make_dead_letter("tests.fixtures.tasks.ping", failed_at=time.time() - 40 * 86400)
    charge = make_dead_letter("shop.tasks.charge", reason="permanent_error", exception=ValueError("card declined"))
    charge_again = make_dead_letter("shop.tasks.charge", reason="permanent_error",
                                    exception=ValueError("card declined"))
    deadletter.discard(charge_again, by="x")
    assert ids_listed(operator) == sorted([ping.pk, charge.pk, charge_again.pk])
    assert ids_listed(operator, task_name="shop.tasks.charge") == sorted([charge.pk, charge_again.pk])
    assert ids_listed(operator, reason="retries_exhausted") == [ping.pk]
    assert ids_listed(operator, status__exact="discarded") == [charge_again.pk]
    assert ids_listed(operator, fingerprint=charge.fingerprint) == sorted([charge.pk, charge_again.pk])
    assert ids_listed(operator, q="declined") == sorted([charge.pk, charge_again.pk])
    assert ids_listed(operator, q=ping.task_id) == [ping.pk]
    assert ids_listed(operator, q="ValueError") == sorted([charge.pk, charge_again.pk])
    assert ids_listed(operator, q=charge.fingerprint) == sorted([charge.pk, charge_again.pk])
    failed = charge.last_failed_at
    assert ping.pk not in ids_listed(operator, last_failed_at__year=failed.year, last_failed_at__month=failed.month,
                                     last_failed_at__day=failed.day)


def test_the_fingerprint_filter_lists_the_top_fingerprints_with_counts(operator):
    charge = [make_dead_letter("shop.tasks.charge", exception=ValueError(f"card {n} declined")) for n in range(3)]
    make_dead_letter("tests.fixtures.tasks.ping")
    response = operator.get(reverse(CHANGELIST))
    [spec] = [spec for spec in response.context["cl"].filter_specs if getattr(spec, "parameter_name", "") == "fingerprint"]
    choices = {value: label for value, label in spec.lookup_choices}
    assert choices[charge[0].fingerprint] == f"ValueError in charge (3) · {charge[0].fingerprint[:8]}"
    assert list(choices)[0] == charge[0].fingerprint  # the most frequent first
    assert "ValueError in charge (3)" in response.text


# -- the detail page -------------------------------------------------------------------

def test_the_detail_page_shows_the_timeline_traceback_arguments_and_audit(operator, throwaway_queue):
    row = make_dead_letter("tests.fixtures.tasks.send_digest", args=["ops@example.com"], kwargs={"batch": 7, "password": "pw"},
                           attempts=3, headers={"tenant": "acme"}, delivery_info={"routing_key": throwaway_queue})
    deadletter.discard(row, by="carol")
    page = operator.get(url("change", row)).text
    timeline = page[page.index('class="safetynet-timeline"'):]
    timeline = timeline[:timeline.index("</table>")]
    for header in ("attempt", "started", "duration", "exception", "message", "action", "delay", "reason", "worker"):
        assert f"<th>{header}</th>" in timeline
    assert timeline.count("<details><summary>traceback of attempt") == 3
    assert "line 41, in charge" in timeline and "line 43, in charge" in timeline
    assert "250 ms" in timeline and ">2 s<" in timeline and "DEFAULT_RETRY_ON is_network_error" in timeline
    started = row.history[0]["started"]
    from datetime import datetime, timezone as tz
    from django.utils import timezone

    local = timezone.localtime(datetime.fromtimestamp(started, tz=tz.utc))
    assert local.strftime("%Y-%m-%d %H:%M:%S") in timeline
    assert '<pre class="safetynet-traceback">Traceback (most recent call last):' in page
    assert "ConnectionError: connection refused (attempt 3)" in page
    assert "&quot;ops@example.com&quot;" in page and "&quot;batch&quot;: 7" in page  # pretty JSON, escaped
    assert "Redacted when stored" in page and "<code>kwargs.password</code>" in page
    assert "&quot;tenant&quot;: &quot;acme&quot;" in page
    audit = page[page.index('class="safetynet-audit"'):]
    assert "<td>dead</td>" in audit and "<td>discard</td>" in audit and "<td>carol</td>" in audit
    assert f"?fingerprint={row.fingerprint}" in page and "1 alike failure<" in page


def test_the_detail_page_of_a_replay_links_to_its_origin(operator, row):
    copy = make_dead_letter("tests.fixtures.tasks.ping", headers={header_names.REPLAY_OF: str(row.pk)})
    page = operator.get(url("change", copy)).text
    assert f'this task was a replay of <a href="{url("change", row)}">#{row.pk}</a>' in page


# -- replay and discard ----------------------------------------------------------------

def test_replay_selected(operator, row, throwaway_queue):
    second = make_dead_letter("tests.fixtures.tasks.ping", delivery_info={"routing_key": throwaway_queue})
    response = act(operator, "replay_selected", row, second)
    [message] = messages_of(response)
    assert message.startswith("Replayed 2 dead letters: ")
    for item in (row, second):
        item.refresh_from_db()
        assert item.status == "replayed" and item.replay_count == 1 and item.replayed_task_id
        assert item.audit[-1]["action"] == "replay" and item.audit[-1]["by"] == "operator"
        assert item.replayed_by == "operator" and f"#{item.pk} as {item.replayed_task_id}" in message
    sent = {m["headers"]["id"]: m["headers"] for m in queued_messages(throwaway_queue)}
    assert set(sent) == {row.replayed_task_id, second.replayed_task_id}
    assert sent[row.replayed_task_id]["tenant"] == "acme"
    assert LogEntry.objects.filter(object_id=str(row.pk), change_message__startswith="Replayed as task").exists()


def test_replay_selected_reports_each_refusal_and_leaves_those_rows(operator, row, throwaway_queue):
    gone = make_dead_letter("tests.fixtures.tasks.renamed_long_ago", delivery_info={"routing_key": throwaway_queue})
    secret = make_dead_letter("tests.fixtures.tasks.ping", kwargs={"card_token": SECRET},
                              delivery_info={"routing_key": throwaway_queue})
    before = {item.pk: state(item) for item in (gone, secret)}
    messages = messages_of(act(operator, "replay_selected", row, gone, secret))
    assert messages[0].startswith("Replayed 1 dead letter: ")
    assert (f"Not replayed, left as it was: #{gone.pk}: task 'tests.fixtures.tasks.renamed_long_ago' is not registered any "
            "more; the row is left as it was") in messages
    assert (f"Not replayed, left as it was: #{secret.pk}: arguments kwargs.card_token were redacted when stored; "
            "replay it with replacement args/kwargs") in messages
    assert {item.pk: state(item) for item in (gone, secret)} == before
    assert len(queued_messages(throwaway_queue)) == 1


def test_replay_button(operator, row, throwaway_queue):
    page = operator.get(url("change", row)).text
    assert f'action="{url("replay", row)}"' in page and f'action="{url("discard", row)}"' in page
    response = press(operator, "replay", row)
    assert response.redirect_chain == [(url("change", row), 302)]
    row.refresh_from_db()
    assert row.status == "replayed" and row.replay_count == 1 and row.audit[-1]["by"] == "operator"
    assert messages_of(response) == [f"Replayed 1 dead letter: #{row.pk} as {row.replayed_task_id}."]
    assert url("replay", row) not in response.text  # only dead rows have the buttons
    [message] = queued_messages(throwaway_queue)
    assert message["headers"]["id"] == row.replayed_task_id
    # Confirming it again (an old tab): refused, and said so.
    again = operator.post(url("replay", row), {"confirm": "yes"}, follow=True)
    assert messages_of(again) == [f"Not replayed, left as it was: #{row.pk}: status is replayed, not dead"]
    assert DeadLetter.objects.get(pk=row.pk).replay_count == 1


def test_replay_button_of_an_unregistered_task(operator, throwaway_queue):
    gone = make_dead_letter("tests.fixtures.tasks.renamed_long_ago", delivery_info={"routing_key": throwaway_queue})
    before = state(gone)
    asked = operator.post(url("replay", gone))
    assert "it would be refused: task &#x27;tests.fixtures.tasks.renamed_long_ago&#x27; is not registered" in asked.text
    response = operator.post(url("replay", gone), {"confirm": "yes"}, follow=True)
    assert messages_of(response) == [
        f"Not replayed, left as it was: #{gone.pk}: task 'tests.fixtures.tasks.renamed_long_ago' is not registered any more; "
        "the row is left as it was"]
    assert state(gone) == before


def test_discard_selected_and_button(operator, row, throwaway_queue):
    second = make_dead_letter("tests.fixtures.tasks.ping")
    messages = messages_of(act(operator, "discard_selected", second))
    assert messages == ["Discarded 1 dead letter."]
    second.refresh_from_db()
    assert second.status == "discarded" and second.audit[-1] == {**second.audit[-1], "action": "discard",
                                                                 "by": "operator"}
    response = press(operator, "discard", row)
    assert messages_of(response) == ["Discarded 1 dead letter."]
    row.refresh_from_db()
    assert row.status == "discarded" and row.replay_count == 0
    assert queued_messages(throwaway_queue) == []
    messages = messages_of(act(operator, "discard_selected", row))
    assert messages == [f"Not discarded, already handled: #{row.pk}."]


def test_unknown_id_on_a_button(operator):
    response = operator.post(reverse("admin:safetynet_deadletter_replay", args=[987654]), follow=True)
    assert response.status_code == 200 and "doesn’t exist" in " ".join(messages_of(response))


# -- secrets ---------------------------------------------------------------------------

def test_a_redacted_kwarg_is_never_shown(operator, throwaway_queue):
    row = make_dead_letter("tests.fixtures.tasks.ping", kwargs={"card_token": SECRET},
                           exception=ValueError(f"declined: card_token={SECRET}"),
                           headers={"authorization": f"Bearer {SECRET}", "tenant": "acme"},
                           delivery_info={"routing_key": throwaway_queue})
    assert DeadLetter.objects.filter(kwargs__card_token=SECRET).count() == 0
    listing = operator.get(reverse(CHANGELIST))
    detail = operator.get(url("change", row))
    assert "tests.fixtures.tasks.ping" in listing.text and "acme" in detail.text
    for response in (listing, detail):
        assert response.status_code == 200 and SECRET not in response.text
    assert ids_listed(operator, q=SECRET) == []  # not even searchable: the value is not stored
    assert "<code>kwargs.card_token</code>" in detail.text


def test_header_values_are_shown_through_the_message_patterns(operator):
    row = make_dead_letter("tests.fixtures.tasks.ping", headers={"tenant": "acme"})
    DeadLetter.objects.filter(pk=row.pk).update(headers={"x-note": f"card_token={SECRET}", "tenant": "acme"})
    detail = operator.get(url("change", row))
    assert detail.status_code == 200 and SECRET not in detail.text and "acme" in detail.text


def test_idempotency_claims_are_listed_read_only():
    from safetynet import idempotency

    held = idempotency.claim("admin-key-1", task_name="shop.charge", task_id="tid-admin", lease=30, max_deliveries=3)
    idempotency.mark_succeeded(held, {"charge": "ch_admin"})
    viewer = User.objects.create_superuser("claims-admin")
    client = logged_in(viewer)
    listing = client.get(reverse("admin:safetynet_idempotencyclaim_changelist") + "?q=admin-key-1")
    assert listing.status_code == 200 and b"admin-key-1" in listing.content and b"tid-admin" in listing.content
    from safetynet.models import IdempotencyClaim

    row = IdempotencyClaim.objects.get(key="admin-key-1")
    detail = client.get(reverse("admin:safetynet_idempotencyclaim_change", args=[row.pk]))
    assert detail.status_code == 200 and b"ch_admin" in detail.content
    assert client.get(reverse("admin:safetynet_idempotencyclaim_add")).status_code == 403
