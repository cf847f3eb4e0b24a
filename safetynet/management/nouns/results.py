"""``safetynet results purge``: the results of ``django.tasks`` tasks (``TaskRecord`` rows)."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django.utils import timezone

from safetynet import conf, taskrecords
from safetynet.management.nouns._text import Noun, local, moment
from safetynet.models import TaskRecord

__all__ = ["Results"]


class Results(Noun):
    """Purge the results of finished ``django.tasks`` tasks."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
        """``results purge``."""
        results = commands.add_parser("results", help="purge old django.tasks results",
                                      description="Purge the results of finished django.tasks tasks.")
        actions = results.add_subparsers(dest="results_command", metavar="action", required=True)
        purge = actions.add_parser(
            "purge", help="delete the results of finished tasks not changed for an age",
            description="Delete the results (TaskRecord rows) of SUCCESSFUL and FAILED django.tasks tasks not "
                        "changed since --older-than (default: SAFETYNET['TASK_RESULTS_KEEP_SECONDS'] ago). "
                        "Workers do this once an hour; get_result() of a purged result raises "
                        "TaskResultDoesNotExist. A task still waiting or running keeps its result.")
        purge.add_argument("--older-than", type=moment, metavar="AGE",
                           help="an age (30d, 12h, 2w) or an ISO 8601 date or datetime")
        purge.add_argument("--dry-run", action="store_true", help="print how many would be deleted; delete nothing")

    def handle(self, options: dict[str, Any]) -> None:
        self.purge(options)

    def purge(self, options: dict[str, Any]) -> None:
        """Delete finished results older than --older-than (default TASK_RESULTS_KEEP_SECONDS)."""
        before = options["older_than"] or timezone.now() - timedelta(seconds=conf.get().task_results_keep_seconds)
        if options["dry_run"]:
            count = TaskRecord.objects.filter(
                updated_at__lt=before, status__in=[TaskRecord.Status.SUCCESSFUL, TaskRecord.Status.FAILED]).count()
            self.stdout.write(f"Dry run: would delete {count} django.tasks results last changed before "
                              f"{local(before)}.")
            return
        count = taskrecords.purge(before)
        self.stdout.write(f"Deleted {count} django.tasks results last changed before {local(before)}.")
