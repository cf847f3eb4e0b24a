"""Size caps: a huge message, traceback, argument or header is kept cut, marked, measured and hashed."""

import base64
import hashlib
import json
import time
import uuid

import pytest
import redis
from django.db import connection

from safetynet import ConfigurationError, conf, deadletter
from safetynet.deadletter import _spool
from safetynet.models import DeadLetter
from tests.celery_app import app

pytestmark = pytest.mark.django_db

SECRET = "tok_live_SECRET123"
BIG = 10 * 1024 * 1024
#: Texts go through redaction whole (about a second per 10 MB): 1 MB is far over every cap, and quick.
BIG_TEXT = 1024 * 1024


def record(**overrides):
    fields = {"task_name": "tests.fixtures.dead_letter_tasks.ok", "task_id": str(uuid.uuid4()),
              "reason": "permanent_error", "exception": ValueError("no"), "failed_at": time.time()}
    fields.update(overrides)
    deadletter.give_up(deadletter.Failure(**fields), log=False)
    return DeadLetter.objects.get(task_id=fields["task_id"])


def compact(value):
    return json.dumps(value, ensure_ascii=False, separators=(",", ":")).encode()


def stored_size(row):
    """How many characters the row takes in the database, every column as text."""
    with connection.cursor() as cursor:
        cursor.execute("SELECT length(t::text) FROM safetynet_deadletter t WHERE id = %s", [row.pk])
        return cursor.fetchone()[0]


@pytest.fixture
def queue():
    name = f"safetynet-caps-{uuid.uuid4().hex[:8]}"
    yield name
    redis.Redis.from_url(app.conf.broker_url).delete(name)


def test_a_huge_argument_is_replaced_by_a_marker_with_its_size_and_hash():
    huge = "x" * BIG
    row = record(args=[1, huge], kwargs={"order": 7})
    marker = row.args[1]
    assert deadletter.is_truncated(marker)
    assert marker["bytes"] == len(compact(huge)) == BIG + 2
    assert marker["sha256"] == hashlib.sha256(compact(huge)).hexdigest()
    assert marker["head"] == ('"' + "x" * 255)
    assert row.args[0] == 1 and row.kwargs == {"order": 7}  # the others are kept whole
    assert stored_size(row) < 10_000
    assert deadletter.truncated_paths(row.args, row.kwargs) == ["args[1]"]


def test_no_secret_survives_in_the_head_of_a_cut_argument():
    payload = {"card_token": SECRET, "note": f"token={SECRET} and password=hunter2", "blob": "y" * BIG}
    row = record(task_name="tests.fixtures.dead_letter_tasks.charge", args=[10, SECRET, "z" * 100 + SECRET + "z" * BIG],
                 kwargs={"payload": payload}, parameters=["amount", "card_token", "memo"])
    everything = json.dumps(DeadLetter.objects.filter(pk=row.pk).values().get(), default=str)
    assert SECRET not in everything and "hunter2" not in everything
    assert row.args[1] == "[redacted]"  # redacted by its parameter's name, on the whole value, before the cut
    assert deadletter.is_truncated(row.args[2]) and "[redacted]" in row.args[2]["head"]
    head = row.kwargs["payload"]["head"]
    assert head.startswith('{"card_token":') and "[redacted]" in head and "hunter2" not in head
    assert "kwargs.payload.card_token" in row.redacted


def test_a_secret_cut_in_half_at_the_end_of_the_head_does_not_survive():
    # The secret straddles the head's end: redaction runs on a window that holds it whole.
    row = record(task_name="tests.fixtures.dead_letter_tasks.charge", args=[1, SECRET, "q" * 250 + SECRET + "q" * BIG],
                 parameters=["amount", "card_token", "memo"])
    head = row.args[2]["head"]
    assert len(head) == 256 and SECRET[:5] not in head


