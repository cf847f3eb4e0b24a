"""Fault injection: make a task's body fail a given number of times, then run for real."""

from __future__ import annotations

import threading
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from datetime import datetime
from typing import Any

from safetynet.core.classify import http_date
from safetynet.exceptions import ConfigurationError
from safetynet.runtime.task import SafetyTask, body_replaced

__all__ = ["FaultPlan", "HTTPStatusError", "http_error", "inject"]


class _Response:
    def __init__(self, status_code: int, headers: dict[str, str]) -> None:
        self.status_code = status_code
        self.headers = {key.title(): value for key, value in headers.items()}


class HTTPStatusError(Exception):
    """An HTTP error shaped like requests' and httpx's: ``.response.status_code`` and headers."""

    def __init__(self, status: int, headers: dict[str, str] | None = None, message: str = "") -> None:
        super().__init__(message or f"HTTP {status}")
        self.response = _Response(status, headers or {})

    def __reduce__(self):
        return (type(self), (self.response.status_code, dict(self.response.headers), str(self)))


def http_error(status: int, retry_after: float | datetime | None = None) -> HTTPStatusError:
    """An HTTP error with ``status`` and, if given, a Retry-After header (seconds or a date)."""
    headers: dict[str, str] = {}
    if isinstance(retry_after, datetime):
        headers["Retry-After"] = http_date(retry_after)
    elif retry_after is not None:
        headers["Retry-After"] = str(int(retry_after))
    return HTTPStatusError(status, headers)


class FaultPlan:
    """How many calls fail and with what; counts the calls it saw."""

    def __init__(self, times: int, exception: BaseException | Callable[[int], BaseException]) -> None:
        if isinstance(times, bool) or not isinstance(times, int) or times < 0:
            raise ConfigurationError(f"inject(times=...) must be a whole number >= 0, got {times!r}")
        self.times = times
        self.exception = exception
        self.calls = 0
        self._lock = threading.Lock()

    def next_failure(self) -> BaseException | None:
        """The exception to raise for this call, or None to run the real body."""
        with self._lock:
            self.calls += 1
            number = self.calls
        if number > self.times:
            return None
        if isinstance(self.exception, BaseException):
            return self.exception
        return self.exception(number)


@contextmanager
def inject(
    task: Any, *, times: int = 1, exception: BaseException | Callable[[int], BaseException] | None = None,
) -> Iterator[FaultPlan]:
    """Inside the block, the first ``times`` calls of ``task`` raise ``exception``, later calls run.

    ``exception`` is an exception instance or a factory ``f(call_number)``; the default is
    ``ConnectionError``. Works for the simulator and eager runs in this process.
    """
    task = getattr(task, "_get_current_object", lambda: task)()
    if not isinstance(task, SafetyTask):
        raise ConfigurationError(f"inject() needs a safetynet task, got {task!r}")
    plan = FaultPlan(times, exception if exception is not None else ConnectionError("injected fault"))

    def faulty(original: Any) -> Any:
        if isinstance(original, staticmethod):
            body = original.__func__

            def faulty_static(*args: Any, **kwargs: Any) -> Any:
                failure = plan.next_failure()
                if failure is not None:
                    raise failure
                return body(*args, **kwargs)

            return staticmethod(faulty_static)

        def faulty_bound(self: Any, *args: Any, **kwargs: Any) -> Any:
            failure = plan.next_failure()
            if failure is not None:
                raise failure
            return original(self, *args, **kwargs)

        return faulty_bound

    if getattr(type(task).__dict__.get("run"), "_safetynet_body", None) is None:
        raise ConfigurationError(f"inject(): {type(task).__qualname__} has no run() of its own to inject into")
    with body_replaced(task, faulty):
        yield plan
