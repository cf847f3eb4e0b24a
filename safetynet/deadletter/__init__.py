"""The dead-letter store: every task finally given up is recorded once; staff inspect, replay, discard, purge.

Recording never loses a failure: when the database does not answer, the record waits in a local
spool and is moved into the database by the next successful record, by every worker's background
jobs, or by ``manage.py safetynet dead flush``. Records are keyed by task id, so a record written
twice (a spooled record flushed by two workers, a redelivered message) is stored once.

The supported Python API::

    replay(rows, queue=None, args=None, kwargs=None, by="")   run them again, with a fresh attempt count
    discard(rows, by="")                 mark them handled without running them
    purge(older_than)                    delete rows whose last failure is older than a moment
    flush_spool()                        move spooled records into the database
    replay_refusal(row, task)            why a row cannot be replayed (None: it can)
    replacement_arguments(args, kwargs)  replacement arguments checked (TypeError/ValueError saying what is wrong)
    cap_fields(fields) / is_truncated(v) the size caps (DEAD_LETTER_MAX_*) and their marker objects
    give_up(Failure(...))                record a task given up (what the runtime does), announced once
    fingerprint(task, type, message)     the key alike failures share

``rows`` is a ``DeadLetter``, an id, a list of ids or a queryset (``DeadLetter.objects.matching(...)``).
"""

from safetynet.deadletter._caps import (
    TRUNCATED,
    cap_fields,
    cap_value,
    is_truncated,
    truncated_paths,
)
from safetynet.deadletter._fingerprints import fingerprint, normalise_message
from safetynet.deadletter._groups import rebuild as rebuild_failure_groups
from safetynet.deadletter._groups import recount as recount_failure_groups
from safetynet.deadletter._groups import waiting_count
from safetynet.deadletter._recording import (
    Failure,
    enforce_cap,
    flush_spool,
    give_up,
    record,
)
from safetynet.deadletter._replay import (
    NOT_READ_BY_REPLAY,
    ReplayOutcome,
    discard,
    purge,
    replacement_arguments,
    replay,
    replay_refusal,
)
from safetynet.redaction import REDACTED

__all__ = [
    "NOT_READ_BY_REPLAY",
    "REDACTED",
    "TRUNCATED",
    "Failure",
    "ReplayOutcome",
    "cap_fields",
    "cap_value",
    "discard",
    "enforce_cap",
    "fingerprint",
    "flush_spool",
    "give_up",
    "is_truncated",
    "normalise_message",
    "purge",
    "rebuild_failure_groups",
    "recount_failure_groups",
    "record",
    "replacement_arguments",
    "replay",
    "replay_refusal",
    "truncated_paths",
    "waiting_count",
]
