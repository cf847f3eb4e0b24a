"""``safetynet explain <task>``: what a task's policy will do, attempt by attempt, before anything runs.

It reads the same objects the worker decides with: the resolved policy and rules (``runtime.options``), the
classification of each exception type (``Rules.classify``), the schedule (``core.forecast``), and, from the
task's source, its explicit ``self.retry(...)`` calls (``runtime.retrycalls``), whose literal ``countdown`` and
``max_retries`` replace the automatic schedule for the exceptions they catch.
"""

from __future__ import annotations

import ast
import builtins
import importlib
import inspect
import re
import textwrap
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from django.core.management.base import CommandError

from safetynet import conf
from safetynet.core.classify import Rules, Verdict, describe_matcher, http_status
from safetynet.core.durations import duration, duration_range
from safetynet.core.forecast import Step, forecast
from safetynet.core.policy import RetryPolicy
from safetynet.exceptions import ConfigurationError, Permanent, Snooze, Transient
from safetynet.management.nouns._text import Noun
from safetynet.runtime import options
from safetynet.runtime.outcome import manual_policy
from safetynet.runtime.registry import UnknownTask, find_task
from safetynet.runtime.retrycalls import RetryCall, SourceUnreadable, retry_calls
from safetynet.runtime.selfcalls import body_function, is_bound, self_calls
from safetynet.runtime.task import SafetyTask

__all__ = ["Explain"]

_HTTP = re.compile(r"^(?:http)[\s:]*(\d{3})$", re.I)


def _waits_as(delay: tuple[float, float] | None, threshold: float | None) -> str:
    """How a retry of this delay waits: in the durable schedule, or as an ETA message."""
    if delay is None:
        return "-"
    low, high = delay
    if threshold is None or high < threshold:
        return "ETA message"
    if low >= threshold:
        return "durable schedule"
    return f"durable schedule if ≥ {duration(threshold)}"


class _HTTPError(Exception):
    """An HTTP error of a given status, as ``http_status`` reads one (``.status_code``)."""

    def __init__(self, status: int) -> None:
        super().__init__(f"HTTP {status}")
        self.status_code = status


@dataclass(frozen=True)
class _Kind:
    """An exception type explain classifies: its name, an instance, and where it was found."""

    name: str
    example: BaseException | None
    why: str = ""  # why it cannot be classified, when ``example`` is None
    retried_by: RetryCall | None = None  # a self.retry() call in an except clause that catches it


def _example(kind: type[BaseException]) -> BaseException | None:
    """An instance of ``kind`` to classify (without calling an ``__init__`` that needs arguments)."""
    try:
        return kind()
    except Exception:
        try:
            return kind.__new__(kind)
        except Exception:
            return None


def _resolve(name: str, namespace: dict[str, Any]) -> Any:
    """A dotted name as the task's module sees it, else an importable path, else a builtin (None if none)."""
    head, _, rest = name.partition(".")
    value = namespace.get(head, getattr(builtins, head, None))
    if value is not None:
        for part in rest.split(".") if rest else ():
            value = getattr(value, part, None)
        if value is not None:
            return value
    module, _, attribute = name.rpartition(".")
    if module:
        try:
            return getattr(importlib.import_module(module), attribute, None)
        except Exception:  # not a module, or it fails to import: not a name we can use
            return None
    return None


