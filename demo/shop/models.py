"""The orders the payment task looks up, the ledger of payments, and the events the worker records."""

from django.db import models


class Order(models.Model):
    """An order; the demo creates none, so order 999 does not exist."""

    customer = models.EmailField()
    total_cents = models.PositiveIntegerField()


class TaskEvent(models.Model):
    """One thing the worker reported about a task, written by the receivers in receivers.py."""

    class Kind(models.TextChoices):
        RETRYING = "retrying", "safetynet.signals.task_retrying"
        DEAD = "dead", "safetynet.signals.task_dead"
        SUCCESS = "success", "celery.signals.task_success"

    task_id = models.CharField(max_length=64, db_index=True)
    task_name = models.CharField(max_length=200)
    kind = models.CharField(max_length=16, choices=Kind.choices)
    attempt = models.PositiveIntegerField(null=True)
    payload = models.JSONField(default=dict)
    recorded_at = models.FloatField(help_text="time.time() in the worker")

    class Meta:
        ordering = ["recorded_at", "id"]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.kind} #{self.attempt}"


class Payment(models.Model):
    """The ledger: one row per charge the shop booked (a duplicate row would be a double booking)."""

    order_id = models.PositiveIntegerField()
    charge_id = models.CharField(max_length=32)
    amount_cents = models.PositiveIntegerField()
    task_id = models.CharField(max_length=64)
