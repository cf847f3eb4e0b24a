"""``safetynet keys show|purge``: idempotency claims."""

from __future__ import annotations

import json
from typing import Any

from django.core.management.base import CommandError

from safetynet import idempotency, shared
from safetynet.management.nouns._text import Noun, local, moment, when
from safetynet.models import IdempotencyClaim

__all__ = ["Keys"]


class Keys(Noun):
    """Inspect and purge idempotency claims."""

    @staticmethod
    def add_arguments(commands: Any) -> None:
        """``keys show|purge``."""
        keys = commands.add_parser("keys", help="inspect and purge idempotency claims",
                                   description="Inspect and purge idempotency claims.")
        actions = keys.add_subparsers(dest="keys_command", metavar="action", required=True)
        show = actions.add_parser("show", help="the claim of one idempotency key",
                                  description="Print the claim of one idempotency key: state, holder, lease, "
                                              "deliveries and stored result.")
        show.add_argument("key")
        show.add_argument("--json", action="store_true", help="print a JSON object instead")
        purge = actions.add_parser(
            "purge", help="delete settled claims older than an age",
            description="Delete succeeded and failed claims last changed before --older-than. A key whose claim "
                        "is gone can run again: keep claims longer than a duplicate can arrive (retries, replays, "
                        "a client resubmitting). Claims in progress are never deleted.")
        purge.add_argument("--older-than", type=moment, required=True, metavar="AGE",
                           help="an age (30d, 12h, 2w) or an ISO 8601 date or datetime")
        purge.add_argument("--dry-run", action="store_true", help="print how many would be deleted; delete nothing")

    def handle(self, options: dict[str, Any]) -> None:
        getattr(self, options["keys_command"])(options)

    def show(self, options: dict[str, Any]) -> None:
        """Print the claim of one key."""
        row = IdempotencyClaim.objects.filter(key=options["key"]).first()
        if row is None:
            raise CommandError(f"No claim for idempotency key {options['key']!r} (never claimed, or purged).")
        fields = {
            "key": row.key, "state": row.state, "task_name": row.task_name, "task_id": row.task_id,
            "owner": row.owner,
            "lease_until": when(row.lease_until) if row.state == IdempotencyClaim.State.IN_PROGRESS else "-",
            "deliveries": row.deliveries, "result_stored": row.result_stored,
            "result": row.result if options["json"] else json.dumps(row.result, default=str),
            "error": row.error, "created_at": when(row.created_at), "updated_at": when(row.updated_at),
        }
        if options["json"]:
            self.write_json(fields)
            return
        width = max(map(len, fields))
        for name, value in fields.items():
            self.stdout.write(f"{name.ljust(width)}  {value}")

    def purge(self, options: dict[str, Any]) -> None:
        """Delete settled claims older than --older-than."""
        before = options["older_than"]
        if options["dry_run"]:
            count = IdempotencyClaim.objects.filter(updated_at__lt=before.timestamp(), state__in=[
                IdempotencyClaim.State.SUCCEEDED, IdempotencyClaim.State.FAILED]).count()
            self.stdout.write(f"Dry run: would delete {count} settled claims last changed before {local(before)}.")
            return
        count = idempotency.purge(before.timestamp())
        expired = shared.purge_expired()
        self.stdout.write(f"Deleted {count} settled claims last changed before {local(before)}, and {expired} "
                          "expired shared counters.")
