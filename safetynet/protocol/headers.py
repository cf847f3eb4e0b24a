"""The message headers safetynet reads and writes, in one place."""

from __future__ import annotations

from typing import Final

__all__ = ["CELERY", "DELIVERY", "HANDOVER", "HISTORY", "PROGRESS", "RELAYED", "REPLAY_OF"]

#: The attempt history of a retried message (``safetynet.protocol.history.History``).
HISTORY: Final = "safetynet"
#: A copy of a message that must be seen taken: ``[row key, publish token]`` (``safetynet.schedule``).
RELAYED: Final = "safetynet_relayed"
#: The token an attempt handed its idempotency claim over to the retry with.
HANDOVER: Final = "safetynet_claim"
#: Marks a task whose progress is shown to the user who started it.
PROGRESS: Final = "safetynet_progress"
#: The dead letter a replayed task came from (its id, as text).
REPLAY_OF: Final = "safetynet_replay_of"

#: Headers about one delivery, not the task: a dead letter does not keep them and a replay does not send them.
DELIVERY: Final = frozenset({HISTORY, RELAYED, HANDOVER})

#: The headers of Celery's task protocol (2): written by Celery for each message it sends. A dead letter the
#: consumer recorded (an unknown task, a malformed or undecodable message) keeps them as they came; a replay
#: is a new message and does not send them.
CELERY: Final = frozenset({
    "lang", "task", "id", "shadow", "eta", "expires", "group", "group_index", "retries", "timelimit", "root_id",
    "parent_id", "argsrepr", "kwargsrepr", "origin", "ignore_result", "replaced_task_nesting", "stamped_headers",
    "stamps", "compression",
})
