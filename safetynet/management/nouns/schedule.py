"""``safetynet relay`` and ``safetynet schedule list|due-now``: the durable schedule and the outbox."""

from __future__ import annotations

import signal
import threading
import time
from typing import Any

from celery import current_app
from django.core.management.base import CommandError
from django.db import DatabaseError, InterfaceError
from django.db.models import QuerySet

from safetynet import conf, schedule
from safetynet.management.nouns._text import (
    Noun,
    columns,
    one_line,
    positive,
    seconds,
    when,
)
from safetynet.models import ScheduledMessage
from safetynet.runtime.consumer import Relay

__all__ = ["Schedule"]


class Schedule(Noun):
    """Relay due messages; inspect and bring forward what waits."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
        """``relay`` and ``schedule list|due-now``."""
        relay = commands.add_parser(
            "relay", help="publish due scheduled retries and outbox messages; send again what no worker took",
            description="Publish the scheduled retries and outbox messages that are due, and send again the kept "
                        "messages of idempotent tasks that no worker took (or whose run died), until stopped "
                        "(SIGTERM or Ctrl-C ends it after the current pass). Every worker runs one already "
                        "(RELAY_IN_WORKERS); run this one too, or instead, as you like: any number can run.")
        relay.add_argument("--once", action="store_true", help="one pass, then exit (prints what it did)")
        relay.add_argument("--poll", type=float, default=None, metavar="SECONDS",
                           help="seconds between passes (default: SAFETYNET['RELAY_POLL_SECONDS'])")
        relay.add_argument("--limit", type=positive, default=500, help="most messages per pass (default 500)")
        schedule = commands.add_parser("schedule", help="inspect the durable schedule and the outbox",
                                       description="Inspect the scheduled retries and outbox messages.")
        actions = schedule.add_subparsers(dest="schedule_command", metavar="action", required=True)
        listing = actions.add_parser("list", help="messages waiting, soonest first",
                                     description="List the messages waiting to be published (and those published "
                                                 "but not yet taken by a worker), soonest first.")
        listing.add_argument("--task", help="only this task name")
        listing.add_argument("--kind", choices=["retry", "outbox", "sent"],
                             help="only retries, outbox messages, or idempotent tasks sent at once and kept")
        listing.add_argument("--limit", type=positive, default=50, help="most rows to list (default 50)")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead")
        due = actions.add_parser("due-now", help="make waiting messages due at once",
                                 description="Make the selected scheduled messages due now: the next relay pass "
                                             "publishes them (a retry waiting hours, after the cause is fixed).")
        due.add_argument("--key", action="append", help="a row key (repeatable), as `schedule list` prints it")
        due.add_argument("--task", help="every waiting message of this task name")
        due.add_argument("--all", action="store_true", help="every waiting message")
        due.add_argument("--dry-run", action="store_true", help="print how many would be made due; change nothing")

    def handle(self, options: dict[str, Any]) -> None:
        if options["command"] == "relay":
            self.relay(options)
        else:
            getattr(self, options["schedule_command"].replace("-", "_"))(options)

    def relay(self, options: dict[str, Any]) -> None:
        """Publish due messages: one pass, or until SIGTERM / Ctrl-C."""
        app = current_app._get_current_object()
        if options["poll"] is not None and not 0.05 <= options["poll"] <= 60:
            raise CommandError("--poll must be from 0.05 to 60 seconds")
        if options["once"]:
            try:
                if conf.get().lost_message_seconds is not None:
                    schedule.sweep_orphans()
                run = schedule.relay(app, limit=options["limit"])
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
        relay = Relay(app, poll=options["poll"], limit=options["limit"], sweeps=True)
        while not stop.is_set():
            stop.wait(relay())
        self.stdout.write("Relay stopped.")

    def _waiting(self, options: dict[str, Any]) -> QuerySet:
        rows = ScheduledMessage.objects.filter(state__in=[ScheduledMessage.State.SCHEDULED,
                                                          ScheduledMessage.State.PUBLISHED])
        if options.get("task"):
            rows = rows.filter(task_name=options["task"])
        if options.get("kind"):
            rows = rows.filter(kind=options["kind"])
        return rows

    def list(self, options: dict[str, Any]) -> None:
        """Print waiting messages, soonest first."""
        rows = list(self._waiting(options).order_by("due_at")[: options["limit"]])
        now = time.time()
        listed = [{
            "key": row.key, "kind": row.kind, "task_name": row.task_name, "task_id": row.task_id,
            "state": row.state,
            # A published row's due_at is when it is sent again if no worker took it.
            "due_at": when(row.due_at) if row.due_at < 1e17 else "-",
            "due_in": seconds(row.due_at - now) if row.due_at >= now and row.due_at < 1e17 else "-",
            "publishes": row.publishes, "last_error": row.last_error,
        } for row in rows]
        if options["json"]:
            self.write_json(listed)
            return
        if not listed:
            self.stdout.write("Nothing is waiting: no scheduled retry, no unpublished outbox message.")
            return
        table = [("due at", "in", "kind", "state", "task", "key", "last error")] + [
            (item["due_at"], item["due_in"], item["kind"],
             "sent, not taken yet" if item["state"] == "published" else "waiting",
             item["task_name"], item["key"], one_line(item["last_error"], 40)) for item in listed]
        for line in columns(table):
            self.stdout.write(line)

    def due_now(self, options: dict[str, Any]) -> None:
        """Make the selected waiting messages due at once."""
        from safetynet import schedule
        if not (options["key"] or options["task"] or options["all"]):
            raise CommandError("Say which: --key KEY (repeatable), --task NAME or --all.")
        rows = self._waiting(options).filter(state=ScheduledMessage.State.SCHEDULED)
        if options["key"]:
            rows = rows.filter(key__in=options["key"])
        if options["dry_run"]:
            self.stdout.write(f"Dry run: would make {rows.count()} waiting messages due now.")
            return
        count = schedule.bring_forward(rows)
        self.stdout.write(f"Made {count} waiting messages due now; a relay publishes them within its poll interval.")
