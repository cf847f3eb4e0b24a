"""Django's tasks API (``django.tasks``) on Celery, through safetynet's path: the backend and the Celery task that
runs each ``@task`` function.

    TASKS = {"default": {"BACKEND": "safetynet.tasks.CeleryBackend", "QUEUES": [...], "OPTIONS": {...}}}

``enqueue`` validates, builds the ``TaskResult`` (so arguments that are not JSON fail here, before anything is
written or sent), writes its ``TaskRecord`` and sends a Celery message to the task ``django.tasks:<module_path>``,
registered for every ``@task`` when Django validates it. On the worker that Celery task is a safetynet task:
guards, idempotency, breakers, the retry decision, dead letters; its body runs the function and notes what it ran
for the ``DjangoTasks`` plug-in (``safetynet.taskrecords``), which keeps the record true.
"""

from __future__ import annotations

import dataclasses
import functools
import inspect
import logging
import time
from collections.abc import Callable, Mapping
from typing import Any

from celery import current_app
from celery.utils import uuid as new_task_id
from django.core.exceptions import ImproperlyConfigured
from django.utils import timezone
from django.utils.module_loading import import_string

from safetynet import conf, taskrecords
from safetynet.core.classify import as_matchers
from safetynet.core.policy import Fixed, RetryPolicy
from safetynet.exceptions import ConfigurationError
from safetynet.runtime import pipeline
from safetynet.runtime.results import text_cleaner
from safetynet.runtime.task import task as safety_task
from safetynet.taskrecords import _compat
from safetynet.taskrecords.plugin import HEADER, NOTE, PREFIX, error_of

if not _compat.AVAILABLE:
    raise ImproperlyConfigured(_compat.MISSING)

__all__ = ["HEADER", "CeleryBackend", "SafetynetTask", "broker_priority", "celery_name"]

logger = logging.getLogger("safetynet")


#: What a Django task may declare, in ``@task(...)`` (Django 6.1, or the backport) or on the backend's OPTIONS.
_RETRY_FIELDS = ("retry_policy", "retry_on", "fail_on", "idempotency_key", "breaker", "deadline", "max_attempts",
                 "backoff")


@dataclasses.dataclass(frozen=True, slots=True, kw_only=True)
class SafetynetTask(_compat.Task):  # type: ignore[misc]
    """A ``django.tasks`` ``Task`` that also says how it is retried (Django 6.1 passes ``@task(**kwargs)`` here)."""

    #: A ``safetynet.RetryPolicy`` (else the task's ``max_attempts``/``backoff``, then the backend's OPTIONS).
    retry_policy: Any = None
    #: Matchers that make a failure transient, or permanent.
    retry_on: Any = ()
    fail_on: Any = ()
    #: A template over the function's arguments, e.g. ``"charge-{order_id}"``: its effect runs once.
    idempotency_key: Any = None
    #: The name of a breaker in ``SAFETYNET["BREAKERS"]``.
    breaker: str | None = None
    #: Seconds after the first attempt started past which no retry is tried.
    deadline: float | None = None
    #: Django's proposed shape: how many attempts in all, and ``backoff(exception, task_result)`` → seconds to
    #: wait, or None to stop.
    max_attempts: int | None = None
    backoff: Callable[[BaseException, Any], float | None] | None = None


def broker_priority(priority: int, broker_url: str) -> int:
    """Django's priority (−100 … 100, higher first) on the broker's 0 … 9: RabbitMQ runs 9 first, Redis 0."""
    step = round((int(priority) + 100) * 9 / 200)
    return 9 - step if str(broker_url).split("://", 1)[0].startswith(("redis", "rediss", "sentinel")) else step


class _Imported:
    """A function named by its dotted path, imported when first called (the module that defines it may be the
    one whose ``@task`` is being made: importing it now would be circular)."""

    def __init__(self, path: str, where: str) -> None:
        self.path, self.where = path, where
        self.function: Callable[..., Any] | None = None

    def load(self) -> Callable[..., Any]:
        if self.function is None:
            try:
                found = import_string(self.path)
            except ImportError as error:
                raise ImproperlyConfigured(f"{self.where}: cannot import {self.path!r}: {error}") from None
            if not callable(found):
                raise ImproperlyConfigured(f"{self.where} must name a function, {self.path!r} is {found!r}")
            self.function = found
        return self.function

    def __call__(self, *args: Any, **kwargs: Any) -> Any:
        return self.load()(*args, **kwargs)

    def __repr__(self) -> str:
        return f"<{self.path}>"


