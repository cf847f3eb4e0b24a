"""One run of a task (``Attempt``), one message on its way out (``Outgoing``), and the plug-in interface.

The runtime creates an ``Attempt`` when a run starts and passes it along the path::

    guards: plugin.before_run(attempt) for each plug-in, in order
    body:   plugin.around_body(attempt, call) nested, the first plug-in outermost
    after:  plugin.after_success(attempt, result) for the plug-ins that noted something in
            attempt.notes, or on a failure core.decide, then
            plugin.adjust(attempt, retry), plugin.on_retry(attempt, retry, message) (then
            plugin.on_retry_not_sent if it could not be published) or
            plugin.on_give_up(attempt, dead, error)
    always: plugin.after_run(attempt, error), for the plug-ins that noted something in attempt.notes

and, on the way out, ``plugin.before_send(message)`` in the caller, then
``plugin.around_publish(message, publish)`` when the message is published. A feature that takes
part in a task's path is one ``Plugin`` subclass registered in ``safetynet.runtime.plugins``.
"""

from __future__ import annotations

from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any, ClassVar

from safetynet.core.decision import Dead, Decision, Retry
from safetynet.protocol.headers import HISTORY
from safetynet.protocol.history import History

__all__ = ["Attempt", "Outgoing", "Plugin"]


@dataclass(eq=False, init=False)
class Attempt:
    """The state of one run of a task: created when it starts, read and written by the path's steps.

    One is made for every run, so ``__init__`` sets only what a run brings; the other fields keep
    their class defaults until a step sets them.
    """

    #: The task object (a ``SafetyTask``).
    task: Any
    #: Celery's request of this run (``task.request``).
    request: Any
    args: tuple[Any, ...]
    kwargs: dict[str, Any]
    #: When the run started, by the runtime's clock (virtual in the simulator), in seconds since the epoch.
    started: float
    #: ``time.perf_counter()`` when the run started (for its run time).
    started_perf: float
    #: The plug-ins taking part, in order.
    plugins: tuple[Plugin, ...] = ()
    #: The idempotency key of the call, once rendered.
    key: str | None = None
    #: The idempotency claim this run holds.
    claim: Any = None
    #: What was decided after the run failed.
    decision: Decision | None = None
    #: The exception already decided (a second look at it must not decide again).
    settled: BaseException | None = None
    #: True once the user's function was called (a stored result or a deferral calls nothing).
    ran: bool = False
    #: True while the body runs inside the transaction that also marks its claim.
    in_body_transaction: bool = False
    #: Writes to make once that transaction has ended (a failure rolls it back); None: none yet.
    after_transaction: list[Callable[[], object]] | None = None
    #: True until the run has ended.
    active: bool = True
    #: State a plug-in keeps for this run, under its name.
    notes: dict[str, Any] = field(default_factory=dict)
    _history: History | None = field(default=None, repr=False)

    def __init__(self, task: Any, request: Any, args: tuple[Any, ...], kwargs: dict[str, Any], started: float,
                 started_perf: float, plugins: tuple[Plugin, ...] = ()) -> None:
        self.task = task
        self.request = request
        self.args = args
        self.kwargs = kwargs
        self.started = started
        self.started_perf = started_perf
        self.plugins = plugins
        self.notes = {}

    @property
    def history(self) -> History:
        """The attempt history this message carried (read from its headers on first use)."""
        if self._history is None:
            self._history = History.from_headers(self.request.headers, self.started)
        return self._history

    @property
    def number(self) -> int:
        """The number of this attempt, 1 for the first (snoozes do not count)."""
        if self._history is None and HISTORY not in (self.request.headers or ()):
            return 1  # a first attempt: no history to read
        return self.history.attempt

    @property
    def eager(self) -> bool:
        """True when run in eager mode (``task_always_eager``, ``apply()``, the simulator)."""
        return bool(self.request.is_eager)

    def when_transaction_ends(self, write: Callable[[], object]) -> None:
        """Run ``write`` now, or, inside the body's transaction (which a failure rolls back), once it has ended."""
        if self.in_body_transaction:
            if self.after_transaction is None:
                self.after_transaction = []
            self.after_transaction.append(write)
        else:
            write()


