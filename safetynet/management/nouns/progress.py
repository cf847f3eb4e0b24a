"""``safetynet progress purge``: user-facing progress rows."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from safetynet import conf, progress
from safetynet.management.nouns._text import Noun, local, moment
from safetynet.models import TaskProgress

__all__ = ["Progress"]


class Progress(Noun):
    """Purge the progress rows of finished tasks."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
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

    def handle(self, options: dict[str, Any]) -> None:
        self.purge(options)

    def purge(self, options: dict[str, Any]) -> None:
        """Delete progress rows older than --older-than (default PROGRESS_KEEP_SECONDS)."""
        before = options["older_than"] or timezone.now() - timedelta(seconds=conf.get().progress_keep_seconds)
        if options["dry_run"]:
            count = TaskProgress.objects.filter(updated_at__lt=before).count()
            self.stdout.write(f"Dry run: would delete {count} progress rows last changed before {local(before)}.")
            return
        count = progress.purge(before)
        self.stdout.write(f"Deleted {count} progress rows last changed before {local(before)}.")
