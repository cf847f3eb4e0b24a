"""The dead-letter store: record every final failure once, then inspect, replay, discard, purge.

Recording never loses a failure: when the database does not answer, the record is written
to a local spool (one JSON file per task, written atomically) and moved into the database
by the next successful record, by the spool flusher thread of every worker, or by
``manage.py safetynet dead flush``. Records are keyed by task id, so a record written
twice (a spooled record flushed by two workers, a redelivered message) is stored once.

Python API::

    record(...)                          store one final failure (used by the runtime)
    replay(rows, queue=None, args=None, kwargs=None, by="")   run them again, fresh attempt count
    discard(rows, by="")                 mark them handled without running them
    purge(older_than)                    delete rows whose last failure is older than a moment
    flush_spool()                        move spooled records into the database
"""

from __future__ import annotations

import base64
import hashlib
import inspect
import json
import logging
import os
import re
import tempfile
import threading
import time
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import datetime, timezone
from pathlib import Path
from typing import Any

from django.db import DatabaseError, InterfaceError, close_old_connections, transaction
from django.db.models import Min

from safetynet import conf, progress, signals
from safetynet.scheduler import RELAYED_HEADER
from safetynet.runtime.history import HEADER, qualified_name
from safetynet.runtime.registry import UnknownTask

__all__ = [
    "REDACTED",
    "ReplayOutcome",
    "discard",
    "fingerprint",
    "flush_spool",
    "purge",
    "record",
    "redact",
    "replay",
]

logger = logging.getLogger("safetynet")

# Headers about one delivery, not the task: the attempt history (stored in its own field) and the
# relay's copy token (a replay is a new message).
_DELIVERY_HEADERS = (HEADER, RELAYED_HEADER)

REDACTED = "[redacted]"
#: Shorter sensitive values are not searched for in free text: they would blank unrelated text.
MIN_SECRET_LENGTH = 4
_MAX_DEPTH = 64
#: Header that links a replayed task to the dead letter it came from.
REPLAY_OF_HEADER = "safetynet_replay_of"


# -- redaction ---------------------------------------------------------------------------

def is_sensitive(name: str, settings: conf.Settings) -> bool:
    """Whether a key or parameter name is one whose value is never stored (REDACT_KEYS, REDACT_PATTERNS)."""
    lowered = name.lower()
    return lowered in settings.redact_keys or any(pattern.search(lowered) for pattern in settings.redact_patterns)

def _redact_value(value: Any, path: str, settings: conf.Settings, found: list[str]) -> Any:
    if isinstance(value, Mapping):
        result = {}
        for key, item in value.items():
            child = f"{path}.{key}"
            if isinstance(key, str) and is_sensitive(key, settings):
                result[key] = REDACTED
                found.append(child)
            else:
                result[key] = _redact_value(item, child, settings, found)
        return result
    if isinstance(value, (list, tuple)):
        return [_redact_value(item, f"{path}[{index}]", settings, found) for index, item in enumerate(value)]
    return value


def redact(args: Any, kwargs: Any, parameter_names: list[str] | None = None) -> tuple[list, dict, list[str]]:
    """Replace sensitive values (by key, and positional arguments by parameter name) with "[redacted]".

    Returns the redacted args and kwargs and the paths that were redacted.
    """
    settings = conf.get()
    found: list[str] = []
    args = list(args or [])
    names = parameter_names or []
    safe_args = []
    for index, value in enumerate(args):
        if index < len(names) and is_sensitive(names[index], settings):
            safe_args.append(REDACTED)
            found.append(f"args[{index}]")
        else:
            safe_args.append(_redact_value(value, f"args[{index}]", settings, found))
    safe_kwargs = _redact_value(dict(kwargs or {}), "kwargs", settings, found)
    return safe_args, safe_kwargs, found


def masked_headers(headers: Mapping[str, Any] | None) -> dict[str, Any]:
    """Headers with the values of sensitive keys replaced, for display (stored headers are redacted already)."""
    _, masked, _ = redact((), headers or {})
    return masked


