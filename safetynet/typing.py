"""The types safetynet's public API speaks in, for annotations (and ``isinstance`` where they are classes).

- ``TaskEnded``, ``Outcome``, ``DeadLetterFacts``: the terminal event ``signals.task_ended`` sends;
- ``Reason``: why a task was given up (a ``StrEnum``: each member equals its stored text);
- ``HistoryEntry``: one attempt as recorded in the history (a ``TypedDict``);
- ``Decision`` (``Retry | Dead | Done``): what the decision core decided;
- ``Matcher``: what ``retry_on``, ``fail_on`` and a breaker's ``count_on`` take;
- ``Plugin``, ``Attempt``, ``Outgoing``: the interface a feature implements to take part in a task's path
  (see docs/architecture.md).
"""

from safetynet.core.classify import Matcher
from safetynet.core.decision import Dead, Decision, Done, Retry
from safetynet.protocol.attempt import Attempt, Outgoing, Plugin
from safetynet.protocol.events import DeadLetterFacts, Outcome, TaskEnded
from safetynet.protocol.history import HistoryEntry
from safetynet.protocol.reasons import Reason

__all__ = [
    "Attempt",
    "Dead",
    "DeadLetterFacts",
    "Decision",
    "Done",
    "HistoryEntry",
    "Matcher",
    "Outcome",
    "Outgoing",
    "Plugin",
    "Reason",
    "Retry",
    "TaskEnded",
]
