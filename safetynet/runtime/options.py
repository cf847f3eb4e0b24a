"""The task options safetynet understands, validated at decoration time, resolved in one place.

Precedence, read only here: what the task declares wins over the project defaults in
``settings.SAFETYNET``. Celery's own retry options keep their meaning: a task that declares
any of them gets ``RetryPolicy.from_celery(...)``; a task that declares ``retry_policy``
gets exactly that; a task that declares neither gets ``SAFETYNET['DEFAULT_POLICY']``.
"""

from __future__ import annotations

import difflib
import inspect
from collections.abc import Mapping
from dataclasses import dataclass
from typing import Any

import celery

from safetynet import conf
from safetynet.core.classify import Matcher, Rules, as_matchers
from safetynet.core.policy import RetryPolicy
from safetynet.exceptions import ConfigurationError
from safetynet.runtime.plugins import PLUGINS

__all__ = ["CELERY_RETRY_OPTIONS", "SAFETYNET_OPTIONS", "KeyOption", "Resolved", "check_known", "declared",
           "resolve", "resolved", "validate"]

#: Options the runtime reads itself.
RUNTIME_OPTIONS = frozenset({"retry_policy", "retry_on", "fail_on", "max_deliveries", "time_limit_retries",
                             "enqueue"})

#: Options safetynet adds to a task: the runtime's and its plug-ins'.
SAFETYNET_OPTIONS = RUNTIME_OPTIONS.union(*(plugin.options for plugin in PLUGINS))

#: Celery's own options about retrying; declaring any of them means "Celery semantics".
CELERY_RETRY_OPTIONS = frozenset(
    {"max_retries", "default_retry_delay", "autoretry_for", "dont_autoretry_for", "retry_kwargs",
     "retry_backoff", "retry_backoff_max", "retry_jitter"}
)

# The Celery options that say how many attempts and how long to wait; dont_autoretry_for
# only classifies, so declaring it alone keeps the project's default policy.
_CELERY_POLICY_OPTIONS = CELERY_RETRY_OPTIONS - {"dont_autoretry_for"}

# Everything Celery's task decorator accepts: the public attributes of its Task class (they
# vary a little between Celery versions, so they are read, not listed), the options
# apply_async reads from the task, and the decorator's own arguments.
_CELERY_OPTIONS = frozenset(
    {name for name, value in vars(celery.Task).items()
     if not name.startswith("_") and not inspect.isfunction(value) and not isinstance(value, property)}
    | {"queue", "routing_key", "exchange", "exchange_type", "delivery_mode", "compression", "immediate",
       "mandatory", "bind", "base", "name", "shared", "lazy", "filter", "typing", "pydantic", "pydantic_strict",
       "pydantic_context", "pydantic_dump_kwargs", "acks_on_failure_or_timeout"}
    | CELERY_RETRY_OPTIONS
)
KNOWN_OPTIONS = _CELERY_OPTIONS | SAFETYNET_OPTIONS

#: Attributes safetynet gives a task instance; an option of the same name would hide them.
_RESERVED = frozenset({"policy", "attempt", "rules"})

# What Celery's decorator writes into the class it builds, besides the options.
_DECORATOR_KEYS = frozenset(
    {"app", "name", "run", "_decorated", "_dump_pydantic_arguments", "__doc__", "__module__", "__annotations__",
     "__header__", "__wrapped__", "_decorated_fun", "__qualname__", "__dict__", "__weakref__"}
)


def check_known(options: Mapping[str, Any], where: str) -> None:
    """Reject an option no part of safetynet or Celery understands, suggesting the closest one."""
    for name in options:
        if name in _RESERVED:
            raise ConfigurationError(
                f"{where}: {name!r} is not an option: safetynet sets task.{name} itself. "
                "Declare a policy with retry_policy=RetryPolicy(...)."
            )
        if name not in KNOWN_OPTIONS and not name.startswith("_"):
            close = difflib.get_close_matches(name, sorted(KNOWN_OPTIONS), n=3, cutoff=0.6)
            hint = f" Did you mean {' or '.join(map(repr, close))}?" if close else ""
            raise ConfigurationError(f"{where}: unknown task option {name!r}.{hint}")