def _callable(value: Any, where: str) -> Callable[..., Any] | None:
    if value is None:
        return None
    if isinstance(value, str):
        if not value or "." not in value:
            raise ImproperlyConfigured(f"{where} must be a function or its dotted path, got {value!r}")
        return _Imported(value, where)
    if not callable(value):
        raise ImproperlyConfigured(f"{where} must be a function (or its dotted path), got {value!r}")
    return value  # type: ignore[no-any-return]


@dataclasses.dataclass(frozen=True)
class _Options:
    """A backend's OPTIONS, checked."""

    enqueue: str = "now"
    max_attempts: int | None = None
    backoff: Callable[..., Any] | None = None
    retry_policy: RetryPolicy | None = None
    retry_on: Any = ()
    fail_on: Any = ()

    @classmethod
    def parse(cls, alias: str, options: Mapping[str, Any]) -> _Options:
        where = f"TASKS[{alias!r}]['OPTIONS']"
        known = {"ENQUEUE", "MAX_ATTEMPTS", "BACKOFF", "RETRY_POLICY", "RETRY_ON", "FAIL_ON"}
        unknown = sorted(set(options) - known)
        if unknown:
            raise ImproperlyConfigured(f"{where}: unknown option {unknown[0]!r} (known: {', '.join(sorted(known))})")
        mode = options.get("ENQUEUE", "now")
        if mode not in conf.ENQUEUE_MODES:
            raise ImproperlyConfigured(f"{where}['ENQUEUE'] must be one of {', '.join(map(repr, conf.ENQUEUE_MODES))}, "
                                       f"got {mode!r}")
        attempts = options.get("MAX_ATTEMPTS")
        if attempts is not None and (isinstance(attempts, bool) or not isinstance(attempts, int) or attempts < 1):
            raise ImproperlyConfigured(f"{where}['MAX_ATTEMPTS'] must be a whole number >= 1, got {attempts!r}")
        policy = options.get("RETRY_POLICY")
        if isinstance(policy, Mapping):
            try:
                policy = RetryPolicy(**policy)
            except (TypeError, ConfigurationError) as error:
                raise ImproperlyConfigured(f"{where}['RETRY_POLICY']: {error}") from None
        if policy is not None and not isinstance(policy, RetryPolicy):
            raise ImproperlyConfigured(f"{where}['RETRY_POLICY'] must be a RetryPolicy or a dict of its fields, "
                                       f"got {policy!r}")
        try:
            retry_on = as_matchers(options.get("RETRY_ON", ()), name=f"{where}['RETRY_ON']")
            fail_on = as_matchers(options.get("FAIL_ON", ()), name=f"{where}['FAIL_ON']")
        except ConfigurationError as error:
            raise ImproperlyConfigured(str(error)) from None
        return cls(enqueue=mode, max_attempts=attempts, backoff=_callable(options.get("BACKOFF"), f"{where}['BACKOFF']"),
                   retry_policy=policy, retry_on=retry_on, fail_on=fail_on)


def _policy(task: Any, options: _Options) -> tuple[RetryPolicy | None, Callable[..., Any] | None]:
    """The task's retry policy and its ``backoff``: what the task declares wins over the backend's OPTIONS."""
    declared = getattr(task, "retry_policy", None)
    backoff = getattr(task, "backoff", None) or (None if declared is not None else options.backoff)
    attempts = getattr(task, "max_attempts", None) or options.max_attempts
    deadline = getattr(task, "deadline", None)
    if declared is not None:
        policy = declared
    elif backoff is not None:  # the wait is backoff()'s: the policy only counts attempts
        policy = RetryPolicy(max_attempts=attempts or 5, backoff=Fixed(0), jitter="none")
    elif attempts is not None or options.retry_policy is not None:
        base = options.retry_policy or conf.get().default_policy
        policy = dataclasses.replace(base, max_attempts=attempts or base.max_attempts)
    else:
        policy = None  # safetynet's DEFAULT_POLICY
    if deadline is not None:
        policy = dataclasses.replace(policy or conf.get().default_policy, deadline=deadline)
    return policy, backoff


