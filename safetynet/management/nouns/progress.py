"""``safetynet progress purge``: user-facing progress rows."""

from __future__ import annotations

from typing import Any

from safetynet import conf, progress
from safetynet.management.nouns._text import Noun, add_age_purge, purge_by_age
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
        add_age_purge(
            actions, help="delete progress rows not changed for an age",
            description="Delete progress rows not changed since --older-than (default: "
                        "SAFETYNET['PROGRESS_KEEP_SECONDS'] ago). Workers do this once an hour; a user who opens "
                        "the page of a purged task is told it cannot be found.")

    def handle(self, options: dict[str, Any]) -> None:
        self.purge(options)

    def purge(self, options: dict[str, Any]) -> None:
        """Delete progress rows older than --older-than (default PROGRESS_KEEP_SECONDS)."""
        purge_by_age(self, options, keep_seconds=conf.get().progress_keep_seconds, rows="progress rows",
                     count=lambda before: TaskProgress.objects.filter(updated_at__lt=before).count(),
                     delete=progress.purge)
