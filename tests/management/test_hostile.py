"""`manage.py safetynet dead` under hostile data: huge rows print small; stored text cannot drive the terminal;
replacement arguments for rows that need them."""

import base64
import io
import json
import re
import time
import uuid

import pytest
from django.core.management import CommandError, call_command

from safetynet import deadletter
from safetynet.models import DeadLetter
from tests.fixtures.dead_letters import HUGE, huge_old_row, make_dead_letter, queued_messages

pytestmark = pytest.mark.django_db

#: What a terminal acts on: ESC (colours, cursor moves, OSC 8 links, window titles), BEL, backspace, carriage
#: return, DEL, the 8-bit CSI, a right-to-left override, a line separator.
HOSTILE = ("\x1b[2J\x1b[31mred\x1b[0m \x1b]8;;https://evil.example/\x07click\x1b]8;;\x07 \x1b]0;pwned\x07"
           " back\x08\x08\x08 over\rwrite \x7f \x9b31m \u202eevil\u202c \u2028next")
RAW = re.compile("[\x00-\x08\x0b-\x1f\x7f-\x9f\u202a-\u202e\u2028\u2029]")


def dead(*arguments):
    out = io.StringIO()
    call_command("safetynet", "dead", *arguments, stdout=out, stderr=io.StringIO())
    return out.getvalue()


def sent(queue):
    return [tuple(json.loads(base64.b64decode(message["body"]))[:2]) for message in queued_messages(queue)]


def hostile_row():
    """A row whose every text holds escape sequences: task name, message, traceback, detail, arguments, headers."""
    task_id = f"id-{uuid.uuid4()}\x1b[8m"
    deadletter.give_up(deadletter.Failure(
        task_name="shop.tasks.\x1b[32mcharge", task_id=task_id, reason="permanent_error", detail=HOSTILE,
        args=[HOSTILE], kwargs={"note": HOSTILE}, headers={"tenant": HOSTILE},
        exception=ValueError(HOSTILE), failed_at=time.time(),
        history=[{"attempt": 1, "started": time.time(), "message": HOSTILE, "traceback": f"Traceback\n  {HOSTILE}"}],
    ), log=False)
    return DeadLetter.objects.get(task_id=task_id)


def test_list_and_show_escape_what_a_terminal_would_act_on():
    row = hostile_row()
    listed, shown = dead("list"), dead("show", str(row.id))
    for output in (listed, shown):
        assert not RAW.search(output), RAW.findall(output)
        assert "\\x1b[31mred" in output and "\\x1b]8;;https://evil.example/\\x07click" in output
        assert "shop.tasks.\\x1b[32mcharge" in output
    # the list line is cut at 100 characters; the whole of it, in show
    for escape in ("\\x08", "\\x0d", "\\x7f", "\\x9b", "\\u202e", "\\u2028", "\\x1b]0;pwned\\x07"):
        assert escape in shown


def test_json_output_escapes_them_too_and_reads_back_the_same():
    row = hostile_row()
    for arguments in (("list", "--json"), ("show", str(row.id), "--json")):
        output = dead(*arguments)
        assert not RAW.search(output), RAW.findall(output)
        data = json.loads(output)
        item = data[0] if isinstance(data, list) else data
        assert item["exception_message"] == HOSTILE and item["task_name"] == "shop.tasks.\x1b[32mcharge"
    shown = json.loads(dead("show", str(row.id), "--json"))
    assert shown["args"] == [HOSTILE] and shown["history"][0]["message"] == HOSTILE


def test_a_lone_surrogate_does_not_crash_a_utf8_terminal():
    from safetynet.management.commands.safetynet import Command
    from safetynet.management.nouns._text import Noun

    stream = io.TextIOWrapper(io.BytesIO(), encoding="utf-8")
    noun = Noun(Command(stdout=stream))
    noun.stdout.write("half a pair: \ud800 here")
    noun.write_json({"message": "half a pair: \ud800 here"})
    stream.flush()
    text = stream.buffer.getvalue().decode()
    assert text.startswith("half a pair: \\ud800 here\n")
    assert json.loads(text[text.index("{"):])["message"] == "half a pair: \ud800 here"


def test_a_huge_old_row_prints_small():
    row = huge_old_row()
    for arguments in (("list",), ("list", "--json"), ("show", str(row.id)), ("show", str(row.id), "--json")):
        output = dead(*arguments)
        assert len(output) < 100_000, (arguments, len(output))
    listed = json.loads(dead("list", "--json"))[0]
    assert listed["exception_message"].endswith(f"[{HUGE} characters in all; the rest is not shown here]")
    shown = json.loads(dead("show", str(row.id), "--json"))
    assert deadletter.is_truncated(shown["args"][0]) and shown["args"][0]["bytes"] == HUGE + 2
    assert shown["shown_cut"] == ["args[0]", "headers.blob"] and shown["truncated"] == []
    assert f"{HUGE} characters in all, sha256" in shown["exception_message"]
    assert "too large to show, stored whole" in dead("show", str(row.id))


def test_a_row_whose_argument_was_cut_replays_with_args(throwaway_queue):
    row = make_dead_letter("tests.fixtures.dead_letter_tasks.ok", args=["x" * 100_000])
    shown = dead("show", str(row.id))
    assert "cut when stored" in shown and "args[0]" in shown and "replay it with --args/--kwargs" in shown
    with pytest.raises(CommandError, match=r"args\[0\] were cut when stored"):
        dead("replay", "--id", str(row.id), "--queue", throwaway_queue)
    refused = dead("replay", "--id", str(row.id), "--dry-run")
    assert f"(dead replay --id {row.id} --args '[...]' --kwargs '{{...}}')" in refused
    assert f"{row.id} tests.fixtures.dead_letter_tasks.ok: would be replayed" in dead(
        "replay", "--id", str(row.id), "--args", "[3]", "--dry-run")
    out = dead("replay", "--id", str(row.id), "--args", "[3]", "--queue", throwaway_queue, "--by", "ann")
    assert "replayed as" in out and sent(throwaway_queue) == [([3], {})]
    assert DeadLetter.objects.get(pk=row.pk).audit[-1]["edited"] == {"args": [3], "kwargs": None}


@pytest.mark.parametrize(("arguments", "message"), [
    (["--args", '"ab"'], "argument --args: replacement args must be a list (or tuple) of positional arguments"),
    (["--args", "[1,"], "argument --args: not JSON"),
    (["--kwargs", "[1, 2]"], "argument --kwargs: replacement kwargs must be a dict of keyword arguments, got list"),
])
def test_bad_replacement_arguments_are_refused_clearly(throwaway_queue, arguments, message):
    row = make_dead_letter("tests.fixtures.dead_letter_tasks.ok", args=[1])
    with pytest.raises(CommandError, match=re.escape(message)):
        dead("replay", "--id", str(row.id), "--queue", throwaway_queue, *arguments)
    assert DeadLetter.objects.get(pk=row.pk).status == "dead" and queued_messages(throwaway_queue) == []


def test_replacement_arguments_need_the_rows_named(throwaway_queue):
    make_dead_letter("tests.fixtures.dead_letter_tasks.ok", args=[1])
    with pytest.raises(CommandError, match="--args and --kwargs replace the arguments of the rows named by --id"):
        dead("replay", "--all", "--args", "[2]", "--queue", throwaway_queue)
    assert queued_messages(throwaway_queue) == []
