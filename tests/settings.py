"""Django settings for the test suite: the real PostgreSQL of the machine, Redis as broker."""

import os

SECRET_KEY = "safetynet-tests"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = [
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "safetynet",
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
SAFETYNET = {}
LOGGING_CONFIG = None
