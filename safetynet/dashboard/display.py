"""How stored rows read to staff: shared by the admin, the dashboard and the command line."""

from __future__ import annotations

import json
from datetime import datetime, timezone
from typing import Any

from safetynet.deadletter import ReplayOutcome

__all__ = ["audit_events", "history_entries", "ids_text", "replay_summary", "shown_json", "shown_moment"]


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


def history_entries(row: Any) -> list[dict[str, Any]]:
    """The row's attempt history, each entry with ``started_at`` as a datetime (for display)."""
    return [{**entry, "started_at": shown_moment(entry.get("started"))}
            for entry in row.history or [] if isinstance(entry, dict)]


def audit_events(row: Any) -> list[dict[str, Any]]:
    """The row's audit trail for display: action, when, by whom, and the rest as pretty JSON."""
    events = []
    for event in row.audit or []:
        if not isinstance(event, dict):
            continue
        extra = {key: value for key, value in event.items() if key not in ("action", "at", "by", "nonce")}
        events.append({"action": event.get("action", "?"), "at": shown_moment(event.get("at")),
                       "by": event.get("by") or "",
                       "extra": shown_json(extra) if extra else ""})
    return events
