"""Recording: every task given up is stored once, as one ``DeadLetter`` row, and announced once.

``give_up(failure)`` is the one door every death goes through, wherever it is found (the worker
child after the core decided, the worker's main process for a hard time limit, a lost worker or a
crash loop, the consumer for a message no task can run, the relay for a message no worker took):
one log line, one row (spooled to local disk while the database does not answer) and one
terminal event (``signals.task_ended``). Rows are keyed by task id, so a death recorded twice (a
redelivered message that died again, a spool flushed by two workers) is stored and announced once.

A record is made storable first (``_storable``: no NUL, no lone surrogate, no NaN, names that fit
their columns), so the database refuses it only for a reason no cleaning fixes. Such a refusal
(``DataError``, ``IntegrityError``, a ``ValueError`` from the driver) is never taken for an outage:
the record goes to the spool's quarantine folder (ERROR, ``dead_letter_quarantined``, an alert),
and a spooled one never holds back the files after it. When neither the database nor the spool
can take a record, its whole (redacted) text is logged at ERROR: the log keeps what nothing else could.
"""

from __future__ import annotations

import base64
import contextlib
import json
import logging
import threading
import time
import uuid
from collections.abc import Mapping, Sequence
from dataclasses import dataclass, field
from datetime import datetime, timezone
from typing import Any

from django.db import close_old_connections, connections, router, transaction
from django.db.models import Min

from safetynet import conf, signals
from safetynet.deadletter import _groups, _spool
from safetynet.deadletter._caps import cap_fields, cap_text
from safetynet.deadletter._fingerprints import fingerprint
from safetynet.deadletter._storable import is_outage, storable
from safetynet.models import DeadLetter
from safetynet.protocol import headers as header_names
from safetynet.protocol.events import DeadLetterFacts, Outcome, TaskEnded
from safetynet.protocol.history import HistoryEntry, qualified_name
from safetynet.protocol.reasons import Reason
from safetynet.redaction import (
    redact,
    redact_text,
    redact_text_values,
    redact_value,
    scrub_values,
    sensitive_values,
)

__all__ = ["Failure", "enforce_cap", "flush_spool", "give_up", "record"]

logger = logging.getLogger("safetynet")


@dataclass
class Failure:
    """A task given up, with what the dead-letter store keeps of it (redacted when stored)."""

    task_name: str
    task_id: str
    reason: Reason
    #: What the decision or the worker said about it.
    detail: str = ""
    args: Sequence[Any] = ()
    kwargs: Mapping[str, Any] = field(default_factory=dict)
    #: The task's positional parameter names (a positional argument is redacted by its name).
    parameters: Sequence[str] = ()
    headers: Mapping[str, Any] = field(default_factory=dict)
    delivery_info: Mapping[str, Any] = field(default_factory=dict)
    #: The exception that ended it; or, without one, its class and text.
    exception: BaseException | None = None
    exception_type: str = ""
    exception_message: str = ""
    #: Every attempt kept, the last one included, and how many were dropped from the bounded history.
    history: Sequence[HistoryEntry] = ()
    omitted: int = 0
    worker: str = ""
    #: The body of a message that could not be decoded; True when its arguments are unknown.
    raw_body: bytes | None = None
    body_unknown: bool = False
    #: When it failed (seconds since the epoch; now when None).
    failed_at: float | None = None

    @property
    def attempts(self) -> int:
        """The number of the attempt that ended it."""
        return int((self.history[-1].get("attempt") if self.history else 1) or 1)


def _as_datetime(value: float | datetime | None) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(value if value is not None else time.time(), tz=timezone.utc)


def _safe_raw_body(raw: bytes | None, detail: str) -> tuple[str, str]:
    """A body that could not be decoded, as redacted text; a binary body is not kept (only its size and hash)."""
    import hashlib

    if not raw:
        return "", detail
    try:
        return redact_text(raw.decode("utf-8")), detail
    except UnicodeDecodeError:
        note = f"binary body of {len(raw)} bytes not kept (sha256 {hashlib.sha256(raw).hexdigest()})"
        return "", f"{detail}; {note}" if detail else note


