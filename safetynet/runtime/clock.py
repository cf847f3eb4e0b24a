"""The runtime's sense of time and chance, swappable so the simulator can run on a virtual clock."""

from __future__ import annotations

import os
import random
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager

__all__ = ["now", "rng", "using"]

#: Seconds since the epoch, from the clock in use (``time.time``, or the simulator's virtual clock while
#: ``using`` runs): called as ``clock.now()``, a plain attribute so a run pays no extra call for it.
now: Callable[[], float] = time.time
_rng: random.Random = random.Random()
# Prefork pool children would inherit the parent's state and draw the same jitter in step.
if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_rng.seed)


def rng() -> random.Random:
    """The random source jitter is drawn from."""
    return _rng


@contextmanager
def using(now_function: Callable[[], float], random_source: random.Random) -> Iterator[None]:
    """Run the block with another clock and random source (the simulator's virtual ones)."""
    global now, _rng
    saved = now, _rng
    now, _rng = now_function, random_source
    try:
        yield
    finally:
        now, _rng = saved
