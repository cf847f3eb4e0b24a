"""What the command line prints and reads: times, ages, tables, selections of dead letters."""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import re
import unicodedata
from collections.abc import Callable
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.core.management.base import BaseCommand, CommandParser
from django.utils import timezone

from safetynet.models import DeadLetter

__all__ = ["FILTERS", "Noun", "add_age_purge", "add_filters", "columns", "json_for_terminal", "local", "moment",
           "one_line", "os_user", "positive", "printable", "purge_by_age", "seconds", "span", "when"]

def seconds(value: float) -> str:
    if math.isinf(value):
        return "∞"
    if value >= 3600:
        return f"{value / 3600:.4g}h"
    if value >= 120:
        return f"{value / 60:.4g}m"
    return f"{value:.4g}s"


def span(low: float, high: float) -> str:
    return seconds(low) if low == high else f"{seconds(low)}–{seconds(high)}"


_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
FILTERS = ("task", "reason", "fingerprint", "status", "since", "until")


def moment(text: str) -> datetime:
    """An argparse type: an ISO 8601 date or datetime (naive: the current time zone) or an age ago (2h, 7d)."""
    value = text.strip()
    match = _AGE.match(value.lower())
    if match:
        try:
            return timezone.now() - timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
        except OverflowError:
            raise argparse.ArgumentTypeError(f"the age {text!r} is too large") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 date or datetime (2024-05-01, 2024-05-01T14:30, "
            "2024-05-01T14:30:00+02:00) nor an age (90s, 30m, 2h, 7d, 2w)"
        ) from None
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)


def positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def add_filters(parser: CommandParser, *, selects: str) -> None:
    reasons, statuses = DeadLetter.Reason.values, DeadLetter.Status.values
    group = parser.add_argument_group("filters (every one given must match)")
    group.add_argument("--task", metavar="NAME", help="task name, exact, or a prefix ending in * (shop.tasks.*)")
    group.add_argument("--reason", choices=reasons, metavar="REASON", help="one of " + ", ".join(reasons))
    group.add_argument("--fingerprint", metavar="SHA1", help="rows failing alike (see `dead show`)")
    group.add_argument("--status", choices=[*statuses, "all"], metavar="STATUS",
                       help=f"one of {', '.join(statuses)} or all (default: dead, or all with --id)")
    group.add_argument("--since", type=moment, metavar="WHEN",
                       help="last failure at or after: 2024-05-01, 2024-05-01T14:30, or an age ago: 30m, 2h, 7d")
    group.add_argument("--until", type=moment, metavar="WHEN", help="last failure before (same forms as --since)")
    group.add_argument("--id", type=int, action="append", metavar="ID", help=f"{selects} this row (repeatable)")


def one_line(text: str, width: int = 100) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= width else line[: width - 1] + "…"


def local(value: datetime | None) -> str:
    return timezone.localtime(value).isoformat(sep=" ", timespec="seconds") if value else "-"


