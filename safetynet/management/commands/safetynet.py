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
    limits list                  every declared limit: concurrency and rate, slots in use, calls in the
                                 rate's window, tasks waiting, when the line ends, a pause (--json)
    limits pause <name>          let no call through a limit for --for SECONDS (--partition P)
    progress purge               delete old progress rows (--older-than, --dry-run)
    results purge                delete the results of finished django.tasks tasks (--older-than, --dry-run)
"""

from __future__ import annotations

from typing import Any

from django.core import checks
from django.core.management.base import BaseCommand, CommandError, CommandParser
from django.db import DatabaseError, ProgrammingError

from safetynet.management.nouns._text import Noun
from safetynet.management.nouns.breakers import Breakers
from safetynet.management.nouns.dead import DeadLetters
from safetynet.management.nouns.explain import Explain
from safetynet.management.nouns.keys import Keys
from safetynet.management.nouns.limits import Limits
from safetynet.management.nouns.progress import Progress
from safetynet.management.nouns.results import Results
from safetynet.management.nouns.schedule import Schedule

#: The nouns, in the order ``--help`` lists them, and the commands each answers.
NOUNS: tuple[tuple[type[Noun], tuple[str, ...]], ...] = (
    (Explain, ("explain",)), (DeadLetters, ("dead",)), (Keys, ("keys",)), (Schedule, ("relay", "schedule")),
    (Breakers, ("breakers",)), (Limits, ("limits",)), (Progress, ("progress",)), (Results, ("results",)),
)


class Command(BaseCommand):
    help = ("See what safetynet will do: `safetynet explain <dotted.task.name>`; "
            "handle dead letters: `safetynet dead list|show|replay|discard|purge|flush`; "
            "idempotency claims: `safetynet keys show|purge`; durable schedule and outbox: "
            "`safetynet relay`, `safetynet schedule list|due-now`; breakers: `safetynet breakers list|open|close`; "
            "limits: `safetynet limits list|pause`; progress: `safetynet progress purge`; "
            "django.tasks results: `safetynet results purge`.")

    def add_arguments(self, parser: CommandParser) -> None:
        commands = parser.add_subparsers(dest="command", metavar="command", required=True)
        for noun, _ in NOUNS:
            noun.add_arguments(commands)  # type: ignore[attr-defined]

    def check(self, *args: Any, **kwargs: Any) -> None:
        """Django's system checks before a command, quiet unless one fails: the warnings (``manage.py check``
        lists them) would bury this command's own output; errors still stop it, with every message shown."""
        issues = checks.run_checks(app_configs=kwargs.get("app_configs"), tags=kwargs.get("tags"),
                                   include_deployment_checks=kwargs.get("include_deployment_checks", False),
                                   databases=kwargs.get("databases"))
        if any(issue.level >= checks.ERROR and not issue.is_silenced() for issue in issues):
            super().check(*args, **kwargs)

    def handle(self, *args: Any, **options: Any) -> None:
        noun = next(noun for noun, names in NOUNS if options["command"] in names)
        try:
            noun(self).handle(options)  # type: ignore[attr-defined]
        except DatabaseError as error:  # a clear line, not a driver's traceback
            first = str(error).strip().splitlines()[0] if str(error).strip() else type(error).__name__
            missing = isinstance(error, ProgrammingError) or "does not exist" in first or "no such table" in first
            advice = ("safetynet's tables are missing: run `manage.py migrate` first." if missing
                      else "Is the database running and reachable with the settings in DATABASES?")
            raise CommandError(f"The database refused: {first}. {advice}") from None