def redact_text(text: str) -> str:
    """Blank out ``key=value`` / ``'key': value`` pairs of sensitive keys in free text (messages, tracebacks)."""
    settings = conf.get()
    names = sorted(settings.redact_keys, key=len, reverse=True)
    if not names:
        return text
    alternatives = "|".join(re.escape(name) for name in names)
    pattern = re.compile(
        rf"""(?i)(['"]?(?:{alternatives})['"]?\s*[:=]\s*)(?:'[^']*'|"[^"]*"|[^\s,}}\)]+)"""
    )
    return pattern.sub(lambda match: match.group(1) + f"'{REDACTED}'", text)


def parameter_names(task: Any) -> list[str]:
    """The names of a task's positional parameters, read from the class, not from ``task.run``.

    Sentry's CeleryIntegration replaces ``task.run`` on the instance with a wrapper whose
    signature (through ``__wrapped__``) still has ``self``: reading it would shift every
    positional argument by one.
    """
    raw = inspect.getattr_static(type(task), "run", None)
    raw = getattr(raw, "_safetynet_body", raw)
    if isinstance(raw, staticmethod):
        function, skip = raw.__func__, 0
    elif inspect.isfunction(raw):
        function, skip = raw, 1  # a method: its first parameter is the task
    else:
        function, skip = getattr(task, "run", None), 0
        if function is None:
            return []
    try:
        signature = inspect.signature(function)
    except (TypeError, ValueError):
        return []
    names = [parameter.name for parameter in signature.parameters.values()
             if parameter.kind in (inspect.Parameter.POSITIONAL_ONLY, inspect.Parameter.POSITIONAL_OR_KEYWORD)]
    return names[skip:]


def sensitive_values(args: Any, kwargs: Any, names: list[str]) -> list[str]:
    """The values of the task's sensitive arguments, as text, to scrub wherever they appear."""
    settings = conf.get()
    found: list[str] = []

    def leaves(value: Any, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            return
        if isinstance(value, Mapping):
            for item in value.values():
                leaves(item, depth + 1)
        elif isinstance(value, (list, tuple, set, frozenset)):
            for item in value:
                leaves(item, depth + 1)
        elif isinstance(value, (str, int, float)) and not isinstance(value, bool):
            found.append(str(value))
        elif isinstance(value, bytes):
            found.append(value.decode("utf-8", "replace"))

    def search(value: Any, depth: int = 0) -> None:
        if depth > _MAX_DEPTH:
            return
        if isinstance(value, Mapping):
            for key, item in value.items():
                if isinstance(key, str) and is_sensitive(key, settings):
                    leaves(item)
                else:
                    search(item, depth + 1)
        elif isinstance(value, (list, tuple)):
            for item in value:
                search(item, depth + 1)

    for index, value in enumerate(list(args or [])):
        if index < len(names) and is_sensitive(names[index], settings):
            leaves(value)
        else:
            search(value)
    search(dict(kwargs or {}))
    unique = {value for value in found if len(value) >= MIN_SECRET_LENGTH}
    return sorted(unique, key=len, reverse=True)  # longest first: a secret containing another goes whole


def scrub_values(text: str, secrets: list[str]) -> str:
    """``text`` with every exact secret value replaced by "[redacted]"."""
    for secret in secrets:
        text = text.replace(secret, REDACTED)
    return text


# -- fingerprint -------------------------------------------------------------------------

_VOLATILE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I), "<uuid>"),
    (re.compile(r"0x[0-9a-f]+", re.I), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
]
_FRAME = re.compile(r'File "([^"]+)", line \d+, in (\S+)')


def normalise_message(message: str) -> str:
    """A failure message with ids, numbers and quoted values replaced, so alike failures group."""
    for pattern, placeholder in _VOLATILE:
        message = pattern.sub(placeholder, message)
    return message.strip()[:500]


def fingerprint(task_name: str, exception_type: str, message: str, traceback: str = "") -> str:
    """sha1 of task, exception type and normalised message (the top frame when there is no message)."""
    basis = normalise_message(message)
    if not basis:
        frames = _FRAME.findall(traceback or "")
        basis = ":".join(frames[-1]) if frames else ""
    return hashlib.sha1(f"{task_name}\n{exception_type}\n{basis}".encode()).hexdigest()


