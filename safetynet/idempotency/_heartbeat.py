"""The heartbeat: while a body runs, the lease of its claim is moved on, so a long run is never taken over.

One background job per process renews, every third of the shortest lease held, the leases of the
claims this process holds; a run that died stops renewing, and its claim's lease runs out.
"""

from __future__ import annotations

import contextlib
import logging
import os
import threading
import time
from collections.abc import Iterator

from django.db import close_old_connections, connections

from safetynet.background import Job, runner
from safetynet.idempotency._claims import Claim
from safetynet.models import IdempotencyClaim

__all__ = ["current", "holding"]

logger = logging.getLogger("safetynet")

_lock = threading.Lock()
_held: dict[str, Claim] = {}
_local = threading.local()
_LANE = "heartbeat"


def _interval() -> float:
    with _lock:
        return max(0.05, min((held.lease for held in _held.values()), default=3.0) / 3)


def _beat() -> None:
    with _lock:
        claims = list(_held.values())
    if not claims:
        # Nothing to renew: do not keep a connection open for an idle process (it is opened
        # again, once, when a beat has claims to renew).
        connections.close_all()
        return
    by_lease: dict[tuple[str, float], list[str]] = {}
    for held in claims:
        by_lease.setdefault((held.using, held.lease), []).append(held.owner)
    try:
        for (using, lease), owners in by_lease.items():
            IdempotencyClaim.objects.using(using).filter(
                owner__in=owners, state=IdempotencyClaim.State.IN_PROGRESS
            ).update(lease_until=time.time() + lease)
    except Exception as error:  # the database may be away for a moment: try again next beat
        logger.warning("safetynet: could not renew idempotency leases: %r", error)
        close_old_connections()  # a broken connection is replaced on the next beat


#: The one heartbeat job of the process (``runner.add`` keeps the one it runs already, and starts it again after
#: a fork or a stop).
_JOB = Job("heartbeat", _beat, _interval, lane=_LANE, at_start=False)


def _hold(held: Claim) -> None:
    with _lock:
        shorter = held.lease / 3 < max(0.05, min((other.lease for other in _held.values()), default=3.0) / 3)
        _held[held.owner] = held
    try:  # (never raises: the body's transaction may be open already, and must reach the body's run to end)
        runner.add(_JOB)
        if shorter:
            runner.wake(_LANE, now=True, job="heartbeat")  # it may sleep longer than this claim's lease allows
    except Exception:
        logger.exception("safetynet: could not start the heartbeat; the lease of %r is not renewed", held.key)


def _drop(held: Claim) -> None:
    with _lock:
        _held.pop(held.owner, None)


@contextlib.contextmanager
def holding(held: Claim) -> Iterator[Claim]:
    """While the body runs: the lease is renewed and ``current()`` is this claim."""
    _hold(held)
    previous = getattr(_local, "claim", None)
    _local.claim = held
    try:
        yield held
    finally:
        _local.claim = previous
        _drop(held)


def current() -> Claim | None:
    """The claim of the idempotent task running in this thread, if any."""
    return getattr(_local, "claim", None)


def _forget_in_child() -> None:
    """A process forked while holding claims (a body using multiprocessing) does not inherit them."""
    global _lock
    _lock = threading.Lock()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
