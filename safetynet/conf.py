"""Project settings: ``settings.SAFETYNET`` merged over typed defaults, cached.

The cache is cleared when Django's ``setting_changed`` fires (``override_settings`` in
tests), and ``version`` moves on so tasks drop what they resolved from the old values.

Every key, its default and its meaning::

    DEFAULT_POLICY        RetryPolicy (or a dict of its fields) for tasks that declare none
    DEFAULT_RETRY_ON      matchers that retry in every task (after the task's own rules)
    DEFAULT_FAIL_ON       matchers that fail at once in every task (after the task's own rules)
    UNCLASSIFIED          "fail" or "retry": what an exception no rule matched does
    HISTORY_MAX_ENTRIES   attempts kept in the message headers (the first and the latest)
    HISTORY_MAX_BYTES     size bound of the attempt history in the headers
    TRACEBACK_MAX_CHARS   each traceback in the history is trimmed to its last N characters
"""

from __future__ import annotations

import difflib
from dataclasses import dataclass
from typing import Any

from django.core.signals import setting_changed
from django.utils.module_loading import import_string

from safetynet.core.classify import Matcher, as_matchers, http_status, is_network_error
from safetynet.core.policy import Exponential, RetryPolicy
from safetynet.exceptions import ConfigurationError

__all__ = ["DEFAULTS", "Settings", "get", "version"]

DEFAULTS: dict[str, Any] = {
    "DEFAULT_POLICY": RetryPolicy(max_attempts=5, backoff=Exponential(1.0, 2.0), jitter="full", max_delay=600.0),
    "DEFAULT_RETRY_ON": (is_network_error, http_status(408, 425, 429, 500, 502, 503, 504)),
    "DEFAULT_FAIL_ON": (),
    "UNCLASSIFIED": "fail",
    "HISTORY_MAX_ENTRIES": 20,
    "HISTORY_MAX_BYTES": 16_384,
    "TRACEBACK_MAX_CHARS": 2_000,
}


@dataclass(frozen=True)
class Settings:
    """The validated project settings."""

    default_policy: RetryPolicy
    default_retry_on: tuple[Matcher, ...]
    default_fail_on: tuple[Matcher, ...]
    unclassified: str
    history_max_entries: int
    history_max_bytes: int
    traceback_max_chars: int


_cached: Settings | None = None
_version = 0


def version() -> int:
    """A number that changes whenever the settings may have changed."""
    return _version


def _user_settings() -> dict[str, Any]:
    from django.conf import settings as django_settings

    if not django_settings.configured:
        return {}
    value = getattr(django_settings, "SAFETYNET", {}) or {}
    if not isinstance(value, dict):
        raise ConfigurationError(f"settings.SAFETYNET must be a dict, got {type(value).__name__}")
    return value


def _matchers(key: str, value: Any) -> tuple[Matcher, ...]:
    items = [value] if isinstance(value, str) else value
    if isinstance(items, (list, tuple)):
        try:
            items = [import_string(item) if isinstance(item, str) else item for item in items]
        except ImportError as error:
            raise ConfigurationError(f"SAFETYNET[{key!r}]: cannot import {error}") from None
    return as_matchers(items, name=f"SAFETYNET[{key!r}]")


def _positive_int(key: str, value: Any) -> int:
    if isinstance(value, bool) or not isinstance(value, int) or value < 1:
        raise ConfigurationError(f"SAFETYNET[{key!r}] must be a whole number >= 1, got {value!r}")
    return value


def build(user: dict[str, Any]) -> Settings:
    """Validate ``user`` (a SAFETYNET dict) over the defaults; raise ConfigurationError if wrong."""
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, DEFAULTS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(sorted(DEFAULTS))}."
        raise ConfigurationError(f"Unknown SAFETYNET setting {name!r}.{hint}")
    merged = {**DEFAULTS, **user}
    policy = merged["DEFAULT_POLICY"]
    if isinstance(policy, dict):
        try:
            policy = RetryPolicy(**policy)
        except TypeError as error:
            raise ConfigurationError(f"SAFETYNET['DEFAULT_POLICY']: {error}") from None
    if not isinstance(policy, RetryPolicy):
        raise ConfigurationError(
            f"SAFETYNET['DEFAULT_POLICY'] must be a RetryPolicy or a dict of its fields, got {policy!r}"
        )
    if merged["UNCLASSIFIED"] not in ("retry", "fail"):
        raise ConfigurationError(f"SAFETYNET['UNCLASSIFIED'] must be 'retry' or 'fail', got {merged['UNCLASSIFIED']!r}")
    return Settings(
        default_policy=policy,
        default_retry_on=_matchers("DEFAULT_RETRY_ON", merged["DEFAULT_RETRY_ON"]),
        default_fail_on=_matchers("DEFAULT_FAIL_ON", merged["DEFAULT_FAIL_ON"]),
        unclassified=merged["UNCLASSIFIED"],
        history_max_entries=_positive_int("HISTORY_MAX_ENTRIES", merged["HISTORY_MAX_ENTRIES"]),
        history_max_bytes=_positive_int("HISTORY_MAX_BYTES", merged["HISTORY_MAX_BYTES"]),
        traceback_max_chars=_positive_int("TRACEBACK_MAX_CHARS", merged["TRACEBACK_MAX_CHARS"]),
    )


def get() -> Settings:
    """The current settings, validated once and cached."""
    global _cached
    if _cached is None:
        _cached = build(_user_settings())
    return _cached


def reset(**_: Any) -> None:
    """Forget the cached settings (connected to ``setting_changed``)."""
    global _cached, _version
    _cached = None
    _version += 1


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "SAFETYNET":
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="safetynet.conf")
