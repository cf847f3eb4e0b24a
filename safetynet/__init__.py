"""safetynet: reliable background tasks for Django, built on Celery.

The public API is what ``__all__`` lists; everything else is private and may change.
"""

from safetynet.core.classify import http_status, is_network_error
from safetynet.core.decision import Dead, Decision, Done, Retry, decide
from safetynet.core.policy import CeleryBackoff, Exponential, Fixed, RetryPolicy
from safetynet.breakers import Breaker, breaker
from safetynet.exceptions import (
    BreakerOpen,
    ClaimLost,
    ConfigurationError,
    CrashLoop,
    IdempotencyKeyError,
    KeyInProgress,
    Permanent,
    SafetynetError,
    Snooze,
    TaskSignal,
    Transient,
)
from safetynet.idempotency import atomic
from safetynet.runtime.task import SafetyTask, task

__version__ = "0.1.0.dev0"

__all__ = [
    "Breaker",
    "BreakerOpen",
    "CeleryBackoff",
    "ClaimLost",
    "ConfigurationError",
    "CrashLoop",
    "Dead",
    "Decision",
    "Done",
    "Exponential",
    "Fixed",
    "IdempotencyKeyError",
    "KeyInProgress",
    "Permanent",
    "Retry",
    "RetryPolicy",
    "SafetyTask",
    "SafetynetError",
    "Snooze",
    "TaskSignal",
    "Transient",
    "__version__",
    "atomic",
    "breaker",
    "decide",
    "http_status",
    "is_network_error",
    "task",
]