def fields_of(failure: Failure) -> dict[str, Any]:
    """The row's fields, redacted and storable: what is stored (or spooled)."""
    history = [dict(entry) for entry in failure.history]  # redacted below: the caller's copy stays as it was
    exception_type, exception_message = failure.exception_type, failure.exception_message
    if failure.exception is not None:
        exception_type = exception_type or qualified_name(failure.exception)
        exception_message = exception_message or str(failure.exception)
    traceback = str(history[-1].get("traceback") or "") if history else ""
    parameters = list(failure.parameters)
    safe_args, safe_kwargs, redacted = redact(failure.args, failure.kwargs, parameters)
    if failure.body_unknown:
        redacted.append("body")  # the arguments could not be read: replay needs them given by hand
    # A message may repeat a secret argument's value ("declined: tok_live_…"): blank the values too.
    secrets = sensitive_values(failure.args, failure.kwargs, parameters)
    exception_message = redact_text(scrub_values(exception_message, secrets))
    traceback = redact_text(scrub_values(traceback, secrets))
    detail = scrub_values(failure.detail, secrets)
    for entry in history:
        entry["message"] = redact_text(scrub_values(entry.get("message") or "", secrets))
        entry["traceback"] = redact_text(scrub_values(entry.get("traceback") or "", secrets))
    delivery = dict(failure.delivery_info or {})
    kept_headers = {key: value for key, value in (failure.headers or {}).items() if key not in header_names.DELIVERY}
    replay_of = kept_headers.get(header_names.REPLAY_OF)
    kept_headers = redact_value(kept_headers, "headers", redacted)
    # A header's text is free text too: the message patterns and the secret arguments' values go.
    kept_headers = redact_text_values(kept_headers, secrets, "headers", redacted)
    raw_text, detail = _safe_raw_body(failure.raw_body, detail)
    raw_text = cap_text(raw_text, conf.get().dead_letter_max_argument_bytes)
    first = history[0].get("started") if history else None
    failed_at = failure.failed_at
    # Redacted whole first, made storable (JSON the database takes, names that fit), then cut to the caps: no secret
    # survives in what is kept of a long value.
    fields = cap_fields(storable({
        "task_name": failure.task_name,
        "task_id": failure.task_id,
        "args": safe_args,
        "kwargs": safe_kwargs,
        "redacted": redacted,
        "headers": json.loads(json.dumps(kept_headers, default=str)),
        "queue": str(delivery.get("routing_key") or delivery.get("queue") or ""),
        "exchange": str(delivery.get("exchange") or ""),
        "routing_key": str(delivery.get("routing_key") or ""),
        "reason": str(failure.reason),
        "detail": redact_text(detail),
        "exception_type": exception_type[:255],
        "exception_message": exception_message,
        "traceback": traceback,
        "history": history,
        "omitted_attempts": failure.omitted,
        "attempts": failure.attempts,
        "first_failed_at": _as_datetime(first if first is not None else failed_at).isoformat(),
        "last_failed_at": _as_datetime(failed_at).isoformat(),
        "worker": str(failure.worker or "")[:255],
        "fingerprint": "",
        "raw_body": base64.b64encode(raw_text.encode()).decode() if raw_text else "",
        "replay_of_id": int(replay_of) if str(replay_of or "").isdigit() else None,
        "audit": [{"action": "dead", "at": _as_datetime(failed_at).isoformat(), "nonce": uuid.uuid4().hex}],
    }), secrets)
    # From the storable text: a lone surrogate cannot even be hashed.
    fields["fingerprint"] = fingerprint(fields["task_name"], fields["exception_type"], fields["exception_message"],
                                        fields["traceback"], arguments=_argument_values(fields))
    return fields


def _argument_values(fields: Mapping[str, Any]) -> list[Any]:
    """The stored (redacted, capped) argument values, for the fingerprint."""
    args, kwargs = fields.get("args"), fields.get("kwargs")
    return [*(args if isinstance(args, list) else []), *(kwargs.values() if isinstance(kwargs, dict) else [])]


def _facts(fields: Mapping[str, Any], row_id: int | None, kept_in: str = "database") -> DeadLetterFacts:
    return DeadLetterFacts(
        id=row_id, fingerprint=fields["fingerprint"], exception_type=fields["exception_type"],
        exception_message=fields["exception_message"], traceback=fields["traceback"], detail=fields["detail"],
        queue=fields["queue"], worker=fields["worker"], redacted=tuple(fields["redacted"]),
        headers=fields["headers"], kept_in=kept_in,
    )


