"""Data PostgreSQL refuses (NUL, lone surrogates, NaN, objects JSON cannot hold, names too long), on the real database.

Stored made storable at once and through the spool; what no cleaning fixes goes to the quarantine
and never holds back the spool files after it.
"""

import json
import logging
import math
import time
import uuid
from datetime import datetime, timezone

import pytest
from django.core import mail
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from django.db import connection

from safetynet import deadletter
from safetynet.deadletter._storable import storable
from safetynet.models import DeadLetter
from safetynet.protocol import headers as header_names
from tests.fixtures.spool import REPLACEMENT, failure, quarantine_names, raw_fields, spool_file

pytestmark = pytest.mark.usefixtures("fresh_alert_window")


NUL = "bad\x00value"


def stored(task_id):
    return DeadLetter.objects.get(task_id=task_id)


@pytest.mark.django_db
def test_a_nul_anywhere_is_stored_sanitised_on_postgresql():
    row_id = str(uuid.uuid4())
    ended = deadletter.give_up(failure(
        task_id=row_id, exception=ValueError(NUL), detail=f"decided {NUL}", args=[NUL, {"nested": [NUL]}],
        kwargs={"profile": {f"key{NUL}": 1, "name": NUL}}, headers={"x-trace": NUL, f"x-{NUL}": "v"},
        history=[{"attempt": 1, "started": time.time(), "action": "dead", "message": NUL,
                  "traceback": f"Traceback\nValueError: {NUL}\n"}],
    ), log=False)
    row = stored(row_id)
    assert ended.dead_letter.kept_in == "database" and ended.dead_letter.id == row.pk
    clean = f"bad{REPLACEMENT}value"
    assert row.exception_message == clean and clean in row.traceback and clean in row.detail
    assert row.args == [clean, {"nested": [clean]}]
    assert row.kwargs == {"profile": {f"key{clean}": 1, "name": clean}}
    assert row.headers == {"x-trace": clean, f"x-{clean}": "v"}
    assert row.history[0]["message"] == clean
    # What replay would send is not what the task got: listed, so replay asks for replacements.
    assert set(row.redacted) == {"args[0]", "args[1].nested[0]", f"kwargs.profile.key{clean}", "kwargs.profile.name",
                                 "headers.x-trace", f"headers.x-{clean}"}
    assert "were redacted" in deadletter.replay_refusal(row, object())


@pytest.mark.django_db
def test_lone_surrogates_nan_and_objects_json_cannot_hold_are_stored():
    row_id = str(uuid.uuid4())
    moment = datetime(2024, 5, 1, 12, 30, tzinfo=timezone.utc)
    deadletter.give_up(failure(
        task_id=row_id, exception=ValueError("bad \udc80 byte, pair \ud83d\ude00"),
        args=["\udcff", math.nan, math.inf, moment, {1: "int key", (1, 2): "tuple key"}],
    ), log=False)
    row = stored(row_id)
    assert row.exception_message == f"bad {REPLACEMENT} byte, pair \U0001f600"
    assert row.args[:3] == [REPLACEMENT, "nan", "inf"]
    assert row.args[3] == {"__type__": "datetime", "__value__": moment.isoformat()}  # kombu decodes it back
    assert row.args[4] == {"1": "int key", "(1, 2)": "tuple key"}
    assert set(row.redacted) == {"args[0]", "args[1]", "args[2]", "args[4].(1, 2)"}


