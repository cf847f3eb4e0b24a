"""Django system checks for risky task configuration (``manage.py check``, every startup).

========  =====================================================================
id        what it catches
========  =====================================================================
E001      settings.SAFETYNET is invalid
E002      a task's retry options are invalid (a Celery task safetynet did not decorate)
W001      a task retries on every exception (``Exception``) with no bound on attempts or time
W002      a task retries without limit (``max_retries=None``) and has no deadline
W003      a retry delay can outlast the broker's ``visibility_timeout`` (Redis, SQS):
          the message is delivered again and the task runs twice (a safetynet task's retries
          that wait in the durable schedule are not ETA messages: they do not count)
W004      the pickle serializer is accepted: a message can run arbitrary code
W005      a task acknowledges late (``acks_late``) but declares no ``idempotency_key``:
          a redelivered message runs its effect twice
W007      a task's body calls its own task synchronously (``fetch(url)`` or ``self.run(url)`` inside
          ``fetch``): it runs inside the same attempt, not as a retry
E003      idempotent tasks are declared but the claims' database is neither PostgreSQL nor SQLite
E004      a task goes through a breaker that ``SAFETYNET["BREAKERS"]`` does not declare
E007      a task names a limit that ``SAFETYNET["LIMITS"]`` does not declare
E008      a task's limit is partitioned by an argument the task does not take
E005      ``USE_TZ`` is False
E006      the dead-letter spool folder can be written by another user (or belongs to one, or
          cannot be created): it is refused, so dead letters spooled during an outage are only logged
W006      ``SPOOL_DIR`` is not set and no private folder outlives a reboot (no writable home, no
          ``STATE_DIRECTORY``/``XDG_STATE_HOME``): the spool falls back to the temporary directory
W008      ``TASKS`` uses ``safetynet.tasks.CeleryBackend`` but the Celery app has no broker
          (reported by the backend's ``check()``, with Django's tasks checks)
E009      a ``TASKS`` backend's ``OPTIONS["BACKOFF"]`` does not import (the backend's ``check()``)
========  =====================================================================
"""

from __future__ import annotations

import inspect
import math
from typing import Any

from django.core import checks

from safetynet import conf
from safetynet.core.policy import CeleryBackoff, Exponential, Fixed, RetryPolicy
from safetynet.deadletter import _spool_folder
from safetynet.exceptions import ConfigurationError
from safetynet.limits.plugin import limit_names
from safetynet.runtime import options
from safetynet.runtime.registry import user_tasks
from safetynet.runtime.selfcalls import self_calls
from safetynet.runtime.task import SafetyTask

__all__ = ["check_settings", "check_spool", "check_tasks", "longest_delay"]

# kombu's default visibility_timeout per transport
_VISIBILITY_DEFAULTS = {"redis": 3600.0, "rediss": 3600.0, "sentinel": 3600.0, "sqs": 1800.0}
_PICKLE = {"pickle", "application/x-python-serialize"}


