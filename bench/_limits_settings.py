"""Django settings of ``bench/limits.py``, for the benchmark process and its worker subprocesses.

Environment (``limits.py`` sets it for its workers):

    SAFETYNET_LIMITS_DB      database name                       (default bench_limits)
    SAFETYNET_LIMITS_REDIS   safetynet's REDIS_URL: the run's private Redis, also the broker
    SAFETYNET_LIMITS_SPOOL   dead-letter spool directory         (default: safetynet's)
    SAFETYNET_LIMITS_LIMIT   the fields of the limit "partner", as JSON
    SAFETYNET_BENCH_DB_HOST / _PORT / _USER: the PostgreSQL server (see _postgres.py)
"""

import json
import os
import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent))

from _postgres import django_database  # noqa: E402

SECRET_KEY = "safetynet-limits-bench"
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "safetynet"]
DATABASES = {"default": {**django_database(os.environ.get("SAFETYNET_LIMITS_DB", "bench_limits")),
                         "CONN_MAX_AGE": 60, "CONN_HEALTH_CHECKS": True}}
SAFETYNET = {
    "SPOOL_DIR": os.environ.get("SAFETYNET_LIMITS_SPOOL") or None,
    "ALERT_MAIL_ADMINS": False,
    "STATS": False,
    "REDIS_URL": os.environ.get("SAFETYNET_LIMITS_REDIS") or None,
    "LIMITS": {
        "partner": json.loads(os.environ.get("SAFETYNET_LIMITS_LIMIT") or '{"concurrency": 3, "rate": "50/s"}'),
        # Timed by the benchmark process itself (check_ms): wide enough never to refuse.
        "check": {"concurrency": 100000, "rate": "1000000/s"},
    },
}
LOGGING_CONFIG = None
