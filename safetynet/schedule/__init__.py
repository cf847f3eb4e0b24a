"""The durable schedule: task messages safetynet must see taken by a worker, kept in the database.

A Celery retry with a countdown is an ETA message: a worker fetches it at once and holds it in
memory until it is due, and on Redis a message held longer than ``visibility_timeout`` is delivered
again, so a long retry bloats workers and can run twice. Here a retry delayed at least
``DURABLE_RETRY_SECONDS`` is a row of ``ScheduledMessage`` instead; so is a message sent in
``outbox`` mode, written in the caller's transaction (a rollback sends nothing; a broker that is
down at commit time loses nothing); and so is an idempotent task's message sent at once, kept to
send it again if the broker loses it (``LOST_MESSAGE_SECONDS``). One table, one relay, one way a
message is sent again.

Exactly once: each copy a relay publishes carries its row's key and a token; the copy of the row's
latest publish that reaches a worker first runs, any other copy is dropped there (``accept``). An
idempotent task's duplicate is also stopped by its claim.
"""

from safetynet.schedule._relay import MAX_PUBLISH_FAILURES, RelayRun, publish_now, relay, sweep_orphans
from safetynet.schedule._rows import (
    MAX_RESENDS,
    NEVER,
    Row,
    accept,
    bring_forward,
    broker_of,
    brokers_of,
    database,
    delay_of,
    drop,
    holds_same,
    is_durable,
    moment,
    pack,
    purge,
    settle,
    unpack,
    write,
)

__all__ = [
    "MAX_PUBLISH_FAILURES",
    "MAX_RESENDS",
    "NEVER",
    "RelayRun",
    "Row",
    "accept",
    "bring_forward",
    "broker_of",
    "brokers_of",
    "database",
    "delay_of",
    "drop",
    "holds_same",
    "is_durable",
    "moment",
    "pack",
    "publish_now",
    "purge",
    "relay",
    "settle",
    "sweep_orphans",
    "unpack",
    "write",
]
