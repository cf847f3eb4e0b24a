"""Django app configuration: registers the system checks and the worker-side receivers."""

from django.apps import AppConfig


class SafetynetConfig(AppConfig):
    """The ``safetynet`` Django app."""

    name = "safetynet"
    verbose_name = "safetynet"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from safetynet import checks  # noqa: F401  (registers the system checks)
        from safetynet.runtime import worker

        worker.connect()
