"""Project settings: ``settings.SAFETYNET`` merged over typed defaults, cached.

The cache is cleared when Django's ``setting_changed`` fires (``override_settings`` in
tests), and ``version`` moves on so tasks drop what they resolved from the old values.

Every key, its default and its meaning::

    DEFAULT_POLICY        RetryPolicy (or a dict of its fields) for tasks that declare none
    DEFAULT_RETRY_ON      matchers that retry in every task (after the task's own rules)
    DEFAULT_FAIL_ON       matchers that fail at once in every task (after the task's own rules)
    UNCLASSIFIED          "fail" or "retry": what an exception no rule matched does
    HISTORY_MAX_ENTRIES   attempts kept in the message headers (the first and the latest)
    HISTORY_MAX_BYTES     size bound of the attempt history in the headers
    TRACEBACK_MAX_CHARS   each traceback in the history is trimmed to its last N characters
    REDACT_KEYS           argument and dict keys whose values are never stored (case-insensitive)
    REDACT_PATTERNS       regular expressions; a key that matches one is redacted too
    DEAD_LETTER_MAX_ROWS  cap on the dead-letter store; the oldest rows beyond it are evicted, loudly
                          (None: no cap)
    DEAD_LETTER_MAX_MESSAGE_CHARS    a dead letter keeps at most this many characters of the exception message,
                          the detail and each attempt's message (a marked, cut copy with the size and sha256 beyond)
    DEAD_LETTER_MAX_TRACEBACK_CHARS  … of the traceback and each attempt's traceback (its end is kept)
    DEAD_LETTER_MAX_ARGUMENT_BYTES   each positional argument and keyword argument value, as JSON; a larger one
                          is replaced by a marker object (size, sha256, the start of its JSON)
    DEAD_LETTER_MAX_ARGUMENTS_TOTAL_BYTES  the arguments as a whole (the largest are replaced by markers first)
    DEAD_LETTER_MAX_HEADERS_BYTES    the kept headers as a whole, as JSON
    SPOOL_FLUSH_SECONDS   how often each worker moves spooled dead letters into the database
    SPOOL_DIR             where dead letters wait when the database is down: an absolute path to a folder only
                          the workers' user can write (None: a private folder of that user, e.g.
                          ~/.local/state/safetynet/spool; see safetynet/deadletter/_spool_folder.py)
    ALERT_MAIL_ADMINS     mail the ADMINS about a new dead letter
    ALERT_RATE_LIMIT      at most one alert per fingerprint in this many seconds (through Django's cache)
    ALERT_HOOKS           callables (or dotted paths) called with each new DeadLetter, e.g. a webhook
    PROMETHEUS_WORKER_PORT  serve the metrics from each worker's main process on this port (None: no server,
                          0: any free port); the environment variable SAFETYNET_PROMETHEUS_WORKER_PORT wins
    PROMETHEUS_WORKER_ADDRESS  the address that server listens on
    REDIS_URL             Redis for counters every worker shares (delivery counts, enqueue uniqueness);
                          None: the Celery broker when it is Redis, else the database; "": always the database
    MAX_DELIVERIES        a task that kills its worker this many times is dead-lettered as crash_loop
    TIME_LIMIT_RETRIES    how many times a task killed by its hard time limit is run again (the policy
                          permitting) before it is dead-lettered as time_limit; None: the policy alone
    IDEMPOTENCY_LEASE_SECONDS  how long a claim outlives its last heartbeat (renewed every third of it)
    LOST_MESSAGE_SECONDS  an idempotent task not started this long after it was due (or whose claim
                          expired with no run taking it over) is sent again by the relay; also how long
                          a relayed message may wait for a worker before it is sent again; None:
                          idempotent tasks are not kept when sent, nothing is sent again
    DURABLE_RETRY_SECONDS a retry delayed at least this long waits in the database (the durable schedule)
                          instead of in a worker's memory as an ETA message; None: every retry is an ETA message
    ENQUEUE               how delay()/apply_async() send a safetynet task: "now" (Celery's way), "on_commit"
                          (after the caller's transaction commits) or "outbox" (written in that transaction,
                          published by the relay once it commits); a task's enqueue= option wins
    RELAY_IN_WORKERS      every worker runs a relay thread that publishes due scheduled and outbox messages
                          (False: run ``manage.py safetynet relay`` yourself)
    RELAY_POLL_SECONDS    how often a relay looks for due messages (a due message waits at most about this long)
    SCHEDULE_KEEP_SECONDS how long a published message's row is kept, to drop a late second copy of it
    BREAKERS              circuit breakers by name: {"smtp": Breaker(...) or a dict of its fields}
    LIMITS                limits on the calls to an upstream, by name: {"partner-api": {"concurrency": 5, "rate": "100/m",
                          "partition_by": "customer_id"}} (a Limit(...) or a dict of its fields); see docs/limits.md
    LIMIT_LEASE_SECONDS   a concurrency slot outlives its worker's last heartbeat this long (renewed every third of
                          it): a worker killed while holding slots frees them within this time
    RETRY_BUDGET          retries through a breaker: {"ratio": 0.2, "min_retries": 3, "window": 60} of its first
                          attempts; past it a retry waits longer. None: no budget
    STATS                 count runs, retries and deaths per task and minute for the dashboard (False: count nothing)
    STATS_FLUSH_SECONDS   how often each process adds its counts to the database (one batch, not a write per task)
    STATS_MINUTE_KEEP_SECONDS  how long per-minute rows are kept (the 1 h window reads them)
    STATS_HOUR_KEEP_SECONDS    how long per-hour rows are kept (the 24 h and 7 d windows read them)
    PROGRESS_ACCESS       a callable (or dotted path) (request, progress) -> bool: who may read a task's progress;
                          None: its owner, and staff with the safetynet.view_taskprogress permission
    PROGRESS_ERROR_MESSAGE  what a user is shown when a task failed and its exception has no public_message
    PROGRESS_MIN_INTERVAL how often at most self.progress() writes (seconds; the last call of a run always lands)
    PROGRESS_KEEP_SECONDS how long progress rows are kept after their last change
    DASHBOARD_SITE_URL    where the dashboard's "Site" link goes (default "/")
    TASK_RESULTS_KEEP_SECONDS  how long the results of django.tasks tasks (TaskRecord rows) are kept after their
                          last change
"""

