"""The spool: dead letters that wait on local disk while the database does not answer.

One file per task, written atomically (a temporary file, fsynced, renamed), so a crash never
leaves half a record; ``safetynet.deadletter.flush_spool`` moves them into the database. The
folder is private to the user the workers run as (``_spool_folder``), and every file is signed:
its first line is ``safetynet-spool/1 <HMAC-SHA256 of the rest>``, with a key derived from
``SECRET_KEY`` (and accepted from ``SECRET_KEY_FALLBACKS``, so a key rotation does not orphan
what waits), the rest the record as JSON.

Reading trusts nothing: a file that is not signed by this project, altered, truncated, not a
regular file (a link is never followed), another user's, or too large is moved to the
``quarantine`` folder inside the spool with a WARNING, and is never stored. So is a record the
database refuses even after it was made storable (ERROR). Neither stops the files after it.
"""

from __future__ import annotations

import hashlib
import hmac
import json
import logging
import os
import re
import stat
import tempfile
import uuid
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from safetynet import signals
from safetynet.deadletter import _spool_folder
from safetynet.models import DeadLetter

__all__ = ["FORMAT", "QUARANTINE", "Spooled", "directory", "pending", "quarantine", "quarantined", "remove",
           "sign", "write", "write_quarantined"]

logger = logging.getLogger("safetynet")

#: The first word of a spool file: the format, then the signature.
FORMAT = b"safetynet-spool/1"
#: The folder, inside the spool, where files that are never stored are moved.
QUARANTINE = "quarantine"
#: A spool file larger than this is not read (a record is a few kilobytes; its fields are capped).
LARGEST_FILE = 256 * 1024 * 1024
_SALT = "safetynet.deadletter.spool"


@dataclass(frozen=True)
class Spooled:
    """A spool file whose signature holds, with the record it keeps."""

    path: Path
    fields: dict[str, Any]


def directory() -> Path:
    """Where spooled records wait (``SPOOL_DIR``, or the private default)."""
    return _spool_folder.location()[0]


def _secrets() -> list[Any]:
    from django.conf import settings

    return [settings.SECRET_KEY, *getattr(settings, "SECRET_KEY_FALLBACKS", [])]


def sign(payload: bytes, secret: Any = None) -> bytes:
    """The signature of a spool file's ``payload`` (hex), with ``SECRET_KEY`` or the ``secret`` given."""
    from django.utils.crypto import salted_hmac

    return salted_hmac(_SALT, payload, secret=secret, algorithm="sha256").hexdigest().encode("ascii")


def _content(fields: Mapping[str, Any]) -> bytes:
    payload = json.dumps(fields, default=str).encode("utf-8")
    return FORMAT + b" " + sign(payload) + b"\n" + payload


def _file_name(task_id: str) -> str:
    """``<task id>.json``; a task id that is not a plain name keeps a hash of itself, so two never share a file."""
    safe = re.sub(r"[^A-Za-z0-9_.-]", "_", task_id).lstrip(".")
    if safe == task_id and 0 < len(task_id) <= 200:
        return f"{task_id}.json"
    digest = hashlib.sha256(task_id.encode("utf-8", "surrogatepass")).hexdigest()[:16]
    return f"{safe[:150]}-{digest}.json"


def _write_atomically(folder: Path, name: str, content: bytes) -> Path:
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    try:
        with os.fdopen(handle, "wb") as file:
            file.write(content)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temporary, folder / name)
    except BaseException:
        Path(temporary).unlink(missing_ok=True)
        raise
    try:  # the rename itself survives a power cut only once the folder is synced
        folder_handle = os.open(folder, os.O_RDONLY)
        try:
            os.fsync(folder_handle)
        finally:
            os.close(folder_handle)
    except OSError:
        pass
    return folder / name


def write(fields: dict[str, Any], error: BaseException) -> Path:
    """Keep a record the database could not take (``error``) in a signed file of its own.

    Raises ConfigurationError when the spool folder cannot be made or another user can write it.
    """
    folder = _spool_folder.ensure()
    path = _write_atomically(folder, _file_name(str(fields["task_id"])), _content(fields))
    logger.error(
        "safetynet: the database did not answer (%r); dead letter of %s[%s] spooled to %s",
        error, fields["task_name"], fields["task_id"], folder,
        extra={"task_name": fields["task_name"], "task_id": fields["task_id"], "spool": str(folder)},
    )
    return path