def test_a_huge_message_detail_and_traceback_keep_their_start_or_end_and_a_note():
    settings = conf.get()
    message = f"card_token={SECRET} " + "m" * BIG_TEXT
    trace = "Traceback (most recent call last):\n" + "  frame\n" * (BIG_TEXT // 8) + "ValueError: the end"
    row = record(exception=ValueError(message), detail="d" * BIG_TEXT,
                 history=[{"attempt": 1, "started": time.time(), "message": message, "traceback": trace}])
    assert len(row.exception_message) <= settings.dead_letter_max_message_chars
    assert row.exception_message.startswith("card_token='[redacted]' mmm")
    redacted_message = "card_token='[redacted]' " + "m" * BIG_TEXT
    assert row.exception_message.endswith(
        f"[truncated by safetynet: {len(redacted_message)} characters in all, "
        f"sha256 {hashlib.sha256(redacted_message.encode()).hexdigest()}]")
    assert len(row.detail) <= settings.dead_letter_max_message_chars and "truncated by safetynet" in row.detail
    assert len(row.traceback) <= settings.dead_letter_max_traceback_chars
    assert row.traceback.startswith("[truncated by safetynet:") and row.traceback.endswith("ValueError: the end")
    assert len(row.history[0]["message"]) <= settings.dead_letter_max_message_chars
    assert SECRET not in json.dumps(DeadLetter.objects.filter(pk=row.pk).values().get(), default=str)
    assert stored_size(row) < 100_000


def test_the_caps_come_from_settings_and_a_value_under_them_is_kept_whole(settings):
    settings.SAFETYNET = {**settings.SAFETYNET, "DEAD_LETTER_MAX_MESSAGE_CHARS": 300,
                          "DEAD_LETTER_MAX_ARGUMENT_BYTES": 2048, "DEAD_LETTER_MAX_ARGUMENTS_TOTAL_BYTES": 4096}
    row = record(args=["a" * 2000, "b" * 2100], exception=ValueError("e" * 299))
    assert row.args[0] == "a" * 2000 and deadletter.is_truncated(row.args[1])
    assert row.exception_message == "e" * 299
    longer = record(exception=ValueError("e" * 301))
    assert len(longer.exception_message) == 300 and "301 characters in all" in longer.exception_message


def test_many_arguments_over_the_total_lose_the_largest_first_then_the_whole(settings):
    settings.SAFETYNET = {**settings.SAFETYNET, "DEAD_LETTER_MAX_ARGUMENT_BYTES": 2048,
                          "DEAD_LETTER_MAX_ARGUMENTS_TOTAL_BYTES": 4096}
    row = record(args=["a" * 1500, "b" * 1900, "c" * 1800, "d" * 1700], kwargs={"small": 1})
    assert [deadletter.is_truncated(value) for value in row.args] == [False, True, True, False]
    assert row.kwargs == {"small": 1}
    many = record(args=list(range(5000)), kwargs={"n": 1})
    assert deadletter.is_truncated(many.args) and many.kwargs == {"n": 1}
    assert many.args["bytes"] == len(compact(list(range(5000))))
    assert deadletter.truncated_paths(many.args, many.kwargs) == ["args"]
    # A hundred thousand small arguments: one pass over them (it summed them all for each one: 90 s).
    hostile = record(args=["x" * 3000, *range(100_000)], kwargs={"n": 1})
    assert deadletter.is_truncated(hostile.args) and hostile.kwargs == {"n": 1}


def test_huge_headers_lose_their_largest_values_and_replay_sends_the_others(queue):
    row = record(args=[1], headers={"tenant": "acme", "blob": "h" * BIG})
    assert row.headers["tenant"] == "acme" and deadletter.is_truncated(row.headers["blob"])
    [outcome] = deadletter.replay(row, queue=queue)
    assert outcome.new_task_id
    [raw] = redis.Redis.from_url(app.conf.broker_url).lrange(queue, 0, -1)
    headers = json.loads(raw)["headers"]
    assert headers["tenant"] == "acme" and "blob" not in headers


def test_history_keeps_the_first_and_latest_entries_and_counts_the_others(settings):
    settings.SAFETYNET = {**settings.SAFETYNET, "HISTORY_MAX_ENTRIES": 3}
    entries = [{"attempt": n, "started": time.time(), "message": f"m{n}", "traceback": ""} for n in range(1, 11)]
    row = record(history=entries, omitted=2)
    assert [entry["attempt"] for entry in row.history] == [1, 9, 10]
    assert row.omitted_attempts == 9


def test_a_value_json_cannot_hold_is_kept_as_text_not_lost():
    row = record(args=[{1, 2}], kwargs={"when": time})
    assert row.args == ["{1, 2}"] and row.kwargs["when"].startswith("<module 'time'")


def test_the_give_up_line_is_bounded_too(caplog):
    task_id = str(uuid.uuid4())
    with caplog.at_level("WARNING", logger="safetynet"):
        deadletter.give_up(deadletter.Failure(task_name="n" * BIG_TEXT, task_id=task_id, reason="unknown_task",
                                              detail="no task named " + "n" * BIG_TEXT, failed_at=time.time()))
    [line] = [record for record in caplog.records if "gave up" in record.getMessage()]
    assert len(line.getMessage()) < 11_000 and len(line.task_name) == 255
    assert "characters in all" in line.detail


def test_overlong_names_are_cut_to_their_columns():
    row = record(task_name="t" * 5000, delivery_info={"routing_key": "q" * 5000}, worker="w" * 5000)
    assert (len(row.task_name), len(row.queue), len(row.worker)) == (255, 255, 255)


def test_capping_twice_changes_nothing():
    fields = {"args": ["x" * BIG, 1], "kwargs": {"k": "y" * BIG}, "headers": {"h": "z" * BIG},
              "exception_message": "m" * BIG, "detail": "d" * BIG, "traceback": "t" * BIG,
              "history": [{"attempt": 1, "message": "m" * BIG, "traceback": "t" * BIG}], "omitted_attempts": 0}
    once = deadletter.cap_fields(fields)
    assert deadletter.cap_fields(once) == once
    assert len(json.dumps(once)) < 80_000  # 10k + 10k + 20k of text, 10k + 20k of history, three markers


def test_a_spooled_record_made_before_the_caps_is_cut_when_flushed(private_spool):
    task_id = str(uuid.uuid4())
    fields = {"task_name": "tests.fixtures.tasks.ping", "task_id": task_id, "args": ["x" * BIG], "kwargs": {},
              "redacted": [], "headers": {}, "queue": "", "exchange": "", "routing_key": "",
              "reason": "retries_exhausted", "detail": "", "exception_type": "ValueError",
              "exception_message": "m" * BIG, "traceback": "", "history": [], "omitted_attempts": 0, "attempts": 1,
              "first_failed_at": "2026-01-01T00:00:00+00:00", "last_failed_at": "2026-01-01T00:00:00+00:00",
              "worker": "", "fingerprint": "f" * 40, "raw_body": "", "replay_of_id": None,
              "audit": [{"action": "dead", "at": "2026-01-01T00:00:00+00:00", "nonce": uuid.uuid4().hex}]}
    _spool.write(fields, ConnectionError("database away"))
    assert deadletter.flush_spool() == 1
    row = DeadLetter.objects.get(task_id=task_id)
    assert deadletter.is_truncated(row.args[0]) and len(row.exception_message) <= 10_000


def test_an_undecodable_body_is_cut_too():
    row = record(reason="undecodable", raw_body=b"b" * BIG_TEXT, body_unknown=True)
    assert len(row.raw_body) < 100_000


# -- replay of a row whose arguments were cut -----------------------------------------------------

def test_a_row_with_a_cut_argument_is_refused_without_replacements(queue):
    row = record(args=[1], kwargs={"blob": "x" * BIG})
    [refused] = deadletter.replay(row, queue=queue)
    assert refused.new_task_id is None
    assert refused.error == ("arguments kwargs.blob were cut when stored (over the dead-letter size caps, "
                             "DEAD_LETTER_MAX_ARGUMENT_BYTES); replay it with replacement kwargs")
    # replacing the other side leaves the marker in what would be sent: still refused
    [still] = deadletter.replay(row, args=[2], queue=queue)
    assert "kwargs.blob were cut" in still.error
    row.refresh_from_db()
    assert row.status == "dead" and row.replay_count == 0
    assert redis.Redis.from_url(app.conf.broker_url).llen(queue) == 0


def test_a_row_with_a_cut_argument_replays_with_replacements(queue):
    row = record(args=["x" * BIG])
    [outcome] = deadletter.replay(row, args=[5], queue=queue, by="ann")
    assert outcome.new_task_id and outcome.error is None
    [raw] = redis.Redis.from_url(app.conf.broker_url).lrange(queue, 0, -1)
    args, kwargs, _ = json.loads(base64.b64decode(json.loads(raw)["body"]))
    assert (args, kwargs) == ([5], {})
    row.refresh_from_db()
    assert row.status == "replayed" and row.audit[-1]["edited"] == {"args": [5], "kwargs": None}


def test_a_huge_replacement_is_audited_cut(queue):
    row = record(args=[1])
    deadletter.replay(row, args=["r" * BIG], queue=queue, by="ann")
    row.refresh_from_db()
    assert deadletter.is_truncated(row.audit[-1]["edited"]["args"][0])
    assert stored_size(row) < 10_000


def test_a_marker_given_back_as_a_replacement_is_refused(queue):
    row = record(args=["x" * BIG])
    with pytest.raises(ValueError, match=r"replacement args\[0\] is a marker of a value cut when stored"):
        deadletter.replay(row, args=list(row.args), queue=queue)


@pytest.mark.parametrize(("args", "kwargs", "message"), [
    ("ab", None, "replacement args must be a list (or tuple) of positional arguments, got str 'ab'"),
    ({"a": 1}, None, "replacement args must be a list"),
    (None, [1, 2], "replacement kwargs must be a dict of keyword arguments, got list [1, 2]"),
    (None, {1: 2}, "replacement kwargs must have string keys (argument names), got 1"),
])
def test_replacement_arguments_of_the_wrong_shape_are_refused_clearly(queue, args, kwargs, message):
    row = record(args=[1])
    with pytest.raises(TypeError) as raised:
        deadletter.replay(row, args=args, kwargs=kwargs, queue=queue)
    assert str(raised.value).startswith(message)
    row.refresh_from_db()
    assert row.status == "dead"
    assert redis.Redis.from_url(app.conf.broker_url).llen(queue) == 0


# -- settings ----------------------------------------------------------------------------------------

@pytest.mark.parametrize(("key", "value", "message"), [
    ("DEAD_LETTER_MAX_MESSAGE_CHARS", 10, "must be a whole number >= 200, got 10"),
    ("DEAD_LETTER_MAX_TRACEBACK_CHARS", "big", "must be a whole number >= 200, got 'big'"),
    ("DEAD_LETTER_MAX_ARGUMENT_BYTES", 100, "must be a whole number >= 1024, got 100"),
    ("DEAD_LETTER_MAX_HEADERS_BYTES", True, "must be a whole number >= 1024, got True"),
    ("DEAD_LETTER_MAX_ARGUMENTS_TOTAL_BYTES", 2000, "must be at least DEAD_LETTER_MAX_ARGUMENT_BYTES (65536)"),
])
def test_bad_caps_are_refused_with_what_to_change(key, value, message):
    with pytest.raises(ConfigurationError, match=message.replace("(", r"\(").replace(")", r"\)")):
        conf.build({key: value})