from __future__ import annotations

import difflib
import re
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from django.core.signals import setting_changed

from safetynet.core.classify import Matcher, http_status, is_network_error
from safetynet.core.policy import Exponential, RetryPolicy
from safetynet.core.limits import Limit
from safetynet.exceptions import ConfigurationError
from safetynet.conf._values import (  # noqa: F401  (the readers build() uses)
    _boolean, _breakers, _callables, _limits, _matchers, _optional_callable, _optional_string, _patterns, _port,
    _positive_int, _retry_budget, _seconds, _size, _spool_dir, _strings, _text, _time_limit_retries,
)

__all__ = ["DEFAULTS", "ENQUEUE_MODES", "Settings", "get", "version"]

DEFAULTS: dict[str, Any] = {
    "DEFAULT_POLICY": RetryPolicy(max_attempts=5, backoff=Exponential(1.0, 2.0), jitter="full", max_delay=600.0),
    "DEFAULT_RETRY_ON": (
        is_network_error,
        http_status(408, 425, 429, 500, 502, 503, 504),
        # Time limits are transient by default: the next attempt may be faster (declare them in
        # a task's fail_on to dead-letter at once).
        "celery.exceptions.SoftTimeLimitExceeded",
        "celery.exceptions.TimeLimitExceeded",
    ),
    "DEFAULT_FAIL_ON": (),
    "UNCLASSIFIED": "fail",
    "HISTORY_MAX_ENTRIES": 20,
    "HISTORY_MAX_BYTES": 16_384,
    "TRACEBACK_MAX_CHARS": 2_000,
    "REDACT_KEYS": (
        "password", "passwd", "secret", "token", "api_key", "apikey", "authorization", "card_token",
        "card_number", "cvv", "cvc", "ssn",
    ),
    "REDACT_PATTERNS": (r"(^|_)(password|secret|token)$",),
    "DEAD_LETTER_MAX_ROWS": 100_000,
    "DEAD_LETTER_MAX_MESSAGE_CHARS": 10_000,
    "DEAD_LETTER_MAX_TRACEBACK_CHARS": 20_000,
    "DEAD_LETTER_MAX_ARGUMENT_BYTES": 65_536,
    "DEAD_LETTER_MAX_ARGUMENTS_TOTAL_BYTES": 262_144,
    "DEAD_LETTER_MAX_HEADERS_BYTES": 65_536,
    "SPOOL_DIR": None,
    "SPOOL_FLUSH_SECONDS": 30,
    "ALERT_MAIL_ADMINS": True,
    "ALERT_RATE_LIMIT": 3600,
    "ALERT_HOOKS": (),
    "PROMETHEUS_WORKER_PORT": None,
    "PROMETHEUS_WORKER_ADDRESS": "0.0.0.0",
    "REDIS_URL": None,
    "MAX_DELIVERIES": 3,
    "TIME_LIMIT_RETRIES": 1,
    "IDEMPOTENCY_LEASE_SECONDS": 30,
    "LOST_MESSAGE_SECONDS": 900,
    "DURABLE_RETRY_SECONDS": 5.0,
    "ENQUEUE": "now",
    "RELAY_IN_WORKERS": True,
    "RELAY_POLL_SECONDS": 0.5,
    "SCHEDULE_KEEP_SECONDS": 86_400,
    "BREAKERS": {},
    "LIMITS": {},
    "LIMIT_LEASE_SECONDS": 30.0,
    "RETRY_BUDGET": {"ratio": 0.2, "min_retries": 3, "window": 60},
    "STATS": True,
    "STATS_FLUSH_SECONDS": 10.0,
    "STATS_MINUTE_KEEP_SECONDS": 2 * 86_400,
    "STATS_HOUR_KEEP_SECONDS": 90 * 86_400,
    "PROGRESS_ACCESS": None,
    "PROGRESS_ERROR_MESSAGE": "Sorry, this did not work. The team has been told.",
    "DASHBOARD_SITE_URL": "/",
    "PROGRESS_MIN_INTERVAL": 0.5,
    "PROGRESS_KEEP_SECONDS": 7 * 86_400,
    "TASK_RESULTS_KEEP_SECONDS": 7 * 86_400,
}