_registered: dict[str, Any] = {}


def celery_name(module_path: str, alias: str) -> str:
    """The Celery task name of a ``django.tasks`` task run through the backend ``alias``: ``django.tasks:`` and its
    module path (``@alias`` after it for a backend other than ``default``, whose OPTIONS may retry differently)."""
    return PREFIX + module_path + ("" if alias == "default" else f"@{alias}")


def celery_task_for(task: Any, options: _Options, alias: str = "default") -> Any:
    """The Celery task that runs ``task`` through the backend ``alias`` (made once per module path and alias)."""
    name = celery_name(task.module_path, alias)
    found = _registered.get(name)
    if found is not None:
        return found
    policy, backoff = _policy(task, options)
    # (backoff in a tuple: a function as a class attribute would be bound to the task)
    declared: dict[str, Any] = {"retry_policy": policy, "_django_task": task.module_path, "_django_backoff": (backoff,)}
    retry_on = tuple(as_matchers(getattr(task, "retry_on", ()) or (), name=f"task {task.module_path}: retry_on"))
    declared["retry_on"] = retry_on + tuple(options.retry_on) + ((Exception,) if backoff is not None else ())
    declared["fail_on"] = tuple(as_matchers(getattr(task, "fail_on", ()) or (), name=f"task {task.module_path}: fail_on")
                                ) + tuple(options.fail_on)
    for option in ("idempotency_key", "breaker"):
        if getattr(task, option, None) is not None:
            declared[option] = getattr(task, option)
    parameters = list(inspect.signature(task.func).parameters.values())
    if task.takes_context:
        parameters = parameters[1:]  # the context is the backend's, not in the message
    module_path = task.module_path

    def run(self: Any, *args: Any, **kwargs: Any) -> Any:
        return _execute(self, module_path, alias, args, kwargs)

    run.__name__, run.__qualname__, run.__module__ = task.func.__name__, task.func.__qualname__, task.func.__module__
    run.__doc__ = task.func.__doc__
    run.__signature__ = inspect.Signature(  # type: ignore[attr-defined]  # idempotency keys bind to it
        [inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY), *parameters])
    try:
        made = safety_task(bind=True, name=name, ignore_result=True, **declared)(run)
    except ConfigurationError as error:
        raise _compat.InvalidTask(str(error)) from None
    _registered[name] = made
    return made


@functools.lru_cache(maxsize=None)
def _django_task(module_path: str) -> Any:
    found = import_string(module_path)
    if not isinstance(found, _compat.Task):
        raise _compat.InvalidTask(f"{module_path!r} is not a django.tasks Task (was it decorated with @task?)")
    return found


def _entries_before(history: Any, number: int) -> list[Mapping[str, Any]]:
    """The history entries of the attempts before this one (deferrals ran none)."""
    return [entry for entry in history.entries if entry.get("action") != "snooze"][-(number - 1):] if number > 1 else []


def _class_path(name: Any) -> str:
    text = str(name or "Exception")
    return text if "." in text else f"builtins.{text}"


