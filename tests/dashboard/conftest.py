"""Fixtures for the dashboard tests: users with chosen permissions, logged-in clients, the dead-letter helpers."""

import pytest

from tests.fixtures.dead_letters import private_spool, throwaway_queue  # noqa: F401  (fixtures)
from tests.fixtures.web import logged_in, person


@pytest.fixture
def admin_client_():
    """A superuser: every page and every action."""
    return logged_in(person("root", superuser=True))