#: How ``delay()``/``apply_async()`` can send a task (the ``ENQUEUE`` setting, the ``enqueue`` option).
ENQUEUE_MODES = ("now", "on_commit", "outbox")


@dataclass(frozen=True)
class Settings:
    """The validated project settings."""

    default_policy: RetryPolicy
    default_retry_on: tuple[Matcher, ...]
    default_fail_on: tuple[Matcher, ...]
    unclassified: str
    history_max_entries: int
    history_max_bytes: int
    traceback_max_chars: int
    redact_keys: frozenset[str]
    redact_patterns: tuple[re.Pattern[str], ...]
    dead_letter_max_rows: int | None
    dead_letter_max_message_chars: int
    dead_letter_max_traceback_chars: int
    dead_letter_max_argument_bytes: int
    dead_letter_max_arguments_total_bytes: int
    dead_letter_max_headers_bytes: int
    spool_dir: str | None
    spool_flush_seconds: int
    alert_mail_admins: bool
    alert_rate_limit: int
    alert_hooks: tuple[Callable[..., Any], ...]
    prometheus_worker_port: int | None
    prometheus_worker_address: str
    redis_url: str | None
    max_deliveries: int
    time_limit_retries: int | None
    idempotency_lease_seconds: float
    lost_message_seconds: float | None
    durable_retry_seconds: float | None
    enqueue: str
    relay_in_workers: bool
    relay_poll_seconds: float
    schedule_keep_seconds: float
    breakers: dict[str, Any]
    limits: dict[str, Limit]
    limit_lease_seconds: float
    retry_budget: Any
    stats: bool
    stats_flush_seconds: float
    stats_minute_keep_seconds: float
    stats_hour_keep_seconds: float
    progress_access: Callable[..., bool] | None
    progress_error_message: str
    dashboard_site_url: str
    progress_min_interval: float
    progress_keep_seconds: float
    task_results_keep_seconds: float


_cached: Settings | None = None
_version = 0


def version() -> int:
    """A number that changes whenever the settings may have changed."""
    return _version


def _user_settings() -> dict[str, Any]:
    from django.conf import settings as django_settings

    if not django_settings.configured:
        return {}
    value = getattr(django_settings, "SAFETYNET", {}) or {}
    if not isinstance(value, dict):
        raise ConfigurationError(f"settings.SAFETYNET must be a dict, got {type(value).__name__}")
    return value


