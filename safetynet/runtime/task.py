"""The Celery side: ``SafetyTask``, the ``task`` decorator, and a user's own ``base=`` class adopted.

A safetynet task is a real Celery task. Its ``run`` is wrapped once, when the class is made: the
wrapper hands the call to ``pipeline.run``, the path of one run. ``apply_async`` hands the message
to ``sending.send`` and ``retry`` to ``outcome.retry``; everything else is Celery's, so routing,
eager mode, ``on_failure``, ``on_retry`` and argument handling stay Celery's.
"""

from __future__ import annotations

import functools
import inspect
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from typing import TYPE_CHECKING, Any, ClassVar, cast

import celery
from celery.contrib.django.task import DjangoTask
from celery.exceptions import Retry as CeleryRetry

from safetynet.core.classify import Rules
from safetynet.core.policy import RetryPolicy
from safetynet.exceptions import ConfigurationError
from safetynet.idempotency import KeyTemplate
from safetynet.progress.plugin import report
from safetynet.protocol.history import History
from safetynet.runtime import options, outcome, pipeline, results, sending

__all__ = ["SafetyTask", "adopt", "body_replaced", "task"]

if TYPE_CHECKING:
    _Base = DjangoTask[Any, Any]
else:
    _Base = DjangoTask


def _wrap_run(run: Any) -> Callable[..., Any]:
    """A task body, wrapped so each call runs as one attempt (``pipeline.run``)."""
    if isinstance(run, staticmethod):
        body = run.__func__

        def guarded(self: SafetyTask, *args: Any, **kwargs: Any) -> Any:
            return pipeline.run(self, body, args, args, kwargs)

        signature = inspect.signature(body)
        self_parameter = inspect.Parameter("self", inspect.Parameter.POSITIONAL_ONLY)
        guarded.__signature__ = signature.replace(  # type: ignore[attr-defined]
            parameters=[self_parameter, *signature.parameters.values()]
        )
    else:
        body = run

        def guarded(self: SafetyTask, *args: Any, **kwargs: Any) -> Any:
            return pipeline.run(self, body, (self, *args), args, kwargs)

    functools.update_wrapper(guarded, body)
    guarded._safetynet_body = run  # type: ignore[attr-defined]
    return guarded


class _Requests:
    """A task class's own ``Request`` (a class or its dotted path) with safetynet's behind it, made when a
    worker first asks for it (the path may name a module that cannot be imported yet)."""

    def __init__(self, declared: Any) -> None:
        self.declared = declared
        self.combined: type | None = None

    def __get__(self, instance: Any, owner: Any = None) -> type:
        if self.combined is None:
            from celery.utils.imports import symbol_by_name

            from safetynet.runtime.worker import with_safety

            self.combined = with_safety(symbol_by_name(self.declared))
        return self.combined


#: Celery's own worker request: a class naming it needs nothing combined.
_CELERY_REQUEST = celery.Task.Request


def _keeps_safety(declared: Any) -> Any:
    """What a class's ``Request`` attribute becomes: safetynet's, or a user's own with safetynet's behind it."""
    if isinstance(declared, _Requests):
        return declared
    if declared == _CELERY_REQUEST or declared == SafetyTask.Request:
        return SafetyTask.Request
    return _Requests(declared)