def _log_whole(fields: Mapping[str, Any], why: str) -> None:
    """The last resort: the whole (redacted) record in an ERROR line, so the log keeps it."""
    logger.error(
        "safetynet: the dead letter of %s[%s] could not be kept: %s. Its whole record follows, so it is not "
        "lost: %s", fields["task_name"], fields["task_id"], why, json.dumps(fields, default=str),
        extra={"task_name": fields["task_name"], "task_id": fields["task_id"], "action": "dead_letter_logged"},
    )


def _keep_spooled(fields: dict[str, Any], error: BaseException) -> str:
    """The database did not answer: spool the record (or, failing that, log it whole); where it is kept."""
    try:
        _spool.write(fields, error)
    except Exception as spool_error:  # refused (another user can write the folder), disk full, no SECRET_KEY…
        _log_whole(fields, f"the database did not answer ({error!r}) and the spool refused it ({spool_error})")
        return "log"
    return "spool"


def _keep_refused(fields: dict[str, Any], error: BaseException) -> str:
    """The database refused the record itself: quarantine it (or, failing that, log it whole); where it is kept."""
    why = f"the database refused it as data even made storable: {error!r}"
    try:
        _spool.write_quarantined(fields, why)
    except Exception as quarantine_error:
        _log_whole(fields, f"{why}, and the spool's quarantine folder could not take it ({quarantine_error})")
        return "log"
    return "quarantine"


def record(failure: Failure) -> DeadLetterFacts | None:
    """Store one final failure (exactly once per task id); spool it if the database is down.

    Returns what was kept (``id`` None unless it was stored; ``kept_in`` says where), or None when
    the task id was recorded before: a second death of the same task adds nothing.
    """
    fields = fields_of(failure)
    try:
        row = store(fields)
    except Exception as error:
        if not is_outage(error):  # about the record: spooling it would only fail again later
            return _facts(fields, None, _keep_refused(fields, error))
        close_old_connections()
        return _facts(fields, None, _keep_spooled(fields, error))
    if row is None:
        return None
    _announce(row)
    _after_write()
    return _facts(fields, row.pk)


def give_up(failure: Failure, *, task: Any = None, runtime: float | None = None, eager: bool = False,
            notes: Mapping[str, Any] | None = None, log: bool = True) -> TaskEnded | None:
    """A task is given up: one log line, one dead letter (none in eager mode), one terminal event.

    Never raises: recording must not change a task's outcome or stop a worker. Returns the event,
    or None when the task id was recorded before (the death was announced then).
    """
    if log:
        # The line is as bounded as the row (a name or detail of megabytes, a hostile message, is cut here too),
        # and the detail, which may quote the failure (a Reject's reason), is redacted like the stored one.
        name, task_id = str(failure.task_name)[:255], str(failure.task_id)[:255]
        detail = redact_text(scrub_values(
            cap_text(str(failure.detail or ""), conf.get().dead_letter_max_message_chars),
            sensitive_values(failure.args, failure.kwargs, list(failure.parameters))))
        extra = {"task_name": name, "task_id": task_id, "attempt": failure.attempts,
                 "reason": str(failure.reason), "detail": detail}
        logger.warning("%s[%s] gave up after attempt %s: %s (%s)", name, task_id,
                       failure.attempts, failure.reason, detail, extra=extra)
    facts: DeadLetterFacts | None = None
    if not eager:
        try:
            facts = record(failure)
        except Exception:  # the log keeps the failure (record itself spools when the database is down)
            logger.exception("safetynet: could not record the dead letter of %s[%s]", failure.task_name,
                             failure.task_id)
        else:
            if facts is None:
                return None
    event = TaskEnded(
        task_name=failure.task_name, task_id=failure.task_id, outcome=Outcome.DEAD, reason=Reason(failure.reason),
        detail=failure.detail, attempts=failure.attempts, runtime=runtime,
        exception=failure.exception, history=tuple(failure.history),
        omitted=failure.omitted, args=tuple(failure.args or ()), kwargs=dict(failure.kwargs or {}),
        headers=dict(failure.headers or {}), task=task, dead_letter=facts, notes=dict(notes or {}), eager=eager,
    )
    signals.announce(event)
    return event


