"""Error classification: is this failure worth another attempt?

Pure: no Django, no Celery. HTTP errors of ``requests``, ``httpx`` and ``urllib`` are read
by duck typing, so none of those libraries is imported here.

Precedence, first match wins:

1. ``Snooze`` raised by the task: try again after its delay, the attempt is not used up.
2. ``Permanent`` raised by the task: dead now.
3. ``Transient`` raised by the task: retry (its ``retry_after`` honoured).
4. the task's ``fail_on`` (and Celery's ``dont_autoretry_for``): dead now.
5. the task's ``retry_on`` (and Celery's ``autoretry_for``): retry.
6. the project's ``DEFAULT_FAIL_ON``: dead now.
7. the project's ``DEFAULT_RETRY_ON``: retry.
8. anything else: the ``UNCLASSIFIED`` setting, ``"fail"`` unless changed.

A matcher is an exception class, a predicate ``callable(exception) -> bool``, or
``http_status(...)``.
"""

from __future__ import annotations

import email.utils
import logging
import urllib.error
from collections.abc import Callable, Iterable
from dataclasses import dataclass
from datetime import datetime, timezone
from typing import Any, Literal

from safetynet.exceptions import ConfigurationError, Permanent, Snooze, Transient

__all__ = [
    "ALWAYS_RETRY",
    "Rules",
    "Verdict",
    "as_matchers",
    "describe_matcher",
    "http_status",
    "is_network_error",
    "is_time_limit",
    "parse_retry_after",
    "retry_after_of",
    "status_of",
]

logger = logging.getLogger("safetynet")

Matcher = Callable[[BaseException], bool] | type[BaseException]
Unclassified = Literal["retry", "fail"]


@dataclass(frozen=True)
class Verdict:
    """What classification concluded, and which rule said so."""

    kind: Literal["retry", "fail", "snooze"]
    rule: str
    retry_after: float | None = None


class http_status:  # noqa: N801 - reads like a function at the call site: http_status(429, 503)
    """Matches an HTTP error whose response status is one of ``codes`` (ints or ranges)."""

    def __init__(self, *codes: int | range) -> None:
        if not codes:
            raise ConfigurationError("http_status() needs at least one status code, e.g. http_status(429, 503)")
        flat: set[int] = set()
        for code in codes:
            items = code if isinstance(code, range) else (code,)
            for item in items:
                if isinstance(item, bool) or not isinstance(item, int) or not 100 <= item <= 599:
                    raise ConfigurationError(
                        f"http_status() takes status codes from 100 to 599 or ranges of them, got {code!r}"
                    )
                flat.add(item)
        self.codes = frozenset(flat)

    def __call__(self, exception: BaseException) -> bool:
        return status_of(exception) in self.codes

    def __repr__(self) -> str:
        return f"http_status({', '.join(map(str, sorted(self.codes)))})"

    def __eq__(self, other: object) -> bool:
        return isinstance(other, http_status) and other.codes == self.codes

    def __hash__(self) -> int:
        return hash(self.codes)


def _response_of(exception: BaseException) -> Any:
    return getattr(exception, "response", None)


def status_of(exception: BaseException) -> int | None:
    """The HTTP status an exception carries (requests, httpx, urllib or ``.status_code``), else None."""
    response = _response_of(exception)
    for holder, names in ((response, ("status_code", "status")), (exception, ("status_code", "status"))):
        if holder is None:
            continue
        for name in names:
            value = getattr(holder, name, None)
            if isinstance(value, int) and not isinstance(value, bool):
                return value
    # urllib.error.HTTPError keeps the status in .code; other exceptions use .code for other things.
    if type(exception).__name__ == "HTTPError" and type(exception).__module__ == "urllib.error":
        code = getattr(exception, "code", None)
        return code if isinstance(code, int) else None
    return None


def _headers_of(exception: BaseException) -> Any:
    response = _response_of(exception)
    headers = getattr(response, "headers", None) if response is not None else None
    if headers is None:
        headers = getattr(exception, "headers", None)  # urllib's HTTPError
    return headers


def parse_retry_after(value: object, now: float) -> float | None:
    """Seconds to wait from a Retry-After value (delta seconds or an HTTP date); None if unusable."""
    if value is None:
        return None
    text = str(value).strip()
    if text.isascii() and text.isdigit():  # str.isdigit() alone accepts '²', which float() refuses
        return float(text)
    try:
        when = email.utils.parsedate_to_datetime(text)
    except (TypeError, ValueError, IndexError, OverflowError):
        when = None
    if when is None:
        logger.warning("ignoring unparseable Retry-After header %r", text, extra={"retry_after": text})
        return None
    if when.tzinfo is None:
        when = when.replace(tzinfo=timezone.utc)
    return max(0.0, when.timestamp() - now)


def retry_after_of(exception: BaseException, now: float) -> float | None:
    """The wait the failure asks for: ``Transient.retry_after`` or an HTTP Retry-After header."""
    if isinstance(exception, Transient) and exception.retry_after is not None:
        return exception.retry_after
    headers = _headers_of(exception)
    if headers is None:
        return None
    getter = getattr(headers, "get", None)
    if getter is None:
        return None
    try:
        value = getter("Retry-After")
        if value is None:
            value = getter("retry-after")
    except Exception:  # a headers object we do not understand is not worth failing the decision for
        return None
    return parse_retry_after(value, now)