@pytest.mark.django_db
def test_names_too_long_for_their_columns_and_counts_out_of_range_are_stored():
    long_id = "t" * 400
    deadletter.give_up(failure(
        task_id=long_id, task_name="n" * 300, delivery_info={"routing_key": "r" * 300, "exchange": "e" * 300},
        history=[{"attempt": 10**12, "started": time.time(), "action": "dead", "message": "", "traceback": ""}],
        omitted=-3,
    ), log=False)
    row = DeadLetter.objects.get(task_name="n" * 255)
    assert len(row.task_id) == 255 and row.task_id.startswith("t" * 100) and "sha256:" in row.task_id
    assert row.routing_key == "r" * 255 and row.exchange == "e" * 255
    assert row.attempts == 2**31 - 1 and row.omitted_attempts == 0
    # The same task recorded again (a redelivered message) is still one row: the cut id is stable.
    assert deadletter.give_up(failure(task_id=long_id, task_name="n" * 300), log=False) is None


@pytest.mark.django_db
def test_a_replay_whose_original_was_purged_is_stored_without_the_link():
    original = deadletter.give_up(failure(), log=False).dead_letter.id
    DeadLetter.objects.filter(pk=original).delete()
    ended = deadletter.give_up(failure(task_id="replayed", headers={header_names.REPLAY_OF: str(original)}),
                               log=False)
    assert ended.dead_letter.kept_in == "database" and stored("replayed").replay_of_id is None


@pytest.mark.django_db
def test_a_nul_is_stored_sanitised_via_the_spool(private_spool):
    spool_file(private_spool, raw_fields(task_id="spooled-nul", exception_message=NUL, args=[NUL],
                                         kwargs={f"k{NUL}": {"deep": NUL}}, headers={"x-h": NUL}))
    assert deadletter.flush_spool() == 1
    row = stored("spooled-nul")
    clean = f"bad{REPLACEMENT}value"
    assert row.exception_message == clean and row.args == [clean] and row.headers == {"x-h": clean}
    assert row.kwargs == {f"k{clean}": {"deep": clean}}
    assert {"args[0]", f"kwargs.k{clean}", "headers.x-h"} <= set(row.redacted)
    assert list(private_spool.glob("*.json")) == []


@pytest.mark.django_db(transaction=True)
def test_a_nul_recorded_while_the_database_is_down_is_stored_sanitised_after(private_spool, database):
    database.down()
    deadletter.give_up(failure(task_id="nul-while-down", exception=ValueError(NUL), args=[NUL]), log=False)
    database.up()
    assert deadletter.flush_spool() == 1
    row = stored("nul-while-down")
    assert row.exception_message == f"bad{REPLACEMENT}value" and row.args == [f"bad{REPLACEMENT}value"]


@pytest.mark.parametrize("unstorable", [
    {"task_name": None},  # NOT NULL: IntegrityError, which no cleaning fixes
    {"first_failed_at": "the day the database broke"},  # not a date: ValueError before anything is sent
    {"attempts": "many"},  # not a number: Django refuses it
])
@pytest.mark.django_db
def test_a_spool_file_the_database_refuses_is_quarantined_and_does_not_delay_the_files_after_it(
        private_spool, caplog, quarantined_signals, unstorable):
    refused = spool_file(private_spool, raw_fields(task_id="a-refused", **unstorable))
    spool_file(private_spool, raw_fields(task_id="b-after"))
    spool_file(private_spool, raw_fields(task_id="c-after", args=[NUL]))
    with caplog.at_level(logging.WARNING, logger="safetynet"):
        assert deadletter.flush_spool() == 2
    assert set(DeadLetter.objects.values_list("task_id", flat=True)) == {"b-after", "c-after"}
    assert quarantine_names(private_spool) == ["a-refused.json"] and not refused.exists()
    [line] = [record for record in caplog.records if getattr(record, "action", "") == "quarantine"]
    assert line.levelno == logging.ERROR and "a-refused.json" in line.getMessage()
    assert "refused by the database" in line.getMessage() and line.task_id == "a-refused"
    [sent] = quarantined_signals
    assert sent["kind"] == "unstorable" and sent["task_id"] == "a-refused" and sent["record"]["task_id"] == "a-refused"
    [message] = mail.outbox
    assert "could not be stored" in message.subject and "a-refused" in message.body
    # Quarantined once for all: the next flush has nothing left to try.
    assert deadletter.flush_spool() == 0 and quarantine_names(private_spool) == ["a-refused.json"]