# -- recording ---------------------------------------------------------------------------

def _as_datetime(value: float | datetime | None) -> datetime:
    if isinstance(value, datetime):
        return value if value.tzinfo else value.replace(tzinfo=timezone.utc)
    return datetime.fromtimestamp(value if value is not None else time.time(), tz=timezone.utc)


def _spool_dir() -> Path:
    return Path(conf.get().spool_dir or os.path.join(tempfile.gettempdir(), "safetynet-spool"))


def _spool(fields: dict[str, Any], error: BaseException) -> None:
    directory = _spool_dir()
    directory.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(fields["task_id"]))[:200] or uuid.uuid4().hex
    handle, temporary = tempfile.mkstemp(dir=directory, prefix=".tmp-")
    with os.fdopen(handle, "w") as file:
        json.dump(fields, file, default=str)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, directory / f"{name}.json")
    logger.error(
        "safetynet: the database did not answer (%r); dead letter of %s[%s] spooled to %s",
        error, fields["task_name"], fields["task_id"], directory,
        extra={"task_name": fields["task_name"], "task_id": fields["task_id"], "spool": str(directory)},
    )


def _safe_raw_body(raw: bytes | None, detail: str) -> tuple[str, str]:
    """A body that could not be decoded, as redacted text; a binary body is not kept (only its size and hash)."""
    if not raw:
        return "", detail
    try:
        return redact_text(raw.decode("utf-8")), detail
    except UnicodeDecodeError:
        note = f"binary body of {len(raw)} bytes not kept (sha256 {hashlib.sha256(raw).hexdigest()})"
        return "", f"{detail}; {note}" if detail else note


def record(
    *,
    task_name: str,
    task_id: str,
    reason: str,
    args: Any = (),
    kwargs: Any = None,
    parameters: list[str] | None = None,
    headers: Mapping[str, Any] | None = None,
    delivery_info: Mapping[str, Any] | None = None,
    exception: BaseException | None = None,
    exception_type: str = "",
    exception_message: str = "",
    traceback: str = "",
    detail: str = "",
    history: list[dict[str, Any]] | None = None,
    omitted: int = 0,
    worker: str = "",
    raw_body: bytes | None = None,
    body_unknown: bool = False,
    failed_at: float | None = None,
) -> bool:
    """Store one final failure (exactly once per task id); spool it if the database is down.

    Returns True when it reached the database (or was already there), False when spooled.
    """
    history = [dict(entry) for entry in history or []]  # redacted below: the caller's copy stays as it was
    if exception is not None:
        exception_type = exception_type or qualified_name(exception)
        exception_message = exception_message or str(exception)
    if history and not traceback:
        traceback = history[-1].get("traceback") or ""
    safe_args, safe_kwargs, redacted = redact(args, kwargs, parameters)
    if body_unknown:
        redacted.append("body")  # the arguments could not be read: replay needs them given by hand
    # A message may repeat a secret argument's value ("declined: tok_live_…"): blank the values too.
    secrets = sensitive_values(args, kwargs, parameters or [])
    exception_message = redact_text(scrub_values(exception_message, secrets))
    traceback = redact_text(scrub_values(traceback, secrets))
    detail = scrub_values(detail, secrets)
    for entry in history:
        entry["message"] = redact_text(scrub_values(entry.get("message") or "", secrets))
        entry["traceback"] = redact_text(scrub_values(entry.get("traceback") or "", secrets))
    delivery = dict(delivery_info or {})
    settings = conf.get()
    kept_headers = {key: value for key, value in (headers or {}).items() if key not in _DELIVERY_HEADERS}
    replay_of = kept_headers.get(REPLAY_OF_HEADER)
    kept_headers = _redact_value(kept_headers, "headers", settings, redacted)
    raw_text, detail = _safe_raw_body(raw_body, detail)
    first = history[0].get("started") if history else None
    fields = {
        "task_name": task_name,
        "task_id": task_id,
        "args": safe_args,
        "kwargs": safe_kwargs,
        "redacted": redacted,
        "headers": json.loads(json.dumps(kept_headers, default=str)),
        "queue": str(delivery.get("routing_key") or delivery.get("queue") or ""),
        "exchange": str(delivery.get("exchange") or ""),
        "routing_key": str(delivery.get("routing_key") or ""),
        "reason": reason,
        "detail": redact_text(detail),
        "exception_type": exception_type[:255],
        "exception_message": exception_message,
        "traceback": traceback,
        "history": history,
        "omitted_attempts": omitted,
        "attempts": (history[-1].get("attempt") if history else 1) or 1,
        "first_failed_at": _as_datetime(first if first is not None else failed_at).isoformat(),
        "last_failed_at": _as_datetime(failed_at).isoformat(),
        "worker": str(worker or "")[:255],
        "fingerprint": fingerprint(task_name, exception_type, exception_message, traceback),
        "raw_body": base64.b64encode(raw_text.encode()).decode() if raw_text else "",
        "replay_of_id": int(replay_of) if str(replay_of or "").isdigit() else None,
        "audit": [{"action": "dead", "at": _as_datetime(failed_at).isoformat(), "nonce": uuid.uuid4().hex}],
    }
    try:
        stored = store(fields)
    except (DatabaseError, InterfaceError) as error:
        close_old_connections()
        _spool(fields, error)
        return False
    if stored is not None:
        _announce(stored)
    _after_write()
    return True


