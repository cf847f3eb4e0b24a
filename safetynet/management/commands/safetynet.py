"""``python manage.py safetynet <command>``: see what safetynet will do.

Commands:
    explain <dotted.task.name>   the retry schedule of a task's policy, attempt by attempt
"""

from __future__ import annotations

import math
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser

from safetynet import conf
from safetynet.core.classify import describe_matcher
from safetynet.core.schedule import schedule
from safetynet.exceptions import ConfigurationError
from safetynet.runtime.registry import UnknownTask, find_task
from safetynet.runtime.task import SafetyTask


def _seconds(value: float) -> str:
    if math.isinf(value):
        return "∞"
    if value >= 3600:
        return f"{value / 3600:.4g}h"
    if value >= 120:
        return f"{value / 60:.4g}m"
    return f"{value:.4g}s"


def _span(low: float, high: float) -> str:
    return _seconds(low) if low == high else f"{_seconds(low)}–{_seconds(high)}"


class Command(BaseCommand):
    help = "See what safetynet will do: `safetynet explain <dotted.task.name>`."

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", metavar="command", required=True)
        explain = commands.add_parser("explain", help="print a task's retry schedule",
                                      description="Print a task's retry schedule, attempt by attempt.")
        explain.add_argument("task_name", help="the registered task name, e.g. shop.tasks.send_receipt")
        explain.add_argument("--limit", type=int, default=30, help="most attempts to list (default 30)")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["command"] == "explain":
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
            resolved = task._resolved()
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
        if not resolved.explicit_policy:
            write(f"An explicit self.retry() without countdown waits default_retry_delay={task.default_retry_delay}s "
                  f"and allows max_retries={task.max_retries} (Celery's meaning).")
        write("")
        rows = [("attempt", "starts at (after the first)", "then waits", "outcome")]
        steps = schedule(policy, limit=limit)
        for step in steps:
            delay = "-" if step.delay is None else _span(*step.delay)
            rows.append((str(step.attempt), "+" + _span(*step.starts), delay, step.outcome))
        widths = [max(len(row[i]) for row in rows) for i in range(4)]
        for row in rows:
            write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        last = steps[-1]
        if last.outcome.startswith("gives up"):
            write(f"\nGives up after attempt {last.attempt}, {_span(*last.starts)} after the first attempt started.")
        else:
            write(f"\n… and on (listed {limit} attempts; raise --limit to see more).")
