import tests.celery_app  # noqa: F401  (the Celery app every test and worker uses)


def pytest_report_header(config):
    import celery
    import django

    return f"safetynet tests on Celery {celery.__version__}, Django {django.get_version()}"


import pytest  # noqa: E402


@pytest.fixture(scope="session")
def django_db_setup(django_db_setup):
    """pytest-django's, and the django.tasks records' own connections closed before the test database is dropped."""
    yield
    try:
        from safetynet.taskrecords import _store
    except Exception:  # noqa: BLE001  (nothing to close)
        return
    _store.flush()
    _store.close_connections()
