"""User-facing progress: what a task shows the person who started it, and nothing more.

Sending a task with ``progress_for=request.user`` writes a ``TaskProgress`` row (queued, owned by
that user) and adds the header ``safetynet_progress`` to the message, so the worker knows the
task is tracked without a database read; the header travels with every retry. While it runs, a
bound task calls ``self.progress(current, total, message=...)``; the worker writes its state
(running, retrying, succeeded, failed). The progress endpoint (``safetynet.progress.urls``) and
the ``{% progress_widget %}`` tag read it.

What a user is shown is only what is safe to show: the state, the numbers and message the task
reported, the attempt, when the next one is due; on success the return value if the task
declared ``progress_result=True`` (dict values under ``REDACT_KEYS`` redacted); on failure the
exception's ``public_message`` (a str attribute you set), else ``PROGRESS_ERROR_MESSAGE``. Never
the exception's text, a traceback, or the arguments. A failed task whose dead letter staff replayed
answers with where it goes on (``replayed_as``, ``replayed_url``), and the widget follows it.
"""

from safetynet.progress._store import (
    as_json,
    can_see,
    carry_over,
    owner_of,
    public_message,
    purge,
    replayed_as,
    status_of,
    track,
)
from safetynet.protocol.headers import PROGRESS as HEADER

__all__ = ["HEADER", "as_json", "can_see", "carry_over", "owner_of", "public_message", "purge", "replayed_as",
           "status_of", "track"]
