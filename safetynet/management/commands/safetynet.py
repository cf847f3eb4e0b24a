"""``python manage.py safetynet <command>``: see what safetynet will do, and handle dead letters.

Commands:
    explain <dotted.task.name>   the retry schedule of a task's policy, attempt by attempt
    dead list                    dead letters, one line each (filters: --task --reason --fingerprint
                                 --status --since --until --id; --limit, --json)
    dead show <id>               everything about one dead letter: attempt timeline, traceback, audit
    dead replay                  run them again with a fresh attempt count (--id, filters or --all;
                                 --queue, --by, --dry-run, --json); exits non-zero if any was refused
    dead discard                 mark them handled without running them (--id, filters or --all; --dry-run)
    dead purge --older-than 30d  delete old rows (--status, --dry-run)
    dead flush                   move records spooled while the database was down into it
    keys show <key> | keys purge the claim of an idempotency key; delete old settled claims
    relay                        publish due scheduled retries and outbox messages until stopped
                                 (--once: one pass; --poll, --limit)
    schedule list                scheduled retries and outbox messages waiting, soonest first
                                 (--task, --kind, --limit, --json)
    schedule due-now             make waiting messages due at once (--key, --task or --all; --dry-run)
    breakers list                every declared breaker: state, calls and failures in its window,
                                 when it may half-open (--json)
    breakers open|close <name>   force a breaker open (--for SECONDS) or closed
"""

from __future__ import annotations

import argparse
import getpass
import json
import math
import os
import re
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any

from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, InterfaceError
from django.db.models import QuerySet
from django.utils import timezone
from kombu.exceptions import OperationalError

from safetynet import conf, deadletter
from safetynet.core.classify import describe_matcher
from safetynet.core.schedule import schedule
from safetynet.exceptions import ConfigurationError
from safetynet.models import DeadLetter
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


def _waits_as(delay: tuple[float, float] | None, threshold: float | None) -> str:
    """How a retry of this delay waits: in the durable schedule, or as an ETA message."""
    if delay is None:
        return "-"
    low, high = delay
    if threshold is None or high < threshold:
        return "ETA message"
    if low >= threshold:
        return "durable schedule"
    return f"durable schedule if ≥ {_seconds(threshold)}"


# -- dead letters: parsing the options -----------------------------------------------------

_AGE = re.compile(r"^(\d+(?:\.\d+)?)([smhdw])$")
_UNIT_SECONDS = {"s": 1, "m": 60, "h": 3600, "d": 86400, "w": 7 * 86400}
_FILTERS = ("task", "reason", "fingerprint", "status", "since", "until")


def moment(text: str) -> datetime:
    """An argparse type: an ISO 8601 date or datetime (naive: the current time zone) or an age ago (2h, 7d)."""
    value = text.strip()
    match = _AGE.match(value.lower())
    if match:
        try:
            return timezone.now() - timedelta(seconds=float(match[1]) * _UNIT_SECONDS[match[2]])
        except OverflowError:
            raise argparse.ArgumentTypeError(f"the age {text!r} is too large") from None
    try:
        parsed = datetime.fromisoformat(value)
    except ValueError:
        raise argparse.ArgumentTypeError(
            f"{text!r} is neither an ISO 8601 date or datetime (2024-05-01, 2024-05-01T14:30, "
            "2024-05-01T14:30:00+02:00) nor an age (90s, 30m, 2h, 7d, 2w)"
        ) from None
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)


def _positive(text: str) -> int:
    try:
        value = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not a whole number") from None
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be at least 1, got {value}")
    return value


def _add_filters(parser: CommandParser, *, selects: str) -> None:
    reasons, statuses = DeadLetter.Reason.values, DeadLetter.Status.values
    group = parser.add_argument_group("filters (every one given must match)")
    group.add_argument("--task", metavar="NAME", help="task name, exact, or a prefix ending in * (shop.tasks.*)")
    group.add_argument("--reason", choices=reasons, metavar="REASON", help="one of " + ", ".join(reasons))
    group.add_argument("--fingerprint", metavar="SHA1", help="rows failing alike (see `dead show`)")
    group.add_argument("--status", choices=[*statuses, "all"], metavar="STATUS",
                       help=f"one of {', '.join(statuses)} or all (default: dead, or all with --id)")
    group.add_argument("--since", type=moment, metavar="WHEN",
                       help="last failure at or after: 2024-05-01, 2024-05-01T14:30, or an age ago: 30m, 2h, 7d")
    group.add_argument("--until", type=moment, metavar="WHEN", help="last failure before (same forms as --since)")
    group.add_argument("--id", type=int, action="append", metavar="ID", help=f"{selects} this row (repeatable)")


def _one_line(text: str, width: int = 100) -> str:
    line = " ".join((text or "").split())
    return line if len(line) <= width else line[: width - 1] + "…"


def _local(value: datetime | None) -> str:
    return timezone.localtime(value).isoformat(sep=" ", timespec="seconds") if value else "-"


