"""Users with chosen safetynet permissions and logged-in test clients (admin, dashboard and progress tests)."""

from django.contrib.auth.models import Permission, User
from django.test import Client


def person(name, *codenames, staff=True, superuser=False):
    """A user with the given safetynet permissions (``view_deadletter``, ...)."""
    user = User.objects.create_user(name, password="pw", is_staff=staff, is_superuser=superuser)
    user.user_permissions.set(Permission.objects.filter(content_type__app_label="safetynet", codename__in=codenames))
    return user


def logged_in(user, **options):
    """A test client (``Client(**options)``) logged in as ``user``."""
    client = Client(**options)
    client.force_login(user)
    return client
