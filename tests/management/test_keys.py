"""`manage.py safetynet keys show|purge`: idempotency claims."""


import pytest

from tests.fixtures import risky_tasks  # noqa: F401  (registers the risky tasks)


@pytest.mark.django_db
def test_keys_show_and_purge():
    import time
    from io import StringIO

    from django.core.management import CommandError, call_command

    from safetynet import idempotency
    from safetynet.models import IdempotencyClaim

    held = idempotency.claim("show-1", task_name="t", task_id="tid-1", lease=30, max_deliveries=3)
    idempotency.mark_succeeded(held, {"charge": "ch_9"})
    idempotency.claim("show-2", task_name="t", task_id="tid-2", lease=30, max_deliveries=3)
    out = StringIO()
    call_command("safetynet", "keys", "show", "show-1", stdout=out)
    assert "succeeded" in out.getvalue() and "ch_9" in out.getvalue()
    with pytest.raises(CommandError, match="No claim for idempotency key 'nope'"):
        call_command("safetynet", "keys", "show", "nope")
    IdempotencyClaim.objects.update(updated_at=time.time() - 10 * 86400)
    out = StringIO()
    call_command("safetynet", "keys", "purge", "--older-than", "7d", "--dry-run", stdout=out)
    assert "would delete 1 settled claims" in out.getvalue()
    call_command("safetynet", "keys", "purge", "--older-than", "7d", stdout=StringIO())
    assert list(IdempotencyClaim.objects.values_list("key", flat=True)) == ["show-2"]  # in progress: kept