def _execute(celery_task: Any, module_path: str, alias: str, args: tuple[Any, ...], kwargs: dict[str, Any]) -> Any:
    """The body of the Celery task: run the function as Django's backends do, noting what it ran."""
    django_task = _django_task(module_path)
    attempt = pipeline.current(celery_task)
    if attempt is None:  # called as a plain function: no result to keep
        return django_task.call(*args, **kwargs)
    request = attempt.request
    meta = (request.headers or {}).get(HEADER) or {}
    alias = str(meta.get("backend") or alias)
    backend = _compat.api.task_backends[alias]
    number, started = attempt.number, time.time()
    worker_id = str(request.hostname or "")
    before = _entries_before(attempt.history, number)
    worker_ids = [str(entry.get("worker") or "") for entry in before]
    worker_ids = [""] * (number - 1 - len(worker_ids)) + worker_ids + [worker_id]
    errors = [_compat.TaskError(exception_class_path=_class_path(entry.get("exception")),
                                traceback=str(entry.get("traceback") or "")) for entry in before]
    enqueued = taskrecords.moment(meta.get("enqueued_at"))
    result = _compat.TaskResult(
        task=django_task, id=request.id, status=_compat.TaskResultStatus.RUNNING, enqueued_at=enqueued,
        started_at=taskrecords.moment(attempt.history.started_at or started), finished_at=None,
        last_attempted_at=taskrecords.moment(started), args=list(args), kwargs=dict(kwargs), backend=alias,
        errors=errors, worker_ids=worker_ids)
    state: dict[str, Any] = {
        "result": result, "attempt": number, "started": started, "worker_id": worker_id,
        "backend_class": type(backend), "backoff": (getattr(celery_task, "_django_backoff", None) or (None,))[0],
        "fields": {"backend": alias, "module_path": module_path,
                   "queue_name": str(meta.get("queue") or django_task.queue_name),
                   "priority": int(meta.get("priority") or 0), "run_after": taskrecords.moment(meta.get("run_after")),
                   "args": result.args, "kwargs": result.kwargs, "enqueued_at": enqueued},
    }
    attempt.notes[NOTE] = state
    taskrecords.attempt_started(request.id, number, started)
    for receiver, response in _compat.signals.task_started.send_robust(sender=type(backend), task_result=result):
        if isinstance(response, Exception):
            logger.error("safetynet: task_started receiver %r failed: %r", receiver, response)
    try:
        if django_task.takes_context:
            raw = django_task.call(_compat.TaskContext(task_result=result), *args, **kwargs)
        else:
            raw = django_task.call(*args, **kwargs)
        value = _compat.normalize_json(raw)
    except Exception as exc:
        # Redacted like a dead letter: key=value pairs of sensitive keys, and the values of sensitive arguments.
        state["error"] = error_of(exc, clean=text_cleaner(celery_task, args, kwargs))
        raise
    state["return_value"] = value
    return value


def _flush(**_: Any) -> None:
    taskrecords.flush()


@functools.lru_cache(maxsize=1)
def _connect_flushes() -> None:
    """The records this process batched are written when a request ends and when a worker (or its child) stops,
    not only a few milliseconds later."""
    from celery import signals as celery_signals
    from django.core.signals import request_finished

    request_finished.connect(_flush, dispatch_uid="safetynet.taskrecords.flush.request", weak=False)
    celery_signals.worker_process_shutdown.connect(_flush, dispatch_uid="safetynet.taskrecords.flush.child",
                                                   weak=False)
    celery_signals.worker_shutdown.connect(_flush, dispatch_uid="safetynet.taskrecords.flush.worker", weak=False)


def _celery_aliases() -> list[str]:
    """The aliases of ``settings.TASKS`` whose backend is a ``CeleryBackend``."""
    from django.conf import settings

    found = []
    for alias, params in (getattr(settings, "TASKS", None) or {}).items():
        try:
            backend_class = import_string(str(params.get("BACKEND", "")))
        except ImportError:
            continue  # Django reports it when that backend is used
        if isinstance(backend_class, type) and issubclass(backend_class, CeleryBackend):
            found.append(alias)
    return found


