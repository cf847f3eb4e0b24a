"""``safetynet dead list|show|replay|discard|purge|flush``: dead letters."""

from __future__ import annotations

import argparse
import json
from typing import Any

from celery import current_app
from django.core.management.base import CommandError
from django.db import DatabaseError, InterfaceError
from django.db.models import QuerySet
from kombu.exceptions import OperationalError

from safetynet import conf, deadletter, redaction
from safetynet.core.durations import duration as human_duration
from safetynet.dashboard import display
from safetynet.deadletter import _spool
from safetynet.exceptions import ConfigurationError
from safetynet.management.nouns._text import (
    FILTERS,
    Noun,
    add_filters,
    columns,
    local,
    moment,
    one_line,
    os_user,
    positive,
    when,
)
from safetynet.models import DeadLetter

__all__ = ["DeadLetters"]


#: The columns `dead list` reads (the exception message only as far as it is shown: see display.with_heads).
SUMMARY_COLUMNS = ("id", "task_name", "task_id", "reason", "status", "attempts", "last_failed_at", "exception_type",
                   "fingerprint", "replay_count")


def _exception(exception_type: str, message: str) -> str:
    if exception_type and message:
        return f"{exception_type}: {message}"
    return exception_type or message or "-"


def _summary(row: DeadLetter, message: str) -> dict[str, Any]:
    return {
        "id": row.id, "task_name": row.task_name, "task_id": row.task_id, "reason": row.reason,
        "status": row.status, "attempts": row.attempts, "last_failed_at": row.last_failed_at.isoformat(),
        "exception_type": row.exception_type, "exception_message": message,
        "fingerprint": row.fingerprint, "replay_count": row.replay_count,
    }


def _everything(row: DeadLetter) -> dict[str, Any]:
    """Every stored field of a row within the caps, for `dead show --json` (the raw body by size only)."""
    shown = display.shown(row)
    headers = shown["headers"]
    return {
        **_summary(row, shown["exception_message"]),
        "args": shown["args"], "kwargs": shown["kwargs"], "redacted": row.redacted,
        "truncated": shown["truncated"], "shown_cut": shown["shown_cut"],
        "headers": headers if deadletter.is_truncated(headers) else redaction.masked_headers(headers),
        "queue": row.queue, "exchange": row.exchange, "routing_key": row.routing_key,
        "detail": redaction.redact_text(shown["detail"]), "traceback": shown["traceback"],
        "history": shown["history"], "omitted_attempts": shown["omitted_attempts"],
        "first_failed_at": row.first_failed_at.isoformat(),
        "worker": row.worker, "raw_body_bytes": len(row.raw_body) * 3 // 4 if row.raw_body else 0,
        "replayed_task_id": row.replayed_task_id,
        "replayed_at": row.replayed_at.isoformat() if row.replayed_at else None,
        "replayed_by": row.replayed_by, "replay_of": row.replay_of_id,
        "audit": [deadletter.cap_value(event, conf.get().dead_letter_max_argument_bytes)[0] for event in row.audit or []],
        "created_at": row.created_at.isoformat(),
    }


def _refusal(row: DeadLetter, app: Any, args: Any = None, kwargs: Any = None) -> str | None:
    """Why replay() would refuse ``row``, for --dry-run: the very check replay() makes."""
    return deadletter.replay_refusal(row, app.tasks.get(row.task_name), args, kwargs)


def _how(error: str | None, row_id: int) -> str:
    """A refusal, with how to replay the row anyway when replacement arguments would do."""
    if error and "replacement" in error:
        return f"{error} (dead replay --id {row_id} --args '[...]' --kwargs '{{...}}')"
    return error or ""


def _json_argument(kind: type, name: str) -> Any:
    """An argparse type: JSON text that must be a list (--args) or an object (--kwargs)."""
    def parse(text: str) -> Any:
        try:
            value = json.loads(text)
        except ValueError as error:
            raise argparse.ArgumentTypeError(f"not JSON: {error}") from None
        try:
            deadletter.replacement_arguments(value if kind is list else None, value if kind is dict else None)
        except (TypeError, ValueError) as error:
            raise argparse.ArgumentTypeError(str(error)) from None
        return value

    parse.__name__ = name  # argparse names the type in its error message
    return parse


