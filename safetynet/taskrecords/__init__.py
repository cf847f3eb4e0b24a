"""Results of ``django.tasks`` tasks run on Celery through safetynet: the ``TaskRecord`` rows ``get_result()`` reads,
and the plug-in that keeps them true along the task's path (``safetynet.runtime.django_tasks`` is the backend)."""

from safetynet.taskrecords._compat import AVAILABLE, MISSING
from safetynet.taskrecords._store import (FLUSH_SECONDS, RUNNING_AFTER, attempt_started, database, flush, insert,
                                         insert_then, moment, purge, read)
from safetynet.taskrecords.plugin import NOTE, PREFIX, DjangoTasks, error_of, on_task_ended, on_task_replayed

__all__ = ["AVAILABLE", "FLUSH_SECONDS", "MISSING", "NOTE", "PREFIX", "RUNNING_AFTER", "DjangoTasks", "attempt_started",
           "database", "error_of", "flush", "insert", "insert_then", "moment", "on_task_ended", "on_task_replayed", "purge", "read"]
