"""Django settings for the test suite: the real PostgreSQL of the machine, Redis as broker."""

import importlib.util
import os

import django

SECRET_KEY = "safetynet-tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "safetynet",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [
    {
        "BACKEND": "django.template.backends.django.DjangoTemplates",
        "APP_DIRS": True,
        "OPTIONS": {
            "context_processors": [
                "django.template.context_processors.request",
                "django.contrib.auth.context_processors.auth",
                "django.contrib.messages.context_processors.messages",
            ]
        },
    }
]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("SAFETYNET_TEST_DB", "test"),
        "HOST": os.environ.get("SAFETYNET_TEST_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("SAFETYNET_TEST_DB_PORT", "5432"),
        "USER": os.environ.get("SAFETYNET_TEST_DB_USER", "postgres"),
    }
}
SAFETYNET = {
    "SPOOL_DIR": os.environ.get("SAFETYNET_TEST_SPOOL") or None,
    "LOST_MESSAGE_SECONDS": float(os.environ.get("SAFETYNET_TEST_LOST_MESSAGE_SECONDS") or 900),
    "ALERT_MAIL_ADMINS": True,
    "SPOOL_FLUSH_SECONDS": 2,
    "DURABLE_RETRY_SECONDS": float(os.environ.get("SAFETYNET_TEST_DURABLE_RETRY_SECONDS") or 5),
    # tests/fixtures/breaker_tasks.py goes through it; the integration tests open it from one worker.
    # The flusher thread would write the counts of one test while another reads them: tests flush by hand.
    "STATS_FLUSH_SECONDS": float(os.environ.get("SAFETYNET_TEST_STATS_FLUSH_SECONDS") or 3600),
    "BREAKERS": {"upstream": {"min_calls": 3, "failure_rate": 0.5, "open_seconds": 4}},
    # tests/fixtures/limit_tasks.py goes through them (tests/integration/test_limits.py).
    "LIMITS": {"test-slots": {"concurrency": 2},
               "test-customers": {"concurrency": 1, "rate": "2/s", "partition_by": "customer_id"}},
    "LIMIT_LEASE_SECONDS": float(os.environ.get("SAFETYNET_TEST_LIMIT_LEASE_SECONDS") or 30),
}
# Django 6.0 takes ADMINS as addresses (its (name, address) pairs are deprecated); 5.2 only as pairs. Django 6.1
# configures mail in MAILERS (EMAIL_BACKEND is deprecated there).
ADMINS = ["ops@example.com"] if django.VERSION >= (6, 0) else [("Ops", "ops@example.com")]
if django.VERSION >= (6, 1):
    MAILERS = {"default": {"BACKEND": "django.core.mail.backends.locmem.EmailBackend"}}
else:
    EMAIL_BACKEND = "django.core.mail.backends.locmem.EmailBackend"
ROOT_URLCONF = "tests.urls"
STATIC_URL = "/static/"
LOGGING_CONFIG = None

# django.tasks (Django 6.0+, or the django-tasks backport on 5.2): run on Celery through safetynet.
TASKS = {
    "default": {"BACKEND": "safetynet.tasks.CeleryBackend", "QUEUES": []},
    # backend-level retries (new-features #142's MAX_ATTEMPTS and BACKOFF), and the enqueue modes
    "quick": {"BACKEND": "safetynet.tasks.CeleryBackend", "QUEUES": [],
              "OPTIONS": {"MAX_ATTEMPTS": 2, "BACKOFF": "tests.fixtures.django_tasks.quick_backoff"}},
    "on_commit": {"BACKEND": "safetynet.tasks.CeleryBackend", "QUEUES": [], "OPTIONS": {"ENQUEUE": "on_commit"}},
    "outbox": {"BACKEND": "safetynet.tasks.CeleryBackend", "QUEUES": [], "OPTIONS": {"ENQUEUE": "outbox"}},
    "immediate": {"BACKEND": "django.tasks.backends.immediate.ImmediateBackend", "QUEUES": []},
}
# the backport on Django 5.2 (an app, its backends under its own name); the package, not bench/django_tasks.py
_backport = importlib.util.find_spec("django_tasks")
if _backport is not None and _backport.submodule_search_locations is not None:
    if django.VERSION < (6, 0):
        INSTALLED_APPS.append("django_tasks")
        TASKS["immediate"]["BACKEND"] = "django_tasks.backends.immediate.ImmediateBackend"