class CeleryBackend(_compat.BaseTaskBackend):
    """Runs ``django.tasks`` tasks on Celery workers, with safetynet's retries, idempotency, breakers and dead
    letters; ``get_result`` reads the durable ``TaskRecord``."""

    task_class = SafetynetTask
    supports_defer = True
    supports_async_task = True
    supports_get_result = True
    supports_priority = True

    def __init__(self, alias: str, params: dict[str, Any]) -> None:
        super().__init__(alias, params)
        self.settings = _Options.parse(alias, self.options)
        self._valid: dict[int, Any] = {}
        _connect_flushes()

    def validate_task(self, task: Any) -> None:
        """Django's checks; then the task's own options, and its Celery task made (refused with ``InvalidTask``).
        A task object found valid is not checked again (``enqueue`` validates each time; a Task is immutable and
        the backend is made anew when ``TASKS`` changes)."""
        if self._valid.get(id(task)) is task:
            return
        super().validate_task(task)
        if celery_name(task.module_path, self.alias) not in _registered:
            celery_task_for(task, self.settings, self.alias)
            # A worker imports the task's module once: it must know it through every Celery backend (``using()``).
            for alias in _celery_aliases():
                if alias != self.alias:
                    other: Any = _compat.api.task_backends[alias]
                    celery_task_for(task, other.settings, alias)
        if len(self._valid) < 10_000:  # (``using()`` makes new objects: a bound, not a cache of every one)
            self._valid[id(task)] = task

    def enqueue(self, task: Any, args: Any, kwargs: Any) -> Any:
        """Validate, record (``READY``) and send; return the ``TaskResult``."""
        self.validate_task(task)
        now = timezone.now()
        try:  # its arguments are normalised as JSON here: a TypeError sends nothing
            result = _compat.TaskResult(
                task=task, id=new_task_id(), status=_compat.TaskResultStatus.READY, enqueued_at=now,
                started_at=None, finished_at=None, last_attempted_at=None, args=args, kwargs=kwargs,
                backend=self.alias, errors=[], worker_ids=[])
        except TypeError as error:
            raise TypeError(f"task {task.module_path}: its arguments must be JSON (str, int, float, bool, None, "
                            f"lists and dicts of them): {error}") from error
        mode = "outbox" if task.run_after is not None else self.settings.enqueue
        record = {
            "id": result.id, "backend": self.alias, "module_path": task.module_path, "queue_name": task.queue_name,
            "priority": task.priority, "run_after": task.run_after, "args": result.args, "kwargs": result.kwargs,
            "status": _compat.TaskResultStatus.READY, "enqueued_at": now,
        }
        celery_task = celery_task_for(task, self.settings, self.alias)
        app = celery_task._get_app()
        options: dict[str, Any] = {
            "task_id": result.id, "enqueue": mode,
            "queue": app.conf.task_default_queue if task.queue_name == "default" else task.queue_name,
            "headers": {HEADER: {"backend": self.alias, "queue": task.queue_name, "priority": task.priority,
                                 "enqueued_at": now.timestamp(),
                                 "run_after": task.run_after.timestamp() if task.run_after is not None else None}},
        }
        if task.priority:
            options["priority"] = broker_priority(task.priority, str(app.conf.broker_url or ""))
        if task.run_after is not None:
            options["eta"] = task.run_after  # waits in the durable schedule (an outbox row), not in the broker
        if mode == "now":  # the record is written as the message is published (overlapped), before this returns
            taskrecords.insert_then(record, lambda: celery_task.apply_async(result.args, result.kwargs, **options))
        else:  # in the caller's transaction, with the outbox row or the on-commit hook that sends it
            taskrecords.insert(record, in_transaction=True)
            celery_task.apply_async(result.args, result.kwargs, **options)
        _compat.signals.task_enqueued.send(type(self), task_result=result)
        return result

    def get_result(self, result_id: str) -> Any:
        """The task's result as its record says now; ``TaskResultDoesNotExist`` for an id never enqueued here."""
        row = taskrecords.read(result_id)
        if row is None:
            raise _compat.TaskResultDoesNotExist(result_id)
        task = _django_task(row.module_path)
        if (task.priority, task.queue_name, task.run_after, task.backend) != (row.priority, row.queue_name,
                                                                                row.run_after, row.backend):
            task = task.using(priority=row.priority, queue_name=row.queue_name, run_after=row.run_after,
                              backend=row.backend)
        result = _compat.TaskResult(
            task=task, id=row.id, status=_compat.TaskResultStatus(row.status), enqueued_at=row.enqueued_at,
            started_at=row.started_at, finished_at=row.finished_at, last_attempted_at=row.last_attempted_at,
            args=list(row.args), kwargs=dict(row.kwargs), backend=row.backend,
            errors=[_compat.TaskError(**error) for error in row.errors], worker_ids=list(row.worker_ids))
        object.__setattr__(result, "_return_value", row.return_value)
        return result

    def check(self, **kwargs: Any) -> list[Any]:
        """Django's checks of this backend: a Celery app must be there to send to."""
        from django.core import checks

        if isinstance(self.settings.backoff, _Imported):
            try:
                self.settings.backoff.load()
            except ImproperlyConfigured as error:
                return [checks.Error(str(error), id="safetynet.E009")]
            except ConfigurationError:  # the module's tasks read settings.SAFETYNET, which E001 reports
                return []
        if not current_app.conf.broker_url and not current_app.conf.task_always_eager:
            return [checks.Warning(
                f"TASKS[{self.alias!r}] runs django.tasks on Celery, but the current Celery app has no broker_url.",
                hint="Configure Celery (CELERY_BROKER_URL with app.config_from_object('django.conf:settings', "
                     "namespace='CELERY')) and import the app in your project's __init__.py.",
                id="safetynet.W008")]
        return []
