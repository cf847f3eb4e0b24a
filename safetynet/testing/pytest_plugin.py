"""The safetynet pytest plugin, loaded through the ``pytest11`` entry point with no configuration.

Fixtures:
    simulate        ``simulate(task, *args, **kwargs) -> Trace`` on a virtual clock, seed 0
    virtual_clock   a ``VirtualClock`` the runtime reads for the duration of the test
    inject_fault    ``inject_fault(task, times=1, exception=...) -> FaultPlan``, undone after the test

Imports are inside the fixtures, so the plugin costs nothing in test suites that do not use it.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import ExitStack
from typing import Any

import pytest


@pytest.fixture
def simulate() -> Callable[..., Any]:
    """Run a task through its real policy on a virtual clock and return the Trace."""
    from safetynet.testing.simulator import simulate as run

    return run


@pytest.fixture
def virtual_clock() -> Iterator[Any]:
    """A VirtualClock installed as the runtime's clock (and a seeded random source) for the test."""
    from safetynet.testing.simulator import VirtualClock

    clock = VirtualClock()
    with clock.installed():
        yield clock


@pytest.fixture
def inject_fault() -> Iterator[Callable[..., Any]]:
    """Make a task fail ``times`` times with ``exception`` before it runs for real; undone afterwards."""
    from safetynet.testing.faults import inject

    with ExitStack() as stack:
        def add(task: Any, *, times: int = 1, exception: Any = None) -> Any:
            return stack.enter_context(inject(task, times=times, exception=exception))

        yield add
