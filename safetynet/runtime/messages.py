"""What a broker message must be for a Celery worker to take it as a task, checked before Celery reads it.

Celery builds a task's request in the worker's main process, from the message's headers and body,
and trusts their shape: a body that decodes but is not ``[args, kwargs, embed]`` (the JSON string
``"just a string"``, a list of two, a dict), an ``id`` header that is missing, a ``timelimit`` that
is not two numbers, a task name that is a list, make it raise out of the consumer's callback, and
the worker stops (``Unrecoverable error``) with the message back in the queue, for every worker.
Other shapes fail later in the pool child, before the task runs (an ``embed`` that is not a
mapping), or are dropped without a trace (an ``eta`` that overflows).

``problem(message, registered)`` reads the message as Celery would (protocol 2, the hybrid form,
protocol 1) and says what is wrong with it, or None when Celery can build the request and run it.
It reads only the top of the body (no walk of the arguments), and the body is decoded once: kombu
keeps the decoded payload for Celery's own read.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Mapping
from dataclasses import dataclass
from datetime import datetime
from typing import Any

from celery.app.task import Context

__all__ = ["EMBED_KEYS", "Problem", "problem"]

#: What Celery puts in the third element of a protocol 2 body.
EMBED_KEYS = frozenset({"callbacks", "errbacks", "chain", "chord"})

# The embed is merged into the request the task sees (``request.update(**embed)``): a key that names
# a field or a method of the request would replace it.
_REQUEST_NAMES = frozenset(name for name in dir(Context) if not name.startswith("__")) | frozenset({
    "task", "properties", "delivery_info", "hostname", "is_eager", "args", "kwargs",
})

# Every header becomes an attribute of the request the task sees: one named after a method of it (``get``,
# ``update``) or one of its private fields would break Celery's own use of the request.
_REQUEST_METHODS = frozenset(
    name for name in dir(Context) if not name.startswith("__")
    and (name.startswith("_") or callable(getattr(Context, name)) or isinstance(Context.__dict__.get(name), property))
)

_OPTIONAL_TEXT = ("root_id", "parent_id", "group", "shadow", "argsrepr", "kwargsrepr", "lang", "origin", "taskset")
# Signatures nested deeper than this (callbacks of callbacks of ...) are refused: the check is bounded.
_MAX_DEPTH = 16


@dataclass(frozen=True)
class Problem:
    """Why a message cannot be taken as a task."""

    #: What is wrong, for a person ("the body is not [args, kwargs, embed]: a str").
    detail: str
    #: The body failed to decode (the reason is ``undecodable``); else it decoded but is not a task message.
    undecodable: bool = False
    #: The exception the decoding raised, if any.
    error: BaseException | None = None


def _kind(value: Any) -> str:
    return type(value).__name__


def problem(message: Any, registered: Callable[[str], bool]) -> Problem | None:
    """What keeps Celery from taking ``message`` as a task, or None.

    ``registered(name)`` says whether this worker has a task of that name: an unknown task is left to
    Celery (and recorded as ``unknown_task``) once its name and id are readable.
    """
    headers = message.headers
    if headers is None:
        headers = {}
    if not isinstance(headers, Mapping):
        return Problem(f"the headers are not a mapping: a {_kind(headers)}")
    protocol1 = "task" not in headers
    if not protocol1:
        name = headers["task"]
        payload: Any = None
        fields: Mapping[str, Any] = headers
    else:  # protocol 1: the task's name and fields are in the body
        decoded = _decoded(message)
        if isinstance(decoded, Problem):
            return decoded
        payload = decoded
        if not isinstance(payload, Mapping) or "task" not in payload:
            return Problem("no task name: neither a 'task' header (protocol 2) nor a body with a 'task' field "
                           "(protocol 1)")
        name, fields = payload["task"], payload
    if not isinstance(name, str) or not name:
        return Problem("the task name is empty" if name == "" else f"the task name is not a text: a {_kind(name)}")
    task_id = fields.get("id")
    if not isinstance(task_id, str) or not task_id:
        return Problem(f"the task id is {'missing' if task_id is None else 'not a text: a ' + _kind(task_id)}")
    if not registered(name):
        return None  # Celery says it is unknown, and safetynet records it as unknown_task
    if payload is None:
        decoded = _decoded(message)
        if isinstance(decoded, Problem):
            return decoded
        payload = decoded
    if protocol1 or isinstance(payload, Mapping) and "args" in payload:
        # protocol 1, and the hybrid form (a protocol 1 body under protocol 2 headers): Celery reads the body
        if not protocol1:
            fields = {**payload, **headers}
        args, kwargs = payload.get("args", ()), payload.get("kwargs", {})
        embed: Any = {key: payload.get(key) for key in ("callbacks", "errbacks", "chord")}
    else:
        if not isinstance(payload, (list, tuple)) or len(payload) != 3:
            shape = f"a {_kind(payload)}" + (f" of {len(payload)}" if isinstance(payload, (list, tuple)) else "")
            return Problem(f"the body is not [args, kwargs, embed]: {shape}")
        args, kwargs, embed = payload
    return (_arguments(args, kwargs) or _embed(embed) or _fields(fields))


def _decoded(message: Any) -> Any:
    try:
        return message.decode()
    except Exception as error:  # ContentDisallowed, DecodeError, and whatever a codec raises
        return Problem(f"the body cannot be decoded ({message.content_type}): {error!r}"[:1000], undecodable=True,
                       error=error)


def _arguments(args: Any, kwargs: Any) -> Problem | None:
    if not isinstance(args, (list, tuple)):
        return Problem(f"the positional arguments are not a list: a {_kind(args)}")
    if not isinstance(kwargs, Mapping):
        return Problem(f"the keyword arguments are not a mapping: a {_kind(kwargs)}")
    if not all(isinstance(key, str) for key in kwargs):
        return Problem("a keyword argument's name is not a text")
    return None


def _embed(embed: Any) -> Problem | None:
    if not embed:
        return None  # Celery reads ``embed or {}``
    if not isinstance(embed, Mapping):
        return Problem(f"the third element of the body (callbacks, errbacks, chain, chord) is not a mapping: "
                       f"a {_kind(embed)}")
    for key, value in embed.items():
        if not isinstance(key, str) or key.startswith("_") or (key in _REQUEST_NAMES and key not in EMBED_KEYS):
            return Problem(f"the body's third element has the key {str(key)[:100]!r}, which would replace "
                           f"a field of the task's request")
        if key == "chord":
            found = None if value is None else _signature(value, "chord", 0)
        elif key in EMBED_KEYS:
            found = _signatures(value, key, 0)
        else:
            found = None
        if found is not None:
            return found
    return None


def _signatures(value: Any, where: str, depth: int) -> Problem | None:
    if value is None:
        return None
    if not isinstance(value, (list, tuple)):
        return Problem(f"{where} is not a list of signatures: a {_kind(value)}")
    for item in value:
        found = _signature(item, where, depth)
        if found is not None:
            return found
    return None


def _signature(value: Any, where: str, depth: int) -> Problem | None:
    """A signature as Celery serialises it: {"task": name, "args": [...], "kwargs": {...}, "options": {...}}."""
    if depth > _MAX_DEPTH:
        return Problem(f"{where}: signatures nested deeper than {_MAX_DEPTH}")
    if not isinstance(value, Mapping):
        return Problem(f"{where}: a signature is not a mapping: a {_kind(value)}")
    if not isinstance(value.get("task"), str) or not value["task"]:
        return Problem(f"{where}: a signature has no task name")
    args, kwargs, options = value.get("args"), value.get("kwargs"), value.get("options")
    if args is not None and not isinstance(args, (list, tuple)):
        return Problem(f"{where}: a signature's args are not a list")
    if kwargs is not None and (not isinstance(kwargs, Mapping) or not all(isinstance(key, str) for key in kwargs)):
        return Problem(f"{where}: a signature's kwargs are not a mapping of names")
    if options is not None and (not isinstance(options, Mapping)
                                or not all(isinstance(key, str) for key in options)):
        return Problem(f"{where}: a signature's options are not a mapping of names")
    kind = value.get("subtask_type")
    if kind is not None and not isinstance(kind, str):
        return Problem(f"{where}: a signature's subtask_type is not a text")
    inner = kwargs or {}
    if kind in ("chain", "group"):
        return _signatures(inner.get("tasks"), f"{where} ({kind})", depth + 1)
    if kind == "chord":
        return (_signatures(inner.get("header"), f"{where} (chord header)", depth + 1)
                or (None if inner.get("body") is None else _signature(inner["body"], f"{where} (chord body)",
                                                                      depth + 1)))
    for option in ("link", "link_error"):
        linked = (options or {}).get(option)
        if isinstance(linked, Mapping):
            linked = [linked]
        found = _signatures(linked, f"{where} ({option})", depth + 1)
        if found is not None:
            return found
    return None


def _fields(fields: Mapping[str, Any]) -> Problem | None:
    """The task fields Celery reads while it builds the request, schedules it and hands it to the pool.

    One pass over the fields present: a field that is None (or absent) is what Celery expects by default."""
    for key, value in fields.items():
        if type(key) is not str or key in _REQUEST_METHODS:
            return Problem(f"the field {str(key)[:100]!r} would replace a method or a private field of the "
                           f"task's request")
        if value is None:
            continue
        check = _CHECKS.get(key)
        if check is not None:
            found = check(key, value)
            if found is not None:
                return found
    return None


def _text(key: str, value: Any) -> Problem | None:
    return None if isinstance(value, str) else Problem(f"the {key!r} field is not a text: a {_kind(value)}")


def _seconds(value: Any) -> bool:
    return (isinstance(value, (int, float)) and not isinstance(value, bool) and math.isfinite(value)
            and value >= 0)


def _retries(key: str, value: Any) -> Problem | None:
    if isinstance(value, int) and not isinstance(value, bool) and value >= 0:
        return None
    return Problem(f"the 'retries' field is not a whole number >= 0: {_short(value)}")


def _timelimit(key: str, value: Any) -> Problem | None:
    if not value:  # Celery reads ``timelimit or (None, None)``
        return None
    if isinstance(value, (list, tuple)) and len(value) == 2 and all(
            limit is None or _seconds(limit) for limit in value):
        return None
    return Problem(f"the 'timelimit' field is not [hard, soft] seconds: {_short(value)}")


def _limit(key: str, value: Any) -> Problem | None:
    return None if _seconds(value) else Problem(f"the {key!r} field is not a number of seconds: {_short(value)}")


def _kind_check(kinds: tuple[type, ...], what: str) -> Callable[[str, Any], Problem | None]:
    def check(key: str, value: Any) -> Problem | None:
        return None if isinstance(value, kinds) else Problem(f"the {key!r} field is not {what}: {_short(value)}")

    return check


def _chord(key: str, value: Any) -> Problem | None:
    return _signature(value, key, 0)


def _linked(key: str, value: Any) -> Problem | None:
    return _signatures(value, key, 0)


def _moment(key: str, value: Any) -> Problem | None:
    """``eta``/``expires`` as Celery reads them: ISO 8601 text (or a datetime), made aware and converted to a
    timestamp (an ``eta`` out of range is otherwise dropped by Celery, with no record)."""
    if not value:
        return None  # Celery reads a false value as "none"
    if not isinstance(value, (str, datetime)):
        return Problem(f"the {key!r} field is not an ISO 8601 date: {_short(value)}")
    from celery.utils.time import maybe_iso8601, maybe_make_aware
    from celery.utils.time import timezone as celery_timezone
    from kombu.asynchronous.timer import to_timestamp

    try:
        moment = maybe_make_aware(maybe_iso8601(value))  # type: ignore[arg-type]
        to_timestamp(celery_timezone.to_system(moment))
        moment.timestamp()
    except Exception as error:  # ValueError, OverflowError, and whatever the parser raises
        return Problem(f"the {key!r} field is not a usable ISO 8601 date: {_short(value)} ({error})")
    return None


_CHECKS: dict[str, Callable[[str, Any], Problem | None]] = {
    **{key: _text for key in _OPTIONAL_TEXT},
    "retries": _retries, "eta": _moment, "expires": _moment, "timelimit": _timelimit,
    "time_limit": _limit, "soft_time_limit": _limit,
    "ignore_result": _kind_check((bool,), "true or false"), "utc": _kind_check((bool,), "true or false"),
    "group_index": _kind_check((int,), "a whole number"),
    "replaced_task_nesting": _kind_check((int,), "a whole number"),
    "stamped_headers": _kind_check((list, tuple), "a list"), "stamps": _kind_check((Mapping,), "a mapping"),
    "groups": _kind_check((list, tuple), "a list"), "headers": _kind_check((Mapping,), "a mapping"),
    "callbacks": _linked, "errbacks": _linked, "chain": _linked, "chord": _chord,
}


def _short(value: Any) -> str:
    text = repr(value)
    return text if len(text) <= 80 else text[:77] + "..."
