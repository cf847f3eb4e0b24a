"""Alerts on new dead letters: ``mail_admins`` rate-limited per fingerprint, and pluggable hooks.

The rate limit goes through Django's default cache (``cache.add`` is atomic): with a shared
cache (Redis) it holds across every worker; with the per-process default it holds per process.
A hook that raises is logged and never changes what was recorded.
"""

from __future__ import annotations

import logging
from typing import Any

from safetynet import conf

__all__ = ["dead_letter_recorded", "dead_letters_evicted"]

logger = logging.getLogger("safetynet")


def _first_in_window(key: str, seconds: int) -> bool:
    from django.core.cache import cache

    try:
        return bool(cache.add(f"safetynet:alert:{key}", 1, timeout=seconds))
    except Exception as error:  # a cache outage must not silence the alert
        logger.warning("safetynet: alert rate limit unavailable (%r); alerting anyway", error)
        return True


def _mail(subject: str, body: str) -> None:
    from django.conf import settings
    from django.core.mail import mail_admins

    if not getattr(settings, "ADMINS", None):
        return
    try:
        mail_admins(subject, body, fail_silently=False)
    except Exception as error:
        logger.error("safetynet: mail_admins failed: %r", error)


def dead_letter_recorded(row: Any) -> None:
    """Alert about a newly stored dead letter."""
    settings = conf.get()
    if settings.alert_mail_admins and _first_in_window(row.fingerprint, settings.alert_rate_limit):
        _mail(
            f"[safetynet] {row.task_name} died: {row.reason}",
            f"Task {row.task_name}[{row.task_id}] was given up ({row.reason}) after {row.attempts} attempt(s).\n"
            f"{row.exception_type}: {row.exception_message}\n\n"
            f"Dead letter id {row.id}, fingerprint {row.fingerprint}. Further failures with this fingerprint are "
            f"not mailed for {settings.alert_rate_limit}s.\n\n{row.traceback}",
        )
    for hook in settings.alert_hooks:
        try:
            hook(row)
        except Exception as error:
            logger.error("safetynet: alert hook %r failed: %r", hook, error)


def dead_letters_evicted(count: int, cap: int, oldest: Any) -> None:
    """Alert that the store's cap evicted rows (never silently)."""
    settings = conf.get()
    if settings.alert_mail_admins and _first_in_window("evicted", settings.alert_rate_limit):
        _mail(
            f"[safetynet] {count} dead letters evicted",
            f"The dead-letter store is capped at {cap} rows (SAFETYNET['DEAD_LETTER_MAX_ROWS']); "
            f"the {count} oldest were deleted, the oldest failure among them at {oldest}.",
        )