@pytest.mark.django_db
def test_a_record_the_database_refuses_on_the_direct_path_is_quarantined_not_spooled(private_spool, caplog,
                                                                                    quarantined_signals):
    with connection.cursor() as cursor:  # a rule of the database no cleaning can satisfy (rolled back after the test)
        cursor.execute("ALTER TABLE safetynet_deadletter ADD CONSTRAINT test_refused CHECK (task_name <> 'refused')")
    with caplog.at_level(logging.ERROR, logger="safetynet"):
        ended = deadletter.give_up(failure(task_name="refused", task_id="refused-1"), log=False)
    assert ended.dead_letter.kept_in == "quarantine" and ended.dead_letter.id is None
    assert not DeadLetter.objects.filter(task_id="refused-1").exists()
    assert list(private_spool.glob("*.json")) == []  # not spooled: it would block the spool for ever
    [path] = (private_spool / "quarantine").iterdir()
    assert json.loads(path.read_bytes().split(b"\n", 1)[1])["task_id"] == "refused-1"
    assert "IntegrityError" in caplog.text and "refused-1" in caplog.text
    assert [item["kind"] for item in quarantined_signals] == ["unstorable"]
    bodies = [message.body for message in mail.outbox]
    assert any("kept in the spool's quarantine folder" in body for body in bodies)  # the death's own alert
    assert any(str(path) in body for body in bodies)  # the quarantine's alert
    # The database is fine for everything else meanwhile (the refusal only rolled back its savepoint).
    deadletter.give_up(failure(task_id="accepted"), log=False)
    assert DeadLetter.objects.filter(task_id="accepted").exists()


# Text with what PostgreSQL refuses mixed in: NUL, lone surrogates, a surrogate pair split in two.
hostile_text = st.lists(st.one_of(st.characters(), st.sampled_from(["\x00", "\ud800", "\udc80", "\udfff", "\ud83d"])),
                        max_size=12).map("".join)
json_like = st.recursive(
    st.one_of(st.none(), st.booleans(), st.integers(), st.floats(), hostile_text),
    lambda children: st.one_of(st.lists(children, max_size=4), st.dictionaries(hostile_text, children, max_size=4)),
    max_leaves=12,
)


def texts(value):
    """Every text in a JSON value, dict keys included."""
    if isinstance(value, str):
        yield value
    elif isinstance(value, dict):
        for key, item in value.items():
            yield key
            yield from texts(item)
    elif isinstance(value, list):
        for item in value:
            yield from texts(item)


@pytest.mark.django_db
@settings(max_examples=60, deadline=None, suppress_health_check=[HealthCheck.function_scoped_fixture])
@given(message=hostile_text, args=st.lists(json_like, max_size=3), kwargs=st.dictionaries(hostile_text, json_like,
                                                                                          max_size=3),
       headers=st.dictionaries(hostile_text, json_like, max_size=2))
def test_whatever_the_text_postgresql_stores_the_dead_letter(private_spool, message, args, kwargs, headers):
    task_id = str(uuid.uuid4())
    ended = deadletter.give_up(failure(task_id=task_id, exception=ValueError(message), args=args, kwargs=kwargs,
                                       headers=headers), log=False)
    assert ended.dead_letter.kept_in == "database"
    row = stored(task_id)
    # What was stored is what storable made of it: nothing was lost beyond the characters replaced.
    assert row.exception_message == storable({"exception_message": message})["exception_message"]
    for text in texts([row.args, row.kwargs, row.headers, row.exception_message, row.traceback]):
        assert "\x00" not in text and not any("\ud800" <= character <= "\udfff" for character in text)
    assert len(row.args) == len(args)
    assert not list(private_spool.glob("*.json"))  # never taken for an outage
