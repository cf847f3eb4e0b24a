"""The hand-written guard's table (what Celery tutorials tell users to write), and a ledger a realistic body writes."""

from django.db import models


class Operation(models.Model):
    """One row per logical operation: the classic do-it-yourself idempotency guard."""

    key = models.CharField(max_length=255, unique=True)
    status = models.CharField(max_length=16, default="pending")
    result = models.JSONField(null=True)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "_bench_app"


class LedgerRow(models.Model):
    """What a realistic task body writes: one row."""

    name = models.CharField(max_length=255)
    created_at = models.DateTimeField(auto_now_add=True)

    class Meta:
        app_label = "_bench_app"
