"""Each test has its own spool; a throwaway queue for what replays send."""

from tests.fixtures.dead_letters import private_spool, throwaway_queue  # noqa: F401  (fixtures)
