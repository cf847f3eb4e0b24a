"""The attempt history that travels in the message headers.

A retried message carries one header, ``safetynet``: the number of the attempt it will run,
when the first attempt started, the previous delay, and a bounded list of what happened in
earlier attempts. Nothing is written anywhere until the task dies.
"""

from __future__ import annotations

import json
import traceback
from dataclasses import dataclass, field
from typing import Any

__all__ = ["HEADER", "AttemptState", "entry_for", "qualified_name"]

HEADER = "safetynet"


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
    action: str,
    delay: float | None,
    reason: str,
    worker: str | None,
    traceback_max_chars: int,
) -> dict[str, Any]:
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


def _bounded(entries: list[dict[str, Any]], max_entries: int, max_bytes: int) -> tuple[list[dict[str, Any]], int]:
    """Keep the first and the latest entries within both bounds; return them and how many were dropped."""
    dropped = 0
    if len(entries) > max_entries:
        dropped = len(entries) - max_entries
        entries = entries[-1:] if max_entries == 1 else entries[:1] + entries[-(max_entries - 1):]

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


@dataclass
class AttemptState:
    """Where a task stands: which attempt runs now and what happened before."""

    attempt: int = 1
    started_at: float = 0.0
    previous_delay: float | None = None
    history: list[dict[str, Any]] = field(default_factory=list)
    omitted: int = 0

    @classmethod
    def from_headers(cls, headers: dict[str, Any] | None, started: float) -> AttemptState:
        """Read the state from a message's custom headers; a first attempt has none."""
        data = (headers or {}).get(HEADER)
        if not isinstance(data, dict):
            return cls(attempt=1, started_at=started)
        try:
            return cls(
                attempt=int(data.get("attempt", 1)),
                started_at=float(data.get("started_at", started)),
                previous_delay=data.get("previous_delay"),
                history=list(data.get("history") or []),
                omitted=int(data.get("omitted", 0)),
            )
        except (TypeError, ValueError):  # a mangled header must not kill the task: start afresh
            return cls(attempt=1, started_at=started)

    def with_entry(self, entry: dict[str, Any]) -> list[dict[str, Any]]:
        """The history with ``entry`` appended (not bounded: this is the final record)."""
        return [*self.history, entry]

    def header_after(
        self, entry: dict[str, Any], *, delay: float, consumes_attempt: bool, max_entries: int, max_bytes: int
    ) -> dict[str, Any]:
        """The header value for the next attempt, bounded in size."""
        entries, dropped = _bounded(self.with_entry(entry), max_entries, max_bytes)
        return {
            "v": 1,
            "attempt": self.attempt + 1 if consumes_attempt else self.attempt,
            "started_at": self.started_at,
            "previous_delay": delay,
            "history": entries,
            "omitted": self.omitted + dropped,
        }
