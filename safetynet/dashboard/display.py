"""How stored rows read to staff: shared by the admin, the dashboard and the command line.

Nothing shown is larger than the cap of one field (``DEAD_LETTER_MAX_*``): a row stored before the
caps existed, or written by hand, is cut here the way recording cuts a new one; the lists read only
the start of the long columns from the database (``with_heads``).
"""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from django.db.models import QuerySet
from django.db.models.functions import Left, Length, Right

from safetynet import conf, deadletter
from safetynet.deadletter import ReplayOutcome

__all__ = [
    "audit_events", "bounded_head", "history_entries", "ids_text", "replay_summary", "shown", "shown_json",
    "shown_moment", "with_heads",
]


def replay_summary(outcomes: list[ReplayOutcome], *, most: int = 20) -> tuple[str | None, list[str]]:
    """What a replay did, said to staff: one line for the rows sent, one per kind of refusal
    (so a thousand alike refusals make one line)."""
    sent = [outcome for outcome in outcomes if outcome.new_task_id]
    done = None
    if sent:
        noun = "dead letter" if len(sent) == 1 else "dead letters"
        done = (f"Replayed {len(sent)} {noun}: "
                + ", ".join(f"#{outcome.dead_letter_id} as {outcome.new_task_id}" for outcome in sent[:most])
                + (f" and {len(sent) - most} more" if len(sent) > most else "") + ".")
    refused: dict[str, list[int]] = {}
    for outcome in outcomes:
        if outcome.error:
            refused.setdefault(outcome.error, []).append(outcome.dead_letter_id)
    return done, [f"Not replayed, left as {'it was' if len(ids) == 1 else 'they were'}: {ids_text(ids, most)}: {error}"
                  for error, ids in refused.items()]


def ids_text(ids: list[int], most: int = 20) -> str:
    """Row ids as staff read them: ``#1, #2 and 3 more``."""
    shown = ", ".join(f"#{pk}" for pk in ids[:most])
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")


# -- reading rows back -------------------------------------------------------------------

def shown_moment(value: Any) -> datetime | None:
    """A time stored in a history entry or an audit event (epoch seconds or ISO text, naive meaning UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def shown_json(value: Any) -> str:
    """A stored value as staff read it: indented JSON, keys sorted."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def shown(row: Any) -> dict[str, Any]:
    """The long fields of a dead letter within the caps, as they are shown (worked out once per row)."""
    cached = row.__dict__.get("_safetynet_shown")
    if cached is None:
        cached = deadletter.cap_fields({
            "exception_message": row.exception_message or "", "detail": row.detail or "",
            "traceback": row.traceback or "", "args": row.args, "kwargs": row.kwargs, "headers": row.headers or {},
            "history": [entry for entry in row.history or [] if isinstance(entry, dict)],
            "omitted_attempts": row.omitted_attempts or 0,
        })
        # Cut when stored (markers in the row: replay needs replacements) or only here (stored whole, shown cut).
        stored = set(deadletter.truncated_paths(row.args, row.kwargs) + _cut_headers(row.headers))
        shown = deadletter.truncated_paths(cached["args"], cached["kwargs"]) + _cut_headers(cached["headers"])
        cached["truncated"] = [path for path in shown if path in stored]
        cached["shown_cut"] = [path for path in shown if path not in stored]
        row.__dict__["_safetynet_shown"] = cached
    return cached


def _cut_headers(headers: Any) -> list[str]:
    if deadletter.is_truncated(headers):
        return ["headers"]
    if not isinstance(headers, dict):
        return []
    return [f"headers.{name}" for name, value in headers.items() if deadletter.is_truncated(value)]


def history_entries(row: Any) -> list[dict[str, Any]]:
    """The row's attempt history (within the caps), each entry with ``started_at`` as a datetime (for display)."""
    return [{**entry, "started_at": shown_moment(entry.get("started"))} for entry in shown(row)["history"]]


def audit_events(row: Any) -> list[dict[str, Any]]:
    """The row's audit trail for display: action, when, by whom, and the rest as pretty JSON (within the caps)."""
    limit = conf.get().dead_letter_max_argument_bytes
    events = []
    for event in row.audit or []:
        if not isinstance(event, dict):
            continue
        extra = {key: value for key, value in event.items() if key not in ("action", "at", "by", "nonce")}
        extra = deadletter.cap_value(extra, limit)[0] if extra else extra
        events.append({"action": str(event.get("action", "?"))[:100], "at": shown_moment(event.get("at")),
                       "by": str(event.get("by") or "")[:255],
                       "extra": shown_json(extra) if extra else ""})
    return events


# -- lists: only the start of the long columns is read -------------------------------------------

#: The long text columns a list may show, and whether their start (False) or end (True) matters.
_LONG_COLUMNS = {"exception_message": False, "traceback": True, "detail": False}


def with_heads(rows: QuerySet, *columns: str, most: int | None = None) -> QuerySet:
    """``rows`` without ``columns``, but with ``<column>_head`` (their start, a traceback its end: at most its cap,
    or ``most`` characters) and ``<column>_length`` read in the database: a list of huge rows reads kilobytes."""
    settings = conf.get()
    annotations: dict[str, Any] = {}
    for column in columns:
        limit = (settings.dead_letter_max_traceback_chars if column == "traceback"
                 else settings.dead_letter_max_message_chars)
        limit = min(limit, most) if most is not None else limit
        annotations[f"{column}_head"] = (Right if _LONG_COLUMNS[column] else Left)(column, limit)
        annotations[f"{column}_length"] = Length(column)
    return rows.defer(*columns).annotate(**annotations)


def bounded_head(row: Any, column: str) -> str:
    """A long column read by ``with_heads``: whole if it fits its cap, else its start (or end) and a note."""
    head, length = getattr(row, f"{column}_head") or "", getattr(row, f"{column}_length") or 0
    if length <= len(head):
        return head
    note = f"[{length} characters in all; the rest is not shown here]"
    if _LONG_COLUMNS[column]:
        return note + " …\n" + head[len(note) + 3:]
    return head[:max(0, len(head) - len(note) - 3)] + " … " + note