_NETWORK_ERROR_NAMES = {
    ("requests.exceptions", "ConnectionError"),
    ("requests.exceptions", "Timeout"),
    ("httpx", "TransportError"),
}


def is_network_error(exception: BaseException) -> bool:
    """A connection or timeout failure (builtin, urllib, requests or httpx): worth retrying."""
    if isinstance(exception, (ConnectionError, TimeoutError)):
        return True
    if isinstance(exception, urllib.error.URLError) and not isinstance(exception, urllib.error.HTTPError):
        # urllib wraps a refused connection, a DNS failure or a timeout in URLError(reason)
        return isinstance(exception.reason, OSError)
    for klass in type(exception).__mro__:
        if (klass.__module__, klass.__name__) in _NETWORK_ERROR_NAMES:
            return True
    return False


_TIME_LIMIT_NAMES = frozenset({"SoftTimeLimitExceeded", "TimeLimitExceeded"})


def is_time_limit(exception: BaseException) -> bool:
    """A task's soft or hard time limit (Celery's, raised by billiard), recognised without importing either."""
    return any(klass.__name__ in _TIME_LIMIT_NAMES and klass.__module__.split(".")[0] in ("billiard", "celery")
               for klass in type(exception).__mro__)


def _is_exception_class(value: object) -> bool:
    return isinstance(value, type) and issubclass(value, BaseException)


def as_matchers(value: object, *, name: str) -> tuple[Matcher, ...]:
    """Normalise ``retry_on``/``fail_on`` input: a class, a predicate, or an iterable of them."""
    if value is None:
        return ()
    if _is_exception_class(value) or (callable(value) and not isinstance(value, type)):
        return (value,)  # type: ignore[return-value]
    if isinstance(value, (str, bytes)) or not isinstance(value, Iterable):
        raise ConfigurationError(
            f"{name} takes exception classes, predicates (callable(exception) -> bool) or http_status(...), "
            f"or a list of them; got {value!r}"
        )
    matchers: list[Matcher] = []
    for item in value:
        matchers.extend(as_matchers(item, name=name))
    return tuple(matchers)


def describe_matcher(matcher: Matcher) -> str:
    """A short name for a matcher, for logs and ``explain``."""
    if _is_exception_class(matcher):
        return matcher.__name__
    if isinstance(matcher, http_status):
        return repr(matcher)
    return getattr(matcher, "__name__", repr(matcher))


def _first_match(matchers: tuple[Matcher, ...], exception: BaseException) -> Matcher | None:
    for matcher in matchers:
        if isinstance(matcher, type):
            if isinstance(exception, matcher):
                return matcher
        elif matcher(exception):
            return matcher
    return None


@dataclass(frozen=True)
class Rules:
    """The classification rules of one task, the project defaults behind them."""

    retry_on: tuple[Matcher, ...] = ()
    fail_on: tuple[Matcher, ...] = ()
    default_retry_on: tuple[Matcher, ...] = ()
    default_fail_on: tuple[Matcher, ...] = ()
    unclassified: Unclassified = "fail"
    #: How the fallback rule is named in logs and traces.
    unclassified_label: str = ""

    def __post_init__(self) -> None:
        if self.unclassified not in ("retry", "fail"):
            raise ConfigurationError(f"unclassified must be 'retry' or 'fail', got {self.unclassified!r}")

    def classify(self, exception: BaseException, now: float) -> Verdict:
        """Apply the precedence in this module's docstring to ``exception``."""
        if isinstance(exception, Snooze):
            return Verdict("snooze", "Snooze", exception.delay)
        if isinstance(exception, Permanent):
            return Verdict("fail", "Permanent")
        if isinstance(exception, Transient):
            return Verdict("retry", "Transient", retry_after_of(exception, now))
        for kind, source, matchers in (
            ("fail", "fail_on", self.fail_on),
            ("retry", "retry_on", self.retry_on),
            ("fail", "DEFAULT_FAIL_ON", self.default_fail_on),
            ("retry", "DEFAULT_RETRY_ON", self.default_retry_on),
        ):
            matcher = _first_match(matchers, exception)
            if matcher is not None:
                retry_after = retry_after_of(exception, now) if kind == "retry" else None
                return Verdict(kind, f"{source} {describe_matcher(matcher)}", retry_after)  # type: ignore[arg-type]
        label = self.unclassified_label or f'no rule matched; UNCLASSIFIED is "{self.unclassified}"'
        if self.unclassified == "retry":
            return Verdict("retry", label, retry_after_of(exception, now))
        return Verdict("fail", label)


#: The rules of an explicit ``self.retry()``: the task asked for a retry, so it retries
#: unless it raised ``Permanent`` or ``Snooze`` itself.
ALWAYS_RETRY = Rules(unclassified="retry", unclassified_label="self.retry()")


def http_date(when: datetime) -> str:
    """Format ``when`` as an HTTP date, for tests and fault injection."""
    return email.utils.format_datetime(when.astimezone(timezone.utc), usegmt=True)
