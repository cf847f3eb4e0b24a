"""``manage.py safetynet limits list|pause`` on the real Redis and, as the fallback, on the real PostgreSQL."""

import json
import logging
import os
import re
import uuid
from io import StringIO

import pytest
import redis
from django.core.management import CommandError, call_command
from django.test import override_settings

from safetynet import LimitReached, limits, signals

pytestmark = pytest.mark.django_db(transaction=True)

REDIS_URL = os.environ.get("SAFETYNET_TEST_BROKER", "redis://127.0.0.1:6379/13")


@pytest.fixture(params=["redis", "database"])
def declare(request):
    """Declare limits by name (on Redis, or on the database with REDIS_URL="") for one test; return their names."""
    stores = {"redis": REDIS_URL, "database": ""}
    active = []

    def declare(**declared):
        names = {key: f"cmd-{key}-{uuid.uuid4().hex[:6]}" for key in declared}
        settings = override_settings(SAFETYNET={"REDIS_URL": stores[request.param],
                                                "LIMITS": {names[key]: fields for key, fields in declared.items()}})
        settings.enable()
        active.append(settings)
        return names

    declare.store = request.param
    yield declare
    for settings in reversed(active):
        settings.disable()
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter("safetynet:limit:cmd-*"):
        client.delete(key)


def command(*args):
    out = StringIO()
    call_command("safetynet", "limits", *args, stdout=out)
    return out.getvalue()


def test_list_shows_each_limit_as_declared_and_its_use_now(declare):
    names = declare(api={"concurrency": 3, "rate": "10/m"}, relay={"rate": (20, 1)},
                    reports={"concurrency": 2, "partition_by": "customer_id"})
    api, relay, reports = names["api"], names["relay"], names["reports"]
    ticket = limits.acquire([(api, "")])
    assert ticket.store == declare.store
    limits.acquire([(reports, "c1")])
    limits.acquire([(reports, "c2")])

    lines = command("list").splitlines()
    assert lines[0].split() == ["limit", "concurrency", "rate", "partitioned", "slots", "in", "use", "calls", "in",
                                "window", "waiting", "line", "ends", "in", "paused", "for"]
    row = {line.split()[0]: line.split()[1:] for line in lines[1:4]}
    assert row[api] == ["3", "10/m", "no", "1/3", "1/10", "0", "-", "-"]
    assert row[relay] == ["-", "20/1s", "no", "-", "0/20", "0", "-", "-"]
    # Over all partitions; a partition's line and pause are its own, not shown.
    assert row[reports] == ["2", "-", "by", "customer_id", "2/2", "-", "-", "-", "-"]
    assert "each partition waits on a line of its own" in lines[4]

    limits.finish(ticket, None)
    [first, *_] = sorted(json.loads(command("list", "--json")), key=lambda state: state["name"] != api)
    assert first == {**first, "name": api, "concurrency": 3, "rate": "10/m", "partitioned": False, "in_use": 0,
                     "calls": 1, "waiting": 0, "paused_in": 0.0, "rule": "3 at once, 10 per min"}


def test_list_shows_the_line_of_refused_tasks_and_a_pause(declare):
    name = declare(api={"concurrency": 1})["api"]
    limits.acquire([(name, "")], task_id="first")
    with pytest.raises(LimitReached):
        limits.acquire([(name, "")], task_id="second")
    [row] = [line.split() for line in command("list").splitlines()[1:]]
    assert row[:6] == [name, "1", "-", "no", "1/1", "-"]
    assert row[6] == "1" and re.fullmatch(r"[0-9.]+s", row[7]) and row[8] == "-"

    assert re.search(r"is paused for (59|60)(\.\d+)?s:", command("pause", name, "--for", "60"))
    [row] = [line.split() for line in command("list").splitlines()[1:]]
    assert re.fullmatch(r"(59|60)(\.\d+)?s", row[8])
    with pytest.raises(LimitReached) as refused:
        limits.acquire([(name, "")], task_id="third")
    assert refused.value.reason == "paused" and refused.value.delay > 50


def test_pause_refuses_calls_for_that_long_and_keeps_a_longer_pause(declare, caplog):
    name = declare(api={"rate": "100/s"})["api"]
    paused = []

    def receiver(sender, **kwargs):
        paused.append(kwargs)

    signals.limit_paused.connect(receiver)
    try:
        with caplog.at_level(logging.WARNING, logger="safetynet"):
            out = command("pause", name, "--for", "0.5")
    finally:
        signals.limit_paused.disconnect(receiver)
    assert paused == [{"signal": signals.limit_paused, "name": name, "partition": "", "seconds": 0.5,
                       "by_hand": True}]
    assert f"Limit '{name}' is paused for" in out and "deferred until then" in out
    assert any("paused for 0.5s (by hand)" in record.getMessage() for record in caplog.records)
    with pytest.raises(LimitReached) as refused:
        limits.acquire([(name, "")])
    assert refused.value.reason == "paused" and 0 < refused.value.delay <= 0.5

    command("pause", name, "--for", "120")
    assert "a longer pause was already there" in command("pause", name, "--for", "10")
    assert json.loads(command("list", "--json"))[0]["paused_in"] > 100


def test_pause_a_partition_of_a_partitioned_limit(declare):
    name = declare(api={"concurrency": 5, "partition_by": "customer_id"})["api"]
    with pytest.raises(CommandError, match=rf"limit '{name}' is partitioned \(by customer_id\).*--partition"):
        command("pause", name, "--for", "30")
    assert "(partition 'c1') is paused" in command("pause", name, "--partition", "c1", "--for", "30")
    with pytest.raises(LimitReached) as refused:
        limits.acquire([(name, "c1")])
    assert refused.value.reason == "paused"
    limits.acquire([(name, "c2")])  # another customer's calls go through


def test_wrong_names_and_durations_are_clear_errors(declare):
    names = declare(api={"concurrency": 1}, relay={"rate": "5/s"})
    declared = ", ".join(sorted(names.values()))
    with pytest.raises(CommandError, match=re.escape("unknown limit 'nope'") + ".*" + re.escape(declared)):
        command("pause", "nope", "--for", "10")
    with pytest.raises(CommandError, match=f"limit '{names['api']}' is not partitioned"):
        command("pause", names["api"], "--partition", "c1", "--for", "10")
    for wrong in ("0", "-5", "86401", "nan", "inf", "soon", "1e9"):
        with pytest.raises(CommandError, match=r"--for: must be a number of seconds above 0 and at most 86400"):
            command("pause", names["api"], "--for", wrong)
    with pytest.raises(CommandError, match="required: --for"):
        command("pause", names["api"])
    assert limits.state_of(names["api"])["paused_in"] == 0  # nothing was paused by the refused commands
    assert "is paused for 24h" in command("pause", names["api"], "--for", "86400")


def test_no_limits_declared():
    with override_settings(SAFETYNET={"LIMITS": {}}):
        assert command("list") == "No limits: declare them in SAFETYNET['LIMITS'].\n"
        assert json.loads(command("list", "--json")) == []
        with pytest.raises(CommandError, match=r"unknown limit 'api'.*\(declared: none\)"):
            command("pause", "api", "--for", "10")


def test_the_command_lists_the_limits_noun():
    from safetynet.management.commands.safetynet import Command

    command = Command()
    assert "limits: `safetynet limits list|pause`" in command.help
    assert "limits" in command.create_parser("manage.py", "safetynet").format_help()
