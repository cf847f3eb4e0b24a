"""Django set-up of ``bench/dashboard.py``: a PostgreSQL database of its own, the dashboard and the admin.

This module is also the benchmark's URLconf (``ROOT_URLCONF``): the dashboard under
``/safetynet/``, Django's admin (the baseline) under ``/admin/``.

Environment (all optional): ``SAFETYNET_BENCH_DB`` (the database name's prefix, default
``safetynet_bench_dashboard``) and the PostgreSQL server's, read in ``_postgres.py``.
"""

from __future__ import annotations

import os

import django
from django.conf import settings

from _postgres import django_database, ensure_database

DB_PREFIX = os.environ.get("SAFETYNET_BENCH_DB", "safetynet_bench_dashboard")


def configure(database: str) -> None:
    """Configure Django on ``database`` (created when missing)."""
    ensure_database(database)
    settings.configure(
        SECRET_KEY="safetynet-bench",
        DEBUG=False,  # with DEBUG, Django would keep every query in memory
        USE_TZ=True,
        ALLOWED_HOSTS=["testserver"],
        INSTALLED_APPS=["django.contrib.admin", "django.contrib.contenttypes", "django.contrib.auth",
                        "django.contrib.sessions", "django.contrib.messages", "safetynet"],
        MIDDLEWARE=["django.contrib.sessions.middleware.SessionMiddleware",
                    "django.middleware.csrf.CsrfViewMiddleware",
                    "django.contrib.auth.middleware.AuthenticationMiddleware",
                    "django.contrib.messages.middleware.MessageMiddleware"],
        TEMPLATES=[{"BACKEND": "django.template.backends.django.DjangoTemplates", "APP_DIRS": True,
                    "OPTIONS": {"context_processors": ["django.template.context_processors.request",
                                                       "django.contrib.auth.context_processors.auth",
                                                       "django.contrib.messages.context_processors.messages"]}}],
        DATABASES={"default": django_database(database)},
        ROOT_URLCONF="_dashboard_settings",
        SAFETYNET={"STATS_MINUTE_KEEP_SECONDS": 31 * 86_400},
        LOGGING_CONFIG=None,
    )
    django.setup()


def __getattr__(name: str):  # the URLconf, built once Django is configured
    if name == "urlpatterns":
        from django.contrib import admin
        from django.urls import include, path

        return [path("admin/", admin.site.urls), path("safetynet/", include("safetynet.dashboard.urls"))]
    raise AttributeError(name)