@checks.register("safetynet")
def check_settings(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E001: the SAFETYNET settings dict is valid. E005: Django keeps times timezone-aware."""
    from django.conf import settings

    messages: list[checks.CheckMessage] = []
    if not settings.USE_TZ:
        messages.append(checks.Error(
            "USE_TZ is False: safetynet writes and compares timezone-aware times (dead letters, the schedule, "
            "the dashboard's per-minute counts), which Django then stores as local times or refuses.",
            hint="Set USE_TZ = True (Django's default since 5.0).", id="safetynet.E005"))
    try:
        conf.build(conf._user_settings())
    except (ConfigurationError, ImportError) as error:
        messages.append(checks.Error(str(error), hint="Fix settings.SAFETYNET; docs/settings.md lists every key.",
                                     id="safetynet.E001"))
    return messages


@checks.register("safetynet")
def check_spool(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E006: the dead-letter spool folder is private to this user. W006: it is not in the temporary directory."""
    try:
        path, origin, problem = _spool_folder.inspect()
    except (ConfigurationError, ImportError):
        return []  # E001 says it
    if problem is not None:
        return [checks.Error(
            problem,
            hint="While it is refused, a dead letter recorded when the database does not answer is only written to "
                 "the log (ERROR, with its whole record). Checked for the user that runs this command: run it as "
                 "the workers' user, or give each user its own SPOOL_DIR.",
            id="safetynet.E006",
        )]
    if origin == _spool_folder.TEMPORARY:
        return [checks.Warning(
            f"SAFETYNET['SPOOL_DIR'] is not set and this user has no private folder that outlives a reboot "
            f"(no writable home, no $STATE_DIRECTORY or $XDG_STATE_HOME): dead letters spooled while the database "
            f"is down wait in {path}, which a reboot empties and another user could create first.",
            hint="Set SAFETYNET['SPOOL_DIR'] to a persistent folder only the workers' user can write (e.g. "
                 "/var/lib/<project>/safetynet-spool, or systemd's StateDirectory=).",
            id="safetynet.W006",
        )]
    return []


def longest_delay(policy: RetryPolicy) -> float:
    """The longest single wait ``policy`` can ask for (inf when it grows without bound)."""
    if policy.max_delay is not None:
        return float(policy.max_delay)
    backoff = policy.backoff
    if isinstance(backoff, Fixed):
        return float(backoff.delay)
    if isinstance(backoff, (Exponential, CeleryBackoff)) and policy.max_attempts is not None:
        return backoff.base_delay(max(policy.max_attempts - 1, 1))
    return math.inf


def _policy_and_catch_all(task: Any) -> tuple[RetryPolicy | None, bool]:
    """The task's retry policy (None if it never retries on its own) and whether it retries everything."""
    if isinstance(task, SafetyTask):
        resolved = options.resolved(task)
        matchers = resolved.rules.retry_on + resolved.rules.default_retry_on
        catch_all = resolved.rules.unclassified == "retry" or any(m in (Exception, BaseException) for m in matchers)
        return resolved.policy, catch_all
    autoretry = tuple(getattr(task, "autoretry_for", ()) or ())
    declared = {name: getattr(task, name) for name in options.CELERY_RETRY_OPTIONS if hasattr(task, name)}
    policy = options.celery_policy(declared, f"task {task.name}")
    return policy, any(klass in (Exception, BaseException) for klass in autoretry)


def _check_claims_database(idempotent: list[str]) -> list[checks.CheckMessage]:
    from django.db import connections

    from safetynet.idempotency import database_for_claims

    alias = database_for_claims()
    vendor = connections[alias].vendor
    if vendor in ("postgresql", "sqlite"):
        return []
    return [checks.Error(
        f"Idempotency claims need PostgreSQL or SQLite (INSERT … ON CONFLICT … RETURNING); database "
        f"{alias!r} is {vendor}. Tasks with idempotency_key: {', '.join(sorted(idempotent)[:5])}.",
        id="safetynet.E003", hint="Route safetynet's IdempotencyClaim model to a PostgreSQL database.",
    )]


def _check_self_calls(name: str, task: Any) -> list[checks.CheckMessage]:
    """W007: the body calls its own task synchronously."""
    return [checks.Warning(
        f"Task {name} calls itself synchronously in its body ({call.filename}:{call.line}: {call.text}): the call "
        "runs inside the same attempt as a plain function, with no new message, no backoff and no limit.",
        obj=name, id="safetynet.W007",
        hint="To try again, raise self.retry(exc=exc) (bind=True) or let the retry policy retry the exception; to "
             "start another task, call .delay(...) or .apply_async(...).",
    ) for call in self_calls(task)]


def _check_limits(name: str, task: Any, declared: dict[str, Any]) -> list[checks.CheckMessage]:
    """E007: the task names a limit nobody declared. E008: it is partitioned by an argument the task does not take."""
    messages: list[checks.CheckMessage] = []
    for limit in limit_names(getattr(task, "limit", None)):
        config = declared.get(limit)
        if config is None:
            known = ", ".join(sorted(declared)) or "none"
            messages.append(checks.Error(
                f"Task {name} names limit {limit!r}, which SAFETYNET['LIMITS'] does not declare (declared: {known}).",
                obj=name, id="safetynet.E007",
                hint=f"Declare it: SAFETYNET['LIMITS'] = {{{limit!r}: {{'concurrency': 5, 'rate': '100/m'}}}}, or fix "
                     "the name.",
            ))
            continue
        by = config.partition_by
        if not isinstance(by, str):
            continue
        try:
            parameters = list(inspect.signature(type(task).run).parameters.values())
        except (TypeError, ValueError):
            continue
        names = {parameter.name for parameter in parameters[1:]}
        if by not in names and not any(parameter.kind is inspect.Parameter.VAR_KEYWORD for parameter in parameters):
            messages.append(checks.Error(
                f"Task {name} goes through limit {limit!r}, partitioned by the argument {by!r}, which the task does "
                f"not take (it takes: {', '.join(sorted(names)) or 'nothing'}).", obj=name, id="safetynet.E008",
                hint="Give the limit a partition_by the task takes, or a callable taking the task's arguments.",
            ))
    return messages


def _broker_visibility_timeout(app: Any) -> float | None:
    scheme = str(app.conf.broker_url or "").split("://", 1)[0].split("+")[0]
    if scheme not in _VISIBILITY_DEFAULTS:
        return None
    return float((app.conf.broker_transport_options or {}).get("visibility_timeout", _VISIBILITY_DEFAULTS[scheme]))


@checks.register("safetynet")
def check_tasks(app_configs: Any = None, **kwargs: Any) -> list[checks.CheckMessage]:
    """E002–E004, E007, E008, W001–W005, W007 over every registered task and the Celery configuration."""
    messages: list[checks.CheckMessage] = []
    try:
        conf.get()
    except (ConfigurationError, ImportError):
        return messages  # E001 says it; resolving tasks would only repeat it
    tasks = user_tasks()
    app = next(iter(tasks.values())).app if tasks else None
    visibility = _broker_visibility_timeout(app) if app is not None else None
    idempotent = [name for name, task in tasks.items() if getattr(task, "_idempotency", None) is not None]
    if idempotent:
        messages.extend(_check_claims_database(idempotent))
    declared_breakers = conf.get().breakers
    for name, task in tasks.items():
        breaker = getattr(task, "breaker", None) if isinstance(task, SafetyTask) else None
        if breaker is not None and breaker not in declared_breakers:
            known = ", ".join(sorted(declared_breakers)) or "none"
            messages.append(checks.Error(
                f"Task {name} goes through breaker {breaker!r}, which SAFETYNET['BREAKERS'] does not declare "
                f"(declared: {known}).", obj=name, id="safetynet.E004",
                hint=f"Declare it: SAFETYNET['BREAKERS'] = {{{breaker!r}: Breaker(...)}}, or fix the name.",
            ))
        if isinstance(task, SafetyTask):
            messages.extend(_check_limits(name, task, conf.get().limits))
        if getattr(task, "acks_late", False) and name not in idempotent:
            messages.append(checks.Warning(
                f"Task {name} acknowledges late (acks_late=True) but declares no idempotency_key: a message "
                "delivered again (worker lost, visibility timeout) runs its effect twice.",
                obj=name, id="safetynet.W005",
                hint="Declare idempotency_key='<operation>-{<argument>}' with @safetynet.task, or, if the task "
                     "is idempotent by itself, add 'safetynet.W005' to SILENCED_SYSTEM_CHECKS.",
            ))
        if isinstance(task, SafetyTask):
            messages.extend(_check_self_calls(name, task))
        try:
            policy, catch_all = _policy_and_catch_all(task)
        except ConfigurationError as error:
            messages.append(checks.Error(str(error), obj=name, id="safetynet.E002",
                                         hint="Fix the task's retry options."))
            continue
        if policy is None:
            continue
        unbounded = policy.max_attempts is None and policy.deadline is None
        if catch_all and unbounded:
            messages.append(checks.Warning(
                f"Task {name} retries on every exception, forever.", obj=name, id="safetynet.W001",
                hint="Retry only what is transient (retry_on=[ConnectionError, http_status(503)]) "
                     "and bound it with max_retries or RetryPolicy(deadline=...).",
            ))
        elif unbounded:
            messages.append(checks.Warning(
                f"Task {name} retries without limit and has no deadline.", obj=name, id="safetynet.W002",
                hint="Set max_retries, or RetryPolicy(max_attempts=None, deadline=<seconds>).",
            ))
        longest = longest_delay(policy)
        durable = conf.get().durable_retry_seconds if isinstance(task, SafetyTask) else None
        if durable is not None and durable <= (visibility or 0.0):
            longest = min(longest, durable)  # longer retries wait in the durable schedule, not in the broker
        if visibility is not None and longest > visibility:
            messages.append(checks.Warning(
                f"Task {name} can wait {longest:g}s before a retry, longer than the broker's "
                f"visibility_timeout of {visibility:g}s: the retry would be delivered twice.",
                obj=name, id="safetynet.W003",
                hint="Lower the retry delay (max_delay / retry_backoff_max / countdown), raise "
                     "broker_transport_options['visibility_timeout'], or (a safetynet task) let long retries "
                     "wait in the durable schedule: SAFETYNET['DURABLE_RETRY_SECONDS'] below the timeout.",
            ))
    if app is not None:
        accepted = {str(item) for item in (app.conf.accept_content or [])}
        serializers = {app.conf.task_serializer, app.conf.result_serializer} | {
            getattr(task, "serializer", None) for task in tasks.values()
        }
        if accepted & _PICKLE or serializers & _PICKLE:
            messages.append(checks.Warning(
                "The pickle serializer is accepted: anyone who can write to the broker can run code in the worker.",
                id="safetynet.W004", hint="Use accept_content=['json'] and task_serializer='json'.",
            ))
    return messages
