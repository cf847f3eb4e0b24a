"""The heartbeat of concurrency slots: while a call runs, the leases of the slots it holds are moved on.

One background job per process (in the heartbeat lane, beside the idempotency claims' one) renews,
every third of ``LIMIT_LEASE_SECONDS``, the leases of the slots this process holds, in one Redis
script (or one database transaction). A process that died stops renewing: its slots are free again
at most ``LIMIT_LEASE_SECONDS`` after the last renewal.
"""

from __future__ import annotations

import logging
import os
import threading
from typing import TYPE_CHECKING, Any

from safetynet import conf, shared
from safetynet.background import Job, runner
from safetynet.limits import _store

if TYPE_CHECKING:
    from safetynet.limits import Ticket

__all__ = ["beat", "drop", "hold", "holding"]

logger = logging.getLogger("safetynet")

_lock = threading.Lock()
_held: dict[str, Ticket] = {}
_LANE = "heartbeat"


def _interval() -> float:
    return max(0.05, conf.get().limit_lease_seconds / 3)


def holding() -> list[Ticket]:
    """The tickets holding slots in this process."""
    with _lock:
        return list(_held.values())


def beat() -> None:
    """Renew the leases of every slot this process holds."""
    tickets = holding()
    if not tickets:
        return
    lease = conf.get().limit_lease_seconds
    in_redis = [(keys, ticket.token) for ticket in tickets if ticket.store == "redis" for keys in ticket.held]
    in_database = [(keys, ticket.token) for ticket in tickets if ticket.store == "database" for keys in ticket.held]
    if in_redis:
        client: Any = shared.redis_client()
        try:
            if client is None:
                raise RuntimeError("Redis is not configured any more")
            _store.script(client, _store.RENEW)(keys=[keys.leases for keys, _ in in_redis] + [
                keys.all_leases for keys, _ in in_redis if keys.all_leases != keys.leases],
                args=[repr(lease), *(token for _, token in in_redis), *(
                    token for keys, token in in_redis if keys.all_leases != keys.leases)])
        except Exception as error:  # Redis may be away for a moment: the next beat tries again
            logger.warning("safetynet: could not renew the leases of limit slots: %r", error)
    if in_database:
        try:
            _store.database_renew(in_database, lease)
        except Exception as error:
            logger.warning("safetynet: could not renew the leases of limit slots in the database: %r", error)
            from django.db import close_old_connections

            close_old_connections()


def hold(ticket: Ticket) -> None:
    """Renew ``ticket``'s slots from now until ``drop``."""
    with _lock:
        _held[ticket.token] = ticket
    runner.add(Job("limit leases", beat, _interval, lane=_LANE, at_start=False))


def drop(ticket: Ticket) -> None:
    with _lock:
        _held.pop(ticket.token, None)


def _forget_in_child() -> None:
    """A process forked while holding slots (a body using multiprocessing) does not inherit them."""
    global _lock
    _lock = threading.Lock()
    _held.clear()


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_forget_in_child)
