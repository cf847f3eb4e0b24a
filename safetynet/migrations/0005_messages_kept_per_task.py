"""One table for every message safetynet must see taken: the idempotency claims stop keeping messages.

An idempotent task's message waiting to be seen taken (a claim ``queued``, or one in progress that
kept its retry's message) moves to ``ScheduledMessage`` as a ``sent`` row, published, sent again by
the relay when no run took it.
"""

import hashlib
import json
import time

from django.db import migrations, models


def _broker() -> str:
    """The digest a relay of the project's Celery app takes rows by (as ``safetynet.schedule.broker_of``)."""
    try:
        from celery import current_app

        return hashlib.sha256(str(current_app.conf.broker_url or "").encode()).hexdigest()[:16]
    except Exception:  # no Celery app here: the rows wait for a relay of the default broker
        return ""


def move_kept_messages(apps, schema_editor):
    Claim = apps.get_model("safetynet", "IdempotencyClaim")
    Message = apps.get_model("safetynet", "ScheduledMessage")
    alias = schema_editor.connection.alias
    broker = _broker()
    now = time.time()
    for claim in Claim.objects.using(alias).filter(state__in=["queued", "in_progress"], message__isnull=False):
        kept = claim.message or {}
        options = {**(kept.get("options") or {}), "headers": kept.get("headers") or {}, "task_id": claim.task_id}
        text = json.dumps({"args": kept.get("args") or [], "kwargs": kept.get("kwargs") or {}, "options": options},
                          default=str)
        Message.objects.using(alias).get_or_create(key=claim.task_id[:255], defaults=dict(
            kind="sent", task_name=claim.task_name, task_id=claim.task_id, broker=broker, state="published",
            due_at=claim.lease_until, message=text, token="", consumed_token="", publishes=1, failures=0,
            last_error="", claim_key=claim.key, origin=0.0, entry=0, created_at=now, updated_at=now,
        ))
    # A queued claim was never claimed by a run: the row above stands for it now.
    Claim.objects.using(alias).filter(state="queued").delete()


class Migration(migrations.Migration):

    dependencies = [
        ("safetynet", "0004_dashboard_stats_and_progress"),
    ]

    operations = [
        migrations.AddField(
            model_name="scheduledmessage",
            name="claim_key",
            field=models.CharField(blank=True, default="", max_length=255),
        ),
        migrations.AddField(
            model_name="scheduledmessage",
            name="entry",
            field=models.PositiveIntegerField(default=0),
        ),
        migrations.AddField(
            model_name="scheduledmessage",
            name="origin",
            field=models.FloatField(default=0.0),
        ),
        migrations.AlterField(
            model_name="scheduledmessage",
            name="kind",
            field=models.CharField(choices=[("retry", "retry"), ("outbox", "outbox"), ("sent", "sent")], max_length=8),
        ),
        migrations.RunPython(move_kept_messages, migrations.RunPython.noop),
        migrations.RemoveIndex(
            model_name="idempotencyclaim",
            name="safetynet_claim_unsettled",
        ),
        migrations.RemoveField(
            model_name="idempotencyclaim",
            name="message",
        ),
        migrations.RemoveField(
            model_name="idempotencyclaim",
            name="resent",
        ),
        migrations.AlterField(
            model_name="idempotencyclaim",
            name="state",
            field=models.CharField(choices=[("in_progress", "in progress"), ("succeeded", "succeeded"),
                                            ("failed", "failed")], max_length=16),
        ),
        migrations.AddIndex(
            model_name="idempotencyclaim",
            index=models.Index(condition=models.Q(("state", "in_progress")), fields=["lease_until"],
                               name="safetynet_claim_unsettled"),
        ),
    ]