def record_lost_message(*, task_name: str, task_id: str, args: Any, kwargs: Any, headers: Mapping[str, Any],
                        queue: str, detail: str, idempotency_key: str | None = None) -> None:
    """A message sent again and again that no worker took: one ERROR line and a ``rejected`` dead letter."""
    extra = {"task_name": task_name, "task_id": task_id, "reason": "rejected"}
    if idempotency_key is not None:
        extra["idempotency_key"] = idempotency_key
    logger.error("safetynet: %s[%s] %s; dead-lettered", task_name, task_id, detail, extra=extra)
    record_safely(
        task_name=task_name, task_id=task_id, reason="rejected", args=args, kwargs=kwargs, headers=headers,
        delivery_info={"routing_key": queue}, exception_type="safetynet.LostMessage", exception_message=detail,
        detail=detail, failed_at=time.time(),
    )


def record_safely(**fields: Any) -> None:
    """``record``, but never raising: recording must not change a task's outcome or stop a worker."""
    try:
        record(**fields)
    except Exception:  # the log keeps the failure (record itself spools when the database is down)
        logger.exception("safetynet: could not record the dead letter of %s[%s]",
                         fields.get("task_name"), fields.get("task_id"))


def store(fields: dict[str, Any]) -> Any:
    """Insert a recorded failure; return the row if it is new, None if the task id was stored already."""
    from safetynet.models import DeadLetter

    values = dict(fields)
    for name in ("first_failed_at", "last_failed_at"):
        values[name] = datetime.fromisoformat(values[name])
    # INSERT … ON CONFLICT DO NOTHING: the task id is unique, so a second record of the same
    # failure is dropped by the database itself. Whether this insert won is told by the nonce.
    DeadLetter.objects.bulk_create([DeadLetter(**values)], ignore_conflicts=True)
    row = DeadLetter.objects.filter(task_id=values["task_id"]).first()
    nonce = values["audit"][0]["nonce"]
    return row if row is not None and row.audit and row.audit[0].get("nonce") == nonce else None


def _announce(row: Any) -> None:
    """Signals and alerts for a newly stored dead letter."""
    from safetynet import alerts

    for receiver, response in signals.dead_letter_recorded.send_robust(sender=type(row), dead_letter=row):
        if isinstance(response, Exception):
            logger.error("safetynet: dead_letter_recorded receiver %r failed: %r", receiver, response)
    alerts.dead_letter_recorded(row)


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
    except (DatabaseError, InterfaceError) as error:
        logger.warning("safetynet: dead-letter housekeeping failed: %r", error)


