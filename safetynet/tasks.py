"""Django's tasks API (``django.tasks``, Django 6.0+, or the ``django-tasks`` backport on 5.2) on Celery, through
safetynet. See docs/django-tasks.md::

    TASKS = {"default": {"BACKEND": "safetynet.tasks.CeleryBackend"}}
"""

from safetynet.runtime.django_tasks import HEADER, CeleryBackend, SafetynetTask, broker_priority

__all__ = ["HEADER", "CeleryBackend", "SafetynetTask", "broker_priority"]
