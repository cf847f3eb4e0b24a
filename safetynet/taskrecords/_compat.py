"""Django's tasks API: ``django.tasks`` (Django ≥ 6.0), or the ``django_tasks`` backport on Django 5.2.

Everything safetynet needs of it is named here once, whichever package provides it (the backport
names two exceptions differently and logs to another logger).
"""

from __future__ import annotations

import importlib.util
from typing import Any

__all__ = ["AVAILABLE", "api", "base", "exceptions", "signals", "BaseTaskBackend", "InvalidTask", "Task", "TaskContext",
           "TaskError", "TaskResult", "TaskResultDoesNotExist", "TaskResultMismatch", "TaskResultStatus",
           "normalize_json", "MISSING"]

#: Why the API is missing, when it is ("" when it is there).
MISSING = ""

try:  # Django 6.0 and later
    from django import tasks as api
    from django.tasks import base, exceptions, signals
    from django.tasks.backends.base import BaseTaskBackend
    from django.utils.json import normalize_json
except ImportError:
    try:  # the backport, on Django 5.2
        # only the package: a module named django_tasks.py on the path (bench/django_tasks.py) is not it
        _spec = importlib.util.find_spec("django_tasks")
        if _spec is None or _spec.submodule_search_locations is None:
            raise ImportError("No module named 'django_tasks'")
        import django_tasks as api  # type: ignore[import-not-found,no-redef]
        from django_tasks import base, exceptions, signals  # type: ignore[import-not-found,no-redef]
        from django_tasks.backends.base import BaseTaskBackend  # type: ignore[import-not-found,no-redef]
        from django_tasks.utils import normalize_json  # type: ignore[import-not-found,no-redef]
    except ImportError as error:
        api = base = exceptions = signals = None
        BaseTaskBackend = object  # type: ignore[assignment,misc]
        normalize_json = None  # type: ignore[assignment]
        MISSING = (f"Django's tasks API is not installed ({error}): it comes with Django 6.0 and later, or with the "
                   "django-tasks backport on Django 5.2 (pip install 'django-safetynet[django-tasks]')")

AVAILABLE = not MISSING

Task: Any = getattr(base, "Task", None)
TaskContext: Any = getattr(base, "TaskContext", None)
TaskError: Any = getattr(base, "TaskError", None)
TaskResult: Any = getattr(base, "TaskResult", None)
TaskResultStatus: Any = getattr(base, "TaskResultStatus", None)
InvalidTask: Any = getattr(exceptions, "InvalidTask", None) or getattr(exceptions, "InvalidTaskError", None)
TaskResultDoesNotExist: Any = getattr(exceptions, "TaskResultDoesNotExist", None)
TaskResultMismatch: Any = getattr(exceptions, "TaskResultMismatch", None)