def flush_spool() -> int:
    """Move spooled records into the database; return how many were moved. Safe to run anywhere."""
    directory = _spool_dir()
    if not directory.is_dir():
        return 0
    moved = 0
    for path in sorted(directory.glob("*.json")):
        try:
            fields = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # another process flushed it
        except ValueError as error:
            logger.error("safetynet: unreadable spool file %s left in place: %r", path, error)
            continue
        stored = store(fields)  # a DatabaseError propagates: the file stays for the next try
        if stored is not None:
            _announce(stored)
        path.unlink(missing_ok=True)
        moved += 1
    if moved:
        logger.info("safetynet: moved %s spooled dead letters into the database", moved)
    return moved


def enforce_cap() -> int:
    """Delete the oldest rows beyond ``DEAD_LETTER_MAX_ROWS``, loudly; return how many."""
    from safetynet.models import DeadLetter

    cap = conf.get().dead_letter_max_rows
    if cap is None:
        return 0
    boundary = DeadLetter.objects.order_by("-created_at", "-id").values_list("id", flat=True)[cap:cap + 1]
    boundary_id = next(iter(boundary), None)
    if boundary_id is None:
        return 0
    evicted = DeadLetter.objects.filter(id__lte=boundary_id)
    oldest = evicted.aggregate(oldest=Min("last_failed_at"))["oldest"]
    count, _ = evicted.delete()
    logger.warning(
        "safetynet: the dead-letter store is over its cap of %s rows: evicted the %s oldest (oldest failure %s)",
        cap, count, oldest, extra={"evicted": count, "cap": cap},
    )
    signals.dead_letters_evicted.send_robust(sender=DeadLetter, count=count, cap=cap, oldest=oldest)
    from safetynet import alerts

    alerts.dead_letters_evicted(count, cap, oldest)
    return count


# -- replay, discard, purge --------------------------------------------------------------

def replay_refusal(row: Any, task: Any, args: Any = None, kwargs: Any = None, *, check_arguments: bool = True
                   ) -> str | None:
    """Why ``row`` cannot be replayed with these arguments (None: it can). Used by replay and --dry-run.

    ``check_arguments`` runs Celery's argument check; replay skips it, since apply_async runs it again.
    """
    from safetynet.models import DeadLetter

    if row.status != DeadLetter.Status.DEAD:
        return f"status is {row.status}, not dead"
    if task is None:
        return str(UnknownTask(f"task {row.task_name!r} is not registered any more; the row is left as it was"))
    given = args is not None or kwargs is not None
    argument_paths = [path for path in (row.redacted or []) if not path.startswith("headers.")]
    if "body" in argument_paths and not given:
        return ("the message body could not be decoded, so its arguments are unknown; "
                "replay it with args/kwargs given by hand")
    if argument_paths and not given:
        return f"arguments {', '.join(argument_paths)} were redacted when stored; replay it with replacement args/kwargs"
    check = getattr(task, "__header__", None) if check_arguments and getattr(task, "typing", False) else None
    if check is not None:  # what apply_async checks before it sends
        try:
            check(*(args if args is not None else row.args or []), **(kwargs if kwargs is not None else row.kwargs or {}))
        except TypeError as error:
            return f"not sent: {error!r}"
    return None


@dataclass(frozen=True)
class ReplayOutcome:
    """What happened to one row: the new task id, or why it was left as it was."""

    dead_letter_id: int
    task_name: str
    new_task_id: str | None = None
    error: str | None = None


NOT_READ_BY_REPLAY = ("history", "traceback", "exception_message", "detail", "raw_body")


