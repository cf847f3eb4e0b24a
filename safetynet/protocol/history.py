"""The attempt history that travels in the headers of a retried message.

A retried message carries one header (``headers.HISTORY``): the number of the attempt it will run,
when the first attempt started, the previous delay, and a bounded list of what happened in earlier
attempts (``HistoryEntry``). Nothing is written anywhere until the task dies; then the history is
stored with its dead letter.
"""

from __future__ import annotations

import json
import traceback
from collections.abc import Mapping
from dataclasses import dataclass, field
from typing import Any, Literal, TypedDict, cast

from safetynet.protocol.headers import HISTORY

__all__ = ["Action", "History", "HistoryEntry", "entry_for", "qualified_name"]

#: What was decided after an attempt.
Action = Literal["retry", "snooze", "dead"]


class HistoryEntry(TypedDict):
    """One attempt as recorded: when, how long, what was raised and what was decided."""

    attempt: int
    #: When the attempt started, in seconds since the epoch.
    started: float
    #: How long it ran, in seconds.
    duration: float
    #: The exception's class (``smtplib.SMTPException``; builtins unqualified), or None.
    exception: str | None
    #: ``str(exception)``, at most 500 characters.
    message: str
    #: The end of the formatted traceback (``TRACEBACK_MAX_CHARS``), or "".
    traceback: str
    #: The worker's host name, or None.
    worker: str | None
    action: Action
    #: The wait before the next attempt, in seconds (None when the task died).
    delay: float | None
    #: The rule or reason that decided it.
    reason: str


def qualified_name(exception: BaseException) -> str:
    """An exception's class as recorded: ``smtplib.SMTPException``, builtins unqualified (``ConnectionError``)."""
    klass = type(exception)
    return klass.__qualname__ if klass.__module__ == "builtins" else f"{klass.__module__}.{klass.__qualname__}"


def entry_for(
    attempt: int,
    started: float,
    ended: float,
    exception: BaseException | None,
    *,
    action: Action,
    delay: float | None,
    reason: str,
    worker: str | None,
    traceback_max_chars: int,
) -> HistoryEntry:
    """One attempt as recorded: when, how long, what was raised and what was decided."""
    text = ""
    if exception is not None and exception.__traceback__ is not None:
        text = "".join(traceback.format_exception(exception))[-traceback_max_chars:]
    return {
        "attempt": attempt,
        "started": round(started, 6),
        "duration": round(max(0.0, ended - started), 6),
        "exception": qualified_name(exception) if exception is not None else None,
        "message": str(exception)[:500] if exception is not None else "",
        "traceback": text,
        "worker": worker,
        "action": action,
        "delay": delay,
        "reason": reason,
    }


def _bounded(entries: list[HistoryEntry], max_entries: int, max_bytes: int) -> tuple[list[HistoryEntry], int]:
    """Keep the first and the latest entries within both bounds; return them and how many were dropped."""
    dropped = 0
    if len(entries) > max_entries:
        dropped = len(entries) - max_entries
        entries = entries[-1:] if max_entries == 1 else entries[:1] + entries[-(max_entries - 1):]
    entries = [dict(entry) for entry in entries]  # type: ignore[misc]  # copies: tracebacks are blanked below

    def size() -> int:
        return len(json.dumps(entries, default=str))

    # Tracebacks are the bulk: drop them oldest first, then drop whole middle entries.
    for entry in entries[:-1]:
        if size() <= max_bytes:
            break
        entry["traceback"] = ""
    while size() > max_bytes and len(entries) > 2:
        entries.pop(1)
        dropped += 1
    return entries, dropped


def _entries(value: Any) -> list[HistoryEntry]:
    """The entries of a header as sent; anything that is not an entry is left out."""
    if not isinstance(value, list):
        return []
    return [cast(HistoryEntry, item) for item in value if isinstance(item, dict)]


@dataclass
class History:
    """Where a task stands: which attempt runs now and what happened before."""

    attempt: int = 1
    started_at: float = 0.0
    previous_delay: float | None = None
    entries: list[HistoryEntry] = field(default_factory=list)
    omitted: int = 0
    #: How many earlier attempts the hard time limit killed.
    time_limits: int = 0

    @classmethod
    def from_headers(cls, headers: Mapping[str, Any] | None, started: float) -> History:
        """Read the state from a message's custom headers; a first attempt has none."""
        data = (headers or {}).get(HISTORY)
        if not isinstance(data, dict):
            return cls(attempt=1, started_at=started)
        try:
            attempt = int(data.get("attempt", 1))
            previous = data.get("previous_delay")
            return cls(
                attempt=max(1, attempt),
                started_at=float(data.get("started_at", started)),
                previous_delay=None if previous is None else float(previous),
                entries=_entries(data.get("history")),
                omitted=max(0, int(data.get("omitted", 0))),
                time_limits=max(0, int(data.get("time_limits", 0))),
            )
        except (TypeError, ValueError, OverflowError):  # a mangled header must not kill the task: start afresh
            return cls(attempt=1, started_at=started)

    @property
    def number(self) -> int:
        """How many entries were ever written (kept and omitted): the next entry's index."""
        return self.omitted + len(self.entries)

    def snoozes(self) -> int:
        """How many deferrals the kept entries record."""
        return sum(1 for entry in self.entries if entry.get("action") == "snooze")

    def with_entry(self, entry: HistoryEntry) -> list[HistoryEntry]:
        """The history with ``entry`` appended (not bounded: this is the final record)."""
        return [*self.entries, entry]

    def header_after(
        self, entry: HistoryEntry, *, delay: float, consumes_attempt: bool, max_entries: int, max_bytes: int,
        time_limit: bool = False,
    ) -> dict[str, Any]:
        """The header value for the next attempt, bounded in size (``time_limit``: the hard limit killed this one)."""
        entries, dropped = _bounded(self.with_entry(entry), max_entries, max_bytes)
        header = {
            "v": 1,
            "attempt": self.attempt + 1 if consumes_attempt else self.attempt,
            "started_at": self.started_at,
            "previous_delay": delay,
            "history": entries,
            "omitted": self.omitted + dropped,
        }
        if self.time_limits or time_limit:
            header["time_limits"] = self.time_limits + int(time_limit)
        return header
