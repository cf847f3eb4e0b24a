"""Django settings of ``bench/long_retries.py``, for the benchmark process and its worker subprocesses.

A settings module (rather than ``settings.configure()``) so that Celery's Django fix-up is
active in the workers, for both systems alike: it closes the database connections a prefork
child inherits from its parent.

Environment (``long_retries.py`` sets it for its workers):

    SAFETYNET_LONG_DB     database name                   (default safetynet_bench_long_retries)
    SAFETYNET_LONG_SPOOL  dead-letter spool directory     (default: safetynet's)
    and the PostgreSQL server's, read in ``_postgres.py``
"""

import os

from _postgres import django_database

SECRET_KEY = "safetynet-long-retries-bench"
# With DEBUG, Django keeps every query of a process in memory: 20,000 tasks would show up as
# worker memory growth that has nothing to do with retries.
DEBUG = False
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "safetynet"]
DATABASES = {
    "default": {
        **django_database(os.environ.get("SAFETYNET_LONG_DB", "safetynet_bench_long_retries")),
        # One connection per process and thread, kept between tasks (both systems alike).
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }
}
SAFETYNET = {
    # DURABLE_RETRY_SECONDS, RELAY_IN_WORKERS and RELAY_POLL_SECONDS keep their defaults (5 s, on,
    # 0.5 s): the benchmark measures the durable schedule as it ships.
    "SPOOL_DIR": os.environ.get("SAFETYNET_LONG_SPOOL") or None,
    "ALERT_MAIL_ADMINS": False,
}
LOGGING_CONFIG = None