class SafetyTask(_Base):
    """Celery's (Django) ``Task`` base with retry policies, error classification and attempt history."""

    _safetynet_base: ClassVar[bool] = True
    #: The user's function, as the class declared it (a function, or a staticmethod for an unbound task).
    _orig_run: ClassVar[Any]

    #: The worker-side request: a hard time limit, a lost worker, a crash loop end in a retry or a dead letter.
    Request = "safetynet.runtime.worker:SafetyRequest"

    #: A ``RetryPolicy``; None means Celery's own retry options, else the project default.
    retry_policy: RetryPolicy | None = None
    #: Matchers that make a failure worth retrying (exception classes, predicates, http_status).
    retry_on: Any = ()
    #: Matchers that make a failure permanent.
    fail_on: Any = ()
    #: A template over the task's arguments (``"charge-{order_id}"``) or a callable taking them;
    #: on an instance, the key of the running call.
    idempotency_key: Any = options.KeyOption(None)
    #: Seconds a claim outlives its last heartbeat (None: ``IDEMPOTENCY_LEASE_SECONDS``).
    idempotency_lease: float | None = None
    #: Run the body and the "succeeded" mark in one database transaction.
    idempotency_atomic: bool = True
    #: Enqueueing the same key again within this many seconds sends no second message.
    unique_for: float | None = None
    #: A task that kills its worker this many times is dead-lettered (None: ``MAX_DELIVERIES``).
    max_deliveries: int | None = None
    #: How many times a run killed by the hard time limit is run again (None: ``TIME_LIMIT_RETRIES``).
    time_limit_retries: int | None = None
    #: How ``delay()``/``apply_async()`` send it: "now", "on_commit" or "outbox" (None: ``ENQUEUE``).
    enqueue: str | None = None
    #: The name of a breaker in ``SAFETYNET["BREAKERS"]``: while it is open the body is not run and
    #: the task is deferred (no attempt used) until it may half-open.
    breaker: str | None = None
    #: The name of a limit in ``SAFETYNET["LIMITS"]``, or a list of them: the body runs only once every one
    #: admits it; until then the task is deferred (no attempt used) until its turn.
    limit: str | list[str] | tuple[str, ...] | None = None
    #: Whose retry budget its retries spend (``RETRY_BUDGET``): None, its breaker's (if it has one);
    #: True, its queue's; a string, a budget of that name shared by the tasks naming it; False, none.
    retry_budget: bool | str | None = None
    #: Show the return value to the user who started the task (the progress endpoint's ``result``).
    progress_result: bool = False

    #: The compiled ``idempotency_key``; None for a task that is not idempotent.
    _idempotency: KeyTemplate | None = None

    def __init_subclass__(cls, **kwargs: Any) -> None:
        super().__init_subclass__(**kwargs)
        if "Request" in cls.__dict__:  # a Request class of its own: safetynet's goes behind it
            cls.Request = _keeps_safety(cls.__dict__["Request"])
        declared_backend = cls.__dict__.get("backend")
        if declared_backend is not None and not isinstance(declared_backend, property):
            # backend=... (a task option, or a class attribute) would hide the redacting property: keep it behind
            cls._backend = declared_backend
            delattr(cls, "backend")
        where = f"task {cls.__dict__.get('name') or cls.__qualname__}"
        if cls.__dict__.get("_decorated"):
            options.check_known(options.decorated_options(cls), where)
        declared = options.declared(cls)
        options.validate(declared, where)
        run = cls.__dict__.get("run")
        if run is not None and not hasattr(run, "_safetynet_body"):
            setattr(cls, "run", _wrap_run(run))  # noqa: B010  (a class attribute mypy sees as a method)
            # Celery's add_autoretry_behaviour skips a task that has _orig_run: autoretry_for is
            # applied here, through the core, instead of by Celery's wrapper.
            cls._orig_run = run
        spec = declared.get("idempotency_key")
        if spec is not None and ("idempotency_key" in cls.__dict__ or run is not None):
            cls._make_idempotent(spec, declared, where)

    @classmethod
    def _make_idempotent(cls, spec: Any, declared: dict[str, Any], where: str) -> None:
        """Compile the key against the body's parameters; idempotent tasks get late acks by default."""
        # Read the raw class attribute: getattr would unwrap a staticmethod (an unbound task).
        body = next((vars(klass)["_orig_run"] for klass in cls.__mro__ if "_orig_run" in vars(klass)), None)
        if body is None:
            raise ConfigurationError(f"{where}: idempotency_key needs a task body (a run method)")
        bound = not isinstance(body, staticmethod)
        cls._idempotency = KeyTemplate(spec, body if bound else body.__func__, bound=bound, where=where)
        cls.idempotency_key = options.KeyOption(spec)
        # Redelivery is safe now: acknowledge after the run, and requeue when the worker dies.
        if declared.get("acks_late") is None:
            cls.acks_late = True
        if declared.get("reject_on_worker_lost") is None:
            cls.reject_on_worker_lost = True

    @classmethod
    def bind(cls, app: Any) -> Any:
        """Celery's ``bind`` (options from the app's config); then late acknowledgement means what users mean
        by it: a message whose worker died is delivered again (bounded by ``max_deliveries``, then
        ``crash_loop``), unless the task or the config set ``reject_on_worker_lost=False``."""
        bound = super().bind(app)
        if cls.acks_late and cls.reject_on_worker_lost is None:
            cls.reject_on_worker_lost = True
        return bound

    # -- what a bound task can read -------------------------------------------------------

    @property
    def policy(self) -> RetryPolicy:
        """The retry policy in force for this task."""
        return options.resolved(self).policy

    @property
    def rules(self) -> Rules:
        """The classification rules in force for this task."""
        return options.resolved(self).rules

    @property
    def attempt(self) -> int:
        """The number of the running attempt, 1 for the first (snoozes do not count)."""
        return History.from_headers(self.request.headers, 0.0).attempt

    def _current_idempotency_key(self) -> str | None:
        """The idempotency key of the running call (stable across retries, redeliveries, replays)."""
        if self._idempotency is None or self.request.called_directly:
            return None
        attempt = pipeline.current(self)
        if attempt is not None and attempt.key is not None:
            return attempt.key
        key = self._idempotency.render(self.request.args, self.request.kwargs)
        if attempt is not None:
            attempt.key = key
        return key

    def progress(self, current: float, total: float | None = None, message: str = "") -> None:
        """Tell the user who started this task how far it got (see safetynet.progress)."""
        report(pipeline.current(self), current, total, message)

    # -- the result backend ----------------------------------------------------------------

    @property
    def backend(self) -> Any:
        """The task's result backend, storing failures redacted (``safetynet.runtime.results``)."""
        real = self._backend if self._backend is not None else self.app.backend
        proxy: results.RedactingBackend | None = self.__dict__.get("_safetynet_backend")
        if proxy is None or proxy.wrapped is not real:
            proxy = self.__dict__["_safetynet_backend"] = results.RedactingBackend(self, real)
        return proxy

    @backend.setter
    def backend(self, value: Any) -> None:
        self._backend = value

    def AsyncResult(self, task_id: str, **kwargs: Any) -> Any:  # noqa: N802  (Celery's name)
        """Celery's ``AsyncResult``, on the real backend (the redacting one only stores)."""
        app = self._get_app()  # type: ignore[attr-defined]
        real = self._backend if self._backend is not None else app.backend
        return app.AsyncResult(task_id, backend=real, task_name=self.name, **kwargs)

    # -- Celery's entry points ------------------------------------------------------------

    def apply_async(self, args: Any = None, kwargs: Any = None, task_id: str | None = None,  # type: ignore[override]
                    **enqueue_options: Any) -> Any:
        """Celery's ``apply_async``, sent as the task's ``enqueue`` mode says: now, on commit or through the
        outbox (``safetynet.runtime.sending``)."""
        return sending.send(self, args, kwargs, task_id, enqueue_options, super().apply_async)

    def retry(
        self, args: Any = None, kwargs: Any = None, exc: BaseException | None = None, throw: bool = True,
        eta: Any = None, countdown: float | None = None, max_retries: int | None = None, **retry_options: Any,
    ) -> CeleryRetry:
        """Celery's ``retry``, with the same meaning, decided by the safetynet core."""
        attempt = pipeline.current(self)
        if attempt is None:  # called directly (Celery re-raises), or outside a run of this task
            return super().retry(args, kwargs, cast(Exception, exc), throw, eta, countdown, max_retries,
                                 **retry_options)
        return outcome.retry(attempt, args, kwargs, exc, throw, eta, countdown, max_retries, **retry_options)


