"""`manage.py safetynet dead list|show|replay|discard|purge|flush`."""

import io
import json
import re
import time
from datetime import datetime, timedelta, timezone

import pytest
from django.core.management import CommandError, call_command
from django.db import connection

from safetynet import deadletter
from safetynet.deadletter import _spool
from safetynet.models import DeadLetter
from tests.fixtures.dead_letters import SECRET, make_dead_letter, queued_messages

pytestmark = pytest.mark.django_db


def dead(*arguments):
    """Run `safetynet dead ...`; return its output."""
    out = io.StringIO()
    call_command("safetynet", "dead", *arguments, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def snapshot():
    """Everything that replay, discard or purge could change."""
    return list(DeadLetter.objects.order_by("id").values_list(
        "id", "status", "replay_count", "replayed_task_id", "audit"))


# -- list ------------------------------------------------------------------------------

def test_list_shows_one_line_per_dead_letter_newest_first():
    older = make_dead_letter("tests.fixtures.tasks.ping", failed_at=time.time() - 3600)
    newer = make_dead_letter("tests.fixtures.tasks.send_digest", reason="permanent_error",
                             exception=ValueError("bad address"), attempts=1)
    lines = dead("list").splitlines()
    assert lines[0].split() == ["id", "task", "reason", "status", "attempts", "last", "failure", "exception"]
    assert lines[1].split()[:5] == [str(newer.id), "tests.fixtures.tasks.send_digest", "permanent_error", "dead", "1"]
    assert lines[1].endswith("ValueError: bad address")
    assert lines[2].split()[:5] == [str(older.id), "tests.fixtures.tasks.ping", "retries_exhausted", "dead", "2"]
    assert len(lines) == 3


def test_list_filters():
    ping = make_dead_letter("tests.fixtures.tasks.ping", failed_at=time.time() - 3 * 86400)
    digest = make_dead_letter("tests.fixtures.tasks.send_digest", reason="permanent_error", exception=ValueError("x"))
    other = make_dead_letter("shop.tasks.charge")
    deadletter.discard(other, by="test")

    def ids(*arguments):
        return [row["id"] for row in json.loads(dead("list", "--json", *arguments))]

    assert ids() == [digest.id, ping.id]  # the default status is dead
    assert ids("--status", "all") == [other.id, digest.id, ping.id]
    assert ids("--status", "discarded") == [other.id]
    assert ids("--task", "tests.fixtures.tasks.*") == [digest.id, ping.id]
    assert ids("--task", "tests.fixtures.tasks.ping") == [ping.id]
    assert ids("--task", "tests.fixtures.tasks") == []  # exact unless it ends in *
    assert ids("--reason", "permanent_error") == [digest.id]
    assert ids("--fingerprint", ping.fingerprint) == [ping.id]
    assert ids("--since", "2d") == [digest.id]
    assert ids("--until", "1d") == [ping.id]
    since = (datetime.now(timezone.utc) - timedelta(days=4)).date().isoformat()
    assert ids("--since", since, "--until", "12h") == [ping.id]
    assert ids("--id", str(other.id)) == [other.id]  # with --id, any status
    assert ids("--id", str(ping.id), "--id", str(digest.id), "--reason", "retries_exhausted") == [ping.id]


def test_list_limit_says_how_many_more():
    for _ in range(3):
        make_dead_letter()
    text = dead("list", "--limit", "2")
    assert len([line for line in text.splitlines() if "tests.fixtures.tasks.ping" in line]) == 2
    assert "2 of 3 shown; raise --limit" in text
    assert len(json.loads(dead("list", "--json", "--limit", "2"))) == 2


def test_list_when_nothing_matches():
    assert dead("list").strip() == "No dead letters match."
    assert json.loads(dead("list", "--json")) == []


@pytest.mark.parametrize(("arguments", "message"), [
    (["--reason", "bored"], r"argument --reason: invalid choice: 'bored'"),
    (["--status", "asleep"], r"argument --status: invalid choice: 'asleep'"),
    (["--since", "yesterday"], r"argument --since: 'yesterday' is neither an ISO 8601 date or datetime"),
    (["--until", "2024-13-45"], r"argument --until: '2024-13-45' is neither"),
    (["--since=-2h"], r"argument --since: '-2h' is neither"),
    (["--since", "3y"], r"argument --since: '3y' is neither"),
    (["--since", "1h", "--until", "2h"], r"--since .* must be before --until"),
    (["--limit", "0"], r"argument --limit: must be at least 1"),
    (["--id", "123456789"], r"No dead letter with id 123456789"),
    (["--id", "seven"], r"argument --id: invalid int value: 'seven'"),
])
def test_list_bad_input_is_a_clear_error(arguments, message):
    make_dead_letter()
    with pytest.raises(CommandError, match=message):
        dead("list", *arguments)


def test_naive_and_aware_datetimes_are_accepted():
    row = make_dead_letter(failed_at=datetime(2024, 5, 1, 12, 0, tzinfo=timezone.utc).timestamp())

    def ids(*arguments):
        return [item["id"] for item in json.loads(dead("list", "--json", *arguments))]

    assert ids("--since", "2024-05-01T11:59:00+00:00", "--until", "2024-05-01T12:01Z") == [row.id]
    assert ids("--since", "2024-05-01", "--until", "2024-05-03") == [row.id]  # naive: the project's time zone
    assert ids("--since", "2024-05-02") == []


# -- show ------------------------------------------------------------------------------

def test_show_prints_everything_with_the_timeline_and_traceback():
    row = make_dead_letter("tests.fixtures.tasks.send_digest", args=["ops@example.com"], kwargs={"batch": 7}, attempts=3,
                           headers={"tenant": "acme"}, delivery_info={"routing_key": "mail", "exchange": "mail"})
    text = dead("show", str(row.id))
    assert f"Dead letter {row.id}" in text
    assert f"task           tests.fixtures.tasks.send_digest  (task id {row.task_id})" in text
    assert "reason         retries_exhausted" in text
    assert "delivery       queue mail, exchange mail" in text
    assert f"fingerprint    {row.fingerprint}  (1 alike failure" in text
    assert "Exception: ConnectionError: connection refused" in text
    assert 'args   ["ops@example.com"]' in text and 'kwargs {"batch": 7}' in text
    assert 'Headers: {"tenant": "acme"}' in text
    timeline = text.split("Attempts:")[1].split("Traceback:")[0]
    header, *rows = [re.split(r"\s{2,}", line.strip()) for line in timeline.strip().splitlines()[:4]]
    assert header == ["attempt", "started", "duration", "exception", "action", "delay", "reason", "worker"]
    assert [r[0] for r in rows] == ["1", "2", "3"]
    assert rows[0][2:6] == ["0.25 s", "ConnectionError", "retry", "2 s"]  # durations a person reads
    assert rows[2][4:6] == ["dead", "-"]
    assert 'File "/srv/shop/tasks.py", line 41, in charge' in timeline  # earlier attempts' tracebacks
    assert "Traceback:\n  Traceback (most recent call last):" in text
    assert "ConnectionError: connection refused (attempt 3)" in text.split("Traceback:")[1]
    assert "Audit trail:" in text and " dead" in text.split("Audit trail:")[1]


def test_show_json_has_every_field():
    row = make_dead_letter(kwargs={"n": 1})
    data = json.loads(dead("show", str(row.id), "--json"))
    assert data["id"] == row.id and data["task_id"] == row.task_id and data["kwargs"] == {"n": 1}
    assert [entry["attempt"] for entry in data["history"]] == [1, 2]
    assert data["traceback"].startswith("Traceback") and data["audit"][0]["action"] == "dead"
    assert "raw_body" not in data and data["raw_body_bytes"] == 0


def test_show_unknown_id():
    with pytest.raises(CommandError, match="No dead letter with id 987654"):
        dead("show", "987654")


# -- secrets ---------------------------------------------------------------------------

def test_a_redacted_kwarg_appears_nowhere():
    row = make_dead_letter(
        "tests.fixtures.tasks.ping", kwargs={"order": 7, "card_token": SECRET},
        exception=ValueError(f"gateway said no to card_token={SECRET}"),
    )
    with connection.cursor() as cursor:
        cursor.execute("SELECT * FROM safetynet_deadletter WHERE id = %s", [row.id])
        raw = repr(cursor.fetchall())
    assert "[redacted]" in raw and SECRET not in raw
    assert row.kwargs == {"order": 7, "card_token": "[redacted]"} and row.redacted == ["kwargs.card_token"]
    for output in (dead("list"), dead("list", "--json"), dead("show", str(row.id)),
                   dead("show", str(row.id), "--json")):
        assert SECRET not in output
    assert "redacted when stored: kwargs.card_token" in dead("show", str(row.id))


def test_sensitive_headers_are_masked_on_display():
    # The store keeps headers as they were, for replay; what the command prints goes through the redaction rules.
    row = make_dead_letter(headers={"authorization": f"Bearer {SECRET}", "tenant": "acme"})
    for output in (dead("show", str(row.id)), dead("show", str(row.id), "--json")):
        assert SECRET not in output and "acme" in output
    assert json.loads(dead("show", str(row.id), "--json"))["headers"] == {
        "authorization": "[redacted]", "tenant": "acme"}


# -- replay ----------------------------------------------------------------------------

def test_replay_by_id_sends_the_task_again(throwaway_queue):
    row = make_dead_letter("tests.fixtures.tasks.ping", headers={"tenant": "acme"})
    out = dead("replay", "--id", str(row.id), "--queue", throwaway_queue, "--by", "alice")
    row.refresh_from_db()
    assert row.status == "replayed" and row.replay_count == 1 and row.replayed_task_id
    assert row.replayed_by == "alice" and row.replayed_at is not None
    assert f"{row.id} tests.fixtures.tasks.ping: replayed as {row.replayed_task_id}" in out
    assert "Replayed 1 of 1; 0 refused" in out
    event = row.audit[-1]
    assert event["action"] == "replay" and event["by"] == "alice" and event["queue"] == throwaway_queue
    assert event["new_task_id"] == row.replayed_task_id
    [message] = queued_messages(throwaway_queue)
    assert message["headers"]["id"] == row.replayed_task_id and message["headers"]["task"] == "tests.fixtures.tasks.ping"
    assert message["headers"]["tenant"] == "acme"  # headers kept
    assert message["headers"]["safetynet_replay_of"] == str(row.id)
    assert "safetynet" not in message["headers"]  # a fresh attempt count: no history travels


def test_replay_by_filter_with_json(throwaway_queue):
    first, second = make_dead_letter(), make_dead_letter()
    other = make_dead_letter("tests.fixtures.tasks.send_digest", args=["a@example.com"])
    data = json.loads(dead("replay", "--task", "tests.fixtures.tasks.ping", "--queue", throwaway_queue, "--json"))
    assert sorted(item["id"] for item in data) == [first.id, second.id]
    assert all(item["new_task_id"] and item["error"] is None for item in data)
    assert len(queued_messages(throwaway_queue)) == 2
    assert DeadLetter.objects.get(id=other.id).status == "dead"
    import getpass

    assert DeadLetter.objects.get(id=first.id).audit[-1]["by"] == getpass.getuser()  # the default --by


def test_replay_all(throwaway_queue):
    rows = [make_dead_letter() for _ in range(3)]
    deadletter.discard(rows[0], by="test")
    out = dead("replay", "--all", "--queue", throwaway_queue)
    assert "Replayed 2 of 2" in out  # only rows still dead
    assert len(queued_messages(throwaway_queue)) == 2


def test_replay_of_an_unregistered_task_is_refused_and_leaves_the_row(throwaway_queue):
    gone = make_dead_letter("tests.fixtures.tasks.renamed_long_ago")
    fine = make_dead_letter("tests.fixtures.tasks.ping")
    before = snapshot()
    out = io.StringIO()
    with pytest.raises(CommandError, match=r"1 of 2 dead letters were refused"):
        call_command("safetynet", "dead", "replay", "--id", str(gone.id), "--id", str(fine.id),
                     "--queue", throwaway_queue, stdout=out)
    assert (f"{gone.id} tests.fixtures.tasks.renamed_long_ago: refused: task 'tests.fixtures.tasks.renamed_long_ago' is not "
            "registered any more; the row is left as it was") in out.getvalue()
    gone_after = DeadLetter.objects.get(id=gone.id)
    assert [row for row in before if row[0] == gone.id] == [row for row in snapshot() if row[0] == gone.id]
    assert gone_after.status == "dead" and gone_after.replay_count == 0
    assert DeadLetter.objects.get(id=fine.id).status == "replayed"


def test_replay_of_redacted_arguments_is_refused(throwaway_queue):
    row = make_dead_letter("tests.fixtures.tasks.ping", kwargs={"card_token": SECRET})
    before = snapshot()
    out = io.StringIO()
    with pytest.raises(CommandError, match="were refused"):
        call_command("safetynet", "dead", "replay", "--id", str(row.id), "--queue", throwaway_queue, "--json",
                     stdout=out)
    [item] = json.loads(out.getvalue())
    assert item["new_task_id"] is None
    assert item["error"] == ("arguments kwargs.card_token were redacted when stored; "
                             "replay it with replacement args/kwargs")
    assert snapshot() == before and queued_messages(throwaway_queue) == []
    assert SECRET not in out.getvalue()


def test_replay_of_a_row_already_replayed_is_refused(throwaway_queue):
    row = make_dead_letter()
    dead("replay", "--id", str(row.id), "--queue", throwaway_queue)
    with pytest.raises(CommandError, match="status is replayed, not dead"):
        dead("replay", "--id", str(row.id), "--queue", throwaway_queue)
    assert DeadLetter.objects.get(id=row.id).replay_count == 1


def test_replay_dry_run_changes_nothing(throwaway_queue):
    fine = make_dead_letter()
    gone = make_dead_letter("tests.fixtures.tasks.renamed_long_ago")
    before = snapshot()
    out = dead("replay", "--all", "--dry-run", "--queue", throwaway_queue)
    assert "Dry run: nothing is sent or changed." in out
    assert f"{fine.id} tests.fixtures.tasks.ping: would be replayed to {throwaway_queue}" in out
    assert f"{gone.id} tests.fixtures.tasks.renamed_long_ago: would be refused: task" in out
    assert "Would replay 1 of 2; 1 would be refused." in out
    data = json.loads(dead("replay", "--all", "--dry-run", "--json"))
    assert {item["id"]: item["would_replay"] for item in data} == {fine.id: True, gone.id: False}
    assert snapshot() == before and queued_messages(throwaway_queue) == []


def test_replay_with_arguments_the_task_does_not_take_is_refused(throwaway_queue):
    row = make_dead_letter("tests.fixtures.tasks.ping", args=[1, 2])  # ping() takes none: the task changed since
    before = snapshot()
    out = dead("replay", "--id", str(row.id), "--dry-run", "--queue", throwaway_queue)
    assert f"{row.id} tests.fixtures.tasks.ping: would be refused: not sent: TypeError(" in out
    with pytest.raises(CommandError, match=r"1 of 1 dead letters were refused.*not sent: TypeError\("):
        dead("replay", "--id", str(row.id), "--queue", throwaway_queue)
    assert snapshot() == before and queued_messages(throwaway_queue) == []


@pytest.mark.parametrize("verb", ["replay", "discard"])
def test_replay_and_discard_need_a_selection(verb):
    make_dead_letter()
    before = snapshot()
    with pytest.raises(CommandError, match=rf"Say which dead letters to {verb}: --id ID, a filter .* or --all"):
        dead(verb)
    assert snapshot() == before


@pytest.mark.parametrize("verb", ["replay", "discard"])
@pytest.mark.parametrize(("arguments", "message"), [
    (["--id", "{id}", "--id", "99999999"], "No dead letter with id 99999999. Nothing was changed."),
    (["--id", "{id}", "--task", "tests.fixtures.tasks.other"], "does not match the filters given"),
    (["--all", "--since", "last week"], "is neither an ISO 8601"),
    (["--all", "--reason", "unlucky"], "invalid choice: 'unlucky'"),
    (["--all", "--status", "zombie"], "invalid choice: 'zombie'"),
])
def test_bad_selection_changes_nothing(verb, arguments, message, throwaway_queue):
    row = make_dead_letter()
    before = snapshot()
    arguments = [argument.format(id=row.id) for argument in arguments]
    with pytest.raises(CommandError, match=message):
        dead(verb, *arguments, *(["--queue", throwaway_queue] if verb == "replay" else []))
    assert snapshot() == before and queued_messages(throwaway_queue) == []


# -- discard ---------------------------------------------------------------------------

def test_discard_marks_rows_handled_with_an_audit_event():
    first, second = make_dead_letter(), make_dead_letter("tests.fixtures.tasks.send_digest")
    out = dead("discard", "--id", str(first.id), "--by", "bob")
    assert f"{first.id} tests.fixtures.tasks.ping: discarded" in out and "Discarded 1 of 1." in out
    first.refresh_from_db()
    assert first.status == "discarded" and first.audit[-1]["action"] == "discard" and first.audit[-1]["by"] == "bob"
    assert DeadLetter.objects.get(id=second.id).status == "dead"
    out = dead("discard", "--id", str(first.id))
    assert "left as it was (status discarded)" in out and "Discarded 0 of 1." in out


def test_discard_dry_run_changes_nothing():
    row = make_dead_letter()
    before = snapshot()
    out = dead("discard", "--reason", "retries_exhausted", "--dry-run")
    assert f"{row.id} tests.fixtures.tasks.ping: would be discarded" in out and "Would discard 1 of 1." in out
    assert snapshot() == before


# -- purge -----------------------------------------------------------------------------

def test_purge_deletes_rows_older_than_the_age():
    old = make_dead_letter(failed_at=time.time() - 40 * 86400)
    old_replayed = make_dead_letter(failed_at=time.time() - 40 * 86400)
    DeadLetter.objects.filter(id=old_replayed.id).update(status="replayed")
    recent = make_dead_letter()
    out = dead("purge", "--older-than", "30d", "--dry-run")
    assert "Dry run: would delete 2 dead letters (any status) last failed before" in out
    assert DeadLetter.objects.count() == 3
    assert "Deleted 1 replayed dead letters" in dead("purge", "--older-than", "30d", "--status", "replayed")
    assert "Deleted 1 dead letters (any status)" in dead("purge", "--older-than", "30d")
    assert list(DeadLetter.objects.values_list("id", flat=True)) == [recent.id]
    assert not DeadLetter.objects.filter(id=old.id).exists()


def test_purge_needs_an_age():
    make_dead_letter(failed_at=time.time() - 40 * 86400)
    with pytest.raises(CommandError, match="the following arguments are required: --older-than"):
        dead("purge")
    with pytest.raises(CommandError, match="argument --older-than: 'a month' is neither"):
        dead("purge", "--older-than", "a month")
    with pytest.raises(CommandError, match="argument --status: invalid choice"):
        dead("purge", "--older-than", "30d", "--status", "old")
    assert DeadLetter.objects.count() == 1


# -- flush -----------------------------------------------------------------------------

def test_flush_moves_spooled_records_in(private_spool):
    fields = {
        "task_name": "tests.fixtures.tasks.ping", "task_id": "spooled-1", "args": [], "kwargs": {}, "redacted": [],
        "headers": {}, "queue": "", "exchange": "", "routing_key": "", "reason": "retries_exhausted",
        "detail": "", "exception_type": "ConnectionError", "exception_message": "down", "traceback": "",
        "history": [], "omitted_attempts": 0, "attempts": 1,
        "first_failed_at": "2024-05-01T12:00:00+00:00", "last_failed_at": "2024-05-01T12:00:00+00:00",
        "worker": "", "fingerprint": deadletter.fingerprint("tests.fixtures.tasks.ping", "ConnectionError", "down"),
        "raw_body": "", "replay_of_id": None, "audit": [{"action": "dead", "at": "2024-05-01T12:00:00+00:00",
                                                         "nonce": "n1"}],
    }
    _spool.write(fields, ConnectionError("the database is down"))  # signed, as the runtime spools it
    assert (private_spool / "spooled-1.json").exists()
    assert dead("flush").startswith("Moved 1 spooled dead letter into the database")
    assert DeadLetter.objects.get(task_id="spooled-1").exception_message == "down"
    assert list(private_spool.glob("*.json")) == []
    assert dead("flush").startswith("Moved 0 spooled dead letters")
    assert not (private_spool / "quarantine").exists()


# -- the explain command still works alongside ----------------------------------------

def test_explain_is_unchanged():
    out = io.StringIO()
    call_command("safetynet", "explain", "tests.fixtures.tasks.send_digest", stdout=out)
    assert "Gives up after attempt 6" in out.getvalue()


def test_header_values_are_shown_through_the_message_patterns():
    row = make_dead_letter(headers={"x-note": "retry", "tenant": "acme"})
    # A row stored before header values were redacted (or written by hand): its display is redacted anyway.
    DeadLetter.objects.filter(pk=row.pk).update(headers={"x-note": f"card_token={SECRET}", "tenant": "acme"})
    for output in (dead("show", str(row.id)), dead("show", str(row.id), "--json"), dead("list", "--json")):
        assert SECRET not in output
    assert json.loads(dead("show", str(row.id), "--json"))["headers"] == {
        "x-note": "card_token='[redacted]'", "tenant": "acme"}
