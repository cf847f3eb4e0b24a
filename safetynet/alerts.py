"""Alerts on tasks given up: ``mail_admins`` rate-limited per fingerprint, and pluggable hooks.

Connected to ``signals.task_ended`` (a death, once, wherever it was found),
``signals.dead_letters_evicted`` and ``signals.dead_letter_quarantined`` (a record the spool will never
store: a planted or altered file, or one the database refused). The rate limit goes through Django's default cache (``cache.add``
is atomic): with a shared cache (Redis) it holds across every worker; with the per-process default
it holds per process. A hook that raises is logged and never changes what was recorded.

A hook is called with the stored ``DeadLetter`` row when there is one (``ALERT_HOOKS``), or, for a
death whose record was not stored (it waits in the spool while the database is down, or was
quarantined, or could only be logged), with a ``TaskEnded`` event. Evictions and quarantined
records are mailed, not sent to the hooks (which take a death, once): their signals are for that.
"""

from __future__ import annotations

import logging
from typing import Any

from safetynet import conf, signals
from safetynet.models import DeadLetter
from safetynet.protocol.events import TaskEnded

__all__ = ["connect", "dead_letter_quarantined", "dead_letters_evicted", "task_given_up"]

#: What an alert says about where a death's record is (``DeadLetterFacts.kept_in``), when it is not a row.
_NOT_STORED = {
    "spool": "Its dead letter waits in the spool (the database did not answer)",
    "quarantine": "The database refused its dead letter even made storable: it is kept in the spool's quarantine "
                  "folder (see the ERROR log line), never stored",
    "log": "Its dead letter could be kept neither in the database nor in the spool: the whole record is in an "
           "ERROR log line",
}

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
        mail_admins(subject, body)  # Django 6.1 deprecates fail_silently (False is the default everywhere)
    except Exception as error:
        logger.error("safetynet: mail_admins failed: %r", error)


def task_given_up(event: TaskEnded) -> None:
    """The terminal event of a death: mail the ADMINS (once per fingerprint and window) and call the hooks."""
    if not event.dead or event.eager or event.dead_letter is None:
        return
    settings = conf.get()
    facts = event.dead_letter
    where = (f"Dead letter id {facts.id}" if facts.id is not None
             else _NOT_STORED.get(facts.kept_in, _NOT_STORED["spool"]))
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


def dead_letter_quarantined(sender: Any = None, path: str = "", why: str = "", kind: str = "", task_name: str = "",
                            task_id: str = "", **_: Any) -> None:
    """Alert that a record was quarantined: it will never be stored without a person looking at it."""
    settings = conf.get()
    if not (settings.alert_mail_admins and _first_in_window(f"quarantined:{kind}", settings.alert_rate_limit)):
        return
    if kind == "unstorable":
        subject = f"[safetynet] the dead letter of {task_name} could not be stored"
        body = (f"The database refused the dead letter of {task_name}[{task_id}] even after it was made storable. "
                f"It was not stored, and will not be: it is kept in {path}.\n\nWhy: {why}")
    else:
        subject = "[safetynet] an untrusted spool file was quarantined"
        body = (f"A file in the dead-letter spool {why}. It was moved to {path} and will never be stored: look at "
                "who could write there (or whether SECRET_KEY changed without SECRET_KEY_FALLBACKS).")
    _mail(subject, f"{body}\n\nFurther quarantined files of this kind are not mailed for {settings.alert_rate_limit}s.")


def connect() -> None:
    """Connect the alerts (from the AppConfig)."""
    signals.consume("safetynet.alerts", task_given_up, successes=False)
    signals.dead_letters_evicted.connect(dead_letters_evicted, dispatch_uid="safetynet.alerts.evicted", weak=False)
    signals.dead_letter_quarantined.connect(dead_letter_quarantined, dispatch_uid="safetynet.alerts.quarantined",
                                            weak=False)
