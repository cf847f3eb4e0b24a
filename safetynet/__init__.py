"""safetynet: reliable background tasks for Django, built on Celery.

The public API is what ``__all__`` lists; everything else is private and may change. The values
(policies, exceptions, the decision core) import without Django being set up, so a settings module
can use them; the task decorator and the rest load when first used.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

from safetynet.core.classify import http_status, is_network_error
from safetynet.core.decision import Dead, Decision, Done, Retry, decide
from safetynet.core.policy import CeleryBackoff, Exponential, Fixed, RetryPolicy
from safetynet.core.limits import Limit
from safetynet.core.upstream import Breaker
from safetynet.exceptions import (
    BreakerOpen,
    ClaimLost,
    ConfigurationError,
    CrashLoop,
    IdempotencyKeyError,
    KeyInProgress,
    LimitReached,
    Permanent,
    SafetynetError,
    Snooze,
    TaskSignal,
    Transient,
)

if TYPE_CHECKING:
    from safetynet.breakers import breaker
    from safetynet.idempotency import atomic
    from safetynet.limits import limit
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
    "Limit",
    "LimitReached",
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
    "limit",
    "task",
]

# Loaded on first use: they need Django's apps (models) to be ready.
_LAZY = {
    "SafetyTask": "safetynet.runtime.task",
    "task": "safetynet.runtime.task",
    "atomic": "safetynet.idempotency",
    "breaker": "safetynet.breakers",
    "limit": "safetynet.limits",
}


def __getattr__(name: str) -> Any:
    module = _LAZY.get(name)
    if module is None:
        raise AttributeError(f"module 'safetynet' has no attribute {name!r}")
    import importlib

    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
