"""Fingerprints: one outage is one group, whichever partner, row, host or id each failing task was about."""

import ast
import time
import uuid
from pathlib import Path

import pytest

from safetynet import deadletter
from safetynet.deadletter import fingerprint, normalise_message
from safetynet.models import DeadLetter

DEMO_TASKS = Path(__file__).resolve().parents[2] / "demo" / "shop" / "tasks.py"


def partner_feed_message(partner):
    """The message the demo's ``refresh_partner_feed`` raises, read from its source (so the test follows it)."""
    tree = ast.parse(DEMO_TASKS.read_text())
    function = next(node for node in ast.walk(tree)
                    if isinstance(node, ast.FunctionDef) and node.name == "refresh_partner_feed")
    raised = next(node for node in ast.walk(function) if isinstance(node, ast.Raise))
    parameter = function.args.args[-1].arg  # (self, partner)
    exception = eval(compile(ast.Expression(raised.exc), str(DEMO_TASKS), "eval"),  # noqa: S307 (the demo's own)
                     {"ConnectionError": ConnectionError}, {parameter: partner})
    return type(exception).__name__, str(exception)


def test_the_demo_partner_feed_outage_is_one_group():
    seen = {}
    for partner in ("acme", "globex", "initech"):
        kind, message = partner_feed_message(partner)
        assert partner in message  # the message does name the partner, unquoted
        seen[partner] = fingerprint("shop.tasks.refresh_partner_feed", kind, message, arguments=[partner])
    assert len(set(seen.values())) == 1, seen
    # …and a different failure of the same task is another group
    assert fingerprint("shop.tasks.refresh_partner_feed", "ConnectionError", "partner acme: bad credentials",
                       arguments=["acme"]) not in seen.values()


@pytest.mark.django_db
def test_recorded_dead_letters_of_the_demo_outage_share_one_fingerprint():
    """Through the real recording path: the stored (redacted) arguments are what the message is matched with."""
    for partner in ("acme", "globex", "initech"):
        kind, message = partner_feed_message(partner)
        deadletter.give_up(deadletter.Failure(
            task_name="shop.tasks.refresh_partner_feed", task_id=str(uuid.uuid4()), reason="retries_exhausted",
            args=[partner], kwargs={}, exception=ConnectionError(message), failed_at=time.time(),
            parameters=["partner"]), log=False)
    rows = DeadLetter.objects.filter(task_name="shop.tasks.refresh_partner_feed")
    assert rows.count() == 3 and rows.values("fingerprint").distinct().count() == 1


@pytest.mark.parametrize(("first", "second"), [
    ("GET https://api.example.com/v1/orders/1234?page=2 failed", "GET https://eu.api.example.com/v2/items/9 failed"),
    ("connection to 10.0.0.7:5432 refused", "connection to 10.0.3.12:5433 refused"),
    ("connection to [2001:db8::1] refused", "connection to [fe80::a00:27ff:fe4e:66a1] refused"),
    ("db-3.internal refused the connection", "db-12.internal refused the connection"),
    ("smtp.eu.mailgun.org:587 timed out", "smtp.us.mailgun.org:465 timed out"),
    ("order 3f2b8c1d-9e4a-4b7c-8d2e-1a2b3c4d5e6f not found", "order 00000000-0000-4000-8000-000000000000 not found"),
    ("object 5f3a9c2e81b4d07f6a1e is locked", "object a1b2c3d4e5f60718 is locked"),
    ("no such customer 'Ann'", 'no such customer "Bob O\'Neil"'),
    ("mail to ann@example.com bounced", "mail to bob.smith+shop@mail.example.org bounced"),
    ("retry after 30.5 s (attempt 3)", "retry after 2 s (attempt 4)"),
])
def test_volatile_parts_of_messages_are_normalised(first, second):
    assert normalise_message(first) == normalise_message(second)


def test_what_stays_keeps_failures_apart():
    assert normalise_message("No module named shop.tasks") != normalise_message("No module named shop.models")
    assert normalise_message("at 12:30:45 the queue was full") == "at <n>:<n>:<n> the queue was full"
    assert normalise_message("partner acme: down") == "partner acme: down"  # not an argument here: kept
    assert normalise_message("partner acme: down", ["acme"]) == "partner <arg>: down"
    # a short argument, a redacted one or a number replaces nothing of the words
    assert normalise_message("a bad id in row", ["a", "[redacted]", "12"]) == "a bad id in row"
    assert normalise_message("declined: [redacted]", ["[redacted]"]) == "declined: [redacted]"
    # an argument is matched as a whole word only
    assert normalise_message("acmecorp is down", ["acme"]) == "acmecorp is down"
    assert normalise_message("x", [{"partner": "acme"}, ["globex"]]) == "x"
    assert normalise_message("acme and globex", [{"partner": "acme"}, ["globex"]]) == "<arg> and <arg>"


def test_old_rows_keep_the_fingerprint_they_were_recorded_with(db):
    """A fingerprint is stored, not recomputed: changing the normalisation does not move old rows."""
    from tests.deadletter.test_deadletter import record

    row = record(exception=ConnectionError("gateway down"))
    DeadLetter.objects.filter(pk=row.pk).update(fingerprint="0" * 40)  # as an older version stored it
    record(exception=ConnectionError("gateway down"))
    assert set(DeadLetter.objects.values_list("fingerprint", flat=True)) == {"0" * 40, row.fingerprint}
