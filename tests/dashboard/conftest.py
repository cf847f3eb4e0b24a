"""Fixtures for the dashboard tests: users with chosen permissions, logged-in clients, the dead-letter helpers."""

import pytest
from django.contrib.auth.models import Permission, User
from django.test import Client

from tests.deadletter.conftest import private_spool, throwaway_queue  # noqa: F401  (fixtures)


def person(name, *codenames, staff=True, superuser=False):
    """A user with the given safetynet permissions (``view_deadletter``, ...)."""
    user = User.objects.create_user(name, password="pw", is_staff=staff, is_superuser=superuser)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="safetynet", codename__in=codenames))
    return user


def logged_in(user, **options):
    client = Client(**options)
    client.force_login(user)
    return client


@pytest.fixture
def admin_client_():
    """A superuser: every page and every action."""
    return logged_in(person("root", superuser=True))
