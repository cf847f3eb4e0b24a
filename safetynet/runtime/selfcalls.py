"""Finding, in a task's source, the places where its body calls its own task synchronously.

``fetch_feed(url)`` or ``self.run(url)`` inside ``fetch_feed`` is a plain function call: it runs
inside the same attempt, with no new message, no backoff and no limit (a loop of them ends in a
``RecursionError``). The runtime makes such a call a plain call and warns once; this module lets
the system checks and ``explain`` point at the line before it runs. It reads the source: what it
cannot see (a call through another name, a helper function) it does not report.
"""

from __future__ import annotations

import ast
import inspect
import textwrap
from dataclasses import dataclass
from typing import Any

__all__ = ["SelfCall", "body_function", "is_bound", "self_calls"]

#: Attributes of the task object that run the body in the calling process.
_SYNCHRONOUS = frozenset({"run", "__call__"})


@dataclass(frozen=True)
class SelfCall:
    """A call of the task by itself: where, and what the source says."""

    filename: str
    line: int
    text: str


def body_function(task: Any) -> Any:
    """The user's function behind a task object (a function, or None when there is none to read)."""
    klass = type(task)
    body = getattr(klass, "_orig_run", None) or klass.__dict__.get("run")
    body = getattr(body, "__func__", body)  # a staticmethod (an unbound task)
    body = getattr(body, "_safetynet_body", body)
    body = getattr(body, "__func__", body)
    return inspect.unwrap(body) if callable(body) else None


def _names_of_the_task(function: Any, task: Any) -> set[str]:
    """Global names in the function's module that are bound to this very task (the decorated name)."""
    names = set()
    candidate = getattr(function, "__name__", None)
    if candidate:
        bound = getattr(function, "__globals__", {}).get(candidate)
        if bound is not None and getattr(bound, "name", None) == task.name:
            names.add(candidate)
    return names


def self_calls(task: Any) -> list[SelfCall]:
    """Where the body of ``task`` calls ``task`` synchronously (``task(...)``, ``task.run(...)``, and for a bound
    task ``self(...)``/``self.run(...)``); empty when the source cannot be read."""
    task = getattr(task, "_get_current_object", lambda: task)()  # shared_task's proxy
    function = body_function(task)
    if function is None:
        return []
    try:
        lines, first = inspect.getsourcelines(function)
        filename = inspect.getsourcefile(function) or "?"
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, IndentationError):
        return []
    definition = next((node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))),
                      None)
    if definition is None:
        return []
    names = _names_of_the_task(function, task)
    parameters = definition.args.posonlyargs + definition.args.args
    bound_name = parameters[0].arg if parameters and is_bound(task) else None
    found = []
    for node in ast.walk(definition):
        if not isinstance(node, ast.Call):
            continue
        callee = node.func
        target = callee.value if isinstance(callee, ast.Attribute) and callee.attr in _SYNCHRONOUS else callee
        if isinstance(target, ast.Name) and (target.id in names or (bound_name is not None and target.id == bound_name)):
            found.append(SelfCall(filename, first + node.lineno - 1, ast.unparse(node)[:120]))
    return sorted(found, key=lambda call: call.line)


def is_bound(task: Any) -> bool:
    """True if the body takes the task as its first argument (``bind=True``, or a class's ``run(self, ...)``)."""
    run = type(task).__dict__.get("_orig_run") or type(task).__dict__.get("run")
    return not isinstance(run, staticmethod)