def _rows(rows: Any) -> Iterator[Any]:
    """DeadLetter rows from a row, an id, ids or a queryset (a queryset is streamed, not loaded whole)."""
    from safetynet.models import DeadLetter

    if isinstance(rows, DeadLetter):
        yield rows
        return
    if isinstance(rows, int):
        rows = [rows]
    if hasattr(rows, "model") and hasattr(rows, "iterator"):
        # replay and discard never read these, and they are most of a row
        yield from rows.order_by("id").defer(*NOT_READ_BY_REPLAY).iterator(chunk_size=2000)
        return
    items = list(rows)
    if items and not isinstance(items[0], DeadLetter):
        found = {row.id: row for row in DeadLetter.objects.filter(id__in=items)}
        missing = [pk for pk in items if pk not in found]
        if missing:
            raise LookupError(f"no dead letter with id {', '.join(map(str, missing))}")
        items = [found[pk] for pk in items]
    yield from items


def _batches(rows: Any, size: int) -> Iterator[list[Any]]:
    batch: list[Any] = []
    for row in _rows(rows):
        batch.append(row)
        if len(batch) >= size:
            yield batch
            batch = []
    if batch:
        yield batch


def _now() -> datetime:
    return datetime.now(tz=timezone.utc)


def replay(
    rows: Any,
    *,
    queue: str | None = None,
    args: list | tuple | None = None,
    kwargs: dict | None = None,
    by: str = "",
    app: Any = None,
    batch_size: int = 500,
) -> list[ReplayOutcome]:
    """Run dead letters again with a fresh attempt count; rows that cannot be replayed are left as they were.

    ``rows`` is a DeadLetter, an id, ids or a queryset. ``queue`` overrides the queue;
    ``args``/``kwargs`` replace the stored ones (the edit is audited, redacted).
    A row is refused when its task no longer exists, or when it has redacted values and
    no replacement arguments are given.
    """
    from celery import current_app

    from safetynet.models import DeadLetter

    app = app or current_app._get_current_object()
    app.loader.import_default_modules()
    outcomes: list[ReplayOutcome] = []
    for batch in _batches(rows, batch_size):
        with transaction.atomic():
            # Claim the rows: a second replay running at the same time skips them instead of sending twice.
            claimed = set(DeadLetter.objects.select_for_update(skip_locked=True)
                          .filter(id__in=[row.id for row in batch], status=DeadLetter.Status.DEAD)
                          .values_list("id", flat=True))
            sendable = []
            for row in batch:
                task = app.tasks.get(row.task_name)
                refusal = replay_refusal(row, task, args, kwargs, check_arguments=False)
                if refusal is None and row.id not in claimed:
                    refusal = "being replayed or changed by someone else right now"
                if refusal is not None:
                    outcomes.append(ReplayOutcome(row.id, row.task_name, error=refusal))
                else:
                    sendable.append((row, task))
            outcomes.extend(_send(app, sendable, queue=queue, args=args, kwargs=kwargs, by=by))
    return outcomes


def _send(app: Any, sendable: list[tuple[Any, Any]], *, queue: str | None, args: Any, kwargs: Any, by: str
          ) -> list[ReplayOutcome]:
    """Publish claimed rows and mark them replayed (inside the caller's transaction, which holds the claim)."""
    from safetynet.models import DeadLetter

    outcomes: list[ReplayOutcome] = []
    done = []
    at = _now()
    # What the audit says is the same for every row of the call but the new task id.
    event: dict[str, Any] = {"action": "replay", "by": by, "at": at.isoformat()}
    if queue:
        event["queue"] = queue
    if (args is not None or kwargs is not None) and sendable:
        edited_args, edited_kwargs, _ = redact(args or [], kwargs or {}, parameter_names(sendable[0][1]))
        event["edited"] = {"args": edited_args if args is not None else None,
                           "kwargs": edited_kwargs if kwargs is not None else None}
    with app.producer_or_acquire() as producer:
        for row, task in sendable:
            new_id = str(uuid.uuid4())
            headers = {key: value for key, value in (row.headers or {}).items()
                       if key not in _DELIVERY_HEADERS and value != REDACTED}
            headers[REPLAY_OF_HEADER] = str(row.id)
            options: dict[str, Any] = {"task_id": new_id, "headers": headers, "producer": producer}
            if queue or row.queue:
                options["queue"] = queue or row.queue
            if headers.get(progress.HEADER):  # the user who watched the first run sees the replay too
                progress.carry_over(row.task_id, new_id, row.task_name)
            try:
                task.apply_async(list(args) if args is not None else row.args,
                                 dict(kwargs) if kwargs is not None else row.kwargs, **options)
            except Exception as error:  # bad arguments, the broker refused it: this row stays dead, the rest go on
                outcomes.append(ReplayOutcome(row.id, row.task_name, error=f"not sent: {error!r}"))
                continue
            row.status = DeadLetter.Status.REPLAYED
            row.replay_count += 1
            row.replayed_task_id = new_id
            row.replayed_at = at
            row.replayed_by = by
            row.audit = [*row.audit, {**event, "new_task_id": new_id}]
            done.append(row)
            outcomes.append(ReplayOutcome(row.id, row.task_name, new_task_id=new_id))
    # Sent is past the point of no return: if marking fails, say loudly which rows went out.
    try:
        _mark_replayed(done, at, by, event)
    except (DatabaseError, InterfaceError):
        logger.critical("safetynet: replayed dead letters %s but could not mark them; do not replay them again",
                        [row.id for row in done])
        raise

    def announce() -> None:
        for row in done:
            signals.task_replayed.send_robust(sender=DeadLetter, dead_letter=row,
                                              new_task_id=row.replayed_task_id, by=by)

    transaction.on_commit(announce)
    return outcomes


