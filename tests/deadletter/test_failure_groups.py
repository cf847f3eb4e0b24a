"""The failures page's summary (``FailureGroup``) is kept right by every write that changes what waits."""

from datetime import datetime, timedelta, timezone

import pytest
from django.db.models import Count, Max, Min

from safetynet import deadletter
from safetynet.models import DeadLetter, FailureGroup
from tests.fixtures.dead_letters import make_dead_letter, private_spool  # noqa: F401

pytestmark = pytest.mark.django_db


def truth():
    """The groups as a GROUP BY over the table says they are."""
    return {group["fingerprint"]: (group["count"], group["first_seen"], group["last_seen"], group["example_id"])
            for group in DeadLetter.objects.dead().order_by().values("fingerprint")
            .annotate(count=Count("id"), first_seen=Min("first_failed_at"), last_seen=Max("last_failed_at"),
                      example_id=Max("id"))}


def kept():
    return {group.fingerprint: (group.count, group.first_seen, group.last_seen, group.example_id)
            for group in FailureGroup.objects.all()}


def test_recording_replay_discard_and_purge_keep_the_summary_equal_to_the_table():
    now = datetime.now(tz=timezone.utc).timestamp()
    rows = [make_dead_letter(exception=ConnectionError("refused"), failed_at=now - 60 * index) for index in range(3)]
    other = make_dead_letter(exception=ValueError("bad row"), reason="permanent_error")
    assert kept() == truth()
    assert kept()[rows[0].fingerprint][0] == 3
    assert deadletter.waiting_count() == 4

    deadletter.discard([rows[0].id], by="test")
    assert kept() == truth() and kept()[rows[0].fingerprint][0] == 2
    deadletter.replay([rows[1].id], by="test")
    assert kept() == truth() and kept()[rows[0].fingerprint][0] == 1
    deadletter.discard([other.id], by="test")
    assert other.fingerprint not in kept()  # nothing of it waits: the group goes
    assert deadletter.purge(datetime.now(tz=timezone.utc) + timedelta(days=1)) == 4
    assert kept() == truth() == {}
    assert deadletter.waiting_count() == 0


def test_a_row_changed_by_hand_is_right_again_after_a_recount_or_rebuild():
    row = make_dead_letter()
    DeadLetter.objects.filter(pk=row.pk).update(status="discarded")
    assert kept() != truth()
    deadletter.recount_failure_groups([row.fingerprint])
    assert kept() == truth() == {}
    DeadLetter.objects.filter(pk=row.pk).update(status="dead")
    assert deadletter.rebuild_failure_groups() == 1
    assert kept() == truth()


def test_the_cap_recounts_what_it_evicted(settings):
    rows = [make_dead_letter() for _ in range(3)]
    settings.SAFETYNET = {**settings.SAFETYNET, "DEAD_LETTER_MAX_ROWS": 1}
    assert deadletter.enforce_cap() == 2
    assert kept() == truth()
    assert kept()[rows[0].fingerprint][0] == 1
