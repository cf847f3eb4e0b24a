"""Redacting a Sentry event as it will be sent: keys, ``key=value`` text, exact secret values, task arguments."""

from __future__ import annotations

import ast
import functools
import re
from collections.abc import Iterable, Mapping
from typing import Any

from safetynet import conf, redaction

__all__ = ["redact_event"]

# Parts of an event that hold no user data (and that redaction must not change).
_STRUCTURAL = frozenset({
    "event_id", "timestamp", "start_timestamp", "platform", "type", "level", "sdk", "modules", "debug_meta",
    "fingerprint", "release", "dist", "environment", "server_name", "_meta",
})
# Source lines of stack frames: only exact secrets are scrubbed there, ``key=value`` text is code.
_SOURCE_CONTEXT = frozenset({"pre_context", "context_line", "post_context"})
_MAX_DEPTH = 64


def redact_event(event: dict[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """Redact a (serialized) Sentry event in place and return it.

    Values under a key named in REDACT_KEYS or matching REDACT_PATTERNS become "[redacted]"
    anywhere (extra, contexts, tags, request data and headers, breadcrumbs, frame variables);
    ``key=value`` pairs in text are blanked like dead-letter messages; ``secrets`` (exact
    values) are replaced in every string; a task's positional arguments (``celery-job``,
    Celery's log lines) are redacted by the task's parameter names.
    """
    settings = conf.get()
    pattern = _secrets_pattern(tuple(dict.fromkeys(secret for secret in secrets if secret)))

    def scrub(text: str) -> str:
        return pattern.sub(redaction.REDACTED, text) if pattern is not None else text

    def walk(value: Any, depth: int) -> Any:
        if isinstance(value, str):
            return redaction.redact_text(scrub(value))
        if depth > _MAX_DEPTH:
            return redaction.REDACTED if isinstance(value, (Mapping, list, tuple)) else value
        if isinstance(value, Mapping):
            if "args" in value:
                value = _redact_task_arguments(value, settings)
            result = {}
            for key, item in value.items():
                if isinstance(key, str) and redaction.is_sensitive(key, settings):
                    result[key] = redaction.REDACTED
                elif key in _SOURCE_CONTEXT:
                    result[key] = source(item)
                else:
                    result[key] = walk(item, depth + 1)
            return result
        if isinstance(value, (list, tuple)):
            return [walk(item, depth + 1) for item in value]
        return value

    def source(value: Any) -> Any:
        if isinstance(value, str):
            return scrub(value)
        if isinstance(value, list):
            return [source(item) for item in value]
        return value

    for key in list(event):
        if key not in _STRUCTURAL:
            event[key] = walk(event[key], 0)
    return event


_TASK_NAME_KEYS = ("task_name", "name", "task")


@functools.lru_cache(maxsize=32)
def _secrets_pattern(secrets: tuple[str, ...]) -> re.Pattern[str] | None:
    """One regex for all exact values, longest first (a secret that contains another goes whole)."""
    if not secrets:
        return None
    return re.compile("|".join(re.escape(secret) for secret in sorted(secrets, key=len, reverse=True)))


def _redact_task_arguments(mapping: Mapping[str, Any], settings: conf.Settings) -> Mapping[str, Any]:
    """A task's positional arguments, redacted by its parameter names.

    Celery's log lines ("Task x[id] received", their ``data``: name, args as a repr) and the
    Celery integration's ``celery-job`` extra (task_name, args) carry them; a repr that cannot
    be read back is redacted whole when the task has a sensitive positional parameter.
    """
    args = mapping.get("args")
    name = next((mapping[key] for key in _TASK_NAME_KEYS if isinstance(mapping.get(key), str)), None)
    if name is None or not isinstance(args, (list, tuple, str)):
        return mapping
    task = _registered_task(name)
    if task is None:
        return mapping
    sensitive = {index for index, parameter in enumerate(redaction.parameter_names(task)) if redaction.is_sensitive(parameter, settings)}
    if not sensitive:
        return mapping

    def redacted(values: Any) -> list[Any]:
        return [redaction.REDACTED if index in sensitive else value for index, value in enumerate(values)]

    if isinstance(args, str):
        try:
            parsed = ast.literal_eval(args)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed = None
        if isinstance(parsed, tuple):
            safe: Any = repr(tuple(redacted(parsed)))
        elif isinstance(parsed, list):
            safe = repr(redacted(parsed))
        else:
            safe = redaction.REDACTED
    else:
        safe = redacted(args)
    return {**mapping, "args": safe}


def _registered_task(name: str) -> Any:
    try:
        from celery import current_app

        return current_app.tasks.get(name)
    except Exception:
        return None