def _raised_in_source(function: Any) -> list[str]:
    """Names of the exception classes the body raises (``raise X(...)``, ``raise X``), in source order."""
    try:
        tree = ast.parse(textwrap.dedent(inspect.getsource(function)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return []
    names = []
    for node in ast.walk(tree):
        if isinstance(node, ast.Raise) and node.exc is not None:
            target = node.exc.func if isinstance(node.exc, ast.Call) else node.exc
            if isinstance(target, (ast.Name, ast.Attribute)) and not (
                    isinstance(target, ast.Attribute) and target.attr == "retry"):
                names.append(ast.unparse(target))
    return names


def _outcome(verdict: Verdict) -> str:
    """What a verdict does, in words."""
    if verdict.kind == "snooze":
        return "tried again after the Snooze's delay (no attempt used)"
    if verdict.kind == "fail":
        return f"given up at once: permanent error ({verdict.rule})"
    return f"retried ({verdict.rule})"


def _classify(rules: Rules, example: BaseException) -> Verdict | str:
    """The verdict on ``example``, or why there is none (a predicate that fails on an instance made without its
    arguments)."""
    try:
        return rules.classify(example, 0.0)
    except Exception as error:
        return f"cannot tell (a rule failed on an instance made without arguments: {type(error).__name__}: {error})"


class Explain(Noun):
    """Print a task's retry schedule."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
        explain = commands.add_parser("explain", help="print a task's retry schedule",
                                      description="Print a task's retry schedule, attempt by attempt.")
        explain.add_argument("task_name", help="the registered task name, e.g. shop.tasks.send_receipt")
        explain.add_argument("--limit", type=int, default=30, help="most attempts to list (default 30)")
        explain.add_argument("--exception", metavar="TYPE",
                             help="the schedule when every attempt raises this exception: a class as the task's "
                                  "module names it, a dotted path (requests.ConnectionError), a builtin, or an "
                                  "HTTP status (\"HTTP 503\")")

    def handle(self, options: dict[str, Any]) -> None:
        self.explain(options["task_name"], options["limit"], options.get("exception"))

    def explain(self, name: str, limit: int, exception: str | None = None) -> None:
        """Print the schedule of ``name``'s policy."""
        if limit < 1:
            raise CommandError("--limit must be at least 1")
        try:
            task = find_task(name)
        except UnknownTask as error:
            raise CommandError(str(error)) from None
        if not isinstance(task, SafetyTask):
            raise CommandError(
                f"{name} is a plain Celery task, not a safetynet task: declare it with @safetynet.task "
                "or base=safetynet.SafetyTask to give it a policy."
            )
        try:
            resolved = options.resolved(task)
            settings = conf.get()
        except ConfigurationError as error:
            raise CommandError(str(error)) from None
        policy, rules = resolved.policy, resolved.rules
        source = ("retry_policy" if resolved.explicit_policy
                  else "Celery's retry options" if policy is not settings.default_policy
                  else "SAFETYNET['DEFAULT_POLICY']")
        write = self.stdout.write
        write(f"Task {name}")
        write(f"Policy: {policy.describe()}  (from {source})")
        retry_on = [describe_matcher(m) for m in rules.retry_on]
        fail_on = [describe_matcher(m) for m in rules.fail_on]
        write("Retries on: " + (", ".join(retry_on) or "-") + "; then the project's DEFAULT_RETRY_ON: "
              + (", ".join(describe_matcher(m) for m in rules.default_retry_on) or "-"))
        write("Fails at once on: " + ", ".join(["Permanent", *fail_on]) + "; then the project's DEFAULT_FAIL_ON: "
              + (", ".join(describe_matcher(m) for m in rules.default_fail_on) or "-")
              + "; any other exception: " + ("retried" if rules.unclassified == "retry" else "given up at once")
              + f" (SAFETYNET['UNCLASSIFIED'] is {rules.unclassified!r})")
        self._explain_delivery(task, settings)
        threshold = settings.durable_retry_seconds
        write("Retries: " + ("every retry is an ETA message held by a worker (DURABLE_RETRY_SECONDS=None)"
                             if threshold is None else
                             f"a retry delayed {duration(threshold)} or more waits in the database (durable "
                             "schedule) and a relay publishes it when due; a shorter one is an ETA message held by "
                             "a worker"))
        if task.breaker is not None:
            config = settings.breakers.get(task.breaker)
            if config is None:
                write(f"Breaker: {task.breaker!r}, which SAFETYNET['BREAKERS'] does not declare (safetynet.E004)")
            else:
                rule = f"{config.failure_rate:.0%} of >= {config.min_calls} calls over {duration(config.window)}"
                if config.consecutive_failures:
                    rule += f", or {config.consecutive_failures} failures in a row"
                write(f"Breaker: {task.breaker}  (opens at {rule}; open {duration(config.open_seconds)}, then "
                      f"{config.half_open_probes} probe(s) at once; while open the task is deferred, no attempt "
                      "used)")
        mode = task.enqueue or settings.enqueue
        write("Enqueue: " + {"now": "delay()/apply_async() publish at once (Celery's way)",
                             "on_commit": "delay()/apply_async() publish once the caller's transaction commits",
                             "outbox": "delay()/apply_async() write the message in the caller's transaction; it is "
                                       "published once that commits (by a relay if the broker is away)"}[mode]
              + f"  (from {'the task' if task.enqueue else 'SAFETYNET[' + repr('ENQUEUE') + ']'})")
        calls = self._explain_retry_calls(task, resolved.explicit_policy)
        kinds = self._kinds(task, rules, calls, exception)
        self._explain_kinds(kinds, rules)
        run_time, run_time_words = self._run_time(task)
        if exception is not None:
            kind = kinds[-1]
            if kind.example is None:
                raise CommandError(f"--exception {exception}: {kind.why}")
            self._schedule_for(task, kind, rules, policy, limit, run_time, run_time_words)
            return
        shown: set[RetryPolicy] = set()
        for call in calls:
            if call.unread:
                continue
            manual = manual_policy(task, None, call.countdown, call.max_retries, 0.0)
            if manual in shown:
                continue
            shown.add(manual)
            write("")
            same = " (the automatic schedule's)" if manual == policy else ""
            write(f"When {call.text} (line {call.line}) retries"
                  + (f" ({', '.join(call.catches)})" if call.catches else "") + f": {manual.describe()}{same}")
            if not same:
                self._table(manual, limit, run_time, run_time_words, outcome_of_retry="retry (self.retry)")
        write("")
        write("When an attempt raises an exception the rules retry (the automatic schedule):")
        self._table(policy, limit, run_time, run_time_words)

    # -- the parts ------------------------------------------------------------------------

    def _explain_retry_calls(self, task: SafetyTask, explicit_policy: bool) -> list[RetryCall]:
        """One line per self.retry() call in the source: what it waits and how often, or why that is unknown."""
        write = self.stdout.write
        try:
            calls = retry_calls(task)
        except SourceUnreadable as error:
            write(f"self.retry(): {error}, so explain cannot tell whether the task calls self.retry() or with "
                  "which countdown; the schedule below is the automatic one.")
            return []
        for call in calls:
            where = f"line {call.line}: {call.text}"
            if call.unread:
                write(f"self.retry() at {where}: explain cannot read {', '.join(call.unread)} (computed when it "
                      "runs), so the waits of this retry are not shown; the schedule below is the automatic one.")
                continue
            if call.countdown is not None:
                wait = f"waits {duration(call.countdown)}"
            elif explicit_policy:
                wait = "waits as the retry_policy's backoff says"
            else:
                wait = f"waits default_retry_delay={duration(float(task.default_retry_delay))} (no countdown given)"
            limit = (f"max_retries={call.max_retries} (given)" if call.max_retries is not None
                     else "the retry_policy's max_attempts" if explicit_policy
                     else f"max_retries={task.max_retries} (the task's)")
            write(f"self.retry() at {where}: {wait}; {limit}")
        if not calls and is_bound(task):
            write("self.retry(): not called in the body" + (
                "" if explicit_policy else
                f"; called from elsewhere without countdown it waits default_retry_delay="
                f"{duration(float(task.default_retry_delay))} and allows max_retries={task.max_retries}") + ".")
        return calls

    def _kinds(self, task: SafetyTask, rules: Rules, calls: list[RetryCall], asked: str | None) -> list[_Kind]:
        """The exception types worth showing: those the task names (its rules, its raises, its except clauses),
        then ``asked`` (--exception), last."""
        function = body_function(task)
        namespace: dict[str, Any] = getattr(function, "__globals__", {}) or {}
        found: dict[str, _Kind] = {}

        def add_class(label: str, value: Any, retried_by: RetryCall | None = None) -> None:
            if isinstance(value, type) and issubclass(value, BaseException):
                label = value.__name__ if label.rsplit(".", 1)[-1] == value.__name__ else label
                if label not in found:
                    found[label] = _Kind(label, _example(value), "it cannot be made without its arguments",
                                         retried_by)

        for matcher in (*rules.fail_on, *rules.retry_on):
            if isinstance(matcher, http_status):
                for code in sorted(matcher.codes)[:3]:
                    found.setdefault(f"HTTP {code}", _Kind(f"HTTP {code}", _HTTPError(code)))
            else:
                add_class(getattr(matcher, "__name__", ""), matcher)
        for call in calls:
            for caught in call.catches:
                add_class(caught, _resolve(caught, namespace), call)
        for raised in _raised_in_source(function) if function is not None else ():
            add_class(raised, _resolve(raised, namespace))
        kinds = list(found.values())
        if asked is not None:
            status = _HTTP.match(asked.strip())
            if status:
                kinds.append(_Kind(f"HTTP {status[1]}", _HTTPError(int(status[1]))))
            else:
                value = _resolve(asked.strip(), namespace)
                if not (isinstance(value, type) and issubclass(value, BaseException)):
                    raise CommandError(f"--exception {asked}: no exception class of that name (give a builtin, a "
                                       "name the task's module imports, a dotted path, or \"HTTP 503\")")
                catcher = next((call for call in calls for caught in call.catches
                                if isinstance(_resolve(caught, namespace), type)
                                and issubclass(value, _resolve(caught, namespace))), None)
                example = _example(value)
                kinds.append(_Kind(value.__name__, example, "it cannot be made without its arguments", catcher))
        return kinds

    def _explain_kinds(self, kinds: Iterable[_Kind], rules: Rules) -> None:
        """One line per exception type: what an attempt that raises it leads to."""
        write = self.stdout.write
        lines = []
        for kind in kinds:
            if kind.example is None:
                lines.append(f"  {kind.name}: cannot tell ({kind.why})")
            elif kind.retried_by is not None and not isinstance(kind.example, (Permanent, Snooze)):
                call = kind.retried_by
                lines.append(f"  {kind.name}: caught, then self.retry() at line {call.line}" +
                             (" (its waits cannot be read)" if call.unread else ""))
            else:
                verdict = _classify(rules, kind.example)
                lines.append(f"  {kind.name}: " + (verdict if isinstance(verdict, str) else _outcome(verdict)))
        if lines:
            write("When an attempt raises:")
            for line in dict.fromkeys(lines):
                write(line)

    def _run_time(self, task: SafetyTask) -> tuple[float, str]:
        """The most one attempt runs (for the schedule's times), and how the schedule says it."""
        limit = task.time_limit or task.soft_time_limit
        if limit:
            which = "time_limit" if task.time_limit else "soft_time_limit"
            return float(limit), f"the times include up to {duration(float(limit))} of run time per attempt ({which})"
        return 0.0, "the attempts' own run time comes on top (no time limit bounds it)"

    def _schedule_for(self, task: SafetyTask, kind: _Kind, rules: Rules, policy: RetryPolicy, limit: int,
                      run_time: float, run_time_words: str) -> None:
        """The table when every attempt raises ``kind`` (--exception)."""
        write = self.stdout.write
        write("")
        assert kind.example is not None
        call = kind.retried_by
        if call is not None and not isinstance(kind.example, (Permanent, Snooze, Transient)):
            if call.unread:
                write(f"When every attempt raises {kind.name}: caught, then {call.text} (line {call.line}), whose "
                      f"{', '.join(call.unread)} explain cannot read.")
                return
            manual = manual_policy(task, None, call.countdown, call.max_retries, 0.0)
            write(f"When every attempt raises {kind.name} (caught, then {call.text}, line {call.line}): "
                  f"{manual.describe()}")
            self._table(manual, limit, run_time, run_time_words, outcome_of_retry="retry (self.retry)")
            return
        verdict = _classify(rules, kind.example)
        if isinstance(verdict, str):
            raise CommandError(f"--exception {kind.name}: {verdict}")
        if verdict.kind == "fail":
            write(f"When an attempt raises {kind.name}: {_outcome(verdict)}")
            self._table(policy, limit, run_time, run_time_words, fails_at_once=verdict.rule)
            return
        if verdict.kind == "snooze":
            write(f"When an attempt raises {kind.name}: {_outcome(verdict)}; no schedule to show.")
            return
        write(f"When every attempt raises {kind.name}: {_outcome(verdict)}")
        self._table(policy, limit, run_time, run_time_words)

    def _table(self, policy: RetryPolicy, limit: int, run_time: float, run_time_words: str, *,
               outcome_of_retry: str = "retry", fails_at_once: str | None = None) -> None:
        write = self.stdout.write
        threshold = conf.get().durable_retry_seconds
        steps: list[Step]
        if fails_at_once is not None:
            steps = [Step(1, (0.0, 0.0), None, "gives up: permanent error")]
        else:
            steps = forecast(policy, limit=limit, run_time=run_time)
        rows = [("attempt", "starts (after the first)", "then waits", "outcome", "the retry waits as")]
        for step in steps:
            delay = "-" if step.delay is None else duration_range(*step.delay)
            outcome = outcome_of_retry if step.outcome == "retry" else step.outcome
            rows.append((str(step.attempt), "+" + duration_range(*step.starts), delay, outcome,
                         _waits_as(step.delay, threshold)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
        last = steps[-1]
        if not last.outcome.startswith("gives up"):
            write(f"… and on (listed {limit} attempts; raise --limit to see more).")
            return
        if fails_at_once is not None:
            write("Gives up after the first attempt.")
            return
        deadline = (f" The deadline ({duration(policy.deadline)}) counts from the first attempt's start, run time "
                    "included." if policy.deadline is not None else "")
        write(f"Gives up after attempt {last.attempt}, which starts {duration_range(*last.starts)} after the first; "
              f"{run_time_words}.{deadline}")

    def _explain_delivery(self, task: SafetyTask, settings: Any) -> None:
        """Idempotency, acknowledgement and crash handling, in one or two lines."""
        write = self.stdout.write
        template = type(task).idempotency_key  # the class reads the declared option
        deliveries = task.max_deliveries or settings.max_deliveries
        if task._idempotency is not None:
            shown = template if isinstance(template, str) else getattr(template, "__qualname__", repr(template))
            lease = task.idempotency_lease or settings.idempotency_lease_seconds
            write(f"Idempotency key: {shown}  (claimed before each run; lease {duration(lease)} renewed by a "
                  "heartbeat; "
                  + ("body and success mark in one transaction" if task.idempotency_atomic
                     else "success marked by safetynet.atomic() or after the body")
                  + (f"; enqueued once per {duration(task.unique_for)}" if task.unique_for else "") + ")")
        else:
            write("Idempotency key: none (a retried or redelivered message runs the body again)")
        if task.acks_late and task.reject_on_worker_lost:
            write(f"Worker lost: the message goes back to the queue; after {deliveries} crashes it is "
                  "dead-lettered as crash_loop.")
        elif task.acks_late:
            write("Worker lost: Celery acknowledges and fails it (reject_on_worker_lost=False); "
                  "recorded as worker_lost.")
        else:
            write("Worker lost: acknowledged before it ran (acks_late=False), so it cannot run again; "
                  "recorded as worker_lost.")
        for call in self_calls(task):
            write(f"Calls itself: {call.filename}:{call.line}: {call.text} runs inside the same attempt as a plain "
                  "function (safetynet.W007); raise self.retry(exc=exc) to try again.")
        if task.time_limit or task.soft_time_limit:
            soft = f"soft {duration(task.soft_time_limit)} (an exception, classified like any other)" \
                if task.soft_time_limit else "no soft limit"
            kills = task.time_limit_retries if getattr(task, "time_limit_retries", None) is not None \
                else conf.get().time_limit_retries
            again = ("run again while the policy allows" if kills is None
                     else "not run again" if kills == 0 else f"run again at most {kills} time{'s' * (kills != 1)}")
            hard = (f"hard {duration(task.time_limit)} (uses up an attempt; {again}; then dead-lettered as "
                    "time_limit)" if task.time_limit else "no hard limit")
            write(f"Time limits: {soft}; {hard}.")
