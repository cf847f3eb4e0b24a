"""Public, supported helpers for testing tasks that use safetynet.

- ``simulate(task, *args, **kwargs)``: run a task through its real policy on a virtual clock.
- ``Simulator(seed=..., start=...)``: the same with a chosen seed and start time.
- ``VirtualClock``: the clock the simulator uses, also a pytest fixture (``virtual_clock``).
- ``inject``: make a task fail N times (or answer 429 with Retry-After), then succeed.
- ``http_error(status, retry_after=...)``: an HTTP error as requests/httpx raise them.

The pytest plugin (``safetynet.testing.pytest_plugin``) is registered through an entry point
and gives the fixtures ``simulate``, ``virtual_clock`` and ``inject_fault``. Importing this package
costs nothing until a name is used (pytest loads the plugin before Django is set up).
"""

from __future__ import annotations

import importlib
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from safetynet.testing.faults import HTTPStatusError, http_error, inject
    from safetynet.testing.simulator import (
        SimulatedAttempt,
        Simulator,
        Trace,
        VirtualClock,
        simulate,
    )

__all__ = [
    "HTTPStatusError",
    "SimulatedAttempt",
    "Simulator",
    "Trace",
    "VirtualClock",
    "http_error",
    "inject",
    "simulate",
]

_WHERE = {
    "HTTPStatusError": "safetynet.testing.faults",
    "http_error": "safetynet.testing.faults",
    "inject": "safetynet.testing.faults",
    "SimulatedAttempt": "safetynet.testing.simulator",
    "Simulator": "safetynet.testing.simulator",
    "Trace": "safetynet.testing.simulator",
    "VirtualClock": "safetynet.testing.simulator",
    "simulate": "safetynet.testing.simulator",
}


def __getattr__(name: str) -> Any:
    module = _WHERE.get(name)
    if module is None:
        raise AttributeError(f"module 'safetynet.testing' has no attribute {name!r}")
    value = getattr(importlib.import_module(module), name)
    globals()[name] = value
    return value


def __dir__() -> list[str]:
    return sorted({*globals(), *__all__})