@dataclass(eq=False)
class Outgoing:
    """A message on its way out: what ``apply_async`` was asked to send, and how."""

    task: Any
    args: Any
    kwargs: Any
    #: ``apply_async``'s options (queue, countdown, eta, headers, …) without safetynet's own.
    options: dict[str, Any]
    #: "now", "on_commit" or "outbox".
    mode: str
    task_id: str | None = None
    #: The idempotency key of the call (rendered in the caller: a bad key fails the caller, not a worker).
    key: str | None = None
    #: The ``apply_async`` options plug-ins read (``Plugin.send_options``), taken out of ``options``.
    notes: dict[str, Any] = field(default_factory=dict)

    @property
    def headers(self) -> dict[str, Any]:
        """The message's custom headers (created empty when there are none)."""
        headers = self.options.get("headers")
        if headers is None:
            headers = self.options["headers"] = {}
        return headers


class Plugin:
    """A feature that takes part in a task's path. Every hook does nothing until overridden."""

    #: The plug-in's name (its key in ``Attempt.notes``).
    name: ClassVar[str] = ""
    #: The task options it understands: declared on a task, validated when the task is declared.
    options: ClassVar[frozenset[str]] = frozenset()
    #: The ``apply_async`` options it reads (kept in ``Outgoing.notes``, not sent to Celery).
    send_options: ClassVar[frozenset[str]] = frozenset()
    #: The message headers without which its ``before_run`` has nothing to do (None: it is always called).
    run_headers: ClassVar[frozenset[str] | None] = None

    def validate(self, options: Mapping[str, Any], where: str) -> None:
        """Check the values of its options (raise ``ConfigurationError`` naming the task, ``where``)."""

    def takes_part(self, task: Any) -> bool:
        """Whether it takes part in ``task``'s runs at all (asked once per task class and settings)."""
        return True

    # -- the way out --------------------------------------------------------------------------

    def before_send(self, message: Outgoing) -> None:
        """In the caller, before the message is sent in any mode: change it, or raise to refuse it."""

    def around_publish(self, message: Outgoing, publish: Callable[[Outgoing], Any]) -> Any:
        """When it is published (at once, on commit, or when the outbox row committed): call ``publish``, or not."""
        return publish(message)

    # -- a run ---------------------------------------------------------------------------------

    def before_run(self, attempt: Attempt) -> None:
        """A guard before the body: raise to not run it (Snooze defers it, Ignore drops the message)."""

    def around_body(self, attempt: Attempt, body: Callable[[], Any]) -> Any:
        """Run ``body`` (inside a claim, a transaction …) and return its result, or a result without it."""
        return body()

    def after_success(self, attempt: Attempt, result: Any) -> None:
        """The body returned ``result`` (called only if the plug-in noted something: ``attempt.notes[name]``)."""

    def adjust(self, attempt: Attempt, retry: Retry) -> Retry | Dead:
        """Change a retry the core decided (wait longer), or end the task where a rule of the task's own says so
        (a ``django.tasks`` task's ``backoff()`` returning None); ``attempt.settled`` is the failure."""
        return retry

    def on_retry(self, attempt: Attempt, retry: Retry, message: Outgoing) -> None:
        """The run failed and ``message`` (the next attempt) is about to be published."""

    def on_retry_not_sent(self, attempt: Attempt, error: BaseException) -> None:
        """The retry ``on_retry`` prepared could not be published (the broker refused it)."""

    def on_give_up(self, attempt: Attempt, dead: Dead, error: BaseException | None) -> None:
        """The run failed and the task is given up."""

    def after_run(self, attempt: Attempt, error: BaseException | None) -> None:
        """The run ended, however it ended (``error`` is what it raised, None on success). Called only when the
        plug-in left a note in ``attempt.notes`` under its name (it has something to clean up)."""
