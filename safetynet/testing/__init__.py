"""Public, supported helpers for testing tasks that use safetynet.

- ``simulate(task, *args, **kwargs)``: run a task through its real policy on a virtual clock.
- ``Simulator(seed=..., start=...)``: the same with a chosen seed and start time.
- ``VirtualClock``: the clock the simulator uses, also a pytest fixture (``virtual_clock``).
- ``inject``: make a task fail N times (or answer 429 with Retry-After), then succeed.
- ``http_error(status, retry_after=...)``: an HTTP error as requests/httpx raise them.

The pytest plugin (``safetynet.testing.pytest_plugin``) is registered through an entry point
and gives the fixtures ``simulate``, ``virtual_clock`` and ``inject_fault``.
"""

from safetynet.testing.faults import HTTPStatusError, http_error, inject
from safetynet.testing.simulator import SimulatedAttempt, Simulator, Trace, VirtualClock, simulate

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
