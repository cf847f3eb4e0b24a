# Dashboard aggregates (TaskStats) and user-facing progress (TaskProgress).

from django.db import migrations, models


class Migration(migrations.Migration):

    dependencies = [
        ('safetynet', '0003_scheduled_messages_and_breaker_state'),
    ]

    operations = [
        migrations.AddIndex(
            model_name="deadletter",
            index=models.Index(fields=["status", "-last_failed_at", "-id"], name="safetynet_dl_status_recent"),
        ),
        migrations.CreateModel(
            name='TaskProgress',
            fields=[
                ('task_id', models.CharField(max_length=255, primary_key=True, serialize=False)),
                ('task_name', models.CharField(max_length=255)),
                ('owner', models.CharField(blank=True, max_length=255)),
                ('state', models.CharField(choices=[('queued', 'queued'), ('running', 'running'), ('retrying', 'retrying'), ('succeeded', 'succeeded'), ('failed', 'failed')], default='queued', max_length=16)),
                ('current', models.FloatField(blank=True, null=True)),
                ('total', models.FloatField(blank=True, null=True)),
                ('message', models.CharField(blank=True, max_length=255)),
                ('result', models.JSONField(blank=True, null=True)),
                ('error', models.CharField(blank=True, max_length=500)),
                ('attempt', models.PositiveIntegerField(default=1)),
                ('next_attempt_at', models.DateTimeField(blank=True, null=True)),
                ('created_at', models.DateTimeField(auto_now_add=True)),
                ('updated_at', models.DateTimeField(auto_now=True)),
            ],
            options={
                'verbose_name_plural': 'task progress',
                'indexes': [models.Index(fields=['updated_at'], name='safetynet_progress_updated')],
            },
        ),
        migrations.CreateModel(
            name='TaskStats',
            fields=[
                ('id', models.BigAutoField(auto_created=True, primary_key=True, serialize=False, verbose_name='ID')),
                ('period', models.PositiveIntegerField()),
                ('start', models.DateTimeField()),
                ('task_name', models.CharField(max_length=255)),
                ('runs', models.PositiveBigIntegerField(default=0)),
                ('successes', models.PositiveBigIntegerField(default=0)),
                ('retries', models.PositiveBigIntegerField(default=0)),
                ('snoozes', models.PositiveBigIntegerField(default=0)),
                ('dead', models.PositiveBigIntegerField(default=0)),
                ('dead_by_reason', models.JSONField(default=dict)),
                ('runtime_sum', models.FloatField(default=0.0)),
                ('runtime_buckets', models.JSONField(default=list)),
            ],
            options={
                'verbose_name_plural': 'task stats',
                'constraints': [models.UniqueConstraint(fields=('period', 'start', 'task_name'), name='safetynet_stats_one_row')],
            },
        ),
    ]
