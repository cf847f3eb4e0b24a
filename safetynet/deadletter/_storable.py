"""What the database can store: a dead letter's record made safe for it, and the errors that are about the record.

PostgreSQL refuses a NUL character in text (``DataError``) and in ``jsonb`` (``\\u0000``), a lone
surrogate (psycopg cannot encode it; ``jsonb`` refuses its escape), ``NaN`` and ``Infinity`` in JSON,
a name longer than its ``varchar(255)`` and a count beyond ``integer``; Django's ``JSONField``
refuses an object ``json`` cannot encode (a ``datetime`` argument kombu decoded). Each would fail
the record on every try, so ``storable`` fixes them before a record is stored or spooled:

- a NUL character or a lone surrogate becomes U+FFFD (a surrogate pair is joined into its character),
  in every text, at any depth of the JSON fields, dict keys included;
- ``NaN``/``Infinity`` become the text ``'nan'``/``'inf'``; an object JSON cannot hold is encoded the
  way kombu encodes it in a message (``{"__type__": "datetime", ...}``, which replay decodes back), or
  else kept as its text;
- a name longer than its column is cut (a task id longer than 255 characters keeps a hash of the
  whole, so it stays unique); a count is kept within ``0 .. 2**31 - 1``.

An argument or header changed on the way is listed in ``redacted`` (replay then asks for
replacement arguments rather than send a value that is not the one the task got).
"""

from __future__ import annotations

import hashlib
import math
import re
from collections.abc import Mapping
from typing import Any

from django.db import DataError, IntegrityError
from django.db import Error as DatabaseLibraryError

__all__ = ["REPLACEMENT", "is_outage", "storable", "text"]

#: What a character the database cannot store becomes.
REPLACEMENT = "\ufffd"

_SURROGATE = re.compile("[\ud800-\udfff]")
_JSON_FIELDS = ("args", "kwargs", "redacted", "headers", "history", "audit")
#: Where a change means the stored value is not the one the task got (listed in ``redacted``).
_ARGUMENT_FIELDS = ("args", "kwargs", "headers")
_NAME_LENGTHS = {"task_name": 255, "queue": 255, "exchange": 255, "routing_key": 255, "worker": 255,
                 "exception_type": 255, "fingerprint": 40, "reason": 32}
_COUNTS = ("attempts", "omitted_attempts")
_LARGEST_COUNT = 2**31 - 1  # PositiveIntegerField: integer on PostgreSQL
_LARGEST_ID = 2**63 - 1  # bigint
_TASK_ID_LENGTH = 255
_DEEPEST = 200


def text(value: str) -> str:
    """``value`` as the database can store it: NUL and lone surrogates become U+FFFD."""
    if "\x00" in value:
        value = value.replace("\x00", REPLACEMENT)
    if _SURROGATE.search(value):
        # Through UTF-16: a surrogate pair becomes its character, a lone surrogate U+FFFD.
        value = value.encode("utf-16-le", "surrogatepass").decode("utf-16-le", "replace")
    return value


def _encoded(value: Any) -> Any:
    """An object JSON cannot hold, as kombu encodes it in a message (raises TypeError when kombu cannot)."""
    from kombu.utils.json import JSONEncoder

    return JSONEncoder().default(value)


def _json(value: Any, path: str, altered: list[str], depth: int = 0) -> Any:
    """``value`` as ``jsonb`` stores it; ``altered`` collects the paths of what had to change."""
    if value is None or isinstance(value, (bool, int)):
        return value
    if isinstance(value, float):
        if math.isfinite(value):
            return value
        altered.append(path)
        return repr(value)
    if isinstance(value, str):
        safe = text(value)
        if safe != value:
            altered.append(path)
        return safe
    if depth >= _DEEPEST:
        altered.append(path)
        return text(f"<nested deeper than {_DEEPEST} levels: not kept>")
    if isinstance(value, Mapping):
        result: dict[str, Any] = {}
        for key, item in value.items():
            # json turns int, float, bool and None keys into text itself; other keys are kept as their text.
            name = key if isinstance(key, str) else _json_key(key)
            safe = text(name)
            while safe in result:  # two keys that differ only by what was replaced: keep both
                safe += REPLACEMENT
            if safe != name or not isinstance(key, (str, int, float, bool, type(None))):
                altered.append(f"{path}.{safe}")
            result[safe] = _json(item, f"{path}.{safe}", altered, depth + 1)
        return result
    if isinstance(value, (list, tuple)):
        return [_json(item, f"{path}[{index}]", altered, depth + 1) for index, item in enumerate(value)]
    try:
        encoded = _encoded(value)
    except Exception:  # any object: its text is what can be kept
        altered.append(path)
        return text(str(value))
    inner: list[str] = []
    result = _json(encoded, path, inner, depth + 1)  # kombu decodes it back: not an alteration in itself
    if inner:
        altered.append(path)
    return result


def _json_key(key: Any) -> str:
    if key is None or isinstance(key, bool):
        return "null" if key is None else ("true" if key else "false")
    if isinstance(key, (int, float)):
        return str(int(key)) if isinstance(key, int) else repr(key)
    return str(key)


def _task_id(value: str) -> str:
    if len(value) <= _TASK_ID_LENGTH:
        return value
    digest = hashlib.sha256(value.encode("utf-8", "surrogatepass")).hexdigest()
    return f"{value[:_TASK_ID_LENGTH - 74]}...sha256:{digest}"


def storable(fields: Mapping[str, Any]) -> dict[str, Any]:
    """A copy of a dead letter's fields that the database can store (see the module's docstring)."""
    result = dict(fields)
    altered: list[str] = []
    for name, value in fields.items():
        if name in _JSON_FIELDS:
            changed: list[str] = []
            result[name] = _json(value, name, changed)
            if name in _ARGUMENT_FIELDS:
                altered.extend(changed)
        elif isinstance(value, str):
            result[name] = text(value)
    for name, longest in _NAME_LENGTHS.items():
        if isinstance(result.get(name), str) and len(result[name]) > longest:
            result[name] = result[name][:longest]
    if isinstance(result.get("task_id"), str):
        result["task_id"] = _task_id(result["task_id"])
    for name in _COUNTS:
        count = result.get(name)
        if isinstance(count, int) and not isinstance(count, bool):
            result[name] = min(max(count, 0), _LARGEST_COUNT)
    replay_of = result.get("replay_of_id")
    if replay_of is not None and (isinstance(replay_of, bool) or not isinstance(replay_of, int)
                                  or not 0 < replay_of <= _LARGEST_ID):
        result["replay_of_id"] = None  # a header no row can have written: there is no row to link to
    if altered and isinstance(result.get("redacted"), list):
        known = set(result["redacted"])
        result["redacted"] = result["redacted"] + [path for path in altered if path not in known]
    return result


def is_outage(error: BaseException) -> bool:
    """True when ``error`` says the database is away (try again later), False when it refuses the record itself.

    ``DataError`` and ``IntegrityError`` are about the record (every "already recorded" conflict is
    absorbed by the insert's ``ON CONFLICT DO NOTHING``, so an ``IntegrityError`` here is a real
    constraint); so is an error raised before the driver sends anything (a ``ValueError`` such as
    psycopg2's "A string literal cannot contain NUL", a ``TypeError`` for a value of the wrong type).
    Every other database error (``OperationalError``, ``InterfaceError``, a missing table) is the
    database's state, not the record's.
    """
    return isinstance(error, DatabaseLibraryError) and not isinstance(error, (DataError, IntegrityError))
