"""The failures page's summary: one ``FailureGroup`` row per fingerprint of the dead letters waiting.

Kept on write, so reading it costs a few hundred rows whatever the size of the store:

- a new dead letter adds itself (one UPDATE, or an INSERT for a new fingerprint): :func:`added`;
- replay, discard, purge and the cap recount the fingerprints they touched from the rows themselves
  (:func:`recount`), so a summary that drifted (a row changed by hand) is right again at the next change;
- :func:`rebuild` recounts every fingerprint (the migration that made the table, and after bulk edits by hand).

A summary write that fails is logged and never fails the dead letter's own write: the letter is the record.
"""

from __future__ import annotations

import logging
from collections.abc import Iterable
from typing import Any

from django.db import IntegrityError, router, transaction
from django.db.models import Count, F, Max, Min, Sum
from django.db.models.functions import Greatest, Least

from safetynet.models import DeadLetter, FailureGroup

__all__ = ["added", "rebuild", "recount", "waiting_count"]

logger = logging.getLogger("safetynet")


def added(row: Any) -> None:
    """Count a newly stored dead letter (status ``dead``) into its fingerprint's group."""
    if row.status != DeadLetter.Status.DEAD:
        return
    try:
        alias = router.db_for_write(FailureGroup)
        groups = FailureGroup.objects.using(alias)
        for _ in range(2):
            with transaction.atomic(using=alias):
                if groups.filter(fingerprint=row.fingerprint).update(
                        count=F("count") + 1, first_seen=Least("first_seen", row.first_failed_at),
                        last_seen=Greatest("last_seen", row.last_failed_at),
                        example_id=Greatest("example_id", row.id)):
                    return
                try:
                    with transaction.atomic(using=alias):
                        groups.create(fingerprint=row.fingerprint, count=1, first_seen=row.first_failed_at,
                                      last_seen=row.last_failed_at, task_name=row.task_name[:255],
                                      exception_type=row.exception_type[:255], example_id=row.id)
                    return
                except IntegrityError:
                    continue  # another worker made the group meanwhile: add to it
    except Exception as error:  # the letter is stored; the summary is recounted at the next change
        logger.warning("safetynet: could not count dead letter %s into its failure group: %r", row.id, error)


def recount(fingerprints: Iterable[str]) -> None:
    """Make the groups of ``fingerprints`` match their dead letters again (a group with none left goes)."""
    wanted = sorted(set(fingerprints))
    try:
        for start in range(0, len(wanted), 500):
            _recount(wanted[start:start + 500])
    except Exception as error:
        logger.warning("safetynet: could not recount %s failure groups: %r", len(wanted), error)


def _recount(fingerprints: list[str]) -> None:
    alias = router.db_for_write(FailureGroup)
    with transaction.atomic(using=alias):
        # Lock the groups first, in one order: an added() at the same time waits instead of being overwritten.
        list(FailureGroup.objects.using(alias).select_for_update().filter(fingerprint__in=fingerprints)
             .order_by("fingerprint").values_list("fingerprint", flat=True))
        summed = _summed(DeadLetter.objects.using(alias).dead().filter(fingerprint__in=fingerprints))
        FailureGroup.objects.using(alias).filter(fingerprint__in=fingerprints).exclude(
            fingerprint__in=[group.fingerprint for group in summed]).delete()
        _write(alias, summed)


def _summed(rows: Any) -> list[FailureGroup]:
    groups = (rows.order_by().values("fingerprint")
              .annotate(count=Count("id"), first_seen=Min("first_failed_at"), last_seen=Max("last_failed_at"),
                        task_name=Max("task_name"), exception_type=Max("exception_type"), example_id=Max("id")))
    return [FailureGroup(**group) for group in groups]


def _write(alias: str, groups: list[FailureGroup]) -> None:
    FailureGroup.objects.using(alias).bulk_create(
        groups, batch_size=1000, update_conflicts=True, unique_fields=["fingerprint"],
        update_fields=["count", "first_seen", "last_seen", "task_name", "exception_type", "example_id"])


def rebuild(*, using: str | None = None) -> int:
    """Recount every group from the dead letters; return how many groups there are."""
    alias = using or router.db_for_write(FailureGroup)
    with transaction.atomic(using=alias):
        FailureGroup.objects.using(alias).all().delete()
        groups = _summed(DeadLetter.objects.using(alias).dead())
        _write(alias, groups)
    return len(groups)


def waiting_count() -> int:
    """How many dead letters wait for a decision, read from the summary (not a count over the table)."""
    return int(FailureGroup.objects.aggregate(total=Sum("count"))["total"] or 0)

