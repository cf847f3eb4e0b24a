"""How each value of ``settings.SAFETYNET`` is read and checked: one function per kind of value, each raising
``ConfigurationError`` with the key and what it must be."""

from __future__ import annotations

import dataclasses
import difflib
import os
import re
from collections.abc import Callable
from typing import Any

from django.utils.module_loading import import_string

from safetynet.core.classify import Matcher, as_matchers
from safetynet.core.limits import Limit
from safetynet.core.upstream import Breaker, RetryBudget
from safetynet.exceptions import ConfigurationError


def _matchers(key: str, value: Any) -> tuple[Matcher, ...]:
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (list, tuple)):
        try:
            items = [import_string(item) if isinstance(item, str) else item for item in items]
        except ImportError as error:
            raise ConfigurationError(f"SAFETYNET[{key!r}]: cannot import {error}") from None
    return as_matchers(items, name=f"SAFETYNET[{key!r}]")


def _boolean(key: str, value: Any) -> bool:
    if not isinstance(value, bool):
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be True or False, got {value!r}")
    return value


def _strings(key: str, value: Any) -> tuple[str, ...]:
    if isinstance(value, str) or not isinstance(value, (list, tuple, set, frozenset)) or not all(
        isinstance(item, str) for item in value
    ):
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be a list of strings, got {value!r}")
    return tuple(value)


def _patterns(value: Any) -> tuple[re.Pattern[str], ...]:
    compiled = []
    for pattern in _strings("REDACT_PATTERNS", value):
        try:
            compiled.append(re.compile(pattern, re.IGNORECASE))
        except re.error as error:
            raise ConfigurationError(f"SAFETYNET['REDACT_PATTERNS']: {pattern!r} is not a valid regex: {error}") from None
    return tuple(compiled)


def _callables(key: str, value: Any) -> tuple[Callable[..., Any], ...]:
    items = [value] if isinstance(value, str) or callable(value) else list(value or ())
    result = []
    for item in items:
        if isinstance(item, str):
            try:
                item = import_string(item)
            except ImportError as error:
                raise ConfigurationError(f"SAFETYNET[{key!r}]: cannot import {error}") from None
        if not callable(item):
            raise ConfigurationError(f"SAFETYNET[{key!r}] takes callables or dotted paths to them, got {item!r}")
        result.append(item)
    return tuple(result)


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be a whole number >= 1, got {value!r}")
    return value


def _time_limit_retries(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or value < 0:
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be a whole number >= 0 (or None), got {value!r}")
    return value


def _size(key: str, value: Any, least: int) -> int:
    """A size cap: a whole number, at least ``least`` (room for the marker that says what was cut)."""
    if isinstance(value, bool) or not isinstance(value, int) or value < least:
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be a whole number >= {least}, got {value!r}")
    return value


def _port(key: str, value: Any) -> int | None:
    if value is None:
        return None
    if isinstance(value, bool) or not isinstance(value, int) or not 0 <= value <= 65535:
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be None or a port number from 0 to 65535, got {value!r}")
    return value


def _optional_string(key: str, value: Any) -> str | None:
    if value is not None and not isinstance(value, str):
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be a string or None, got {value!r}")
    return value


def _spool_dir(value: Any) -> str | None:
    if value is None:
        return None
    if not isinstance(value, (str, os.PathLike)) or not str(value).strip():
        raise ConfigurationError(f"SAFETYNET['SPOOL_DIR'] must be None or the path of a folder, got {value!r}")
    path = os.path.expanduser(os.fspath(value))
    if not os.path.isabs(path):
        raise ConfigurationError(
            f"SAFETYNET['SPOOL_DIR'] must be an absolute path (or start with ~), got {value!r}: a relative one would "
            "be a different folder in each process that starts elsewhere."
        )
    return path


def _optional_callable(key: str, value: Any) -> Callable[..., Any] | None:
    if value is None:
        return None
    found = _callables(key, value)
    if len(found) != 1:
        raise ConfigurationError(f"SAFETYNET[{key!r}] takes one callable or a dotted path to it, got {value!r}")
    return found[0]


def _text(key: str, value: Any, longest: int) -> str:
    if not isinstance(value, str) or not value.strip() or len(value) > longest:
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be a non-empty string of at most {longest} characters, "
                                 f"got {value!r}")
    return value


