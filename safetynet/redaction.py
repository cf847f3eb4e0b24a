"""Redaction: what is never stored, logged or shown.

Values under sensitive keys (``REDACT_KEYS``, ``REDACT_PATTERNS``) are replaced with "[redacted]"
in arguments and headers; positional arguments are redacted by their parameter's name; and the
values of a task's sensitive arguments, with ``key=value`` pairs of sensitive keys, are blanked
wherever they appear in free text (exception messages, tracebacks, details). Every part of
safetynet that stores or shows task data goes through here.
"""

from __future__ import annotations

import functools
import inspect
import re
from collections.abc import Mapping
from typing import Any

from safetynet import conf

__all__ = [
    "MIN_SECRET_LENGTH",
    "REDACTED",
    "is_sensitive",
    "masked_headers",
    "parameter_names",
    "redact",
    "redact_text",
    "redact_text_values",
    "redact_value",
    "scrub_values",
    "sensitive_values",
]

REDACTED = "[redacted]"
#: Shorter sensitive values are not searched for in free text: they would blank unrelated text.
MIN_SECRET_LENGTH = 4
_MAX_DEPTH = 64


def is_sensitive(name: str, settings: conf.Settings | None = None) -> bool:
    """Whether a key or parameter name is one whose value is never stored (REDACT_KEYS, REDACT_PATTERNS)."""
    settings = settings or conf.get()
    lowered = name.lower()
    return lowered in settings.redact_keys or any(pattern.search(lowered) for pattern in settings.redact_patterns)


def redact_value(value: Any, path: str, found: list[str], settings: conf.Settings | None = None) -> Any:
    """``value`` with the values of sensitive keys replaced, at any depth; ``found`` collects their paths."""
    settings = settings or conf.get()
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            child = f"{path}.{key}"
            if isinstance(key, str) and is_sensitive(key, settings):
                result[key] = REDACTED
                found.append(child)
            else:
                result[key] = redact_value(item, child, found, settings)
        return result
    if isinstance(value, (list, tuple)):
        return [redact_value(item, f"{path}[{index}]", found, settings) for index, item in enumerate(value)]
    return value


def redact(args: Any, kwargs: Any, parameter_names: list[str] | None = None) -> tuple[list[Any], dict[str, Any], list[str]]:
    """Replace sensitive values (by key, and positional arguments by parameter name) with "[redacted]".

    Returns the redacted args and kwargs and the paths that were redacted.
    """
    settings = conf.get()
    found: list[str] = []
    names = parameter_names or []
    safe_args = []
    for index, value in enumerate(list(args or [])):
        if index < len(names) and is_sensitive(names[index], settings):
            safe_args.append(REDACTED)
            found.append(f"args[{index}]")
        else:
            safe_args.append(redact_value(value, f"args[{index}]", found, settings))
    safe_kwargs = redact_value(dict(kwargs or {}), "kwargs", found, settings)
    return safe_args, safe_kwargs, found


def masked_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Headers for display: the values of sensitive keys replaced, and every text value through the message
    patterns (stored headers are redacted already; a row stored by an older version may not be)."""
    _, masked, _ = redact((), headers or {})
    return redact_text_values(masked, (), "headers", [])  # type: ignore[no-any-return]


def redact_text_values(value: Any, secrets: list[str] | tuple[str, ...], path: str, found: list[str],
                       depth: int = 0) -> Any:
    """``value`` with every string in it (at any depth) through the message patterns: ``key=value`` pairs of
    sensitive keys and the exact ``secrets`` blanked; ``found`` collects the paths of the strings changed."""
    if isinstance(value, str):
        safe = redact_text(scrub_values(value, list(secrets)))
        if safe != value:
            found.append(path)
        return safe
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, Mapping):
        return {key: redact_text_values(item, secrets, f"{path}.{key}", found, depth + 1) for key, item in value.items()}
    if isinstance(value, (list, tuple)):
        return [redact_text_values(item, secrets, f"{path}[{index}]", found, depth + 1)
                for index, item in enumerate(value)]
    return value


def redact_text(text: str) -> str:
    """Blank out ``key=value`` / ``'key': value`` pairs of sensitive keys in free text (messages, tracebacks)."""
    pattern = _text_pattern(conf.get().redact_keys)
    if pattern is None:
        return text
    return pattern.sub(_blank, text)


def _blank(match: re.Match[str]) -> str:
    return match.group(1) + f"'{REDACTED}'"


@functools.lru_cache(maxsize=8)
def _text_pattern(keys: frozenset[str]) -> re.Pattern[str] | None:
    """The ``key=value`` pattern of these key names, compiled once (longest names first)."""
    names = sorted(keys, key=len, reverse=True)
    if not names:
        return None
    alternatives = "|".join(re.escape(name) for name in names)
    return re.compile(rf"""(?i)(['"]?(?:{alternatives})['"]?\s*[:=]\s*)(?:'[^']*'|"[^"]*"|[^\s,}}\)]+)""")


def parameter_names(task: Any) -> list[str]:
    """The names of a task's positional parameters, read from the class, not from ``task.run``.

    Sentry's CeleryIntegration replaces ``task.run`` on the instance with a wrapper whose
    signature (through ``__wrapped__``) still has ``self``: reading it would shift every
    positional argument by one. Kept per class and ``run`` (sending a task reads them).
    """
    klass = type(task)
    try:
        key = (klass, klass.__dict__.get("run") or getattr(klass, "run", None))
        cached = _parameter_names.get(key)
    except TypeError:  # an unhashable run: not kept
        key, cached = None, None
    if cached is None:
        cached = tuple(_parameter_names_of(task))
        if key is not None and len(_parameter_names) < 4096:
            _parameter_names[key] = cached
    return list(cached)


_parameter_names: dict[tuple[Any, Any], tuple[str, ...]] = {}


def _parameter_names_of(task: Any) -> list[str]:
    raw = inspect.getattr_static(type(task), "run", None)
    raw = getattr(raw, "_safetynet_body", raw)
    if isinstance(raw, staticmethod):
        function, skip = raw.__func__, 0
    elif inspect.isfunction(raw):
        function, skip = raw, 1  # a method: its first parameter is the task
    else:
        function, skip = getattr(task, "run", None), 0
        if function is None:
            return []
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    names = [parameter.name for parameter in signature.parameters.values()
             if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return names[skip:]


def sensitive_values(args: Any, kwargs: Any, names: list[str]) -> list[str]:
    """The values of the task's sensitive arguments, as text, to scrub wherever they appear."""
    settings = conf.get()
    found: list[str] = []

    def leaves(value: Any, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            return
        if isinstance(value, Mapping):
            for item in value.values():
                leaves(item, depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                leaves(item, depth + 1)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            found.append(str(value))
        elif isinstance(value, bytes):
            found.append(value.decode("utf-8", "replace"))

    def search(value: Any, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            return
        if isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and is_sensitive(key, settings):
                    leaves(item)
                else:
                    search(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                search(item, depth + 1)

    for index, value in enumerate(list(args or [])):
        if index < len(names) and is_sensitive(names[index], settings):
            leaves(value)
        else:
            search(value)
    search(dict(kwargs or {}))
    unique = {value for value in found if len(value) >= MIN_SECRET_LENGTH}
    return sorted(unique, key=len, reverse=True)  # longest first: a secret containing another goes whole


def scrub_values(text: str, secrets: list[str]) -> str:
    """``text`` with every exact secret value replaced by "[redacted]"."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text
