"""Durable records: dead letters, idempotency claims, the schedule, shared counters, the dashboard's aggregates
and user-facing progress."""

from __future__ import annotations

from datetime import datetime

from django.db import models
from django.db.models import Q

from safetynet.protocol.reasons import Reason

__all__ = ["BreakerState", "DeadLetter", "DeadLetterQuerySet", "FailureGroup", "IdempotencyClaim", "ScheduledMessage", "SharedKey",
           "TaskProgress", "TaskStats"]


class DeadLetterQuerySet(models.QuerySet):
    """Dead letters, filtered with intent-revealing methods."""

    def dead(self) -> DeadLetterQuerySet:
        """Rows still waiting for a decision (not replayed, not discarded)."""
        return self.filter(status=DeadLetter.Status.DEAD)

    def matching(
        self,
        *,
        task: str | None = None,
        reason: str | None = None,
        fingerprint: str | None = None,
        status: str | None = None,
        since: datetime | None = None,
        until: datetime | None = None,
    ) -> DeadLetterQuerySet:
        """Rows matching every filter given (task names may end in ``*`` for a prefix)."""
        rows = self
        if task:
            rows = rows.filter(task_name__startswith=task[:-1]) if task.endswith("*") else rows.filter(task_name=task)
        if reason:
            rows = rows.filter(reason=reason)
        if fingerprint:
            rows = rows.filter(fingerprint=fingerprint)
        if status:
            rows = rows.filter(status=status)
        if since:
            rows = rows.filter(last_failed_at__gte=since)
        if until:
            rows = rows.filter(last_failed_at__lt=until)
        return rows

    def older_than(self, moment: datetime) -> DeadLetterQuerySet:
        """Rows whose last failure is before ``moment``."""
        return self.filter(last_failed_at__lt=moment)


