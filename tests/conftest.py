import tests.celery_app  # noqa: F401  (the Celery app every test and worker uses)