def _mark_replayed(rows: list[Any], at: datetime, by: str, event: dict[str, Any]) -> None:
    """Write what replay did to ``rows``: one UPDATE per batch on PostgreSQL, one statement per row elsewhere.

    Not ``bulk_update``: its CASE WHEN per field and row costs more Python per row than
    publishing the message. On PostgreSQL only the ids and new task ids travel per row; the
    audit event is appended and the replay count incremented by the database.
    """
    from django.db import connections, router

    from safetynet.models import DeadLetter

    if not rows:
        return
    alias = router.db_for_write(DeadLetter)
    connection = connections[alias]
    meta = DeadLetter._meta
    quote = connection.ops.quote_name
    column = {name: quote(meta.get_field(name).column)
              for name in ("status", "replay_count", "replayed_task_id", "replayed_at", "replayed_by", "audit")}
    table, pk = quote(meta.db_table), quote(meta.pk.column)
    status = DeadLetter.Status.REPLAYED.value
    replayed_at = meta.get_field("replayed_at").get_db_prep_save(at, connection)
    if connection.vendor == "postgresql":
        params: list[Any] = [status, replayed_at, by, json.dumps(event)]
        for row in rows:
            params += [row.pk, row.replayed_task_id]
        values = ", ".join(["(%s, %s)"] * len(rows))
        sql = (
            f"UPDATE {table} AS d SET {column['status']} = %s, {column['replayed_at']} = %s,"
            f" {column['replayed_by']} = %s, {column['replayed_task_id']} = v.new_id,"
            f" {column['audit']} = d.{column['audit']} || jsonb_build_array(%s::jsonb"
            f" || jsonb_build_object('new_task_id', v.new_id)),"
            f" {column['replay_count']} = d.{column['replay_count']} + 1"
            f" FROM (VALUES {values}) AS v(id, new_id) WHERE d.{pk} = v.id"
        )
        with connection.cursor() as cursor:
            cursor.execute(sql, params)
        return
    audit = meta.get_field("audit")
    sql = (
        f"UPDATE {table} SET {column['status']} = %s, {column['replayed_at']} = %s, {column['replayed_by']} = %s,"
        f" {column['replayed_task_id']} = %s, {column['audit']} = %s, {column['replay_count']} = %s WHERE {pk} = %s"
    )
    with transaction.atomic(using=alias, savepoint=False), connection.cursor() as cursor:
        cursor.executemany(sql, [
            [status, replayed_at, by, row.replayed_task_id, audit.get_db_prep_save(row.audit, connection),
             row.replay_count, row.pk]
            for row in rows
        ])


