"""Celery's own log lines about a safetynet task, redacted.

Celery's worker logs a failed task's exception and traceback ("Task x[id] raised unexpected:
ValueError('card_token=…')"), a retry's ("Task x[id] retry: Retry in 5s: …"), the arguments of a
received task (in the record's ``data``) and the body of a message no task can run. A
``RedactingFilter`` on those loggers (``CELERY_LOGGERS``) blanks, in the record's arguments, its
``data`` and its formatted traceback, the ``key=value`` pairs of sensitive keys and the values of
the task's sensitive arguments: the text patterns dead-letter messages go through. Being on the
loggers, not on a handler, it works whatever handlers the project or Celery
(``worker_hijack_root_logger``) set up, Sentry's logging integration included.

Lines about a registered Celery task that is not a safetynet task are left as Celery wrote them,
and so are the two lines every task logs, whose cost stays Celery's: the success line (a task's
return value is logged as returned) and the received line, whose text has no arguments and whose
``data`` holds the message's ``argsrepr``/``kwargsrepr``, redacted when a safetynet task is sent
(``safetynet.runtime.sending.redacted_reprs``).
"""

from __future__ import annotations

import ast
import logging
import re
import traceback
from collections.abc import Callable, Mapping
from typing import Any

from safetynet import conf
from safetynet.redaction import REDACTED, is_sensitive, parameter_names, redact, redact_text
from safetynet.runtime import results

__all__ = ["CELERY_LOGGERS", "RedactingFilter", "install", "uninstall"]

#: The Celery loggers whose lines carry a task's exception, traceback, arguments or message body.
CELERY_LOGGERS = (
    "celery.app.trace",  # raised unexpected/expected, retry, internal error, rejected, ignored
    "celery.worker.strategy",  # received (arguments in ``data``), a bad ETA (the request's info)
    "celery.worker.request",  # time limits, a lost worker's retry, "Task handler raised error"
    "celery.worker.consumer.consumer",  # an unknown task or invalid message: its body and headers
)

# The lines of every task, left alone (see the module's docstring): Celery's success and received lines.
_EVERY_TASK = ("Task %(name)s[%(id)s] succeeded", "Task %(name)s[%(id)s] received")
# printf conversions of a %-format string, in order (``%%`` is not one).
_CONVERSION = re.compile(r"%(?:\(([^)]*)\))?[#0\- +]*(?:\*|\d+)?(?:\.(?:\*|\d+))?[hlL]?([diouxXeEfFgGcrsa%])")
_ARGUMENT_KEYS = frozenset({"args", "kwargs"})


class _Text(str):
    """Redacted text standing for an argument: the same under ``%s`` and ``%r``."""

    __slots__ = ()

    def __repr__(self) -> str:
        return str(self)


class RedactingFilter(logging.Filter):
    """Redacts a Celery log record about a safetynet task (or about no registered task) in place."""

    def filter(self, record: logging.LogRecord) -> bool:
        try:
            _redact(record)
        except Exception:  # never let a secret through because redaction failed: withhold the values
            record.args = None
            record.msg = f"{record.msg} [values withheld: safetynet could not redact them]"
            if record.exc_info:
                record.exc_text = "[traceback withheld: safetynet could not redact it]"
        return True


FILTER = RedactingFilter()


def install() -> None:
    """Put the filter on Celery's task loggers (idempotent; any process, it only acts on their lines)."""
    for name in CELERY_LOGGERS:
        logging.getLogger(name).addFilter(FILTER)


def uninstall() -> None:
    """Take the filter off again."""
    for name in CELERY_LOGGERS:
        logging.getLogger(name).removeFilter(FILTER)


def _registered(name: Any) -> Any:
    if not isinstance(name, str) or not name:
        return None
    try:
        from celery import current_app

        return current_app.tasks.get(name)
    except Exception:
        return None


def _task_named_in(record: logging.LogRecord) -> tuple[Any, Any, bool]:
    """The task a record is about, its id, and whether the record names a registered task at all."""
    args = record.args
    if isinstance(args, Mapping):
        task = _registered(args.get("name"))
        return task, args.get("id"), task is not None
    if isinstance(args, tuple):
        for index, value in enumerate(args):
            if isinstance(value, Mapping):  # a request's info: {"id", "name", "args", …}
                task = _registered(value.get("name"))
                if task is not None:
                    return task, value.get("id"), True
                continue
            task = _registered(value)
            if task is not None:
                following = args[index + 1] if index + 1 < len(args) else None
                return task, following, True
    return None, None, False


