"""Each test has its own spool; a throwaway queue for what replays send; a database that can go away."""

from tests.fixtures.dead_letters import private_spool, throwaway_queue  # noqa: F401  (fixtures)
from tests.fixtures.spool import database, fresh_alert_window, quarantined_signals  # noqa: F401  (fixtures)