def replay_summary(outcomes: list[ReplayOutcome], *, most: int = 20) -> tuple[str | None, list[str]]:
    """What a replay did, said to staff: one line for the rows sent, one per kind of refusal
    (so a thousand alike refusals make one line)."""
    sent = [outcome for outcome in outcomes if outcome.new_task_id]
    done = None
    if sent:
        noun = "dead letter" if len(sent) == 1 else "dead letters"
        done = (f"Replayed {len(sent)} {noun}: "
                + ", ".join(f"#{outcome.dead_letter_id} as {outcome.new_task_id}" for outcome in sent[:most])
                + (f" and {len(sent) - most} more" if len(sent) > most else "") + ".")
    refused: dict[str, list[int]] = {}
    for outcome in outcomes:
        if outcome.error:
            refused.setdefault(outcome.error, []).append(outcome.dead_letter_id)
    return done, [f"Not replayed, left as {'it was' if len(ids) == 1 else 'they were'}: {ids_text(ids, most)}: {error}"
                  for error, ids in refused.items()]


def ids_text(ids: list[int], most: int = 20) -> str:
    """Row ids as staff read them: ``#1, #2 and 3 more``."""
    shown = ", ".join(f"#{pk}" for pk in ids[:most])
    return shown + (f" and {len(ids) - most} more" if len(ids) > most else "")


# -- reading rows back -------------------------------------------------------------------

def shown_moment(value: Any) -> datetime | None:
    """A time stored in a history entry or an audit event (epoch seconds or ISO text, naive meaning UTC)."""
    if isinstance(value, (int, float)) and not isinstance(value, bool):
        try:
            return datetime.fromtimestamp(value, tz=timezone.utc)
        except (OverflowError, OSError, ValueError):
            return None
    if isinstance(value, str):
        try:
            parsed = datetime.fromisoformat(value)
        except ValueError:
            return None
        return parsed if parsed.tzinfo else parsed.replace(tzinfo=timezone.utc)
    return None


def shown_json(value: Any) -> str:
    """A stored value as staff read it: indented JSON, keys sorted."""
    return json.dumps(value, indent=2, sort_keys=True, ensure_ascii=False, default=str)


def history_entries(row: Any) -> list[dict[str, Any]]:
    """The row's attempt history, each entry with ``started_at`` as a datetime (for display)."""
    return [{**entry, "started_at": shown_moment(entry.get("started"))}
            for entry in row.history or [] if isinstance(entry, dict)]


def audit_events(row: Any) -> list[dict[str, Any]]:
    """The row's audit trail for display: action, when, by whom, and the rest as pretty JSON."""
    events = []
    for event in row.audit or []:
        if not isinstance(event, dict):
            continue
        extra = {key: value for key, value in event.items() if key not in ("action", "at", "by", "nonce")}
        events.append({"action": event.get("action", "?"), "at": shown_moment(event.get("at")),
                       "by": event.get("by") or "",
                       "extra": shown_json(extra) if extra else ""})
    return events


def discard(rows: Any, *, by: str = "") -> int:
    """Mark dead letters handled without running them; return how many changed."""
    from safetynet.models import DeadLetter

    at = _now().isoformat()
    changed = 0
    for batch in _batches(rows, 500):
        with transaction.atomic():
            # Read again under a lock: a replay committing meanwhile must not be overwritten, and a row a
            # replay holds right now is skipped (that replay marks it).
            dead = list(DeadLetter.objects.select_for_update(skip_locked=True)
                        .filter(id__in=[row.id for row in batch], status=DeadLetter.Status.DEAD)
                        .only("id", "status", "audit"))
            for row in dead:
                row.status = DeadLetter.Status.DISCARDED
                row.audit = [*row.audit, {"action": "discard", "by": by, "at": at}]
            DeadLetter.objects.bulk_update(dead, ["status", "audit"])
        changed += len(dead)
    return changed


def purge(older_than: datetime, *, status: str | None = None) -> int:
    """Delete rows whose last failure is before ``older_than`` (optionally only of one status)."""
    from safetynet.models import DeadLetter

    rows = DeadLetter.objects.older_than(older_than)
    if status:
        rows = rows.filter(status=status)
    count, _ = rows.delete()
    return count