def _read(path: Path, secrets: list[Any]) -> tuple[dict[str, Any] | None, str | None]:
    """The record of a spool file, or why it cannot be trusted; (None, None) when it is gone or changing."""
    try:
        info = os.lstat(path)
    except FileNotFoundError:
        return None, None  # another process flushed it
    except OSError as error:
        return None, f"cannot be examined ({error.strerror})"
    if stat.S_ISLNK(info.st_mode):
        return None, "is a symbolic link (links in the spool are never followed)"
    if not stat.S_ISREG(info.st_mode):
        return None, f"is not a regular file ({stat.filemode(info.st_mode)})"
    if hasattr(os, "geteuid") and info.st_uid != os.geteuid():
        return None, f"belongs to uid {info.st_uid}, not to the user this process runs as (uid {os.geteuid()})"
    if info.st_size > LARGEST_FILE:
        return None, f"is larger than {LARGEST_FILE} bytes ({info.st_size})"
    flags = os.O_RDONLY | getattr(os, "O_NOFOLLOW", 0) | getattr(os, "O_NONBLOCK", 0) | getattr(os, "O_CLOEXEC", 0)
    try:
        handle = os.open(path, flags)
    except FileNotFoundError:
        return None, None
    except OSError as error:
        return None, f"cannot be opened ({error.strerror})"
    with os.fdopen(handle, "rb") as file:
        opened = os.fstat(file.fileno())
        if (opened.st_dev, opened.st_ino) != (info.st_dev, info.st_ino):
            return None, None  # written again meanwhile (the same task spooled twice): read at the next flush
        data = file.read(LARGEST_FILE + 1)
    header, newline, payload = data.partition(b"\n")
    if not newline or not header.startswith(FORMAT + b" "):
        return None, ("is not signed (no 'safetynet-spool/1' signature line): not written by safetynet, "
                      "or by a version before signed spool files")
    signature = header[len(FORMAT) + 1:]
    if not any(hmac.compare_digest(signature, sign(payload, secret)) for secret in secrets):
        return None, ("has a signature that does not match: it was altered or cut after it was written, "
                      "or signed with another SECRET_KEY")
    try:
        fields = json.loads(payload)
    except ValueError:
        return None, "is signed but its record is not JSON"
    if not isinstance(fields, dict):
        return None, "is signed but holds no record"
    return fields, None


def pending() -> Iterator[Spooled]:
    """The signed records waiting, by file name; a file that cannot be trusted is quarantined on the way.

    Raises ConfigurationError when another user can write the spool folder (nothing in it is read).
    """
    folder = _spool_folder.existing()
    if folder is None:
        return
    secrets = _secrets()
    try:
        names = sorted(entry.name for entry in os.scandir(folder))
    except FileNotFoundError:
        return
    for name in names:
        if name.startswith(".") or not name.endswith(".json"):
            continue  # a file being written (.tmp-…), the quarantine folder, or anything that is not a record
        path = folder / name
        fields, distrust = _read(path, secrets)
        if distrust is not None:
            quarantine(path, distrust)
        elif fields is not None:
            yield Spooled(path, fields)


def remove(path: Path) -> None:
    """The record of ``path`` is stored: forget its file."""
    path.unlink(missing_ok=True)


def _announce(target: Path, why: str, kind: str, fields: Mapping[str, Any] | None) -> None:
    known = fields or {}
    for receiver, response in signals.dead_letter_quarantined.send_robust(
        sender=DeadLetter, path=str(target), why=why, kind=kind, task_name=str(known.get("task_name") or ""),
        task_id=str(known.get("task_id") or ""), record=dict(fields) if fields is not None else None,
    ):
        if isinstance(response, Exception):
            logger.error("safetynet: dead_letter_quarantined receiver %r failed: %r", receiver, response)


def quarantine(path: Path, why: str, *, kind: str = "untrusted", fields: Mapping[str, Any] | None = None
               ) -> Path | None:
    """Move a spool entry (never followed) to the quarantine folder, loudly; None if it is gone or cannot move.

    ``kind`` is ``untrusted`` (not a signed file of this project: a WARNING) or ``unstorable``
    (the database refused its record: an ERROR, with the record, ``fields``, to the signal).
    """
    level = logging.ERROR if kind == "unstorable" else logging.WARNING
    extra = {"action": "quarantine", "spool_file": str(path), "why": why,
             "task_name": str((fields or {}).get("task_name") or ""), "task_id": str((fields or {}).get("task_id") or "")}
    try:
        folder = _spool_folder.private_subfolder(path.parent, QUARANTINE)
        target = folder / path.name
        if os.path.lexists(target):
            target = folder / f"{path.stem}-{uuid.uuid4().hex[:8]}{path.suffix}"
        os.rename(path, target)  # the entry itself: a link is moved, not what it points to
    except FileNotFoundError:
        return None  # another process moved or flushed it
    except Exception as error:  # a folder that cannot be used must not stop the files after this one
        logger.error("safetynet: spool file %s %s, and it could not be moved to quarantine (%s): left in place, "
                     "skipped at every flush", path, why, error, extra=extra)
        return None
    logger.log(level, "safetynet: spool file %s %s: moved to %s, never stored", path, why, target, extra=extra)
    _announce(target, why, kind, fields)
    return target


def write_quarantined(fields: dict[str, Any], why: str) -> Path:
    """Keep a record the database refused even made storable in a signed file of the quarantine folder."""
    folder = _spool_folder.private_subfolder(_spool_folder.ensure(), QUARANTINE)
    name = _file_name(str(fields["task_id"]))
    if os.path.lexists(folder / name):  # the same task refused before: keep both
        name = f"{name[:-5]}-{uuid.uuid4().hex[:8]}.json"
    target = _write_atomically(folder, name, _content(fields))
    logger.error("safetynet: the database refused the dead letter of %s[%s] (%s): kept in %s, never stored",
                 fields["task_name"], fields["task_id"], why, target,
                 extra={"action": "quarantine", "spool_file": str(target), "why": why,
                        "task_name": fields["task_name"], "task_id": fields["task_id"]})
    _announce(target, why, "unstorable", fields)
    return target


def quarantined() -> list[Path]:
    """The entries in the quarantine folder (none when the spool or the folder does not exist)."""
    folder = directory() / QUARANTINE
    try:
        return sorted(Path(entry.path) for entry in os.scandir(folder) if not entry.name.startswith("."))
    except OSError:
        return []
