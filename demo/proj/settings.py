"""Settings of the safetynet demo: everything embedded (SQLite), or Redis if asked for.

Paths are absolute, derived from this file, so the demo runs from any working directory.
``SAFETYNET_DEMO_REDIS_URL`` (e.g. ``redis://127.0.0.1:6379/3``) switches the Celery broker
and result backend to that Redis; without it nothing but local SQLite files is used.
"""

import os
from pathlib import Path

DEMO_DIR = Path(__file__).resolve().parent.parent
#: Where the demo keeps its SQLite files and the worker log (the browser tests use a directory of their own).
VAR_DIR = Path(os.environ.get("SAFETYNET_DEMO_VAR") or DEMO_DIR / "var").resolve()

SECRET_KEY = "safetynet-demo-not-secret"
DEBUG = False
USE_TZ = True
TIME_ZONE = "UTC"
DEFAULT_AUTO_FIELD = "django.db.models.BigAutoField"

INSTALLED_APPS = [
    "django.contrib.admin",
    "django.contrib.contenttypes",
    "django.contrib.auth",
    "django.contrib.sessions",
    "django.contrib.messages",
    "django.contrib.staticfiles",
    "safetynet",
    "shop",
]
MIDDLEWARE = [
    "django.contrib.sessions.middleware.SessionMiddleware",
    "django.middleware.common.CommonMiddleware",
    "django.middleware.csrf.CsrfViewMiddleware",
    "django.contrib.auth.middleware.AuthenticationMiddleware",
    "django.contrib.messages.middleware.MessageMiddleware",
]
TEMPLATES = [{
    "BACKEND": "django.template.backends.django.DjangoTemplates",
    "APP_DIRS": True,
    "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                       "django.contrib.auth.context_processors.auth",
                                       "django.contrib.messages.context_processors.messages"]},
}]
ROOT_URLCONF = "proj.urls"
STATIC_URL = "/static/"
LOGIN_URL = "/accounts/login/"
LOGIN_REDIRECT_URL = "/reports/"
ALLOWED_HOSTS = ["127.0.0.1", "localhost"]

DATABASES = {
    "default": {
        "ENGINE": "django.db.backends.sqlite3",
        "NAME": VAR_DIR / "demo.sqlite3",
        # The worker writes events from several threads while run.py reads them.
        "OPTIONS": {
            "timeout": 30,
            "transaction_mode": "IMMEDIATE",
            "init_command": "PRAGMA journal_mode=WAL;",
        },
    }
}

# Django's tasks API (django.tasks, Django 6; or the django-tasks backport on 5.2) on Celery through safetynet:
# shop.tasks.book_courier, case (h) of the report. Without either, the demo runs without it.
try:
    import django.tasks  # noqa: F401
except ImportError:
    try:
        import django_tasks  # noqa: F401
    except ImportError:
        pass
    else:
        INSTALLED_APPS.append("django_tasks")
        TASKS = {"default": {"BACKEND": "safetynet.tasks.CeleryBackend"}}
else:
    TASKS = {"default": {"BACKEND": "safetynet.tasks.CeleryBackend"}}

# safetynet's own settings: the defaults are what the demo shows, but for the dashboard's counts,
# written every second so the pages fill while you look.
SAFETYNET: dict = {
    "STATS_FLUSH_SECONDS": 1.0,
    # Two upstreams behind breakers, for the dashboard's breakers page (run.py calls through them).
    "BREAKERS": {
        "partner-api": {"min_calls": 4, "failure_rate": 0.5, "open_seconds": 1800},
        "payment-gateway": {"min_calls": 10, "failure_rate": 0.5, "open_seconds": 60},
    },
    # A limit shared by every worker: the shipping-quotes API allows 2 calls at once and 5 a second (case (i)).
    # The margin widens the rate's window from the default 50 ms to 200 ms: room, on a busy laptop, for the
    # time between the limiter's check and the call reaching the API. Without Redis (SAFETYNET_DEMO_REDIS_URL)
    # the limit lives in the database (LimitState rows in demo/var/demo.sqlite3); with it, in that Redis.
    "LIMITS": {
        "quotes-api": {"concurrency": 2, "rate": "5/s", "margin": 0.2},
    },
}

# -- Celery (read by proj/celery.py with namespace="CELERY") ------------------------------
REDIS_URL = os.environ.get("SAFETYNET_DEMO_REDIS_URL", "").strip()
if REDIS_URL:
    CELERY_BROKER_URL = REDIS_URL
    CELERY_RESULT_BACKEND = REDIS_URL
else:
    CELERY_BROKER_URL = f"sqla+sqlite:///{VAR_DIR / 'broker.sqlite3'}"
    CELERY_RESULT_BACKEND = f"db+sqlite:///{VAR_DIR / 'results.sqlite3'}"
    # SQLite busy timeout: the worker's threads and run.py share these files.
    CELERY_BROKER_TRANSPORT_OPTIONS = {"connect_args": {"timeout": 30}}
    CELERY_DATABASE_ENGINE_OPTIONS = {"connect_args": {"timeout": 30}}
CELERY_TASK_SERIALIZER = "json"
CELERY_RESULT_SERIALIZER = "json"
CELERY_ACCEPT_CONTENT = ["json"]
CELERY_BROKER_CONNECTION_RETRY_ON_STARTUP = True

# -- Where the demo tasks find their services (run.py starts the stubs and sets these) ----
DEMO_SMTP_HOST = "127.0.0.1"
DEMO_SMTP_PORT = int(os.environ.get("DEMO_SMTP_PORT", "2525"))
DEMO_API_URL = os.environ.get("DEMO_API_URL", "http://127.0.0.1:8025")
DEMO_INVENTORY_ADDRESS = os.environ.get("DEMO_INVENTORY_ADDRESS", "127.0.0.1:9")
DEMO_GATEWAY_URL = os.environ.get("DEMO_GATEWAY_URL", "http://127.0.0.1:8026")
DEMO_PARTNER_URL = os.environ.get("DEMO_PARTNER_URL", "http://127.0.0.1:8027")
DEMO_QUOTES_URL = os.environ.get("DEMO_QUOTES_URL", "http://127.0.0.1:8028")
DEMO_WORKER_READY_FILE = VAR_DIR / "worker.ready"

LOGGING = {
    "version": 1,
    "disable_existing_loggers": False,
    "handlers": {"console": {"class": "logging.StreamHandler"}},
    # One line per decision (retry at INFO, give-up at WARNING) lands in demo/var/worker.log.
    "loggers": {"safetynet": {"handlers": ["console"], "level": "INFO", "propagate": False}},
}
