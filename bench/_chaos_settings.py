"""Django settings of ``bench/chaos.py``, for the benchmark process and its worker subprocesses.

A settings module (rather than ``settings.configure()``) so that Celery's Django fix-up is
active in the workers: it closes the database connections a prefork child inherits from its
parent, which a worker that is killed and restarted every few seconds depends on.

Environment (``chaos.py`` sets it for its workers):

    SAFETYNET_CHAOS_DB          database name                     (default safetynet_chaos)
    SAFETYNET_CHAOS_DB_HOST     PostgreSQL host                   (default 127.0.0.1)
    SAFETYNET_CHAOS_DB_PORT     PostgreSQL port                   (default 5432)
    SAFETYNET_CHAOS_DB_USER     PostgreSQL user                   (default postgres)
    SAFETYNET_CHAOS_SPOOL       dead-letter spool directory       (default: safetynet's)
    SAFETYNET_CHAOS_REDIS       safetynet's REDIS_URL             (default: the broker when it is Redis)
    SAFETYNET_CHAOS_VISIBILITY  the broker's visibility timeout (default 10)
    SAFETYNET_CHAOS_LOST_MESSAGE  safetynet's LOST_MESSAGE_SECONDS (default 60)
"""

import os

SECRET_KEY = "safetynet-chaos-bench"
DEBUG = False  # with DEBUG, Django would keep every query in memory
USE_TZ = True
INSTALLED_APPS = ["django.contrib.contenttypes", "django.contrib.auth", "safetynet"]
DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.postgresql",
        "NAME": os.environ.get("SAFETYNET_CHAOS_DB", "safetynet_chaos"),
        "HOST": os.environ.get("SAFETYNET_CHAOS_DB_HOST", "127.0.0.1"),
        "PORT": os.environ.get("SAFETYNET_CHAOS_DB_PORT", "5432"),
        "USER": os.environ.get("SAFETYNET_CHAOS_DB_USER", "postgres"),
        # One connection per process and thread, kept between tasks (both systems alike).
        "CONN_MAX_AGE": 60,
        "CONN_HEALTH_CHECKS": True,
    }
}
SAFETYNET = {
    "SPOOL_DIR": os.environ.get("SAFETYNET_CHAOS_SPOOL") or None,
    "SPOOL_FLUSH_SECONDS": 2,
    "ALERT_MAIL_ADMINS": False,
    # With RabbitMQ as the broker, the run's private Redis keeps safetynet's shared counters.
    "REDIS_URL": os.environ.get("SAFETYNET_CHAOS_REDIS") or None,
    # An idempotent task not started this long after it was sent is sent again: kombu's Redis
    # transport can lose a message it popped when its worker is killed (see chaos.py). Above the
    # longest wait in the queue of this run (5,000 sent at once drain in about a minute), or a
    # message only waiting its turn is sent twice (harmless, but twice the work).
    "LOST_MESSAGE_SECONDS": float(os.environ.get("SAFETYNET_CHAOS_LOST_MESSAGE") or 60),
}
LOGGING_CONFIG = None
