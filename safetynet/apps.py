"""Django app configuration: the system checks, the worker's receivers, the consumers of the terminal event, and
the integrations whose package is installed."""

import importlib.util

from django.apps import AppConfig


class SafetynetConfig(AppConfig):
    """The ``safetynet`` Django app."""

    name = "safetynet"
    verbose_name = "safetynet"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from safetynet import alerts, checks, signals, stats  # noqa: F401  (checks: registers the system checks)
        from safetynet.progress.plugin import on_task_ended
        from safetynet.runtime import consumer, logs

        consumer.connect()
        logs.install()  # Celery's own lines about a safetynet task, redacted
        stats.connect()
        alerts.connect()
        signals.consume("safetynet.progress", on_task_ended, successes=False)  # a success: Progress.after_success
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