def store(fields: dict[str, Any]) -> Any:
    """Insert a recorded failure; return the row if it is new, None if the task id was stored already.

    ``fields`` should be storable (``fields_of`` makes them so; the spool's are made so again).
    """
    values = dict(fields)
    for name in ("first_failed_at", "last_failed_at"):
        values[name] = datetime.fromisoformat(values[name])
    nonce = values["audit"][0]["nonce"]
    alias = router.db_for_write(DeadLetter)
    rows = DeadLetter.objects.using(alias)
    # Inside a caller's transaction, a savepoint: a refused insert must not break it. Outside one (a worker
    # recording a death), the insert commits on its own: no BEGIN and COMMIT round trips around it.
    in_transaction = connections[alias].in_atomic_block
    with transaction.atomic(using=alias) if in_transaction else contextlib.nullcontext():
        if values.get("replay_of_id") is not None and not rows.filter(pk=values["replay_of_id"]).exists():
            values["replay_of_id"] = None  # the row it replayed was purged meanwhile: the link goes, the record stays
        # INSERT … ON CONFLICT DO NOTHING: the task id is unique, so a second record of the same
        # failure is dropped by the database itself. Whether this insert won is told by the nonce.
        rows.bulk_create([DeadLetter(**values)], ignore_conflicts=True)
        row = rows.filter(task_id=values["task_id"]).first()  # where it was written, not a replica
    if row is None or not row.audit or row.audit[0].get("nonce") != nonce:
        return None
    _groups.added(row)
    return row


def _announce(row: Any) -> None:
    """``dead_letter_recorded`` for a newly stored row."""
    for receiver, response in signals.dead_letter_recorded.send_robust(sender=type(row), dead_letter=row):
        if isinstance(response, Exception):
            logger.error("safetynet: dead_letter_recorded receiver %r failed: %r", receiver, response)


_last_housekeeping = 0.0
_housekeeping_lock = threading.Lock()


def _after_write() -> None:
    """After a successful write: flush what was spooled, and enforce the store's cap (throttled)."""
    global _last_housekeeping
    now = time.monotonic()
    with _housekeeping_lock:
        if now - _last_housekeeping < 5.0:
            return
        _last_housekeeping = now
    try:
        flush_spool()
        enforce_cap()
    except Exception as error:  # the record is stored: housekeeping must not change that (the next write retries)
        logger.warning("safetynet: dead-letter housekeeping failed: %r", error)


def flush_spool() -> int:
    """Move spooled records into the database; return how many were moved. Safe to run anywhere.

    A file that is not signed by this project (or not a regular file of this user) and a record the
    database refuses are moved to the spool's quarantine folder, loudly, and the flush goes on. A
    database that does not answer stops it (DatabaseError): the files wait for the next flush.
    ConfigurationError when another user can write the spool folder (nothing in it is read).
    """
    moved = 0
    for spooled in _spool.pending():
        try:
            # A file spooled before the caps is cut like a new record, then made storable.
            row = store(cap_fields(storable(spooled.fields)))
        except Exception as error:
            if is_outage(error):
                raise  # the database is away: this file and the ones after it wait for the next flush
            _spool.quarantine(spooled.path, f"was refused by the database even made storable ({error!r})",
                              kind="unstorable", fields=spooled.fields)
            continue
        if row is not None:
            _announce(row)
        _spool.remove(spooled.path)
        moved += 1
    if moved:
        logger.info("safetynet: moved %s spooled dead letters into the database", moved)
    return moved


def enforce_cap() -> int:
    """Delete the oldest rows beyond ``DEAD_LETTER_MAX_ROWS``, loudly; return how many."""
    cap = conf.get().dead_letter_max_rows
    if cap is None:
        return 0
    boundary = DeadLetter.objects.order_by("-created_at", "-id").values_list("id", flat=True)[cap:cap + 1]
    boundary_id = next(iter(boundary), None)
    if boundary_id is None:
        return 0
    evicted = DeadLetter.objects.filter(id__lte=boundary_id)
    oldest = evicted.aggregate(oldest=Min("last_failed_at"))["oldest"]
    touched = set(evicted.dead().order_by().values_list("fingerprint", flat=True).distinct())
    count, _ = evicted.delete()
    _groups.recount(touched)
    logger.warning(
        "safetynet: the dead-letter store is over its cap of %s rows: evicted the %s oldest (oldest failure %s)",
        cap, count, oldest, extra={"evicted": count, "cap": cap},
    )
    signals.dead_letters_evicted.send_robust(sender=DeadLetter, count=count, cap=cap, oldest=oldest)
    return count
