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
        from safetynet import alerts, checks, signals, stats, taskrecords  # noqa: F401  (checks: registers them)
        from safetynet.progress.plugin import on_task_ended
        from safetynet.runtime import consumer, logs

        consumer.connect()
        logs.install()  # Celery's own lines about a safetynet task, redacted
        stats.connect()
        alerts.connect()
        signals.consume("safetynet.progress", on_task_ended, successes=False)  # a success: Progress.after_success
        # django.tasks results (safetynet.tasks.CeleryBackend): a death marks the record FAILED; a replay links
        signals.consume("safetynet.taskrecords", taskrecords.on_task_ended, successes=False)
        signals.task_replayed.connect(taskrecords.on_task_replayed, dispatch_uid="safetynet.taskrecords.replayed",
                                      weak=False)
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