def when(value: Any, timespec: str = "seconds") -> str:
    """An epoch (history entries) or an ISO 8601 string (audit events), in the current time zone."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            moment = datetime.fromtimestamp(value, tz=dt_timezone.utc)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value)
            moment = moment if timezone.is_aware(moment) else moment.replace(tzinfo=dt_timezone.utc)
        else:
            return "-" if value is None else str(value)
    except (OverflowError, OSError, ValueError):
        return str(value)
    return timezone.localtime(moment).isoformat(sep=" ", timespec=timespec)


def columns(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns; the last one is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths, strict=False)), row[-1]]).rstrip() for row in rows]


def os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


# -- stored text on a terminal -------------------------------------------------------------------

#: Candidates: anything but printable ASCII, newline and tab (then checked one by one, so text stays quick).
_NOT_PLAIN = re.compile(r"[^\x20-\x7e\n\t]")
#: Control, format (bidi overrides, zero-width), surrogate and line/paragraph separator characters.
_UNSAFE_CATEGORIES = frozenset({"Cc", "Cf", "Cs", "Zl", "Zp"})


def _unsafe(char: str) -> bool:
    return unicodedata.category(char) in _UNSAFE_CATEGORIES


def _escaped(match: re.Match[str]) -> str:
    char = match.group()
    if not _unsafe(char):
        return char
    code = ord(char)
    return f"\\x{code:02x}" if code < 0x100 else f"\\u{code:04x}" if code < 0x10000 else f"\\U{code:08x}"


def printable(text: str) -> str:
    """``text`` safe to print on a terminal: control and format characters written as escapes (ESC as ``\\x1b``,
    a carriage return as ``\\x0d``), so stored text cannot move the cursor, recolour, retitle or link; newlines
    and tabs are kept."""
    return _NOT_PLAIN.sub(_escaped, text)


def _json_escaped(match: re.Match[str]) -> str:
    char = match.group()
    if not _unsafe(char):
        return char
    code = ord(char)
    if code < 0x10000:
        return f"\\u{code:04x}"
    code -= 0x10000  # a UTF-16 surrogate pair, as JSON writes characters beyond the first plane
    return f"\\u{0xD800 + (code >> 10):04x}\\u{0xDC00 + (code & 0x3FF):04x}"


def json_for_terminal(text: str) -> str:
    """JSON text with the characters ``json.dumps(ensure_ascii=False)`` leaves raw but a terminal acts on (DEL, C1
    controls such as the 8-bit CSI, bidi overrides, line separators, lone surrogates) written as ``\\uXXXX``: the
    same JSON, safe to print. (They can only be inside strings: JSON's own syntax is ASCII.)"""
    return _NOT_PLAIN.sub(_json_escaped, text)


class _PrintableOutput:
    """The command's output, escaping what a terminal would act on in every line written."""

    def __init__(self, output: Any) -> None:
        self._output = output

    def write(self, message: str = "", style_func: Any = None, ending: str | None = None) -> None:
        self._output.write(printable(message), style_func=style_func, ending=ending)

    def __getattr__(self, name: str) -> Any:
        return getattr(self._output, name)


class Noun:
    """One noun of ``manage.py safetynet``: its actions write through the command's output.

    ``self.stdout`` escapes control characters in what it writes (stored text is shown, never acted on by the
    terminal); ``write_json`` writes JSON, which escapes them its own way.
    """

    def __init__(self, command: BaseCommand) -> None:
        self.stdout = _PrintableOutput(command.stdout)
        self._raw_stdout = command.stdout
        self.style = command.style

    def write_json(self, value: Any) -> None:
        """``value`` as indented JSON (safe to print: see ``json_for_terminal``)."""
        self._raw_stdout.write(json_for_terminal(json.dumps(value, indent=2, ensure_ascii=False, default=str)))


# -- purges of rows older than an age --------------------------------------------------------------


def add_age_purge(actions: Any, *, help: str, description: str) -> None:
    """A ``purge`` action with ``--older-than AGE`` and ``--dry-run`` (for rows not changed for an age)."""
    purge = actions.add_parser("purge", help=help, description=description)
    purge.add_argument("--older-than", type=moment, metavar="AGE",
                       help="an age (30d, 12h, 2w) or an ISO 8601 date or datetime")
    purge.add_argument("--dry-run", action="store_true", help="print how many would be deleted; delete nothing")


def purge_by_age(noun: Noun, options: dict[str, Any], *, keep_seconds: float, rows: str,
                 count: Callable[[datetime], int], delete: Callable[[datetime], int]) -> None:
    """Delete the ``rows`` last changed before --older-than (default: ``keep_seconds`` ago) with ``delete``, or
    with --dry-run only say how many ``count`` finds; either way, say how many and before when."""
    before = options["older_than"] or timezone.now() - timedelta(seconds=keep_seconds)
    if options["dry_run"]:
        noun.stdout.write(f"Dry run: would delete {count(before)} {rows} last changed before {local(before)}.")
        return
    noun.stdout.write(f"Deleted {delete(before)} {rows} last changed before {local(before)}.")
