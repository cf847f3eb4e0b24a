"""Size caps: what a dead letter keeps of a huge message, traceback, argument or header.

A value over its cap is not stored whole: a text keeps its start (a traceback its end) and a
marked note with its full size and sha256; an argument (each positional argument, each keyword
argument's value) or a header value is replaced by a **marker object**::

    {"__safetynet_truncated__": true, "bytes": 10485762, "sha256": "…", "head": "[\\"aaaa…"}

``bytes`` and ``sha256`` are those of the value's compact JSON (``separators=(",", ":")``,
``ensure_ascii=False``, UTF-8) after redaction; ``head`` is the start of that JSON, redacted once
more as free text. A row holding a marker in its arguments cannot be replayed without
replacement arguments. The caps are applied when a record is made, when a spooled record is
stored, and again when a row is shown (rows stored before the caps existed, or edited by hand).
Applying them twice changes nothing.
"""

from __future__ import annotations

import hashlib
import json
from collections.abc import Iterable, Mapping
from typing import Any

from safetynet import conf
from safetynet.redaction import redact_text, scrub_values

__all__ = [
    "HEAD_CHARS",
    "TRUNCATED",
    "cap_arguments",
    "cap_fields",
    "cap_headers",
    "cap_history",
    "cap_text",
    "cap_traceback",
    "cap_value",
    "is_truncated",
    "truncated_paths",
]

#: The key that makes a dict a marker. Real arguments do not use it: a marker is only ever made here.
TRUNCATED = "__safetynet_truncated__"
#: How much of a cut value's JSON its marker keeps.
HEAD_CHARS = 256
_MARKER_KEYS = frozenset({TRUNCATED, "bytes", "sha256", "head"})
#: Fewer bytes than any marker's JSON (its keys and a sha256 alone take more): a value this small is never
#: replaced by one.
_MARKER_LEAST = 100


def _encoded(text: str) -> bytes:
    return text.encode("utf-8", "surrogatepass")


def is_truncated(value: Any) -> bool:
    """Whether ``value`` is a marker standing for a value cut when stored."""
    return isinstance(value, Mapping) and value.get(TRUNCATED) is True and set(value) == _MARKER_KEYS


def _head(text: str, secrets: list[str]) -> str:
    """The start of a value's JSON, with secrets blanked: over a window that holds any secret met whole."""
    window = text[:HEAD_CHARS + max((len(secret) for secret in secrets), default=0) + 64]
    return redact_text(scrub_values(window, secrets))[:HEAD_CHARS]


def _marker(text: str, secrets: list[str], data: bytes | None = None) -> dict[str, Any]:
    """The marker of a value whose compact JSON is ``text`` (``data``: its UTF-8, when made already)."""
    data = _encoded(text) if data is None else data
    return {TRUNCATED: True, "bytes": len(data), "sha256": hashlib.sha256(data).hexdigest(),
            "head": _head(text, secrets)}


def _compact(value: Any) -> str:
    return json.dumps(value, ensure_ascii=False, separators=(",", ":"))


def _size(value: Any) -> int:
    return len(_encoded(_compact(value)))


def _as_json(value: Any) -> tuple[Any, str]:
    """``value`` as it is stored (a value JSON cannot hold becomes its text) and its compact JSON."""
    try:
        return value, _compact(value)
    except (TypeError, ValueError):
        text = json.dumps(value, ensure_ascii=False, separators=(",", ":"), default=str)
        return json.loads(text), text


def cap_value(value: Any, limit: int, secrets: Iterable[str] = ()) -> tuple[Any, int]:
    """``value``, or its marker when its JSON takes more than ``limit`` bytes; and the bytes of what is kept.

    The value is turned into JSON once, and that JSON into bytes once (measured and hashed).
    """
    if is_truncated(value):
        return value, _size(value)
    kept, text = _as_json(value)
    data = _encoded(text)
    if len(data) <= limit:
        return kept, len(data)
    marker = _marker(text, list(secrets), data)
    return marker, _size(marker)