@contextmanager
def body_replaced(task: SafetyTask, replace: Callable[[Any], Any]) -> Iterator[None]:
    """Inside the block, ``task`` runs ``replace(body)`` instead of its body (the raw ``run``: a function, or a
    staticmethod for an unbound task); for fault injection. Safe for tasks an instrumentation wrapped."""
    klass = type(task)
    wrapped = klass.__dict__.get("run")
    original = getattr(wrapped, "_safetynet_body", None)
    if original is None:
        raise ConfigurationError(f"{klass.__qualname__} has no run() of its own to replace")
    # An instrumentation that wrapped run on the instance (Sentry's Celery integration does) would hide the
    # class attribute: step it aside for the block.
    shadow = task.__dict__.pop("run", None)
    setattr(klass, "run", _wrap_run(replace(original)))  # noqa: B010
    try:
        yield
    finally:
        setattr(klass, "run", wrapped)  # noqa: B010
        if shadow is not None:
            task.__dict__["run"] = shadow


_adopted: dict[type, type] = {}


def adopt(base: type) -> type[SafetyTask]:
    """``base`` (a ``celery.Task`` subclass) with safetynet behind it: its own methods run first, as they would
    under Celery, and call on through ``super()`` into safetynet's. One class per base."""
    if not (isinstance(base, type) and issubclass(base, celery.Task)):
        raise ConfigurationError(f"safetynet.task: base must be a Celery Task class (a subclass of celery.Task), "
                                 f"got {base!r}")
    if issubclass(base, SafetyTask):
        return base
    if issubclass(SafetyTask, base):  # celery.Task itself, or Celery's DjangoTask
        return SafetyTask
    combined = _adopted.get(base)
    if combined is None:
        combined = _adopted[base] = type(str(base.__qualname__).rsplit(".", 1)[-1], (base, SafetyTask), {
            "__module__": base.__module__, "__qualname__": base.__qualname__, "__doc__": base.__doc__,
            # base's own Request (first in the MRO) keeps SafetyRequest behind it
            "Request": _keeps_safety(base.Request),
        })
    return combined


def task(*args: Any, **task_options: Any) -> Any:
    """Declare a safetynet task; works like Celery's ``shared_task`` and takes its options (``base=`` any
    Celery Task class)."""
    task_options["base"] = adopt(task_options.get("base", SafetyTask))
    named = task_options.get("name") or (args[0].__qualname__ if args and callable(args[0]) else None)
    where = f"task {named}" if named else "@safetynet.task(...)"
    options.check_known(task_options, where)
    options.validate(task_options, where)

    def declare(function: Callable[..., Any]) -> Any:
        spec = task_options.get("idempotency_key")
        if spec is not None:  # checked now, not when Celery first builds the task class
            name = task_options.get("name") or getattr(function, "__qualname__", repr(function))
            KeyTemplate(spec, function, bound=bool(task_options.get("bind")), where=f"task {name}")
        return celery.shared_task(**task_options)(function)

    if len(args) == 1 and callable(args[0]):
        return declare(args[0])
    if args:
        return celery.shared_task(*args, **task_options)
    return declare
