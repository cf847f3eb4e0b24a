import tests.celery_app  # noqa: F401  (the Celery app every test and worker uses)


def pytest_report_header(config):
    import celery
    import django

    return f"safetynet tests on Celery {celery.__version__}, Django {django.get_version()}"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup, django_db_blocker):
    """pytest-django's; before the test database is dropped, the django.tasks records' own connections are closed
    and the sessions other threads left on it ended."""
    yield
    try:
        from safetynet.taskrecords import _store
    except Exception:  # noqa: BLE001  (nothing to close)
        return
    _store.flush()
    _store.close_connections()
    with django_db_blocker.unblock():
        _end_other_sessions()


def _end_other_sessions():
    """The background jobs of this test process (stats, records, heartbeats) hold connections of their own threads,
    which this thread cannot close: their runner stops, and the server ends the sessions left on the test database,
    so that pytest-django can drop it ("being accessed by other users" otherwise)."""
    from django.db import connection

    from safetynet.background import runner

    runner.stop()
    if connection.vendor != "postgresql":
        return
    with connection.cursor() as cursor:
        cursor.execute("SELECT pg_terminate_backend(pid) FROM pg_stat_activity "
                       "WHERE datname = current_database() AND pid <> pg_backend_pid()")
