"""Django's tasks API (``django.tasks``, Django 6.0+, or the ``django-tasks`` backport on 5.2) on Celery, through
safetynet. See docs/django-tasks.md::

    TASKS = {"default": {"BACKEND": "safetynet.tasks.CeleryBackend"}}

The names are loaded when first used: importing this module needs neither API (Celery's ``autodiscover_tasks()``
imports every installed app's ``tasks`` module, this one included, on projects that have no tasks API at all).
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Any

__all__ = ["HEADER", "CeleryBackend", "SafetynetTask", "broker_priority"]

if TYPE_CHECKING:
    from safetynet.runtime.django_tasks import HEADER, CeleryBackend, SafetynetTask, broker_priority


def __getattr__(name: str) -> Any:
    if name in __all__:
        from safetynet.runtime import django_tasks  # ImproperlyConfigured, saying what to install, without the API

        return getattr(django_tasks, name)
    raise AttributeError(f"module 'safetynet.tasks' has no attribute {name!r}")


def __dir__() -> list[str]:
    return sorted(__all__)