def build(user: dict[str, Any]) -> Settings:
    """Validate ``user`` (a SAFETYNET dict) over the defaults; raise ConfigurationError if wrong."""
    unknown = sorted(set(user) - set(DEFAULTS))
    if unknown:
        name = unknown[0]
        close = difflib.get_close_matches(name, DEFAULTS, n=1)
        hint = f" Did you mean {close[0]!r}?" if close else f" Known keys: {', '.join(sorted(DEFAULTS))}."
        raise ConfigurationError(f"Unknown SAFETYNET setting {name!r}.{hint}")
    merged = {**DEFAULTS, **user}
    policy = merged["DEFAULT_POLICY"]
    if isinstance(policy, dict):
        try:
            policy = RetryPolicy(**policy)
        except TypeError as error:
            raise ConfigurationError(f"SAFETYNET['DEFAULT_POLICY']: {error}") from None
    if not isinstance(policy, RetryPolicy):
        raise ConfigurationError(
            f"SAFETYNET['DEFAULT_POLICY'] must be a RetryPolicy or a dict of its fields, got {policy!r}"
        )
    if merged["ENQUEUE"] not in ENQUEUE_MODES:
        raise ConfigurationError(
            f"SAFETYNET['ENQUEUE'] must be one of {', '.join(map(repr, ENQUEUE_MODES))}, got {merged['ENQUEUE']!r}"
        )
    if merged["UNCLASSIFIED"] not in ("retry", "fail"):
        raise ConfigurationError(f"SAFETYNET['UNCLASSIFIED'] must be 'retry' or 'fail', got {merged['UNCLASSIFIED']!r}")
    argument_bytes = _size("DEAD_LETTER_MAX_ARGUMENT_BYTES", merged["DEAD_LETTER_MAX_ARGUMENT_BYTES"], 1024)
    total_bytes = _size("DEAD_LETTER_MAX_ARGUMENTS_TOTAL_BYTES", merged["DEAD_LETTER_MAX_ARGUMENTS_TOTAL_BYTES"], 1024)
    if total_bytes < argument_bytes:
        raise ConfigurationError(
            f"SAFETYNET['DEAD_LETTER_MAX_ARGUMENTS_TOTAL_BYTES'] ({total_bytes}) must be at least "
            f"DEAD_LETTER_MAX_ARGUMENT_BYTES ({argument_bytes}): the arguments as a whole hold at least one argument"
        )
    settings = Settings(
        default_policy=policy,
        default_retry_on=_matchers("DEFAULT_RETRY_ON", merged["DEFAULT_RETRY_ON"]),
        default_fail_on=_matchers("DEFAULT_FAIL_ON", merged["DEFAULT_FAIL_ON"]),
        unclassified=merged["UNCLASSIFIED"],
        history_max_entries=_positive_int("HISTORY_MAX_ENTRIES", merged["HISTORY_MAX_ENTRIES"]),
        history_max_bytes=_positive_int("HISTORY_MAX_BYTES", merged["HISTORY_MAX_BYTES"]),
        traceback_max_chars=_positive_int("TRACEBACK_MAX_CHARS", merged["TRACEBACK_MAX_CHARS"]),
        redact_keys=frozenset(str(key).lower() for key in _strings("REDACT_KEYS", merged["REDACT_KEYS"])),
        redact_patterns=_patterns(merged["REDACT_PATTERNS"]),
        dead_letter_max_rows=(None if merged["DEAD_LETTER_MAX_ROWS"] is None
                              else _positive_int("DEAD_LETTER_MAX_ROWS", merged["DEAD_LETTER_MAX_ROWS"])),
        dead_letter_max_message_chars=_size("DEAD_LETTER_MAX_MESSAGE_CHARS", merged["DEAD_LETTER_MAX_MESSAGE_CHARS"],
                                            200),
        dead_letter_max_traceback_chars=_size("DEAD_LETTER_MAX_TRACEBACK_CHARS",
                                              merged["DEAD_LETTER_MAX_TRACEBACK_CHARS"], 200),
        dead_letter_max_argument_bytes=argument_bytes,
        dead_letter_max_arguments_total_bytes=total_bytes,
        dead_letter_max_headers_bytes=_size("DEAD_LETTER_MAX_HEADERS_BYTES", merged["DEAD_LETTER_MAX_HEADERS_BYTES"],
                                            1024),
        spool_dir=_spool_dir(merged["SPOOL_DIR"]),
        spool_flush_seconds=_positive_int("SPOOL_FLUSH_SECONDS", merged["SPOOL_FLUSH_SECONDS"]),
        alert_mail_admins=_boolean("ALERT_MAIL_ADMINS", merged["ALERT_MAIL_ADMINS"]),
        alert_rate_limit=_positive_int("ALERT_RATE_LIMIT", merged["ALERT_RATE_LIMIT"]),
        alert_hooks=_callables("ALERT_HOOKS", merged["ALERT_HOOKS"]),
        prometheus_worker_port=_port("PROMETHEUS_WORKER_PORT", merged["PROMETHEUS_WORKER_PORT"]),
        prometheus_worker_address=str(merged["PROMETHEUS_WORKER_ADDRESS"]),
        redis_url=_optional_string("REDIS_URL", merged["REDIS_URL"]),
        max_deliveries=_positive_int("MAX_DELIVERIES", merged["MAX_DELIVERIES"]),
        time_limit_retries=_time_limit_retries("TIME_LIMIT_RETRIES", merged["TIME_LIMIT_RETRIES"]),
        idempotency_lease_seconds=_seconds("IDEMPOTENCY_LEASE_SECONDS", merged["IDEMPOTENCY_LEASE_SECONDS"], 1, 86_400),
        lost_message_seconds=(None if merged["LOST_MESSAGE_SECONDS"] is None
                              else _seconds("LOST_MESSAGE_SECONDS", merged["LOST_MESSAGE_SECONDS"], 1, 86_400)),
        durable_retry_seconds=(None if merged["DURABLE_RETRY_SECONDS"] is None
                               else _seconds("DURABLE_RETRY_SECONDS", merged["DURABLE_RETRY_SECONDS"], 0, 86_400)),
        enqueue=merged["ENQUEUE"],
        relay_in_workers=_boolean("RELAY_IN_WORKERS", merged["RELAY_IN_WORKERS"]),
        relay_poll_seconds=_seconds("RELAY_POLL_SECONDS", merged["RELAY_POLL_SECONDS"], 0.05, 60),
        schedule_keep_seconds=_seconds("SCHEDULE_KEEP_SECONDS", merged["SCHEDULE_KEEP_SECONDS"], 60, 90 * 86_400),
        breakers=_breakers(merged["BREAKERS"]),
        limits=_limits(merged["LIMITS"]),
        limit_lease_seconds=_seconds("LIMIT_LEASE_SECONDS", merged["LIMIT_LEASE_SECONDS"], 1, 3600),
        retry_budget=_retry_budget(merged["RETRY_BUDGET"]),
        stats=_boolean("STATS", merged["STATS"]),
        stats_flush_seconds=_seconds("STATS_FLUSH_SECONDS", merged["STATS_FLUSH_SECONDS"], 0.1, 3600),
        stats_minute_keep_seconds=_seconds("STATS_MINUTE_KEEP_SECONDS", merged["STATS_MINUTE_KEEP_SECONDS"],
                                           3600, 90 * 86_400),
        stats_hour_keep_seconds=_seconds("STATS_HOUR_KEEP_SECONDS", merged["STATS_HOUR_KEEP_SECONDS"],
                                         86_400, 3660 * 86_400),
        progress_access=_optional_callable("PROGRESS_ACCESS", merged["PROGRESS_ACCESS"]),
        progress_error_message=_text("PROGRESS_ERROR_MESSAGE", merged["PROGRESS_ERROR_MESSAGE"], 500),
        dashboard_site_url=_text("DASHBOARD_SITE_URL", merged["DASHBOARD_SITE_URL"], 2000),
        progress_min_interval=_seconds("PROGRESS_MIN_INTERVAL", merged["PROGRESS_MIN_INTERVAL"], 0, 3600),
        progress_keep_seconds=_seconds("PROGRESS_KEEP_SECONDS", merged["PROGRESS_KEEP_SECONDS"], 60, 3660 * 86_400),
        task_results_keep_seconds=_seconds("TASK_RESULTS_KEEP_SECONDS", merged["TASK_RESULTS_KEEP_SECONDS"], 60,
                                           3660 * 86_400),
    )
    if settings.lost_message_seconds is not None and settings.schedule_keep_seconds <= settings.lost_message_seconds:
        raise ConfigurationError(
            f"SAFETYNET['SCHEDULE_KEEP_SECONDS'] ({settings.schedule_keep_seconds:g}) must be longer than "
            f"LOST_MESSAGE_SECONDS ({settings.lost_message_seconds:g}): a message's row must outlive the time a copy "
            "of it may still arrive, or a late second copy is not recognised and runs again. Raise "
            "SCHEDULE_KEEP_SECONDS (one day by default) or lower LOST_MESSAGE_SECONDS."
        )
    return settings


def get() -> Settings:
    """The current settings, validated once and cached."""
    global _cached
    if _cached is None:
        _cached = build(_user_settings())
    return _cached


def reset(**_: Any) -> None:
    """Forget the cached settings (connected to ``setting_changed``)."""
    global _cached, _version
    _cached = None
    _version += 1


def _on_setting_changed(*, setting: str, **kwargs: Any) -> None:
    if setting == "SAFETYNET":
        reset()


setting_changed.connect(_on_setting_changed, dispatch_uid="safetynet.conf")
