"""What a safetynet task leaves in Celery's result backend: failures stored redacted.

Celery stores a failed (or retried) task's exception and traceback in the result backend
(``celery-task-meta-<id>`` in Redis, ``celery_taskmeta`` in a database). A safetynet task's
``backend`` is a ``RedactingBackend``: a thin proxy over the app's backend whose
``mark_as_failure``, ``mark_as_retry`` and ``store_result`` store a copy of the exception (same
type, its arguments and attributes redacted with the dead-letter text patterns and the task's
sensitive argument values) and a redacted traceback. The live exception is not touched:
``on_failure``, ``on_retry``, errbacks, ``self.retry``, Sentry and the dead letter see it as raised.
With ``result_extended`` the stored arguments are redacted by parameter name too.

Everything else is the real backend's: a success costs one forwarded call.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from typing import Any

from celery import states
from celery.app.task import Context
from celery.utils.serialization import UnpickleableExceptionWrapper
from celery.utils.saferepr import saferepr

from safetynet import conf
from safetynet.redaction import (
    REDACTED,
    is_sensitive,
    parameter_names,
    redact,
    redact_text,
    scrub_values,
    sensitive_values,
)

__all__ = ["RedactingBackend", "cleaned", "redacted_exception", "text_cleaner"]

_MAX_DEPTH = 32

Clean = Callable[[str], str]


def text_cleaner(task: Any, args: Any, kwargs: Any) -> Clean:
    """A function blanking, in free text, ``key=value`` pairs of sensitive keys and the values of the task's
    sensitive arguments (the patterns dead-letter messages go through)."""
    try:
        secrets = sensitive_values(args, kwargs, parameter_names(task))
    except Exception:  # odd arguments: the key=value patterns still apply
        secrets = []

    def clean(text: str) -> str:
        return redact_text(scrub_values(text, secrets))

    return clean


def cleaned(value: Any, clean: Clean, settings: conf.Settings, depth: int = 0) -> Any:
    """``value`` with its text cleaned and the values of sensitive keys replaced (containers copied)."""
    if isinstance(value, str):
        return clean(value)
    if depth > _MAX_DEPTH:
        return value
    if isinstance(value, tuple):
        return tuple(cleaned(item, clean, settings, depth + 1) for item in value)
    if isinstance(value, list):
        return [cleaned(item, clean, settings, depth + 1) for item in value]
    if isinstance(value, Mapping):
        return {key: REDACTED if isinstance(key, str) and is_sensitive(key, settings)
                else cleaned(item, clean, settings, depth + 1) for key, item in value.items()}
    return value


def redacted_exception(exc: BaseException, clean: Clean) -> BaseException:
    """A copy of ``exc`` to store: the same type, its ``args`` and attributes cleaned; ``exc`` when nothing changes.

    The copy is made without calling ``__init__`` (whose parameters may not be its ``args``), so a class with
    an unusual constructor or its own ``__reduce__`` (which reads the cleaned attributes) comes back as Celery
    would bring it back. An exception Celery had to wrap (``UnpickleableExceptionWrapper``) is wrapped again.
    """
    settings = conf.get()
    if isinstance(exc, UnpickleableExceptionWrapper):
        text = getattr(exc, "text", None)
        return UnpickleableExceptionWrapper(str(exc.exc_module), str(exc.exc_cls_name),
                                            cleaned(tuple(exc.exc_args or ()), clean, settings),
                                            clean(str(text)) if text is not None else None)
    args = cleaned(tuple(exc.args), clean, settings)
    attributes = getattr(exc, "__dict__", None) or {}
    safe_attributes = {key: REDACTED if is_sensitive(key, settings) else cleaned(value, clean, settings)
                       for key, value in attributes.items()}
    if args == tuple(exc.args) and _same(safe_attributes, attributes):
        return exc
    klass = type(exc)
    try:
        try:
            copy = klass.__new__(klass, *args)
        except Exception:  # a __new__ of its own that takes other arguments
            copy = klass.__new__(klass)
        copy.args = args
        copy.__dict__.update(safe_attributes)
    except Exception:  # cannot be made without its constructor: kept by name and text, as Celery keeps it
        return UnpickleableExceptionWrapper(klass.__module__, klass.__name__, args, clean(saferepr(exc)))
    return copy


def _same(cleaned: Mapping[str, Any], original: Mapping[str, Any]) -> bool:
    try:
        return bool(cleaned == original)
    except Exception:  # an attribute that cannot be compared: take it as changed
        return False


class RedactingBackend:
    """A task's result backend that stores its failures redacted; everything else is the real backend's."""

    def __init__(self, task: Any, backend: Any) -> None:
        self.task = task
        self.wrapped = backend
        #: Whether the backend stores the request's arguments (``result_extended``), read once per backend.
        self.extended = bool(backend.app.conf.find_value_for_key("extended", "result"))

    def __getattr__(self, name: str) -> Any:
        if name in ("task", "wrapped", "extended"):  # not set yet (a copy being made): no recursion
            raise AttributeError(name)
        return getattr(self.wrapped, name)

    def process_cleanup(self) -> Any:
        """The real backend's (Celery's tracer calls it after every task: spelled out, it skips ``__getattr__``)."""
        return self.wrapped.process_cleanup()

    def __repr__(self) -> str:
        return f"<RedactingBackend for {getattr(self.task, 'name', self.task)!r}: {self.wrapped!r}>"

    # -- what is stored ------------------------------------------------------------------

    def _clean(self, request: Any) -> Clean:
        return text_cleaner(self.task, getattr(request, "args", None), getattr(request, "kwargs", None))

    def _redacted(self, exc: Any, traceback: Any, request: Any) -> tuple[Any, Any]:
        clean = self._clean(request)
        safe_exc = redacted_exception(exc, clean) if isinstance(exc, BaseException) else exc
        safe_traceback = clean(traceback) if isinstance(traceback, str) else traceback
        return safe_exc, safe_traceback

    def _stored_request(self, request: Any) -> Any:
        """With ``result_extended`` (the request's arguments are stored), a copy with them redacted."""
        if request is None or not self.extended:
            return request
        args, kwargs, found = redact(getattr(request, "args", None) or (), getattr(request, "kwargs", None) or {},
                                     parameter_names(self.task))
        if not found:
            return request
        copy = Context(dict(vars(request)))
        copy.args, copy.kwargs = args, kwargs
        return copy

    def store_result(self, task_id: Any, result: Any, state: str, traceback: Any = None, request: Any = None,
                     **kwargs: Any) -> Any:
        """Celery's ``store_result``; an exception state's exception and traceback stored redacted."""
        if state in states.EXCEPTION_STATES:
            result, traceback = self._redacted(result, traceback, request)
        return self.wrapped.store_result(task_id, result, state, traceback=traceback,
                                         request=self._stored_request(request), **kwargs)

    def mark_as_failure(self, task_id: Any, exc: Any, traceback: Any = None, request: Any = None,
                        store_result: bool = True, call_errbacks: bool = True, state: str = states.FAILURE) -> Any:
        """Celery's ``mark_as_failure`` storing the redacted copy (a chain or a chord it fails gets that copy too);
        the task's errbacks get the live exception, as Celery gives it to them."""
        safe_exc, safe_traceback = self._redacted(exc, traceback, request)
        errbacks = call_errbacks and request is not None and bool(getattr(request, "errbacks", None))
        outcome = self.wrapped.mark_as_failure(task_id, safe_exc, safe_traceback, request=self._stored_request(request),
                                               store_result=store_result, call_errbacks=call_errbacks and not errbacks,
                                               state=state)
        if errbacks:
            self.wrapped._call_task_errbacks(request, exc, traceback)
        return outcome

    def mark_as_retry(self, task_id: Any, exc: Any, traceback: Any = None, request: Any = None,
                      store_result: bool = True, state: str = states.RETRY) -> Any:
        """Celery's ``mark_as_retry`` storing the redacted copy."""
        safe_exc, safe_traceback = self._redacted(exc, traceback, request)
        return self.wrapped.mark_as_retry(task_id, safe_exc, safe_traceback, request=self._stored_request(request),
                                          store_result=store_result, state=state)

    def mark_as_done(self, task_id: Any, result: Any, request: Any = None, store_result: bool = True,
                     state: str = states.SUCCESS) -> Any:
        """Celery's ``mark_as_done`` (the request's arguments redacted when ``result_extended`` stores them)."""
        return self.wrapped.mark_as_done(task_id, result, request=self._stored_request(request),
                                         store_result=store_result, state=state)