class DeadLetters(Noun):
    """Inspect, replay, discard and purge dead letters."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
        """``dead list|show|replay|discard|purge|flush``."""
        dead = commands.add_parser("dead", help="inspect, replay, discard and purge dead letters",
                                   description="Inspect, replay, discard and purge dead letters.")
        actions = dead.add_subparsers(dest="dead_command", metavar="action", required=True)

        listing = actions.add_parser("list", help="dead letters, one line each",
                                     description="List dead letters, newest failure first, one line each.")
        add_filters(listing, selects="list")
        listing.add_argument("--limit", type=positive, default=50, help="most rows to list (default 50)")
        listing.add_argument("--json", action="store_true", help="print a JSON list instead")

        show = actions.add_parser("show", help="everything about one dead letter",
                                  description="Print one dead letter: fields, arguments, attempt timeline, "
                                              "traceback and audit trail.")
        show.add_argument("dead_letter_id", type=int, metavar="id")
        show.add_argument("--json", action="store_true", help="print a JSON object instead")

        replay = actions.add_parser(
            "replay", help="run dead letters again, with a fresh attempt count",
            description="Send the selected dead letters' tasks again, with their arguments and headers and a "
                        "fresh attempt count. Rows that cannot be replayed (task gone, arguments redacted or cut "
                        "when stored and no --args/--kwargs given, not dead) are left as they were, and the "
                        "command exits non-zero.")
        add_filters(replay, selects="replay")
        replay.add_argument("--all", action="store_true", help="every row the filters select (needed without "
                                                               "--id or a filter)")
        replay.add_argument("--queue", help="send to this queue instead of the one each task died on")
        # dest: call_command() takes an option named "args" for the command's positional arguments
        replay.add_argument("--args", dest="replacement_args", type=_json_argument(list, "JSON list"), default=None,
                            metavar="JSON",
                            help="replacement positional arguments, a JSON list (with --id): for a row whose "
                                 "arguments were redacted or cut when stored")
        replay.add_argument("--kwargs", dest="replacement_kwargs", type=_json_argument(dict, "JSON object"),
                            default=None, metavar="JSON",
                            help="replacement keyword arguments, a JSON object (with --id)")
        replay.add_argument("--by", default=None, help="who replays, for the audit trail (default: the OS user)")
        replay.add_argument("--dry-run", action="store_true", help="print what would be replayed; send nothing")
        replay.add_argument("--json", action="store_true", help="print a JSON list of outcomes")

        discard = actions.add_parser("discard", help="mark dead letters handled without running them",
                                     description="Mark the selected dead letters discarded (kept, audited, "
                                                 "not run).")
        add_filters(discard, selects="discard")
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

    def handle(self, options: dict[str, Any]) -> None:
        getattr(self, options["dead_command"])(options)

    def _selected(self, options: dict[str, Any], *, verb: str) -> QuerySet:
        """The rows the options select; CommandError (and nothing changed) when they do not make sense."""
        ids = sorted(set(options.get("id") or []))
        explicit = [name for name in FILTERS if options.get(name)]
        if verb in ("replay", "discard") and not (ids or explicit or options.get("all")):
            raise CommandError(
                f"Say which dead letters to {verb}: --id ID, a filter (--task, --reason, --fingerprint, --status, "
                f"--since, --until), or --all for every dead letter still dead. Nothing was changed."
            )
        since, until = options.get("since"), options.get("until")
        if since and until and since >= until:
            raise CommandError(f"--since ({local(since)}) must be before --until ({local(until)}).")
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

    def list(self, options: dict[str, Any]) -> None:
        """One line per dead letter, newest failure first."""
        rows = self._selected(options, verb="list")
        limit = options["limit"]
        # Of each exception message, only what is shown: the cap of one field (JSON), or a line's worth.
        page = list(display.with_heads(rows.only(*SUMMARY_COLUMNS), "exception_message",
                                       most=None if options["json"] else 200)[:limit])
        if options["json"]:
            self.write_json([_summary(row, display.bounded_head(row, "exception_message")) for row in page])
            return
        if not page:
            self.stdout.write("No dead letters match.")
            return
        lines = [("id", "task", "reason", "status", "attempts", "last failure", "exception")]
        lines += [(str(row.id), row.task_name, row.reason, row.status, str(row.attempts), local(row.last_failed_at),
                   one_line(_exception(row.exception_type, row.exception_message_head or ""))) for row in page]
        for line in columns(lines):
            self.stdout.write(line)
        total = len(page) if len(page) < limit else rows.count()
        if total > len(page):
            self.stdout.write(f"\n{len(page)} of {total} shown; raise --limit or narrow the filters to see more.")

    def show(self, options: dict[str, Any]) -> None:
        """Everything about one dead letter."""
        row = DeadLetter.objects.filter(id=options["dead_letter_id"]).first()
        if row is None:
            raise CommandError(f"No dead letter with id {options['dead_letter_id']}.")
        if options["json"]:
            self.write_json(_everything(row))
            return
        write = self.stdout.write
        shown = display.shown(row)  # every long field within its cap
        alike = DeadLetter.objects.filter(fingerprint=row.fingerprint).count()
        delivery = ", ".join(part for part in (
            f"queue {row.queue}" if row.queue else "", f"exchange {row.exchange}" if row.exchange else "",
            f"routing key {row.routing_key}" if row.routing_key and row.routing_key != row.queue else "",
        ) if part) or "-"
        fields = [
            ("task", f"{row.task_name}  (task id {row.task_id})"),
            ("status", row.status),
            ("reason", row.reason + (f": {redaction.redact_text(shown['detail'])}" if shown["detail"] else "")),
            ("attempts", str(row.attempts) + (f" ({shown['omitted_attempts']} not kept in the history)"
                                              if shown["omitted_attempts"] else "")),
            ("first failure", local(row.first_failed_at)),
            ("last failure", local(row.last_failed_at)),
            ("worker", row.worker or "-"),
            ("delivery", delivery),
            ("fingerprint", f"{row.fingerprint}  ({alike} alike failure{'' if alike == 1 else 's'}: "
                            f"dead list --fingerprint {row.fingerprint} --status all)"),
            ("replays", f"{row.replay_count}" + (f", last as {row.replayed_task_id} at {local(row.replayed_at)} "
                                                  f"by {row.replayed_by or '?'}" if row.replayed_task_id else "")),
        ]
        if row.replay_of_id:
            fields.append(("replay of", f"dead letter {row.replay_of_id}"))
        if row.raw_body:
            fields.append(("raw body", f"{len(row.raw_body) * 3 // 4} bytes kept (not shown: it is not redacted)"))
        write(f"Dead letter {row.id}")
        for line in columns([(f"  {name}", value) for name, value in fields]):
            write(line)
        write("")
        write(f"Exception: {_exception(row.exception_type, shown['exception_message'])}")
        write("")
        write("Arguments" + (f" (redacted when stored: {', '.join(row.redacted)})" if row.redacted else "") + ":")
        write("  args   " + json.dumps(shown["args"], ensure_ascii=False, default=str))
        write("  kwargs " + json.dumps(shown["kwargs"], ensure_ascii=False, default=str))
        if shown["truncated"]:
            needs = [path for path in shown["truncated"] if not path.startswith("headers")]
            write(f"  cut when stored (over the size caps; each kept as a marker with its size and sha256): "
                  f"{', '.join(shown['truncated'])}" + ("; replay it with --args/--kwargs" if needs else ""))
        if shown["shown_cut"]:
            write(f"  too large to show, stored whole (shown as markers with their size and sha256): "
                  f"{', '.join(shown['shown_cut'])}")
        headers = shown["headers"]
        if headers:
            shown_headers = headers if deadletter.is_truncated(headers) else redaction.masked_headers(headers)
            write("Headers: " + json.dumps(shown_headers, ensure_ascii=False, default=str))
        write("")
        write("Attempts:")
        entries = shown["history"]
        if entries:
            table = [("  attempt", "started", "duration", "exception", "action", "delay", "reason", "worker")]
            for entry in entries:
                delay, duration = entry.get("delay"), entry.get("duration")
                table.append((
                    f"  {entry.get('attempt', '?')}", when(entry.get("started"), "milliseconds"),
                    human_duration(duration) if isinstance(duration, (int, float)) else "-",
                    entry.get("exception") or "-", entry.get("action") or "-",
                    human_duration(delay) if isinstance(delay, (int, float)) else "-",
                    entry.get("reason") or "-", entry.get("worker") or "-",
                ))
            for line in columns(table):
                write(line)
            if shown["omitted_attempts"]:
                write(f"  ({shown['omitted_attempts']} attempts between the first and the latest were not kept)")
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
                if trace and trace == shown["traceback"]:
                    write("    (traceback: the final one, below)")
                elif trace:
                    for text in trace.rstrip().split("\n"):
                        write(f"    {text}")
        else:
            write("  (no attempt history was recorded)")
        write("")
        write("Traceback:" if shown["traceback"] else "Traceback: -")
        for text in shown["traceback"].rstrip().split("\n") if shown["traceback"] else []:
            write(f"  {text}")
        write("")
        write("Audit trail:")
        limit = conf.get().dead_letter_max_argument_bytes
        for event in row.audit or []:
            if not isinstance(event, dict):
                continue
            extra = {key: value for key, value in event.items() if key not in ("action", "at", "by", "nonce")}
            extra = deadletter.cap_value(extra, limit)[0] if extra else extra  # a huge argument edit, cut
            by = f" by {event['by']}" if event.get("by") else ""
            details = ("  " + json.dumps(extra, ensure_ascii=False, default=str)) if extra else ""
            write(f"  {when(event.get('at'))}  {event.get('action', '?')}{by}{details}")

    def replay(self, options: dict[str, Any]) -> None:
        """Replay the selected rows; exit non-zero when any was refused."""
        args, kwargs = options.get("replacement_args"), options.get("replacement_kwargs")
        if (args is not None or kwargs is not None) and not options.get("id"):
            raise CommandError("--args and --kwargs replace the arguments of the rows named by --id: give --id ID "
                               "(repeatable). Nothing was changed.")
        selected = self._selected(options, verb="replay").order_by("id")
        if not selected.exists():
            if options["json"]:
                self.write_json([])
            else:
                self.stdout.write("No dead letters match; nothing to replay.")
            return
        if options["dry_run"]:
            app = current_app._get_current_object()
            app.loader.import_default_modules()
            predicted = [(row, _refusal(row, app, args, kwargs))
                         for row in selected.defer(*deadletter.NOT_READ_BY_REPLAY)]
            if options["json"]:
                self.write_json([{"id": row.id, "task_name": row.task_name, "would_replay": error is None,
                                   "queue": (options["queue"] or row.queue or None) if error is None else None,
                                   "error": error} for row, error in predicted])
                return
            self.stdout.write("Dry run: nothing is sent or changed.")
            for row, error in predicted:
                target = options["queue"] or row.queue or "its default queue"
                self.stdout.write(f"{row.id} {row.task_name}: " + (f"would be refused: {_how(error, row.id)}" if error
                                                                   else f"would be replayed to {target}"))
            refused = sum(1 for _, error in predicted if error)
            self.stdout.write(f"Would replay {len(predicted) - refused} of {len(predicted)}; "
                              f"{refused} would be refused.")
            return
        try:
            # the queryset itself: replay streams it in batches instead of loading every row
            outcomes = deadletter.replay(selected, queue=options["queue"] or None, by=options["by"] or os_user(),
                                         args=args, kwargs=kwargs)
        except (OperationalError, DatabaseError, InterfaceError) as error:  # the broker or the database
            raise CommandError(
                f"Replay stopped: {type(error).__name__}: {error}. Rows not sent are left as they were; "
                "`dead list --status replayed` shows any sent before the error."
            ) from error
        refused = [outcome for outcome in outcomes if outcome.error]
        if options["json"]:
            self.write_json([{"id": o.dead_letter_id, "task_name": o.task_name, "new_task_id": o.new_task_id,
                               "error": o.error} for o in outcomes])
        else:
            for outcome in outcomes:
                self.stdout.write(f"{outcome.dead_letter_id} {outcome.task_name}: "
                                  + (f"refused: {_how(outcome.error, outcome.dead_letter_id)}" if outcome.error
                                     else f"replayed as {outcome.new_task_id}"))
            self.stdout.write(f"Replayed {len(outcomes) - len(refused)} of {len(outcomes)}; "
                              f"{len(refused)} refused (left as they were).")
        if refused:
            raise CommandError(f"{len(refused)} of {len(outcomes)} dead letters were refused; they are left as they "
                               "were: " + "; ".join(f"{o.dead_letter_id}: {o.error}" for o in refused[:5])
                               + (" …" if len(refused) > 5 else ""))

    def discard(self, options: dict[str, Any]) -> None:
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
        changed = deadletter.discard(dead, by=options["by"] or os_user())
        self.stdout.write(f"Discarded {changed} of {len(rows)}.")

    def purge(self, options: dict[str, Any]) -> None:
        """Delete rows whose last failure is older than --older-than."""
        before, status = options["older_than"], options["status"]
        which = f"{status} dead letters" if status else "dead letters (any status)"
        if options["dry_run"]:
            rows = DeadLetter.objects.older_than(before)
            count = (rows.filter(status=status) if status else rows).count()
            self.stdout.write(f"Dry run: would delete {count} {which} last failed before {local(before)}.")
            return
        count = deadletter.purge(before, status=status)
        self.stdout.write(f"Deleted {count} {which} last failed before {local(before)}.")

    def flush(self, options: dict[str, Any]) -> None:
        """Move spooled records into the database."""
        try:
            moved = deadletter.flush_spool()
        except (DatabaseError, InterfaceError) as error:
            raise CommandError(f"The database did not answer ({error}); the spooled records stay for the next "
                               "flush.") from error
        except ConfigurationError as error:
            raise CommandError(str(error)) from error
        where = _spool.directory()
        self.stdout.write(f"Moved {moved} spooled dead letter{'' if moved == 1 else 's'} into the database "
                          f"(from {where}).")
        quarantined = _spool.quarantined()
        if quarantined:
            self.stdout.write(f"{len(quarantined)} file{'' if len(quarantined) == 1 else 's'} in "
                              f"{where / _spool.QUARANTINE} will never be stored (the log says why for each): "
                              "look at them, then delete them.")
