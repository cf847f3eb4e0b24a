import tests.celery_app  # noqa: F401  (the Celery app every test and worker uses)


def pytest_report_header(config):
    import celery
    import django

    return f"safetynet tests on Celery {celery.__version__}, Django {django.get_version()}"
