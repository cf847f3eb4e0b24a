"""Django app configuration: registers the system checks, the worker-side receivers, the dashboard's counters
and the installed integrations."""

import importlib.util

from django.apps import AppConfig


class SafetynetConfig(AppConfig):
    """The ``safetynet`` Django app."""

    name = "safetynet"
    verbose_name = "safetynet"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from safetynet import checks  # noqa: F401  (registers the system checks)
        from safetynet import progress, stats
        from safetynet.runtime import worker

        worker.connect()
        stats.connect()
        progress.connect()
        self.install_integrations()

    @staticmethod
    def install_integrations() -> None:
        """Connect the optional integrations whose package is installed."""
        if importlib.util.find_spec("prometheus_client") is not None:
            from safetynet.contrib import prometheus

            prometheus.install()
        if importlib.util.find_spec("sentry_sdk") is not None:
            from safetynet.contrib import sentry

            sentry.install()