def _seconds(key: str, value: Any, low: float, high: float) -> float:
    if isinstance(value, bool) or not isinstance(value, (int, float)) or not low <= value <= high:
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be a number of seconds from {low:g} to {high:g}, got {value!r}")
    return float(value)


_BREAKER_NAME = re.compile(r"^[A-Za-z0-9_.:-]{1,100}$")


def _check_entry(setting: str, what: str, name: Any, item: Any, fields: list[str]) -> None:
    """A named entry of ``BREAKERS`` or ``LIMITS``: its name, and (given as a dict) its fields, with a "did you
    mean" for an unknown one."""
    if not isinstance(name, str) or not _BREAKER_NAME.match(name):
        raise ConfigurationError(f"SAFETYNET[{setting!r}]: a {what}'s name is 1 to 100 letters, digits or "
                                 f"_ . : -, got {name!r}")
    if isinstance(item, dict):
        unknown = sorted(set(item) - set(fields))
        if unknown:
            close = difflib.get_close_matches(unknown[0], fields, n=1)
            hint = f" Did you mean {close[0]!r}?" if close else f" Fields: {', '.join(fields)}."
            raise ConfigurationError(f"SAFETYNET[{setting!r}][{name!r}]: unknown field {unknown[0]!r}.{hint}")


def _breakers(value: Any) -> dict[str, Any]:
    """``BREAKERS``: each a ``Breaker`` or a dict of its fields, under a name."""
    if not isinstance(value, dict):
        raise ConfigurationError(
            f"SAFETYNET['BREAKERS'] must be a dict of name -> Breaker(...) (or a dict of its fields), got {value!r}"
        )
    breakers = {}
    fields = [item.name for item in dataclasses.fields(Breaker) if item.name != "name"]
    for name, item in value.items():
        _check_entry("BREAKERS", "breaker", name, item, fields)
        if isinstance(item, dict):
            item = Breaker(**item, name=name)
        elif isinstance(item, Breaker):
            item = dataclasses.replace(item, name=name)
        else:
            raise ConfigurationError(f"SAFETYNET['BREAKERS'][{name!r}] must be a Breaker(...) or a dict of its "
                                     f"fields, got {item!r}")
        breakers[name] = item
    return breakers


def _limits(value: Any) -> dict[str, Limit]:
    """``LIMITS``: each a ``Limit`` or a dict of its fields, under a name; a dotted ``partition_by`` is imported."""
    if not isinstance(value, dict):
        raise ConfigurationError(
            f"SAFETYNET['LIMITS'] must be a dict of name -> {{'concurrency': N, 'rate': 'N/m', ...}} (or Limit(...)), "
            f"got {value!r}"
        )
    limits = {}
    fields = [item.name for item in dataclasses.fields(Limit) if item.name != "name"]
    for name, item in value.items():
        _check_entry("LIMITS", "limit", name, item, fields)
        where = f"SAFETYNET['LIMITS'][{name!r}]"
        if isinstance(item, dict):
            item = dict(item)
        elif isinstance(item, Limit):
            item = {field.name: getattr(item, field.name) for field in dataclasses.fields(Limit) if field.name != "name"}
        else:
            raise ConfigurationError(f"{where} must be a dict of its fields (concurrency, rate, partition_by, "
                                     f"tighten_on_429, max_pause, margin) or a Limit(...), got {item!r}")
        partition = item.get("partition_by")
        if isinstance(partition, str) and "." in partition:
            try:
                item["partition_by"] = import_string(partition)
            except ImportError as error:
                raise ConfigurationError(f"{where}: partition_by: cannot import {error}") from None
        try:
            limits[name] = Limit(**item, name=name)
        except ConfigurationError as error:
            raise ConfigurationError(f"SAFETYNET['LIMITS']: {error}") from None
    return limits


def _retry_budget(value: Any) -> Any:
    if value is None or isinstance(value, RetryBudget):
        return value
    if not isinstance(value, dict):
        raise ConfigurationError(f"SAFETYNET['RETRY_BUDGET'] must be a dict (ratio, min_retries, window) or None, "
                                 f"got {value!r}")
    try:
        return RetryBudget(**value)
    except TypeError:
        raise ConfigurationError(f"SAFETYNET['RETRY_BUDGET'] takes ratio, min_retries and window, got "
                                 f"{sorted(value)}") from None