def _arguments(task: Any, task_id: Any, logger: str) -> tuple[Any, Any]:
    """The live arguments of the run the record is about: the task's current request (in the process that runs
    it), else (a line of the worker's main process) its active request with that id."""
    if task is None or task_id is None:
        return None, None
    request = getattr(task, "request", None)
    if request is not None and getattr(request, "id", None) == task_id:
        return request.args, request.kwargs
    if logger != "celery.worker.request":
        return None, None
    try:
        from celery.worker.state import active_requests
    except Exception:
        return None, None
    for active in list(active_requests):
        if getattr(active, "id", None) == task_id:
            return getattr(active, "args", None), getattr(active, "kwargs", None)
    return None, None


def _redact(record: logging.LogRecord) -> None:
    if isinstance(record.msg, str) and record.msg.startswith(_EVERY_TASK):
        return
    task, task_id, named = _task_named_in(record)
    if named and not getattr(type(task), "_safetynet_base", False):
        return  # a plain Celery task's line: Celery's
    args, kwargs = _arguments(task, task_id, record.name)
    clean = results.text_cleaner(task, args, kwargs) if task is not None else redact_text
    settings = conf.get()
    if isinstance(record.args, Mapping):
        context = _redacted_context(record.args, task, clean, settings)
        record.args = context  # a mapping, as logging allows
        if isinstance(getattr(record, "data", None), Mapping):
            record.data = context
    elif isinstance(record.args, tuple):
        record.args = _redacted_arguments(str(record.msg), record.args, task, clean, settings)
    elif isinstance(record.msg, str):
        record.msg = clean(record.msg)
    if record.exc_info and record.exc_info[1] is not None and not record.exc_text:
        record.exc_text = clean("".join(traceback.format_exception(*record.exc_info)).rstrip("\n"))


def _redacted_context(context: Mapping[str, Any], task: Any, clean: Callable[[str], str],
                      settings: conf.Settings) -> dict[str, Any]:
    """Celery's context dict (name, id, exc, traceback, args, kwargs, …) with its values redacted."""
    safe: dict[str, Any] = {}
    for key, value in context.items():
        if key in ("name", "id", "hostname"):
            safe[key] = value
        elif key in _ARGUMENT_KEYS and task is not None:
            safe[key] = clean(_redacted_repr(task, key, value))
        else:
            safe[key] = results.cleaned(value, clean, settings)
    return safe


def _redacted_repr(task: Any, key: str, value: Any) -> str:
    """A task's ``argsrepr``/``kwargsrepr`` (or its arguments) redacted by parameter name, as a repr."""
    if isinstance(value, str):
        try:
            parsed = ast.literal_eval(value)
        except (ValueError, SyntaxError, TypeError, MemoryError, RecursionError):
            parsed = None
        if parsed is None:  # a repr that cannot be read back (cut, or of objects): unsafe if a parameter is sensitive
            names = parameter_names(task)
            return REDACTED if key == "args" and any(map(is_sensitive, names)) else value
        value = parsed
    if key == "args" and isinstance(value, (list, tuple)):
        safe_args, _, _ = redact(value, {}, parameter_names(task))
        return repr(tuple(safe_args) if isinstance(value, tuple) else safe_args)
    if key == "kwargs" and isinstance(value, Mapping):
        _, safe_kwargs, _ = redact((), value)
        return repr(safe_kwargs)
    return repr(value)


def _redacted_arguments(message: str, args: tuple[Any, ...], task: Any, clean: Callable[[str], str],
                        settings: conf.Settings) -> tuple[Any, ...]:
    """A record's positional arguments, each redacted as its conversion in ``message`` renders it (``%r`` a repr,
    ``%s`` text); numbers and unchanged values are left as they are."""
    conversions = [match.group(2) for match in _CONVERSION.finditer(message) if match.group(2) != "%"]
    safe: list[Any] = []
    for index, value in enumerate(args):
        conversion = conversions[index] if index < len(conversions) else "s"
        if isinstance(value, (bool, int, float, type(None))) or conversion not in ("r", "s", "a"):
            safe.append(value)
            continue
        if isinstance(value, Mapping):  # a request's info (name, args, kwargs, …)
            shown: Any = _redacted_context(value, task, clean, settings)
        elif isinstance(value, (list, tuple)):
            shown = results.cleaned(value, clean, settings)
        else:
            shown = value
        text = repr(value) if conversion in ("r", "a") else str(value)
        cleaned = clean(repr(shown) if conversion in ("r", "a") else str(shown))
        safe.append(value if cleaned == text else _Text(cleaned))
    return tuple(safe)
