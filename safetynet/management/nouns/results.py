"""``safetynet results purge``: the results of ``django.tasks`` tasks (``TaskRecord`` rows)."""

from __future__ import annotations

from typing import Any

from safetynet import conf, taskrecords
from safetynet.management.nouns._text import Noun, add_age_purge, purge_by_age
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
        add_age_purge(
            actions, help="delete the results of finished tasks not changed for an age",
            description="Delete the results (TaskRecord rows) of SUCCESSFUL and FAILED django.tasks tasks not "
                        "changed since --older-than (default: SAFETYNET['TASK_RESULTS_KEEP_SECONDS'] ago). "
                        "Workers do this once an hour; get_result() of a purged result raises "
                        "TaskResultDoesNotExist. A task still waiting or running keeps its result.")

    def handle(self, options: dict[str, Any]) -> None:
        self.purge(options)

    def purge(self, options: dict[str, Any]) -> None:
        """Delete finished results older than --older-than (default TASK_RESULTS_KEEP_SECONDS)."""
        purge_by_age(self, options, keep_seconds=conf.get().task_results_keep_seconds, rows="django.tasks results",
                     count=lambda before: TaskRecord.objects.filter(
                         updated_at__lt=before,
                         status__in=[TaskRecord.Status.SUCCESSFUL, TaskRecord.Status.FAILED]).count(),
                     delete=taskrecords.purge)
