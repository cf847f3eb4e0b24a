"""The demo app: four tasks and a record of what the worker saw."""

from django.apps import AppConfig


class ShopConfig(AppConfig):
    name = "shop"
    verbose_name = "safetynet demo shop"
    default_auto_field = "django.db.models.BigAutoField"

    def ready(self) -> None:
        from shop import receivers  # noqa: F401  (connects the signal receivers)
