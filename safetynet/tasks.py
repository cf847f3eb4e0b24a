"""Django's tasks API (``django.tasks``, Django 6.0+, or the ``django-tasks`` backport on 5.2) on Celery, through
safetynet. See docs/django-tasks.md::

    TASKS = {"default": {"BACKEND": "safetynet.tasks.CeleryBackend"}}

The names load on first use: Celery's Django autodiscovery imports ``<app>.tasks`` for every installed app, this
module included, and a project without Django's tasks API must still start. Without it, using a name raises
``ImproperlyConfigured`` saying what to install.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["HEADER", "CeleryBackend", "SafetynetTask", "broker_priority"]

if TYPE_CHECKING:
    from safetynet.runtime.django_tasks import HEADER, CeleryBackend, SafetynetTask, broker_priority


def __getattr__(name: str) -> Any:
    if name not in __all__:
        raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
    from safetynet.runtime import django_tasks

    return getattr(django_tasks, name)


def __dir__() -> list[str]:
    return sorted([*globals(), *__all__])
