"""The pure decision core: retry policies, error classification and ``decide``.

Nothing here imports Django or Celery (an import-linter contract checks it), so the worker
runtime, the simulator and ``explain`` all share exactly the same logic.
"""

from safetynet.core.classify import Rules, Verdict, http_status
from safetynet.core.decision import DONE, Dead, Decision, Done, Retry, decide
from safetynet.core.policy import CeleryBackoff, Exponential, Fixed, RetryPolicy

__all__ = [
    "DONE",
    "CeleryBackoff",
    "Dead",
    "Decision",
    "Done",
    "Exponential",
    "Fixed",
    "Retry",
    "RetryPolicy",
    "Rules",
    "Verdict",
    "decide",
    "http_status",
]
