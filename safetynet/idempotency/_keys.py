"""Idempotency keys: a template over a task's arguments (or a callable), checked when the task is declared."""

from __future__ import annotations

import inspect
import re
import string
from collections.abc import Callable
from typing import Any

from safetynet.exceptions import ConfigurationError, IdempotencyKeyError

__all__ = ["MAX_KEY_LENGTH", "KeyTemplate", "check_key"]

#: The longest key a claim can hold (the column's size).
MAX_KEY_LENGTH = 255

_FIELD_ROOT = re.compile(r"^[^.\[]*")


class KeyTemplate:
    """A task's ``idempotency_key`` option, checked against the task's parameters when declared."""

    def __init__(self, spec: str | Callable[..., Any], function: Callable[..., Any], *, bound: bool, where: str):
        self.spec = spec
        signature = inspect.signature(function)
        parameters = list(signature.parameters.values())
        if bound and parameters:
            parameters = parameters[1:]
        self.signature = signature.replace(parameters=parameters)
        #: The parameters' names when all are plain positional ones: a call passing each of them
        #: positionally then maps onto them without ``Signature.bind`` (the common case, and cheaper).
        self.positional = tuple(p.name for p in parameters) if all(
            p.kind in (p.POSITIONAL_ONLY, p.POSITIONAL_OR_KEYWORD) for p in parameters
        ) else None
        if callable(spec):
            return
        if not isinstance(spec, str) or not spec.strip():
            raise ConfigurationError(
                f"{where}: idempotency_key must be a template such as 'order-{{order_id}}' or a callable "
                f"taking the task's arguments, got {spec!r}"
            )
        names = {p.name for p in parameters if p.kind not in (p.VAR_POSITIONAL, p.VAR_KEYWORD)}
        open_kwargs = any(p.kind is p.VAR_KEYWORD for p in parameters)
        try:
            fields = [field for _, field, _, _ in string.Formatter().parse(spec) if field is not None]
        except ValueError as error:
            raise ConfigurationError(f"{where}: idempotency_key {spec!r} is not a valid template: {error}") from None
        if not fields:
            raise ConfigurationError(
                f"{where}: idempotency_key {spec!r} names no argument, so every call would share one key; "
                "write it over the arguments that identify the operation, e.g. 'charge-{order_id}'"
            )
        for field in fields:
            root = _FIELD_ROOT.match(field).group(0)  # type: ignore[union-attr]
            if not root or root.isdigit():
                raise ConfigurationError(
                    f"{where}: idempotency_key {spec!r}: name the argument ({{order_id}}), not a position ({{{field}}})"
                )
            if root not in names and not open_kwargs:
                known = ", ".join(sorted(names)) or "none"
                raise ConfigurationError(
                    f"{where}: idempotency_key {spec!r} names {root!r}, which is not an argument of the task "
                    f"(its arguments: {known})"
                )

    def render(self, args: Any, kwargs: Any) -> str:
        """The key for one call; IdempotencyKeyError when the arguments cannot make one."""
        args, kwargs = tuple(args or ()), dict(kwargs or {})
        if callable(self.spec):
            value = self.spec(*args, **kwargs)
            if isinstance(value, int) and not isinstance(value, bool):
                value = str(value)
            if not isinstance(value, str):
                raise IdempotencyKeyError(f"the idempotency_key callable returned {value!r}, not a string")
            key = value
        else:
            if self.positional is not None and not kwargs and len(args) == len(self.positional):
                values = dict(zip(self.positional, args, strict=True))
            else:
                try:
                    bound = self.signature.bind(*args, **kwargs)
                except TypeError as error:
                    raise IdempotencyKeyError(f"cannot make the idempotency key {self.spec!r}: {error}") from None
                bound.apply_defaults()
                values = dict(bound.arguments)
                for parameter in self.signature.parameters.values():
                    if parameter.kind is parameter.VAR_KEYWORD:
                        values.update(values.pop(parameter.name, {}))
            try:
                key = self.spec.format_map(values)
            except (KeyError, AttributeError, IndexError) as error:
                raise IdempotencyKeyError(
                    f"cannot make the idempotency key {self.spec!r} from the arguments: missing {error}"
                ) from None
        return check_key(key)


def check_key(key: str) -> str:
    """``key`` if it can be claimed; IdempotencyKeyError saying what is wrong otherwise."""
    if not key.strip():
        raise IdempotencyKeyError("the idempotency key is empty")
    if len(key) > MAX_KEY_LENGTH:
        raise IdempotencyKeyError(
            f"the idempotency key is {len(key)} characters long; the limit is {MAX_KEY_LENGTH}. "
            f"Build it from identifiers, not payloads (it starts {key[:40]!r})"
        )
    return key

