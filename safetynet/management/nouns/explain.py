"""``safetynet explain <task>``: what a task's policy will do, attempt by attempt, before anything runs."""

from __future__ import annotations

from typing import Any

from django.core.management.base import CommandError

from safetynet import conf
from safetynet.core.classify import describe_matcher
from safetynet.core.forecast import forecast
from safetynet.exceptions import ConfigurationError
from safetynet.limits.plugin import limit_names
from safetynet.management.nouns._text import Noun, seconds, span
from safetynet.runtime import options
from safetynet.runtime.registry import UnknownTask, find_task
from safetynet.runtime.selfcalls import self_calls
from safetynet.runtime.task import SafetyTask

__all__ = ["Explain"]


def _waits_as(delay: tuple[float, float] | None, threshold: float | None) -> str:
    """How a retry of this delay waits: in the durable schedule, or as an ETA message."""
    if delay is None:
        return "-"
    low, high = delay
    if threshold is None or high < threshold:
        return "ETA message"
    if low >= threshold:
        return "durable schedule"
    return f"durable schedule if ≥ {seconds(threshold)}"


class Explain(Noun):
    """Print a task's retry schedule."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
        explain = commands.add_parser("explain", help="print a task's retry schedule",
                                      description="Print a task's retry schedule, attempt by attempt.")
        explain.add_argument("task_name", help="the registered task name, e.g. shop.tasks.send_receipt")
        explain.add_argument("--limit", type=int, default=30, help="most attempts to list (default 30)")

    def handle(self, options: dict[str, Any]) -> None:
        self.explain(options["task_name"], options["limit"])

    def explain(self, name: str, limit: int) -> None:
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
              + "; any other exception: " + rules.unclassified)
        self._explain_delivery(task, settings)
        threshold = settings.durable_retry_seconds
        write("Retries: " + ("every retry is an ETA message held by a worker (DURABLE_RETRY_SECONDS=None)"
                             if threshold is None else
                             f"a retry delayed {seconds(threshold)} or more waits in the database (durable schedule) "
                             "and a relay publishes it when due; a shorter one is an ETA message held by a worker"))
        if task.breaker is not None:
            config = settings.breakers.get(task.breaker)
            if config is None:
                write(f"Breaker: {task.breaker!r}, which SAFETYNET['BREAKERS'] does not declare (safetynet.E004)")
            else:
                rule = f"{config.failure_rate:.0%} of >= {config.min_calls} calls over {seconds(config.window)}"
                if config.consecutive_failures:
                    rule += f", or {config.consecutive_failures} failures in a row"
                write(f"Breaker: {task.breaker}  (opens at {rule}; open {seconds(config.open_seconds)}, then "
                      f"{config.half_open_probes} probe(s) at once; while open the task is deferred, no attempt "
                      "used)")
        self._explain_limits(task, settings)
        mode = task.enqueue or settings.enqueue
        write("Enqueue: " + {"now": "delay()/apply_async() publish at once (Celery's way)",
                             "on_commit": "delay()/apply_async() publish once the caller's transaction commits",
                             "outbox": "delay()/apply_async() write the message in the caller's transaction; it is "
                                       "published once that commits (by a relay if the broker is away)"}[mode]
              + f"  (from {'the task' if task.enqueue else 'SAFETYNET[' + repr('ENQUEUE') + ']'})")
        if not resolved.explicit_policy:
            write(f"An explicit self.retry() without countdown waits default_retry_delay={task.default_retry_delay}s "
                  f"and allows max_retries={task.max_retries} (Celery's meaning).")
        write("")
        rows = [("attempt", "starts at (after the first)", "then waits", "outcome", "the retry waits as")]
        steps = forecast(policy, limit=limit)
        for step in steps:
            delay = "-" if step.delay is None else span(*step.delay)
            rows.append((str(step.attempt), "+" + span(*step.starts), delay, step.outcome,
                         _waits_as(step.delay, settings.durable_retry_seconds)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            write("  ".join(cell.ljust(width) for cell, width in zip(row, widths, strict=False)).rstrip())
        last = steps[-1]
        if last.outcome.startswith("gives up"):
            write(f"\nGives up after attempt {last.attempt}, {span(*last.starts)} after the first attempt started.")
        else:
            write(f"\n… and on (listed {limit} attempts; raise --limit to see more).")

    def _explain_limits(self, task: SafetyTask, settings: Any) -> None:
        """The limits the task goes through, and what happens over them."""
        names = limit_names(task.limit)
        if not names:
            return
        write = self.stdout.write
        for name in names:
            config = settings.limits.get(name)
            if config is None:
                write(f"Limit: {name!r}, which SAFETYNET['LIMITS'] does not declare (safetynet.E007)")
                continue
            write(f"Limit: {name}  ({config.describe()}; shared by every worker)")
        write(f"Over a limit: the body does not run; the task is deferred until its turn (no attempt used, the "
              f"deadline still counts), waiting in the durable schedule when that is "
              f"{seconds(settings.durable_retry_seconds) if settings.durable_retry_seconds is not None else 'never'}"
              f" or more; a slot is a lease of {seconds(settings.limit_lease_seconds)} renewed by the heartbeat "
              "(a killed worker's slots are free again within it).")

    def _explain_delivery(self, task: SafetyTask, settings: Any) -> None:
        """Idempotency, acknowledgement and crash handling, in one or two lines."""
        write = self.stdout.write
        template = type(task).idempotency_key  # the class reads the declared option
        deliveries = task.max_deliveries or settings.max_deliveries
        if task._idempotency is not None:
            shown = template if isinstance(template, str) else getattr(template, "__qualname__", repr(template))
            lease = task.idempotency_lease or settings.idempotency_lease_seconds
            write(f"Idempotency key: {shown}  (claimed before each run; lease {lease:g}s renewed by a heartbeat; "
                  + ("body and success mark in one transaction" if task.idempotency_atomic
                     else "success marked by safetynet.atomic() or after the body")
                  + (f"; enqueued once per {task.unique_for:g}s" if task.unique_for else "") + ")")
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
            soft = f"soft {task.soft_time_limit:g}s (an exception, classified like any other)" \
                if task.soft_time_limit else "no soft limit"
            kills = task.time_limit_retries if getattr(task, "time_limit_retries", None) is not None \
                else conf.get().time_limit_retries
            again = ("run again while the policy allows" if kills is None
                     else "not run again" if kills == 0 else f"run again at most {kills} time{'s' * (kills != 1)}")
            hard = (f"hard {task.time_limit:g}s (uses up an attempt; {again}; then dead-lettered as time_limit)"
                    if task.time_limit else "no hard limit")
            write(f"Time limits: {soft}; {hard}.")