def _when(value: Any, timespec: str = "seconds") -> str:
    """An epoch (history entries) or an ISO 8601 string (audit events), in the current time zone."""
    try:
        if isinstance(value, (int, float)) and not isinstance(value, bool):
            moment = datetime.fromtimestamp(value, tz=dt_timezone.utc)
        elif isinstance(value, str):
            moment = datetime.fromisoformat(value)
            moment = moment if timezone.is_aware(moment) else moment.replace(tzinfo=dt_timezone.utc)
        else:
            return "-" if value is None else str(value)
    except (OverflowError, OSError, ValueError):
        return str(value)
    return timezone.localtime(moment).isoformat(sep=" ", timespec=timespec)


def _exception(row: DeadLetter) -> str:
    if row.exception_type and row.exception_message:
        return f"{row.exception_type}: {row.exception_message}"
    return row.exception_type or row.exception_message or "-"


def _summary(row: DeadLetter) -> dict[str, Any]:
    return {
        "id": row.id, "task_name": row.task_name, "task_id": row.task_id, "reason": row.reason,
        "status": row.status, "attempts": row.attempts, "last_failed_at": row.last_failed_at.isoformat(),
        "exception_type": row.exception_type, "exception_message": row.exception_message,
        "fingerprint": row.fingerprint, "replay_count": row.replay_count,
    }


def _everything(row: DeadLetter) -> dict[str, Any]:
    """Every stored field of a row, for `dead show --json` (the raw body by size only)."""
    return {
        **_summary(row),
        "args": row.args, "kwargs": row.kwargs, "redacted": row.redacted, "headers": deadletter.masked_headers(row.headers),
        "queue": row.queue, "exchange": row.exchange, "routing_key": row.routing_key,
        "detail": deadletter.redact_text(row.detail), "traceback": row.traceback, "history": row.history,
        "omitted_attempts": row.omitted_attempts, "first_failed_at": row.first_failed_at.isoformat(),
        "worker": row.worker, "raw_body_bytes": len(row.raw_body) * 3 // 4 if row.raw_body else 0,
        "replayed_task_id": row.replayed_task_id,
        "replayed_at": row.replayed_at.isoformat() if row.replayed_at else None,
        "replayed_by": row.replayed_by, "replay_of": row.replay_of_id, "audit": row.audit,
        "created_at": row.created_at.isoformat(),
    }


def _table(rows: list[tuple[str, ...]]) -> list[str]:
    """Left-aligned columns; the last one is not padded."""
    widths = [max(len(row[i]) for row in rows) for i in range(len(rows[0]) - 1)]
    return ["  ".join([*(cell.ljust(width) for cell, width in zip(row, widths)), row[-1]]).rstrip() for row in rows]


def _refusal(row: DeadLetter, app: Any) -> str | None:
    """Why replay() would refuse ``row``, for --dry-run: the very check replay() makes."""
    return deadletter.replay_refusal(row, app.tasks.get(row.task_name))


def _os_user() -> str:
    try:
        return getpass.getuser()
    except (OSError, KeyError):
        return f"uid {os.getuid()}" if hasattr(os, "getuid") else "unknown"