def validate(options: Mapping[str, Any], where: str) -> None:
    """Check the values of the options safetynet reads; raise ConfigurationError naming the field.

    The retry options are checked here; each plug-in checks its own (``Plugin.validate``).
    """
    policy = options.get("retry_policy")
    if policy is not None and not isinstance(policy, RetryPolicy):
        raise ConfigurationError(f"{where}: retry_policy must be a safetynet.RetryPolicy, got {policy!r}")
    if policy is not None:
        clash = sorted({"max_retries", "retry_backoff", "retry_backoff_max", "retry_jitter", "default_retry_delay",
                        "retry_kwargs"} & set(options))
        if clash:
            raise ConfigurationError(
                f"{where}: give either retry_policy or Celery's {', '.join(clash)}, not both: "
                "retry_policy=RetryPolicy(...) already says how many attempts and how long to wait."
            )
    value = options.get("max_deliveries")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 1):
        raise ConfigurationError(f"{where}: max_deliveries must be a whole number >= 1, got {value!r}")
    value = options.get("time_limit_retries")
    if value is not None and (isinstance(value, bool) or not isinstance(value, int) or value < 0):
        raise ConfigurationError(f"{where}: time_limit_retries must be a whole number >= 0, got {value!r}")
    mode = options.get("enqueue")
    if mode is not None and mode not in conf.ENQUEUE_MODES:
        raise ConfigurationError(
            f"{where}: enqueue must be one of {', '.join(map(repr, conf.ENQUEUE_MODES))}, got {mode!r}"
        )
    for name in ("retry_on", "fail_on"):
        if name in options:
            as_matchers(options[name], name=f"{where}: {name}")
    for name in ("autoretry_for", "dont_autoretry_for"):
        value = options.get(name)
        if value:
            if not isinstance(value, (tuple, list)) or not all(
                isinstance(item, type) and issubclass(item, BaseException) for item in value
            ):
                raise ConfigurationError(f"{where}: {name} must be a tuple of exception classes, got {value!r}")
    if any(name in options for name in ("max_retries", "retry_backoff", "retry_backoff_max", "retry_jitter",
                                        "default_retry_delay", "retry_kwargs")):
        celery_policy(options, where)
    for plugin in PLUGINS:
        plugin.validate(options, where)


def celery_policy(options: Mapping[str, Any], where: str) -> RetryPolicy:
    """``RetryPolicy.from_celery`` over the given options and Celery's defaults."""
    retry_kwargs = options.get("retry_kwargs") or {}
    if not isinstance(retry_kwargs, Mapping):
        raise ConfigurationError(f"{where}: retry_kwargs must be a dict, got {retry_kwargs!r}")
    delay = retry_kwargs.get("countdown", options.get("default_retry_delay", celery.Task.default_retry_delay))
    try:
        return RetryPolicy.from_celery(
            max_retries=retry_kwargs.get("max_retries", options.get("max_retries", celery.Task.max_retries)),
            retry_backoff=options.get("retry_backoff", False),
            retry_backoff_max=options.get("retry_backoff_max", 600),
            retry_jitter=options.get("retry_jitter", True),
            default_retry_delay=delay,
        )
    except ConfigurationError as error:
        raise ConfigurationError(f"{where}: {error}") from None


class KeyOption:
    """Where a task class keeps its ``idempotency_key`` option: the class reads the option,
    an instance reads the key of the running call (``self.idempotency_key``)."""

    def __init__(self, spec: Any) -> None:
        self.spec = spec

    def __get__(self, instance: Any, owner: type) -> Any:
        if instance is None:
            return self.spec
        return instance._current_idempotency_key()


def _below_base(klass: type) -> list[type]:
    """``klass`` and its ancestors up to (not including) the safetynet base class, ``SafetyTask``."""
    found = []
    for ancestor in klass.__mro__:
        if "_safetynet_base" in vars(ancestor):
            break
        found.append(ancestor)
    return found


def declared(klass: type) -> dict[str, Any]:
    """The options a task class declares itself or inherits from classes between it and ``SafetyTask``
    (a user's ``base=`` class among them)."""
    found: dict[str, Any] = {}
    for ancestor in reversed(_below_base(klass)):
        for name, value in vars(ancestor).items():
            if name in KNOWN_OPTIONS:
                found[name] = value.spec if isinstance(value, KeyOption) else value
    return found


def decorated_options(klass: type) -> dict[str, Any]:
    """The options Celery's decorator copied into ``klass`` (for the unknown-option check)."""
    return {name: value for name, value in vars(klass).items() if name not in _DECORATOR_KEYS}


@dataclass(frozen=True)
class Resolved:
    """A task's effective policy and rules, and whether the policy was declared with retry_policy."""

    policy: RetryPolicy
    rules: Rules
    explicit_policy: bool
    version: int


def resolved(task: Any) -> Resolved:
    """``task``'s policy and rules under the current settings (resolved once per task and settings)."""
    found = task.__dict__.get("_safetynet_resolved")
    if found is None or found.version != conf.version():
        found = task.__dict__["_safetynet_resolved"] = resolve(task)
    return found  # type: ignore[no-any-return]


def resolve(task: celery.Task[Any, Any]) -> Resolved:
    """Read a task's options over the project defaults: the one place precedence lives."""
    settings = conf.get()
    options = declared(type(task))
    retry_on: tuple[Matcher, ...] = as_matchers(options.get("retry_on"), name="retry_on") + tuple(
        options.get("autoretry_for") or ()
    )
    fail_on: tuple[Matcher, ...] = as_matchers(options.get("fail_on"), name="fail_on") + tuple(
        options.get("dont_autoretry_for") or ()
    )
    rules = Rules(
        retry_on=retry_on,
        fail_on=fail_on,
        default_retry_on=settings.default_retry_on,
        default_fail_on=settings.default_fail_on,
        unclassified=settings.unclassified,  # type: ignore[arg-type]
    )
    if options.get("retry_policy") is not None:
        policy, explicit = options["retry_policy"], True
    elif _CELERY_POLICY_OPTIONS & set(options):
        policy, explicit = celery_policy(options, task.name), False
    else:
        policy, explicit = settings.default_policy, False
    return Resolved(policy=policy, rules=rules, explicit_policy=explicit, version=conf.version())