class DeadLetter(models.Model):
    """A task that finally failed: everything needed to understand it and to run it again."""

    #: Why the task was given up (``safetynet.protocol.reasons.Reason``, as model choices).
    Reason = models.TextChoices("Reason", [(member.name, (member.value, member.label)) for member in Reason])

    class Status(models.TextChoices):
        DEAD = "dead", "dead"
        REPLAYED = "replayed", "replayed"
        DISCARDED = "discarded", "discarded"

    task_name = models.CharField(max_length=255)
    task_id = models.CharField(max_length=255, unique=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    #: Where a value was replaced by "[redacted]" before storing (e.g. ``["kwargs.card_token"]``).
    redacted = models.JSONField(default=list, blank=True)
    #: The message headers replay keeps (custom headers, without the attempt history).
    headers = models.JSONField(default=dict, blank=True)
    queue = models.CharField(max_length=255, blank=True)
    exchange = models.CharField(max_length=255, blank=True)
    routing_key = models.CharField(max_length=255, blank=True)
    reason = models.CharField(max_length=32, choices=Reason.choices)
    detail = models.TextField(blank=True)
    exception_type = models.CharField(max_length=255, blank=True)
    exception_message = models.TextField(blank=True)
    traceback = models.TextField(blank=True)
    history = models.JSONField(default=list, blank=True)
    omitted_attempts = models.PositiveIntegerField(default=0)
    attempts = models.PositiveIntegerField(default=1)
    first_failed_at = models.DateTimeField()
    last_failed_at = models.DateTimeField()
    worker = models.CharField(max_length=255, blank=True)
    #: sha1 of task + exception type + normalised message (or top frame): groups alike failures.
    fingerprint = models.CharField(max_length=40)
    #: The raw body (base64) of a message that could not be decoded.
    raw_body = models.TextField(blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.DEAD)
    replay_count = models.PositiveIntegerField(default=0)
    replayed_task_id = models.CharField(max_length=255, blank=True)
    replayed_at = models.DateTimeField(null=True, blank=True)
    replayed_by = models.CharField(max_length=255, blank=True)
    #: The dead letter this task was a replay of, if it was one.
    replay_of = models.ForeignKey("self", null=True, blank=True, on_delete=models.SET_NULL, related_name="replays")
    #: Who did what to the row and when: replays (with any argument edits or queue override), discards.
    audit = models.JSONField(default=list, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)

    objects = DeadLetterQuerySet.as_manager()

    class Meta:
        ordering = ["-last_failed_at", "-id"]
        indexes = [
            models.Index(fields=["status", "task_name"], name="safetynet_dl_status_task"),
            models.Index(fields=["status", "reason"], name="safetynet_dl_status_reason"),
            models.Index(fields=["status", "fingerprint"], name="safetynet_dl_status_fp"),
            models.Index(fields=["last_failed_at"], name="safetynet_dl_last_failed"),
            models.Index(fields=["created_at"], name="safetynet_dl_dead_created", condition=Q(status="dead")),
            # The dashboard's list: one status, newest first.
            models.Index(fields=["status", "-last_failed_at", "-id"], name="safetynet_dl_status_recent"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.reason}"


class FailureGroup(models.Model):
    """The dead letters waiting for a decision of one fingerprint, summed: the failures page reads these rows.

    Kept by ``safetynet.deadletter`` on every write (a new letter adds itself; replay, discard,
    purge and the cap recount the fingerprints they touched), so the page never groups the whole
    table. A group with no letter waiting is deleted.
    """

    fingerprint = models.CharField(max_length=40, primary_key=True)
    #: Dead letters of the fingerprint with status ``dead``.
    count = models.PositiveBigIntegerField(default=0)
    first_seen = models.DateTimeField()
    last_seen = models.DateTimeField()
    task_name = models.CharField(max_length=255)
    exception_type = models.CharField(max_length=255, blank=True)
    #: The newest waiting letter's id (the example the page shows).
    example_id = models.BigIntegerField()

    class Meta:
        indexes = [models.Index(fields=["-count", "-last_seen", "fingerprint"], name="safetynet_fg_order")]

    def __str__(self) -> str:
        return f"{self.fingerprint[:12]} x{self.count}"


class IdempotencyClaim(models.Model):
    """One logical operation, claimed by the task run that may perform it.

    Times are seconds since the epoch (floats) so the claim SQL is the same on PostgreSQL and
    SQLite. ``lease_until`` is moved on by a heartbeat while the body runs; a claim whose lease
    ran out belongs to a run that died, and the next delivery takes it over (the task's row in
    ``ScheduledMessage`` says what to send again).
    """

    class State(models.TextChoices):
        IN_PROGRESS = "in_progress", "in progress"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"

    # The key is the primary key: every run inserts and updates a row, so each index costs every
    # task (no surrogate id, no pattern index, no index on times the hot path writes).
    key = models.CharField(max_length=255, primary_key=True)
    task_name = models.CharField(max_length=255)
    #: The task id of the run that holds (or last held) the claim.
    task_id = models.CharField(max_length=255)
    state = models.CharField(max_length=16, choices=State.choices)
    #: Who holds (or last held) it: task id, host, pid and a nonce, or the token of a hand-over to a retry.
    owner = models.CharField(max_length=255, blank=True)
    lease_until = models.FloatField(default=0.0)
    #: Runs that took the claim since it was last settled; a takeover means the previous run died.
    deliveries = models.PositiveIntegerField(default=1)
    #: The stored return value (JSON), returned to a later duplicate; ``result_stored`` says if there is one.
    result = models.JSONField(null=True, blank=True)
    result_stored = models.BooleanField(default=False)
    error = models.TextField(blank=True)
    created_at = models.FloatField()
    updated_at = models.FloatField()

    class Meta:
        indexes = [
            # The orphan sweep's query (a run that died); settled claims leave it.
            models.Index(fields=["lease_until"], name="safetynet_claim_unsettled",
                         condition=Q(state="in_progress")),
        ]

    def __str__(self) -> str:
        return f"{self.key} {self.state}"


class SharedKey(models.Model):
    """A counter or a set-once value shared by every worker, when Redis is not configured."""

    key = models.CharField(max_length=255, unique=True)
    value = models.TextField(blank=True)
    count = models.BigIntegerField(default=0)
    #: Seconds since the epoch after which the row means nothing (and may be overwritten).
    expires_at = models.FloatField()

    class Meta:
        indexes = [models.Index(fields=["expires_at"], name="safetynet_sharedkey_expires")]

    def __str__(self) -> str:
        return f"{self.key}={self.count or self.value}"


class ScheduledMessage(models.Model):
    """A task message safetynet must see taken by a worker: one row per task id, kept in the database.

    Three kinds: a ``retry`` whose delay is long enough to go through the durable schedule instead
    of an ETA message a worker would hold in memory; an ``outbox`` message written in the caller's
    transaction (published once that commits; never, if it rolls back); and a message ``sent`` at
    once for an idempotent task, kept to send it again if the broker loses it. Times are seconds
    since the epoch (floats), as for claims. Once published, ``due_at`` is when the relay sends it
    again if no worker took it (``LOST_MESSAGE_SECONDS``); the copy of the latest publish that first
    reaches a worker is recorded in ``consumed_token`` and any other copy is dropped, so each
    message runs once. A retry of the same task writes over its row (see ``safetynet.schedule``).
    """

    class Kind(models.TextChoices):
        RETRY = "retry", "retry"
        OUTBOX = "outbox", "outbox"
        SENT = "sent", "sent"

    class State(models.TextChoices):
        SCHEDULED = "scheduled", "scheduled"
        PUBLISHED = "published", "published"
        CONSUMED = "consumed", "consumed"

    #: The task id (rows written before 0.1 keyed a retry by task id and history entry: ``<id>#<n>``).
    key = models.CharField(max_length=255, primary_key=True)
    kind = models.CharField(max_length=8, choices=Kind.choices)
    task_name = models.CharField(max_length=255)
    task_id = models.CharField(max_length=255)
    #: The broker it goes to (a digest of the sending app's broker URL): a relay publishes only the
    #: rows of its own broker, so workers of apps on other brokers sharing the database leave them be.
    broker = models.CharField(max_length=16)
    state = models.CharField(max_length=16, choices=State.choices, default=State.SCHEDULED)
    due_at = models.FloatField()
    #: Arguments and publishing options (kombu JSON), as ``apply_async`` would have published them.
    message = models.TextField()
    #: The token of the latest publish; the first copy to reach a worker leaves its own in ``consumed_token``.
    token = models.CharField(max_length=32, blank=True)
    consumed_token = models.CharField(max_length=32, blank=True)
    publishes = models.PositiveIntegerField(default=0)
    #: Publishes that failed (the broker refused it); each waits longer before the next.
    failures = models.PositiveIntegerField(default=0)
    last_error = models.TextField(blank=True)
    #: The idempotency key of the task ("" if it has none): its claim tells whether a run took the message.
    claim_key = models.CharField(max_length=255, blank=True, default="")
    #: When the task's first attempt started (0 for a message that has not run yet): with ``entry``, which
    #: message of a task id this is (a redelivered attempt writes the same; a later attempt a larger entry).
    origin = models.FloatField(default=0.0)
    #: How many attempt-history entries the message carries (0 for a first attempt).
    entry = models.PositiveIntegerField(default=0)
    created_at = models.FloatField()
    updated_at = models.FloatField()

    class Meta:
        indexes = [
            # The relay's query: what is due (or published and not taken in time).
            models.Index(fields=["broker", "due_at"], name="safetynet_scheduled_due",
                         condition=Q(state__in=["scheduled", "published"])),
            # Retention: rows done with are deleted after SCHEDULE_KEEP_SECONDS.
            models.Index(fields=["updated_at"], name="safetynet_scheduled_done",
                         condition=Q(state__in=["published", "consumed"])),
        ]

    def __str__(self) -> str:
        return f"{self.kind} {self.task_name}[{self.task_id}] {self.state}"


class BreakerState(models.Model):
    """A circuit breaker's state when Redis is not configured (see safetynet.breakers)."""

    name = models.CharField(max_length=100, primary_key=True)
    state = models.CharField(max_length=16, default="closed")
    #: While open: when the next call may probe (seconds since the epoch).
    until = models.FloatField(default=0.0)
    consecutive = models.PositiveIntegerField(default=0)
    #: Calls and failures per bucket of the window: {bucket number: [calls, failures]}.
    window = models.JSONField(default=dict)
    #: Probes in flight while half-open: {token: expires at}.
    probes = models.JSONField(default=dict)
    changed = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return f"{self.name} {self.state}"


class LimitState(models.Model):
    """A limit's (or one partition's) shared state when Redis is not configured or does not answer
    (see safetynet.limits); changed under a row lock."""

    #: The limit's name, and the partition after a NUL-free separator (``name`` alone when not partitioned).
    key = models.CharField(max_length=255, primary_key=True)
    name = models.CharField(max_length=100, db_index=True)
    #: Concurrency slots held: {token: lease expires at}.
    leases = models.JSONField(default=dict)
    #: When each call in the rate's window was admitted, oldest first.
    log = models.JSONField(default=list)
    #: The last turn given out (seconds since the epoch): the end of the waiting line.
    line = models.FloatField(default=0.0)
    #: The mean time a slot is held (None before a call ended).
    hold = models.FloatField(null=True, blank=True)
    #: Paused after a 429 until then.
    paused = models.FloatField(default=0.0)
    #: Tasks waiting for their turn: {task id: turn}.
    turns = models.JSONField(default=dict)
    updated = models.FloatField(default=0.0)

    def __str__(self) -> str:
        return self.key


class TaskStats(models.Model):
    """What one task did in one period (a minute or an hour): the dashboard's aggregates.

    Workers count in memory and add their counts to these rows in batches (see
    ``safetynet.stats``), so a task run writes nothing itself. Each batch goes to the minute row
    and to the hour row, so a long window reads few rows.
    """

    MINUTE = 60
    HOUR = 3600

    #: The period's length in seconds: 60 or 3600.
    period = models.PositiveIntegerField()
    #: When the period starts (aligned to its length).
    start = models.DateTimeField()
    task_name = models.CharField(max_length=255)
    #: Attempts whose body ran and ended (success, retry or dead), and how each ended.
    runs = models.PositiveBigIntegerField(default=0)
    successes = models.PositiveBigIntegerField(default=0)
    retries = models.PositiveBigIntegerField(default=0)
    #: Deferrals that used no attempt (Snooze, an open breaker, a key in progress).
    snoozes = models.PositiveBigIntegerField(default=0)
    #: Tasks given up, and the same by dead-letter reason: {"retries_exhausted": 3, ...}.
    dead = models.PositiveBigIntegerField(default=0)
    dead_by_reason = models.JSONField(default=dict)
    #: Run times: their sum (seconds), and counts per bucket of ``safetynet.stats.RUNTIME_BUCKETS``.
    runtime_sum = models.FloatField(default=0.0)
    runtime_buckets = models.JSONField(default=list)

    class Meta:
        verbose_name_plural = "task stats"
        constraints = [
            models.UniqueConstraint(fields=["period", "start", "task_name"], name="safetynet_stats_one_row"),
        ]

    def __str__(self) -> str:
        return f"{self.task_name} {self.start:%Y-%m-%d %H:%M} ({self.period}s)"


class TaskProgress(models.Model):
    """What a user-facing task shows its user: state, progress, and its result or a safe error message.

    Written by the worker (``self.progress(...)`` and the task's outcome), read by the progress
    endpoint. ``owner`` is who may read it (``user:<pk>``, empty for nobody but staff allowed to
    view progress); never a traceback, never the task's arguments.
    """

    class State(models.TextChoices):
        QUEUED = "queued", "queued"
        RUNNING = "running", "running"
        RETRYING = "retrying", "retrying"
        SUCCEEDED = "succeeded", "succeeded"
        FAILED = "failed", "failed"

    task_id = models.CharField(max_length=255, primary_key=True)
    task_name = models.CharField(max_length=255)
    owner = models.CharField(max_length=255, blank=True)
    state = models.CharField(max_length=16, choices=State.choices, default=State.QUEUED)
    current = models.FloatField(null=True, blank=True)
    total = models.FloatField(null=True, blank=True)
    message = models.CharField(max_length=255, blank=True)
    #: The return value (JSON), when the task declared it may be shown (``progress_result=True``).
    result = models.JSONField(null=True, blank=True)
    #: The message shown when the task failed: its exception's ``public_message``, else the default.
    error = models.CharField(max_length=500, blank=True)
    attempt = models.PositiveIntegerField(default=1)
    #: While retrying: when the next attempt is due.
    next_attempt_at = models.DateTimeField(null=True, blank=True)
    created_at = models.DateTimeField(auto_now_add=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        verbose_name_plural = "task progress"
        indexes = [models.Index(fields=["updated_at"], name="safetynet_progress_updated")]

    def __str__(self) -> str:
        return f"{self.task_name}[{self.task_id}] {self.state}"


class TaskRecord(models.Model):
    """A ``django.tasks`` task run on Celery through safetynet: what ``get_result()`` answers.

    Written when the task is enqueued (``READY``), by the worker when an attempt runs (``RUNNING``),
    fails and waits for its retry (``READY`` again) or ends (``SUCCESSFUL`` or ``FAILED``, with the
    dead letter's id). ``errors`` has one entry per failed attempt, its traceback redacted like a dead
    letter's; ``worker_ids`` one per attempt.
    """

    class Status(models.TextChoices):
        READY = "READY", "ready"
        RUNNING = "RUNNING", "running"
        FAILED = "FAILED", "failed"
        SUCCESSFUL = "SUCCESSFUL", "successful"

    #: The result id (the Celery task id).
    id = models.CharField(max_length=64, primary_key=True)
    #: The alias of the backend in ``settings.TASKS``.
    backend = models.CharField(max_length=100)
    #: ``Task.module_path``: the task is imported again from it.
    module_path = models.CharField(max_length=255)
    queue_name = models.CharField(max_length=255)
    priority = models.SmallIntegerField(default=0)
    run_after = models.DateTimeField(null=True, blank=True)
    args = models.JSONField(default=list, blank=True)
    kwargs = models.JSONField(default=dict, blank=True)
    status = models.CharField(max_length=16, choices=Status.choices, default=Status.READY)
    enqueued_at = models.DateTimeField(null=True, blank=True)
    started_at = models.DateTimeField(null=True, blank=True)
    last_attempted_at = models.DateTimeField(null=True, blank=True)
    finished_at = models.DateTimeField(null=True, blank=True)
    #: How many attempts ran (``len(worker_ids)``), kept as a number for the conditional writes.
    attempts = models.PositiveIntegerField(default=0)
    worker_ids = models.JSONField(default=list, blank=True)
    #: ``[{"exception_class_path": ..., "traceback": ...}]``, one per failed attempt.
    errors = models.JSONField(default=list, blank=True)
    return_value = models.JSONField(null=True, blank=True)
    #: The dead letter stored when safetynet gave the task up.
    dead_letter_id = models.BigIntegerField(null=True, blank=True)
    #: The result this one replays (a dead letter sent again).
    replay_of = models.CharField(max_length=64, blank=True)
    updated_at = models.DateTimeField(auto_now=True)

    class Meta:
        indexes = [models.Index(fields=["updated_at"], name="safetynet_taskrecord_updated")]

    def __str__(self) -> str:
        return f"{self.module_path}[{self.id}] {self.status}"
