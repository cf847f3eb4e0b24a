"""Django settings of ``bench/outage.py``, for the benchmark process and its worker subprocesses.

A settings module (rather than ``settings.configure()``) so that Celery's Django fix-up is
active in the prefork workers (it closes the database connections a child inherits).

Environment (``outage.py`` sets it for its workers):

    SAFETYNET_OUTAGE_DB        database name                        (default bench_outage)
    SAFETYNET_OUTAGE_REDIS     safetynet's REDIS_URL: the run's private Redis, also the broker
    SAFETYNET_OUTAGE_SPOOL     dead-letter spool directory          (default: safetynet's)
    SAFETYNET_OUTAGE_BREAKER   the fields of the breaker "partner", as JSON
    SAFETYNET_BENCH_DB_HOST / _PORT / _USER: the PostgreSQL server (see _postgres.py)
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _postgres import django_database  # noqa: E402

SECRET_KEY = "safetynet-outage-bench"
DEBUG = False  # with DEBUG, Django would keep every query in memory
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "safetynet"]
DATABASES = {"default": {**django_database(os.environ.get("SAFETYNET_OUTAGE_DB", "bench_outage")),
                         "CONN_MAX_AGE": 60, "CONN_HEALTH_CHECKS": True}}
SAFETYNET = {
    "SPOOL_DIR": os.environ.get("SAFETYNET_OUTAGE_SPOOL") or None,
    "ALERT_MAIL_ADMINS": False,
    "REDIS_URL": os.environ.get("SAFETYNET_OUTAGE_REDIS") or None,
    "BREAKERS": {"partner": json.loads(os.environ.get("SAFETYNET_OUTAGE_BREAKER") or "{}")},
}
LOGGING_CONFIG = None
