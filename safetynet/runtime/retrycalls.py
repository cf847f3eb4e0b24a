"""Reading, in a task's source, its explicit ``self.retry(...)`` calls: the waits and limits they ask for.

``explain`` shows the schedule a task follows; a task that catches an exception and calls
``raise self.retry(exc=exc, countdown=5)`` follows that call's ``countdown`` and ``max_retries``, not the automatic
schedule. This module finds those calls and reads their arguments when they are numbers written in the source
(or module-level names bound to numbers, or simple arithmetic of those); what it cannot read (a value computed at
run time, ``eta=``, ``**options``) it names, so ``explain`` can say so instead of guessing.
"""

from __future__ import annotations

import ast
import inspect
import operator
import textwrap
from collections.abc import Callable, Mapping
from dataclasses import dataclass, field
from typing import Any

from safetynet.runtime.selfcalls import body_function, is_bound

__all__ = ["RetryCall", "SourceUnreadable", "retry_calls"]

_OPERATORS: dict[type[ast.operator], Callable[[Any, Any], Any]] = {
    ast.Add: operator.add, ast.Sub: operator.sub, ast.Mult: operator.mul, ast.Div: operator.truediv,
    ast.FloorDiv: operator.floordiv, ast.Pow: operator.pow,
}


class SourceUnreadable(Exception):
    """The task's source cannot be read (no file, a C function, a lambda)."""


class _NotLiteral(Exception):
    pass


@dataclass(frozen=True)
class RetryCall:
    """One ``self.retry(...)`` call in a task's body.

    ``countdown`` and ``max_retries`` are the values read (None: not given, so the task's own apply);
    ``unread`` names each argument given that could not be read, as the source writes it; ``catches`` are the
    exception types of the ``except`` clause around the call (empty when it is not inside one).
    """

    filename: str
    line: int
    text: str
    countdown: float | None = None
    max_retries: int | None = None
    unread: tuple[str, ...] = field(default=())
    catches: tuple[str, ...] = field(default=())


def _value(node: ast.expr, names: Mapping[str, Any]) -> Any:
    """A number written in the source: a constant, a module-level name bound to one, or arithmetic of those."""
    if isinstance(node, ast.Constant) and (node.value is None or
                                           (isinstance(node.value, (int, float)) and not isinstance(node.value, bool))):
        return node.value
    if isinstance(node, ast.Name):
        value = names.get(node.id, _NotLiteral)
        if value is None or (isinstance(value, (int, float)) and not isinstance(value, bool)):
            return value
    if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
        operand = _value(node.operand, names)
        if isinstance(operand, (int, float)):
            return -operand if isinstance(node.op, ast.USub) else operand
    if isinstance(node, ast.BinOp) and type(node.op) in _OPERATORS:
        left, right = _value(node.left, names), _value(node.right, names)
        if isinstance(left, (int, float)) and isinstance(right, (int, float)):
            try:
                return _OPERATORS[type(node.op)](left, right)
            except (ArithmeticError, ValueError):
                pass
    raise _NotLiteral


def _enclosing_handlers(tree: ast.AST) -> dict[int, ast.ExceptHandler]:
    """For each node inside an ``except`` clause, the innermost clause (by ``id`` of the node)."""
    found: dict[int, ast.ExceptHandler] = {}

    def visit(node: ast.AST, handler: ast.ExceptHandler | None) -> None:
        if isinstance(node, ast.ExceptHandler):
            handler = node
        if handler is not None:
            found[id(node)] = handler
        for child in ast.iter_child_nodes(node):
            visit(child, handler)

    visit(tree, None)
    return found


def _caught(handler: ast.ExceptHandler | None) -> tuple[str, ...]:
    if handler is None:
        return ()
    if handler.type is None:
        return ("any exception",)
    types = handler.type.elts if isinstance(handler.type, ast.Tuple) else [handler.type]
    return tuple(ast.unparse(kind) for kind in types)


def retry_calls(task: Any) -> list[RetryCall]:
    """The ``self.retry(...)`` calls in ``task``'s body (for a bound task), in source order; empty for a task that
    makes none. Raises ``SourceUnreadable`` when the source cannot be read."""
    task = getattr(task, "_get_current_object", lambda: task)()  # shared_task's proxy
    function = body_function(task)
    if function is None:
        raise SourceUnreadable(f"{getattr(task, 'name', task)} has no Python function to read")
    try:
        lines, first = inspect.getsourcelines(function)
        filename = inspect.getsourcefile(function) or "?"
        tree = ast.parse(textwrap.dedent("".join(lines)))
    except (OSError, TypeError, SyntaxError, IndentationError) as error:
        raise SourceUnreadable(f"the source of {getattr(task, 'name', task)} cannot be read ({error})") from None
    definition = next((node for node in ast.walk(tree) if isinstance(node, (ast.FunctionDef, ast.AsyncFunctionDef))),
                      None)
    parameters = (definition.args.posonlyargs + definition.args.args) if definition is not None else []
    if definition is None or not parameters or not is_bound(task):
        return []  # an unbound task has no self to call retry on
    bound_name = parameters[0].arg
    names = getattr(function, "__globals__", {})
    handlers = _enclosing_handlers(definition)
    found = []
    for node in ast.walk(definition):
        if not (isinstance(node, ast.Call) and isinstance(node.func, ast.Attribute) and node.func.attr == "retry"
                and isinstance(node.func.value, ast.Name) and node.func.value.id == bound_name):
            continue
        read: dict[str, Any] = {}
        unread = [f"{len(node.args)} positional argument(s)"] if len(node.args) > 3 else []
        for keyword in node.keywords:
            if keyword.arg is None:
                unread.append(f"**{ast.unparse(keyword.value)}")
            elif keyword.arg in ("countdown", "max_retries"):
                try:
                    read[keyword.arg] = _value(keyword.value, names)
                except _NotLiteral:
                    unread.append(f"{keyword.arg}={ast.unparse(keyword.value)}")
            elif keyword.arg == "eta":
                unread.append(f"eta={ast.unparse(keyword.value)}")
        countdown, max_retries = read.get("countdown"), read.get("max_retries")
        found.append(RetryCall(
            filename=filename, line=first + node.lineno - 1, text=ast.unparse(node)[:120],
            countdown=None if countdown is None else max(0.0, float(countdown)),
            max_retries=None if max_retries is None else int(max_retries),
            unread=tuple(unread), catches=_caught(handlers.get(id(node))),
        ))
    return sorted(found, key=lambda call: call.line)
