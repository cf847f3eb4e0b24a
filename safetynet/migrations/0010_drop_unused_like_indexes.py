"""PostgreSQL only: drop the ``varchar_pattern_ops`` indexes Django adds beside the unique keys of the tables written
on every task (a task's record, an idempotency claim, a scheduled or tracked message, a shared key). Nothing looks
these keys up with ``LIKE``; each such index cost every INSERT an index entry (about a tenth of the server's work for
a record's INSERT, measured)."""

from django.db import migrations

#: (model, column) whose ``_like`` index goes.
KEYS = [("taskrecord", "id"), ("idempotencyclaim", "key"), ("scheduledmessage", "key"), ("sharedkey", "key")]


def _indexes(apps, schema_editor):
    for model_name, column in KEYS:
        table = apps.get_model("safetynet", model_name)._meta.db_table
        yield table, column, schema_editor._create_index_name(table, [column], suffix="_like")


def drop(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for _table, _column, name in _indexes(apps, schema_editor):
        schema_editor.execute(f"DROP INDEX IF EXISTS {schema_editor.quote_name(name)}")


def restore(apps, schema_editor):
    if schema_editor.connection.vendor != "postgresql":
        return
    for table, column, name in _indexes(apps, schema_editor):
        schema_editor.execute(f"CREATE INDEX IF NOT EXISTS {schema_editor.quote_name(name)} ON "
                              f"{schema_editor.quote_name(table)} ({schema_editor.quote_name(column)} "
                              f"varchar_pattern_ops)")


class Migration(migrations.Migration):

    dependencies = [
        ('safetynet', '0009_dead_letter_reason_malformed'),
    ]

    operations = [migrations.RunPython(drop, restore, elidable=False)]