class Command(BaseCommand):
    help = ("See what safetynet will do: `safetynet explain <dotted.task.name>`; "
            "handle dead letters: `safetynet dead list|show|replay|discard|purge|flush`; "
            "idempotency claims: `safetynet keys show|purge`; durable schedule and outbox: "
            "`safetynet relay`, `safetynet schedule list|due-now`; breakers: `safetynet breakers list|open|close`.")

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", metavar="command", required=True)
        explain = commands.add_parser("explain", help="print a task's retry schedule",
                                      description="Print a task's retry schedule, attempt by attempt.")
        explain.add_argument("task_name", help="the registered task name, e.g. shop.tasks.send_receipt")
        explain.add_argument("--limit", type=int, default=30, help="most attempts to list (default 30)")
        self.add_dead_arguments(commands)
        self.add_keys_arguments(commands)
        self.add_schedule_arguments(commands)
        self.add_breaker_arguments(commands)
        self.add_progress_arguments(commands)

    def add_breaker_arguments(self, commands: Any) -> None:
        """``breakers list|open|close``."""
        parser = commands.add_parser("breakers", help="list circuit breakers; open or close one by hand",
                                     description="List the breakers of SAFETYNET['BREAKERS'] with their shared "
                                                 "state; open or close one by hand.")
        actions = parser.add_subparsers(dest="breakers_command", metavar="action", required=True)
        listing = actions.add_parser("list", help="every declared breaker and its state")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead")
        opening = actions.add_parser("open", help="open a breaker by hand: tasks through it wait",
                                     description="Open a breaker by hand: tasks through it are deferred until it "
                                                 "may half-open (after --for seconds, default its open_seconds).")
        opening.add_argument("name")
        opening.add_argument("--for", dest="seconds", type=float, default=None, metavar="SECONDS",
                             help="how long it stays open before a probe (default: its open_seconds)")
        closing = actions.add_parser("close", help="close a breaker by hand: calls go through again")
        closing.add_argument("name")

    def add_schedule_arguments(self, commands: Any) -> None:
        """``relay`` and ``schedule list|due-now``."""
        relay = commands.add_parser(
            "relay", help="publish due scheduled retries and outbox messages",
            description="Publish the scheduled retries and outbox messages that are due, until stopped (SIGTERM "
                        "or Ctrl-C ends it after the current pass). Every worker runs one already "
                        "(RELAY_IN_WORKERS); run this one too, or instead, as you like: any number can run.")
        relay.add_argument("--once", action="store_true", help="one pass, then exit (prints what it did)")
        relay.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                           help="seconds between passes (default: SAFETYNET['RELAY_POLL_SECONDS'])")
        relay.add_argument("--limit", type=_positive, default=500, help="most messages per pass (default 500)")
        schedule = commands.add_parser("schedule", help="inspect the durable schedule and the outbox",
                                       description="Inspect the scheduled retries and outbox messages.")
        actions = schedule.add_subparsers(dest="schedule_command", metavar="action", required=True)
        listing = actions.add_parser("list", help="messages waiting, soonest first",
                                     description="List the messages waiting to be published (and those published "
                                                 "but not yet taken by a worker), soonest first.")
        listing.add_argument("--task", help="only this task name")
        listing.add_argument("--kind", choices=["retry", "outbox"], help="only retries or outbox messages")
        listing.add_argument("--limit", type=_positive, default=50, help="most rows to list (default 50)")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead")
        due = actions.add_parser("due-now", help="make waiting messages due at once",
                                 description="Make the selected scheduled messages due now: the next relay pass "
                                             "publishes them (a retry waiting hours, after the cause is fixed).")
        due.add_argument("--key", action="append", help="a row key (repeatable), as `schedule list` prints it")
        due.add_argument("--task", help="every waiting message of this task name")
        due.add_argument("--all", action="store_true", help="every waiting message")
        due.add_argument("--dry-run", action="store_true", help="print how many would be made due; change nothing")

    def add_keys_arguments(self, commands: Any) -> None:
        """``keys show|purge``."""
        keys = commands.add_parser("keys", help="inspect and purge idempotency claims",
                                   description="Inspect and purge idempotency claims.")
        actions = keys.add_subparsers(dest="keys_command", metavar="action", required=True)
        show = actions.add_parser("show", help="the claim of one idempotency key",
                                  description="Print the claim of one idempotency key: state, holder, lease, "
                                              "deliveries and stored result.")
        show.add_argument("key")
        show.add_argument("--json", action="store_true", help="print a JSON object instead")
        purge = actions.add_parser(
            "purge", help="delete settled claims older than an age",
            description="Delete succeeded and failed claims last changed before --older-than. A key whose claim "
                        "is gone can run again: keep claims longer than a duplicate can arrive (retries, replays, "
                        "a client resubmitting). Claims queued or in progress are never deleted.")
        purge.add_argument("--older-than", type=moment, required=True, metavar="AGE",
                           help="an age (30d, 12h, 2w) or an ISO 8601 date or datetime")
        purge.add_argument("--dry-run", action="store_true", help="print how many would be deleted; delete nothing")

    def add_progress_arguments(self, commands: Any) -> None:
        """``progress purge``."""
        progress = commands.add_parser("progress", help="purge old progress rows",
                                       description="Purge the progress rows of finished tasks.")
        actions = progress.add_subparsers(dest="progress_command", metavar="action", required=True)
        purge = actions.add_parser(
            "purge", help="delete progress rows not changed for an age",
            description="Delete progress rows not changed since --older-than (default: "
                        "SAFETYNET['PROGRESS_KEEP_SECONDS'] ago). Workers do this once an hour; a user who opens "
                        "the page of a purged task is told it cannot be found.")
        purge.add_argument("--older-than", type=moment, metavar="AGE",
                           help="an age (30d, 12h, 2w) or an ISO 8601 date or datetime")
        purge.add_argument("--dry-run", action="store_true", help="print how many would be deleted; delete nothing")

    def add_dead_arguments(self, commands: Any) -> None:
        """``dead list|show|replay|discard|purge|flush``."""
        dead = commands.add_parser("dead", help="inspect, replay, discard and purge dead letters",
                                   description="Inspect, replay, discard and purge dead letters.")
        actions = dead.add_subparsers(dest="dead_command", metavar="action", required=True)

        listing = actions.add_parser("list", help="dead letters, one line each",
                                     description="List dead letters, newest failure first, one line each.")
        _add_filters(listing, selects="list")
        listing.add_argument("--limit", type=_positive, default=50, help="most rows to list (default 50)")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead")

        show = actions.add_parser("show", help="everything about one dead letter",
                                  description="Print one dead letter: fields, arguments, attempt timeline, "
                                              "traceback and audit trail.")
        show.add_argument("dead_letter_id", type=int, metavar="id")
        show.add_argument("--json", action="store_true", help="print a JSON object instead")

        replay = actions.add_parser(
            "replay", help="run dead letters again, with a fresh attempt count",
            description="Send the selected dead letters' tasks again, with their arguments and headers and a "
                        "fresh attempt count. Rows that cannot be replayed (task gone, arguments redacted, not "
                        "dead) are left as they were, and the command exits non-zero.")
        _add_filters(replay, selects="replay")
        replay.add_argument("--all", action="store_true", help="every row the filters select (needed without "
                                                               "--id or a filter)")
        replay.add_argument("--queue", help="send to this queue instead of the one each task died on")
        replay.add_argument("--by", default=None, help="who replays, for the audit trail (default: the OS user)")
        replay.add_argument("--dry-run", action="store_true", help="print what would be replayed; send nothing")
        replay.add_argument("--json", action="store_true", help="print a JSON list of outcomes")

        discard = actions.add_parser("discard", help="mark dead letters handled without running them",
                                     description="Mark the selected dead letters discarded (kept, audited, "
                                                 "not run).")
        _add_filters(discard, selects="discard")
        discard.add_argument("--all", action="store_true", help="every row the filters select (needed without "
                                                                "--id or a filter)")
        discard.add_argument("--by", default=None, help="who discards, for the audit trail (default: the OS user)")
        discard.add_argument("--dry-run", action="store_true", help="print what would be discarded; change nothing")

        purge = actions.add_parser("purge", help="delete old dead letters",
                                   description="Delete dead letters whose last failure is older than --older-than.")
        purge.add_argument("--older-than", type=moment, required=True, metavar="AGE",
                           help="an age (30d, 12h, 2w) or an ISO 8601 date or datetime")
        purge.add_argument("--status", choices=DeadLetter.Status.values, metavar="STATUS",
                           help=f"only rows of this status: {', '.join(DeadLetter.Status.values)} (default: any)")
        purge.add_argument("--dry-run", action="store_true", help="print how many would be deleted; delete nothing")

        actions.add_parser("flush", help="move spooled dead letters into the database",
                           description="Move the dead letters spooled while the database was down into it.")

    def handle(self, *args: Any, **options: Any) -> None:
        if options["command"] == "explain":
            self.explain(options["task_name"], options["limit"])
        elif options["command"] == "dead":
            getattr(self, f"dead_{options['dead_command']}")(options)
        elif options["command"] == "keys":
            getattr(self, f"keys_{options['keys_command']}")(options)
        elif options["command"] == "breakers":
            getattr(self, f"breakers_{options['breakers_command']}")(options)
        elif options["command"] == "progress":
            self.progress_purge(options)
        elif options["command"] == "relay":
            self.relay(options)
        elif options["command"] == "schedule":
            getattr(self, f"schedule_{options['schedule_command'].replace('-', '_')}")(options)

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
        self._explain_delivery(task, settings)
        threshold = settings.durable_retry_seconds
        write("Retries: " + ("every retry is an ETA message held by a worker (DURABLE_RETRY_SECONDS=None)"
                             if threshold is None else
                             f"a retry delayed {_seconds(threshold)} or more waits in the database (durable schedule) "
                             "and a relay publishes it when due; a shorter one is an ETA message held by a worker"))
        if task.breaker is not None:
            config = settings.breakers.get(task.breaker)
            if config is None:
                write(f"Breaker: {task.breaker!r}, which SAFETYNET['BREAKERS'] does not declare (safetynet.E004)")
            else:
                rule = f"{config.failure_rate:.0%} of >= {config.min_calls} calls over {_seconds(config.window)}"
                if config.consecutive_failures:
                    rule += f", or {config.consecutive_failures} failures in a row"
                write(f"Breaker: {task.breaker}  (opens at {rule}; open {_seconds(config.open_seconds)}, then "
                      f"{config.half_open_probes} probe(s) at once; while open the task is deferred, no attempt "
                      "used)")
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
        steps = schedule(policy, limit=limit)
        for step in steps:
            delay = "-" if step.delay is None else _span(*step.delay)
            rows.append((str(step.attempt), "+" + _span(*step.starts), delay, step.outcome,
                         _waits_as(step.delay, settings.durable_retry_seconds)))
        widths = [max(len(row[i]) for row in rows) for i in range(5)]
        for row in rows:
            write("  ".join(cell.ljust(width) for cell, width in zip(row, widths)).rstrip())
        last = steps[-1]
        if last.outcome.startswith("gives up"):
            write(f"\nGives up after attempt {last.attempt}, {_span(*last.starts)} after the first attempt started.")
        else:
            write(f"\n… and on (listed {limit} attempts; raise --limit to see more).")

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
        if task.time_limit or task.soft_time_limit:
            soft = f"soft {task.soft_time_limit:g}s (an exception, classified like any other)" \
                if task.soft_time_limit else "no soft limit"
            hard = f"hard {task.time_limit:g}s (uses up an attempt; dead-lettered as time_limit when none is left)" \
                if task.time_limit else "no hard limit"
            write(f"Time limits: {soft}; {hard}.")

    # -- idempotency claims ---------------------------------------------------------------

    def keys_show(self, options: dict[str, Any]) -> None:
        """Print the claim of one key."""
        from safetynet.models import IdempotencyClaim

        row = IdempotencyClaim.objects.filter(key=options["key"]).first()
        if row is None:
            raise CommandError(f"No claim for idempotency key {options['key']!r} (never claimed, or purged).")
        fields = {
            "key": row.key, "state": row.state, "task_name": row.task_name, "task_id": row.task_id,
            "owner": row.owner,
            "lease_until": _when(row.lease_until) if row.state in (IdempotencyClaim.State.IN_PROGRESS,
                                                                   IdempotencyClaim.State.QUEUED) else "-",
            "deliveries": row.deliveries, "resent": row.resent, "result_stored": row.result_stored,
            "result": row.result if options["json"] else json.dumps(row.result, default=str),
            "error": row.error, "created_at": _when(row.created_at), "updated_at": _when(row.updated_at),
        }
        if options["json"]:
            self._write_json(fields)
            return
        width = max(map(len, fields))
        for name, value in fields.items():
            self.stdout.write(f"{name.ljust(width)}  {value}")

    def keys_purge(self, options: dict[str, Any]) -> None:
        """Delete settled claims older than --older-than."""
        from safetynet import idempotency, shared
        from safetynet.models import IdempotencyClaim

        before = options["older_than"]
        if options["dry_run"]:
            count = IdempotencyClaim.objects.filter(updated_at__lt=before.timestamp(), state__in=[
                IdempotencyClaim.State.SUCCEEDED, IdempotencyClaim.State.FAILED]).count()
            self.stdout.write(f"Dry run: would delete {count} settled claims last changed before {_local(before)}.")
            return
        count = idempotency.purge(before.timestamp())
        expired = shared.purge_expired()
        self.stdout.write(f"Deleted {count} settled claims last changed before {_local(before)}, and {expired} "
                          "expired shared counters.")

    # -- progress -------------------------------------------------------------------------

    def progress_purge(self, options: dict[str, Any]) -> None:
        """Delete progress rows older than --older-than (default PROGRESS_KEEP_SECONDS)."""
        from safetynet import progress
        from safetynet.models import TaskProgress

        before = options["older_than"] or timezone.now() - timedelta(seconds=conf.get().progress_keep_seconds)
        if options["dry_run"]:
            count = TaskProgress.objects.filter(updated_at__lt=before).count()
            self.stdout.write(f"Dry run: would delete {count} progress rows last changed before {_local(before)}.")
            return
        count = progress.purge(before)
        self.stdout.write(f"Deleted {count} progress rows last changed before {_local(before)}.")

    # -- breakers -------------------------------------------------------------------------

    def breakers_list(self, options: dict[str, Any]) -> None:
        """Print every declared breaker's shared state."""
        import time

        from safetynet import breakers

        names = sorted(conf.get().breakers)
        now = time.time()
        states = [breakers.state_of(name) for name in names]
        if options["json"]:
            self._write_json(states)
            return
        if not states:
            self.stdout.write("No breakers: declare them in SAFETYNET['BREAKERS'].")
            return
        rows = [("breaker", "state", "calls", "failures", "failure rate", "half-open in", "probes")]
        for state, name in zip(states, names):
            config = conf.get().breakers[name]
            rate = f"{state['failures'] / state['calls']:.0%}" if state["calls"] else "-"
            rows.append((name, state["state"].replace("_", "-"), str(state["calls"]), str(state["failures"]),
                         f"{rate} (opens at {config.failure_rate:.0%} of >= {config.min_calls})",
                         _seconds(max(0.0, state["until"] - now)) if state["state"] == "open" else "-",
                         f"{state['probes']}/{config.half_open_probes}" if state["state"] == "half_open" else "-"))
        for line in _table(rows):
            self.stdout.write(line)

    def _breaker_name(self, name: str) -> str:
        from safetynet import breakers

        try:
            breakers.spec(name)
        except ConfigurationError as error:
            raise CommandError(str(error)) from None
        return name

    def breakers_open(self, options: dict[str, Any]) -> None:
        from safetynet import breakers

        name = self._breaker_name(options["name"])
        seconds = options["seconds"]
        if seconds is not None and not 0 < seconds <= 86_400:
            raise CommandError("--for must be from 0 to 86400 seconds")
        breakers.force(name, "open", seconds=seconds)
        self.stdout.write(f"Breaker {name!r} is open; tasks through it wait until it may half-open.")

    def breakers_close(self, options: dict[str, Any]) -> None:
        from safetynet import breakers

        name = self._breaker_name(options["name"])
        breakers.force(name, "closed")
        self.stdout.write(f"Breaker {name!r} is closed; calls go through again.")

    # -- the durable schedule and the outbox ----------------------------------------------

    def relay(self, options: dict[str, Any]) -> None:
        """Publish due messages: one pass, or until SIGTERM / Ctrl-C."""
        import signal
        import threading

        from celery import current_app

        from safetynet import scheduler

        app = current_app._get_current_object()
        if options["poll"] is not None and not 0.05 <= options["poll"] <= 60:
            raise CommandError("--poll must be from 0.05 to 60 seconds")
        if options["once"]:
            try:
                run = scheduler.relay(app, limit=options["limit"])
            except (DatabaseError, InterfaceError) as error:
                raise CommandError(f"The database cannot be reached: {error}") from None
            self.stdout.write(f"Published {run.published}, sent again {run.resent}, could not publish {run.failed}, "
                              f"gave up {run.given_up}.")
            if run.error is not None:
                raise CommandError(f"The broker refused a message: {run.error!r}; it is due again after a backoff.")
            return
        stop = threading.Event()
        for number in (signal.SIGTERM, signal.SIGINT):
            signal.signal(number, lambda *_: stop.set())
        self.stdout.write(f"Relaying due scheduled retries and outbox messages through {app.conf.broker_url!r} "
                          "(SIGTERM or Ctrl-C stops).")
        scheduler.run_forever(app, stop=stop, poll=options["poll"], limit=options["limit"])
        self.stdout.write("Relay stopped.")

    def _waiting(self, options: dict[str, Any]) -> QuerySet:
        from safetynet.models import ScheduledMessage

        rows = ScheduledMessage.objects.filter(state__in=[ScheduledMessage.State.SCHEDULED,
                                                          ScheduledMessage.State.PUBLISHED])
        if options.get("task"):
            rows = rows.filter(task_name=options["task"])
        if options.get("kind"):
            rows = rows.filter(kind=options["kind"])
        return rows

    def schedule_list(self, options: dict[str, Any]) -> None:
        """Print waiting messages, soonest first."""
        import time

        rows = list(self._waiting(options).order_by("due_at")[: options["limit"]])
        now = time.time()
        listed = [{
            "key": row.key, "kind": row.kind, "task_name": row.task_name, "task_id": row.task_id,
            "state": row.state,
            # A published row's due_at is when it is sent again if no worker took it.
            "due_at": _when(row.due_at) if row.due_at < 1e17 else "-",
            "due_in": _seconds(row.due_at - now) if row.due_at >= now and row.due_at < 1e17 else "-",
            "publishes": row.publishes, "last_error": row.last_error,
        } for row in rows]
        if options["json"]:
            self._write_json(listed)
            return
        if not listed:
            self.stdout.write("Nothing is waiting: no scheduled retry, no unpublished outbox message.")
            return
        table = [("due at", "in", "kind", "state", "task", "key", "last error")] + [
            (item["due_at"], item["due_in"], item["kind"],
             "sent, not taken yet" if item["state"] == "published" else "waiting",
             item["task_name"], item["key"], _one_line(item["last_error"], 40)) for item in listed]
        for line in _table(table):
            self.stdout.write(line)

    def schedule_due_now(self, options: dict[str, Any]) -> None:
        """Make the selected waiting messages due at once."""
        from safetynet import scheduler
        from safetynet.models import ScheduledMessage

        if not (options["key"] or options["task"] or options["all"]):
            raise CommandError("Say which: --key KEY (repeatable), --task NAME or --all.")
        rows = self._waiting(options).filter(state=ScheduledMessage.State.SCHEDULED)
        if options["key"]:
            rows = rows.filter(key__in=options["key"])
        if options["dry_run"]:
            self.stdout.write(f"Dry run: would make {rows.count()} waiting messages due now.")
            return
        count = scheduler.bring_forward(rows)
        self.stdout.write(f"Made {count} waiting messages due now; a relay publishes them within its poll interval.")

    # -- dead letters -------------------------------------------------------------------

    def _write_json(self, value: Any) -> None:
        self.stdout.write(json.dumps(value, indent=2, ensure_ascii=False, default=str))

    def _selected(self, options: dict[str, Any], *, verb: str) -> QuerySet:
        """The rows the options select; CommandError (and nothing changed) when they do not make sense."""
        ids = sorted(set(options.get("id") or []))
        explicit = [name for name in _FILTERS if options.get(name)]
        if verb in ("replay", "discard") and not (ids or explicit or options.get("all")):
            raise CommandError(
                f"Say which dead letters to {verb}: --id ID, a filter (--task, --reason, --fingerprint, --status, "
                f"--since, --until), or --all for every dead letter still dead. Nothing was changed."
            )
        since, until = options.get("since"), options.get("until")
        if since and until and since >= until:
            raise CommandError(f"--since ({_local(since)}) must be before --until ({_local(until)}).")
        status = options.get("status") or (None if ids else DeadLetter.Status.DEAD)
        rows = DeadLetter.objects.matching(
            task=options.get("task"), reason=options.get("reason"), fingerprint=options.get("fingerprint"),
            status=None if status == "all" else status, since=since, until=until,
        )
        if ids:
            found = set(DeadLetter.objects.filter(id__in=ids).values_list("id", flat=True))
            missing = [pk for pk in ids if pk not in found]
            if missing:
                raise CommandError(f"No dead letter with id {', '.join(map(str, missing))}. Nothing was changed.")
            rows = rows.filter(id__in=ids)
            if explicit:
                matched = set(rows.values_list("id", flat=True))
                excluded = [pk for pk in ids if pk not in matched]
                if excluded and verb != "list":
                    raise CommandError(
                        f"Dead letter {', '.join(map(str, excluded))} does not match the filters given "
                        f"({', '.join('--' + name for name in explicit)}). Nothing was changed."
                    )
        return rows

    def dead_list(self, options: dict[str, Any]) -> None:
        """One line per dead letter, newest failure first."""
        rows = self._selected(options, verb="list")
        limit = options["limit"]
        page = list(rows[:limit])
        if options["json"]:
            self._write_json([_summary(row) for row in page])
            return
        if not page:
            self.stdout.write("No dead letters match.")
            return
        lines = [("id", "task", "reason", "status", "attempts", "last failure", "exception")]
        lines += [(str(row.id), row.task_name, row.reason, row.status, str(row.attempts), _local(row.last_failed_at),
                   _one_line(_exception(row))) for row in page]
        for line in _table(lines):
            self.stdout.write(line)
        total = len(page) if len(page) < limit else rows.count()
        if total > len(page):
            self.stdout.write(f"\n{len(page)} of {total} shown; raise --limit or narrow the filters to see more.")

    def dead_show(self, options: dict[str, Any]) -> None:
        """Everything about one dead letter."""
        row = DeadLetter.objects.filter(id=options["dead_letter_id"]).first()
        if row is None:
            raise CommandError(f"No dead letter with id {options['dead_letter_id']}.")
        if options["json"]:
            self._write_json(_everything(row))
            return
        write = self.stdout.write
        alike = DeadLetter.objects.filter(fingerprint=row.fingerprint).count()
        delivery = ", ".join(part for part in (
            f"queue {row.queue}" if row.queue else "", f"exchange {row.exchange}" if row.exchange else "",
            f"routing key {row.routing_key}" if row.routing_key and row.routing_key != row.queue else "",
        ) if part) or "-"
        fields = [
            ("task", f"{row.task_name}  (task id {row.task_id})"),
            ("status", row.status),
            ("reason", row.reason + (f": {deadletter.redact_text(row.detail)}" if row.detail else "")),
            ("attempts", str(row.attempts) + (f" ({row.omitted_attempts} not kept in the history)"
                                              if row.omitted_attempts else "")),
            ("first failure", _local(row.first_failed_at)),
            ("last failure", _local(row.last_failed_at)),
            ("worker", row.worker or "-"),
            ("delivery", delivery),
            ("fingerprint", f"{row.fingerprint}  ({alike} alike failure{'' if alike == 1 else 's'}: "
                            f"dead list --fingerprint {row.fingerprint} --status all)"),
            ("replays", f"{row.replay_count}" + (f", last as {row.replayed_task_id} at {_local(row.replayed_at)} "
                                                  f"by {row.replayed_by or '?'}" if row.replayed_task_id else "")),
        ]
        if row.replay_of_id:
            fields.append(("replay of", f"dead letter {row.replay_of_id}"))
        if row.raw_body:
            fields.append(("raw body", f"{len(row.raw_body) * 3 // 4} bytes kept (not shown: it is not redacted)"))
        write(f"Dead letter {row.id}")
        for line in _table([(f"  {name}", value) for name, value in fields]):
            write(line)
        write("")
        write(f"Exception: {_exception(row)}")
        write("")
        write("Arguments" + (f" (redacted when stored: {', '.join(row.redacted)})" if row.redacted else "") + ":")
        write("  args   " + json.dumps(row.args, ensure_ascii=False, default=str))
        write("  kwargs " + json.dumps(row.kwargs, ensure_ascii=False, default=str))
        if row.headers:
            write("Headers: " + json.dumps(deadletter.masked_headers(row.headers), ensure_ascii=False, default=str))
        write("")
        write("Attempts:")
        entries = [entry for entry in row.history or [] if isinstance(entry, dict)]
        if entries:
            table = [("  attempt", "started", "duration", "exception", "action", "delay", "reason", "worker")]
            for entry in entries:
                delay, duration = entry.get("delay"), entry.get("duration")
                table.append((
                    f"  {entry.get('attempt', '?')}", _when(entry.get("started"), "milliseconds"),
                    f"{duration:.3f}s" if isinstance(duration, (int, float)) else "-",
                    entry.get("exception") or "-", entry.get("action") or "-",
                    f"{delay:g}s" if isinstance(delay, (int, float)) else "-",
                    entry.get("reason") or "-", entry.get("worker") or "-",
                ))
            for line in _table(table):
                write(line)
            if row.omitted_attempts:
                write(f"  ({row.omitted_attempts} attempts between the first and the latest were not kept)")
            # Messages and tracebacks, alike consecutive attempts together.
            runs: list[tuple[list[Any], str, str]] = []
            for entry in entries:
                message, trace = entry.get("message") or "", entry.get("traceback") or ""
                if runs and runs[-1][1:] == (message, trace):
                    runs[-1][0].append(entry.get("attempt", "?"))
                else:
                    runs.append(([entry.get("attempt", "?")], message, trace))
            for attempts, message, trace in runs:
                if not (message or trace):
                    continue
                which = f"attempt {attempts[0]}" if len(attempts) == 1 else f"attempts {attempts[0]}–{attempts[-1]}"
                write(f"\n  {which}: {message}".rstrip())
                if trace and trace == row.traceback:
                    write("    (traceback: the final one, below)")
                elif trace:
                    for text in trace.rstrip().splitlines():
                        write(f"    {text}")
        else:
            write("  (no attempt history was recorded)")
        write("")
        write("Traceback:" if row.traceback else "Traceback: -")
        for text in (row.traceback or "").rstrip().splitlines():
            write(f"  {text}")
        write("")
        write("Audit trail:")
        for event in row.audit or []:
            if not isinstance(event, dict):
                continue
            extra = {key: value for key, value in event.items() if key not in ("action", "at", "by", "nonce")}
            by = f" by {event['by']}" if event.get("by") else ""
            details = ("  " + json.dumps(extra, ensure_ascii=False, default=str)) if extra else ""
            write(f"  {_when(event.get('at'))}  {event.get('action', '?')}{by}{details}")

    def dead_replay(self, options: dict[str, Any]) -> None:
        """Replay the selected rows; exit non-zero when any was refused."""
        selected = self._selected(options, verb="replay").order_by("id")
        if not selected.exists():
            if options["json"]:
                self._write_json([])
            else:
                self.stdout.write("No dead letters match; nothing to replay.")
            return
        if options["dry_run"]:
            from celery import current_app

            app = current_app._get_current_object()
            app.loader.import_default_modules()
            predicted = [(row, _refusal(row, app)) for row in selected.defer(*deadletter.NOT_READ_BY_REPLAY)]
            if options["json"]:
                self._write_json([{"id": row.id, "task_name": row.task_name, "would_replay": error is None,
                                   "queue": (options["queue"] or row.queue or None) if error is None else None,
                                   "error": error} for row, error in predicted])
                return
            self.stdout.write("Dry run: nothing is sent or changed.")
            for row, error in predicted:
                target = options["queue"] or row.queue or "its default queue"
                self.stdout.write(f"{row.id} {row.task_name}: " + (f"would be refused: {error}" if error
                                                                   else f"would be replayed to {target}"))
            refused = sum(1 for _, error in predicted if error)
            self.stdout.write(f"Would replay {len(predicted) - refused} of {len(predicted)}; "
                              f"{refused} would be refused.")
            return
        try:
            # the queryset itself: replay streams it in batches instead of loading every row
            outcomes = deadletter.replay(selected, queue=options["queue"] or None, by=options["by"] or _os_user())
        except (OperationalError, DatabaseError, InterfaceError) as error:  # the broker or the database
            raise CommandError(
                f"Replay stopped: {type(error).__name__}: {error}. Rows not sent are left as they were; "
                "`dead list --status replayed` shows any sent before the error."
            ) from error
        refused = [outcome for outcome in outcomes if outcome.error]
        if options["json"]:
            self._write_json([{"id": o.dead_letter_id, "task_name": o.task_name, "new_task_id": o.new_task_id,
                               "error": o.error} for o in outcomes])
        else:
            for outcome in outcomes:
                self.stdout.write(f"{outcome.dead_letter_id} {outcome.task_name}: "
                                  + (f"refused: {outcome.error}" if outcome.error
                                     else f"replayed as {outcome.new_task_id}"))
            self.stdout.write(f"Replayed {len(outcomes) - len(refused)} of {len(outcomes)}; "
                              f"{len(refused)} refused (left as they were).")
        if refused:
            raise CommandError(f"{len(refused)} of {len(outcomes)} dead letters were refused; they are left as they "
                               "were: " + "; ".join(f"{o.dead_letter_id}: {o.error}" for o in refused[:5])
                               + (" …" if len(refused) > 5 else ""))

    def dead_discard(self, options: dict[str, Any]) -> None:
        """Discard the selected rows."""
        rows = list(self._selected(options, verb="discard").order_by("id"))
        if not rows:
            self.stdout.write("No dead letters match; nothing to discard.")
            return
        dead = [row for row in rows if row.status == DeadLetter.Status.DEAD]
        if options["dry_run"]:
            self.stdout.write("Dry run: nothing is changed.")
        for row in rows:
            if row.status != DeadLetter.Status.DEAD:
                outcome = f"left as it was (status {row.status})"
            else:
                outcome = "would be discarded" if options["dry_run"] else "discarded"
            self.stdout.write(f"{row.id} {row.task_name}: {outcome}")
        if options["dry_run"]:
            self.stdout.write(f"Would discard {len(dead)} of {len(rows)}.")
            return
        changed = deadletter.discard(dead, by=options["by"] or _os_user())
        self.stdout.write(f"Discarded {changed} of {len(rows)}.")

    def dead_purge(self, options: dict[str, Any]) -> None:
        """Delete rows whose last failure is older than --older-than."""
        before, status = options["older_than"], options["status"]
        which = f"{status} dead letters" if status else "dead letters (any status)"
        if options["dry_run"]:
            rows = DeadLetter.objects.older_than(before)
            count = (rows.filter(status=status) if status else rows).count()
            self.stdout.write(f"Dry run: would delete {count} {which} last failed before {_local(before)}.")
            return
        count = deadletter.purge(before, status=status)
        self.stdout.write(f"Deleted {count} {which} last failed before {_local(before)}.")

    def dead_flush(self, options: dict[str, Any]) -> None:
        """Move spooled records into the database."""
        try:
            moved = deadletter.flush_spool()
        except (DatabaseError, InterfaceError) as error:
            raise CommandError(f"The database did not answer ({error}); the spooled records stay for the next "
                               "flush.") from error
        where = conf.get().spool_dir or "the default spool directory"
        self.stdout.write(f"Moved {moved} spooled dead letter{'' if moved == 1 else 's'} into the database "
                          f"(from {where}).")
