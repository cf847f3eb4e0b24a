"""Alerts on tasks given up: ``mail_admins`` rate-limited per fingerprint, and pluggable hooks.

Connected to ``signals.task_ended`` (a death, once, wherever it was found) and
``signals.dead_letters_evicted``. The rate limit goes through Django's default cache (``cache.add``
is atomic): with a shared cache (Redis) it holds across every worker; with the per-process default
it holds per process. A hook that raises is logged and never changes what was recorded.

A hook is called with the stored ``DeadLetter`` row when there is one (``ALERT_HOOKS``), or, for a
death whose record waits in the spool while the database is down, with a ``TaskEnded`` event.
"""

from __future__ import annotations

import logging
from typing import Any

from safetynet import conf, signals
from safetynet.models import DeadLetter
from safetynet.protocol.events import TaskEnded

__all__ = ["connect", "dead_letters_evicted", "task_given_up"]

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


def task_given_up(event: TaskEnded) -> None:
    """The terminal event of a death: mail the ADMINS (once per fingerprint and window) and call the hooks."""
    if not event.dead or event.eager or event.dead_letter is None:
        return
    settings = conf.get()
    facts = event.dead_letter
    where = f"Dead letter id {facts.id}" if facts.id is not None else "Its dead letter waits in the spool (the " \
        "database did not answer)"
    if settings.alert_mail_admins and _first_in_window(facts.fingerprint, settings.alert_rate_limit):
        _mail(
            f"[safetynet] {event.task_name} died: {event.reason}",
            f"Task {event.task_name}[{event.task_id}] was given up ({event.reason}) after {event.attempts} "
            f"attempt(s).\n{facts.exception_type}: {facts.exception_message}\n\n"
            f"{where}, fingerprint {facts.fingerprint}. Further failures with this fingerprint are "
            f"not mailed for {settings.alert_rate_limit}s.\n\n{facts.traceback}",
        )
    if not settings.alert_hooks:
        return
    row = DeadLetter.objects.filter(pk=facts.id).first() if facts.id is not None else None
    for hook in settings.alert_hooks:
        try:
            hook(row if row is not None else event)
        except Exception as error:
            logger.error("safetynet: alert hook %r failed: %r", hook, error)


def dead_letters_evicted(sender: Any = None, count: int = 0, cap: int = 0, oldest: Any = None, **_: Any) -> None:
    """Alert that the store's cap evicted rows (never silently)."""
    settings = conf.get()
    if settings.alert_mail_admins and _first_in_window("evicted", settings.alert_rate_limit):
        _mail(
            f"[safetynet] {count} dead letters evicted",
            f"The dead-letter store is capped at {cap} rows (SAFETYNET['DEAD_LETTER_MAX_ROWS']); "
            f"the {count} oldest were deleted, the oldest failure among them at {oldest}.",
        )


def connect() -> None:
    """Connect the alerts (from the AppConfig)."""
    signals.consume("safetynet.alerts", task_given_up, successes=False)
    signals.dead_letters_evicted.connect(dead_letters_evicted, dispatch_uid="safetynet.alerts.evicted", weak=False)
