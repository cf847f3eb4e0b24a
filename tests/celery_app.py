"""The Celery app the tests and their worker processes use; broker chosen by environment."""

import os

import django
from celery import Celery

os.environ.setdefault("DJANGO_SETTINGS_MODULE", "tests.settings")
django.setup()

app = Celery("safetynet_tests")
app.conf.update(
    broker_url=os.environ.get("SAFETYNET_TEST_BROKER", "redis://127.0.0.1:6379/15"),
    result_backend=os.environ.get("SAFETYNET_TEST_BACKEND", "redis://127.0.0.1:6379/14"),
    task_serializer="json",
    accept_content=["json"],
    result_serializer=os.environ.get("SAFETYNET_TEST_RESULT_SERIALIZER", "json"),
    result_accept_content=["json", os.environ.get("SAFETYNET_TEST_RESULT_SERIALIZER", "json")],
    broker_connection_retry_on_startup=True,
    worker_hijack_root_logger=False,
    broker_transport_options=({"visibility_timeout": float(os.environ["SAFETYNET_TEST_VISIBILITY_TIMEOUT"])}
                              if os.environ.get("SAFETYNET_TEST_VISIBILITY_TIMEOUT") else {}),
    include=["tests.fixtures.tasks", "tests.fixtures.dead_letter_tasks", "tests.fixtures.idempotent_tasks", "tests.fixtures.scheduled_tasks", "tests.fixtures.breaker_tasks", *filter(None, os.environ.get("SAFETYNET_TEST_INCLUDE", "").split(","))],
)
app.set_default()

if os.environ.get("SAFETYNET_TEST_RECORD"):
    from tests.fixtures import recording

    recording.connect()