def _note(size: int, sha256: str) -> str:
    return f"[truncated by safetynet: {size} characters in all, sha256 {sha256}]"


def cap_text(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else its start and a note (``limit`` in all)."""
    if len(text) <= limit:
        return text
    note = "\n… " + _note(len(text), hashlib.sha256(_encoded(text)).hexdigest())
    return text[:max(0, limit - len(note))] + note


def cap_traceback(text: str, limit: int) -> str:
    """``text`` if it has at most ``limit`` characters, else a note and its end (where the exception is)."""
    if len(text) <= limit:
        return text
    note = _note(len(text), hashlib.sha256(_encoded(text)).hexdigest()) + " …\n"
    return note + text[len(text) - max(0, limit - len(note)):]


def _fit(values: dict[Any, Any], sizes: dict[Any, int], budget: int, secrets: list[str]) -> bool:
    """Replace the largest values by markers until ``sizes`` add up to at most ``budget``; whether they do.

    The total is kept as it goes (a message with 100,000 small arguments is one pass, not 100,000 sums)."""
    total = sum(sizes.values())
    for key in sorted(sizes, key=sizes.__getitem__, reverse=True):
        if total <= budget:
            return True
        if is_truncated(values[key]):
            continue
        if sizes[key] <= _MARKER_LEAST:  # no marker is smaller than this: neither is any value after it
            break
        marker = _marker(_as_json(values[key])[1], secrets)
        marker_size = _size(marker)
        if marker_size < sizes[key]:  # else a marker saves nothing here
            total -= sizes[key] - marker_size
            values[key], sizes[key] = marker, marker_size
    return total <= budget


def cap_arguments(args: Any, kwargs: Any, settings: conf.Settings | None = None, secrets: Iterable[str] = ()
                  ) -> tuple[Any, Any]:
    """Each argument within ``DEAD_LETTER_MAX_ARGUMENT_BYTES``, all of them within the total.

    When many small arguments are still over the total, ``args`` or ``kwargs`` as a whole (the
    larger first) is replaced by one marker.
    """
    settings = settings or conf.get()
    secrets = list(secrets)
    each, total = settings.dead_letter_max_argument_bytes, settings.dead_letter_max_arguments_total_bytes
    values: dict[Any, Any] = {}
    sizes: dict[Any, int] = {}
    positional = [] if is_truncated(args) else list(args or [])
    keywords = {} if is_truncated(kwargs) else dict(kwargs or {})
    for index, value in enumerate(positional):
        values[("args", index)], sizes[("args", index)] = cap_value(value, each, secrets)
    for name, value in keywords.items():
        values[("kwargs", name)], size = cap_value(value, each, secrets)
        sizes[("kwargs", name)] = size + len(_encoded(json.dumps(str(name), ensure_ascii=False))) + 1
    fits = _fit(values, sizes, total, secrets)
    new_args = args if is_truncated(args) else [values[("args", index)] for index in range(len(positional))]
    new_kwargs = kwargs if is_truncated(kwargs) else {name: values[("kwargs", name)] for name in keywords}
    if fits:
        return new_args, new_kwargs
    side_sizes = {side: sum(size for (kind, _), size in sizes.items() if kind == side) for side in ("args", "kwargs")}
    for side in sorted(side_sizes, key=side_sizes.__getitem__, reverse=True):
        if sum(side_sizes.values()) <= total:
            break
        whole = _marker(_compact(new_args if side == "args" else new_kwargs), secrets)
        if side == "args":
            new_args = whole
        else:
            new_kwargs = whole
        side_sizes[side] = _size(whole)
    return new_args, new_kwargs


def cap_headers(headers: Any, settings: conf.Settings | None = None, secrets: Iterable[str] = ()) -> Any:
    """The kept headers within ``DEAD_LETTER_MAX_HEADERS_BYTES``: the largest values become markers first."""
    settings = settings or conf.get()
    limit = settings.dead_letter_max_headers_bytes
    if is_truncated(headers) or not isinstance(headers, Mapping):
        return headers
    secrets = list(secrets)
    values: dict[Any, Any] = {}
    sizes: dict[Any, int] = {}
    for name, value in headers.items():
        values[name], size = cap_value(value, limit, secrets)
        sizes[name] = size + len(_encoded(json.dumps(str(name), ensure_ascii=False))) + 1
    if _fit(values, sizes, limit, secrets):
        return values
    return _marker(_compact(values), secrets)


def cap_history(history: Any, omitted: int, settings: conf.Settings | None = None) -> tuple[list[Any], int]:
    """Each entry's texts within the caps (a traceback keeps its end); at most ``HISTORY_MAX_ENTRIES`` entries
    (the first and the latest), the others counted in ``omitted``."""
    settings = settings or conf.get()
    entries = list(history or [])
    most = settings.history_max_entries
    if len(entries) > most:
        omitted += len(entries) - most
        entries = entries[:1] + entries[len(entries) - (most - 1):] if most > 1 else entries[-1:]
    capped = []
    for entry in entries:
        if not isinstance(entry, Mapping):
            capped.append(cap_value(entry, settings.dead_letter_max_argument_bytes)[0])
            continue
        kept = {}
        for key, value in entry.items():
            if key == "traceback" and isinstance(value, str):
                kept[key] = cap_traceback(value, settings.dead_letter_max_traceback_chars)
            elif isinstance(value, str):
                kept[key] = cap_text(value, settings.dead_letter_max_message_chars)
            elif isinstance(value, (int, float, bool)) or value is None:
                kept[key] = value
            else:
                kept[key] = cap_value(value, settings.dead_letter_max_argument_bytes)[0]
        capped.append(kept)
    return capped, omitted


def cap_fields(fields: dict[str, Any], secrets: Iterable[str] = ()) -> dict[str, Any]:
    """A record's fields (redacted already) within every cap: what is stored, spooled or shown."""
    settings = conf.get()
    secrets = list(secrets)
    capped = dict(fields)
    for name in ("task_name", "task_id", "queue", "exchange", "routing_key", "worker", "exception_type"):
        if isinstance(capped.get(name), str):
            capped[name] = capped[name][:255]  # the column's size: longer is refused by the database
    for name in ("exception_message", "detail"):
        if isinstance(capped.get(name), str):
            capped[name] = cap_text(capped[name], settings.dead_letter_max_message_chars)
    if isinstance(capped.get("traceback"), str):
        capped["traceback"] = cap_traceback(capped["traceback"], settings.dead_letter_max_traceback_chars)
    if "args" in capped or "kwargs" in capped:
        capped["args"], capped["kwargs"] = cap_arguments(capped.get("args"), capped.get("kwargs"), settings, secrets)
    if "headers" in capped:
        capped["headers"] = cap_headers(capped["headers"], settings, secrets)
    if "history" in capped:
        capped["history"], capped["omitted_attempts"] = cap_history(capped["history"],
                                                                    int(capped.get("omitted_attempts") or 0), settings)
    return capped


def truncated_paths(args: Any, kwargs: Any) -> list[str]:
    """Where arguments were cut when stored: ``args`` or ``kwargs`` whole, ``args[1]``, ``kwargs.payload``."""
    paths = []
    if is_truncated(args):
        paths.append("args")
    elif isinstance(args, (list, tuple)):
        paths += [f"args[{index}]" for index, value in enumerate(args) if is_truncated(value)]
    if is_truncated(kwargs):
        paths.append("kwargs")
    elif isinstance(kwargs, Mapping):
        paths += [f"kwargs.{name}" for name, value in kwargs.items() if is_truncated(value)]
    return paths
