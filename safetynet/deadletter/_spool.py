"""The spool: dead letters that wait on local disk while the database does not answer.

One JSON file per task, written atomically (a temporary file, fsynced, renamed), so a crash never
leaves half a record; ``safetynet.deadletter.flush_spool`` moves them into the database.
"""

from __future__ import annotations

import json
import logging
import os
import re
import tempfile
import uuid
from collections.abc import Iterator
from pathlib import Path
from typing import Any

from safetynet import conf

__all__ = ["directory", "pending", "remove", "write"]

logger = logging.getLogger("safetynet")


def directory() -> Path:
    """Where spooled records wait (``SPOOL_DIR``)."""
    return Path(conf.get().spool_dir or os.path.join(tempfile.gettempdir(), "safetynet-spool"))


def write(fields: dict[str, Any], error: BaseException) -> None:
    """Keep a record the database refused (``error``) in a file of its own."""
    folder = directory()
    folder.mkdir(parents=True, exist_ok=True)
    name = re.sub(r"[^A-Za-z0-9_.-]", "_", str(fields["task_id"]))[:200] or uuid.uuid4().hex
    handle, temporary = tempfile.mkstemp(dir=folder, prefix=".tmp-")
    with os.fdopen(handle, "w") as file:
        json.dump(fields, file, default=str)
        file.flush()
        os.fsync(file.fileno())
    os.replace(temporary, folder / f"{name}.json")
    logger.error(
        "safetynet: the database did not answer (%r); dead letter of %s[%s] spooled to %s",
        error, fields["task_name"], fields["task_id"], folder,
        extra={"task_name": fields["task_name"], "task_id": fields["task_id"], "spool": str(folder)},
    )


def pending() -> Iterator[tuple[Path, dict[str, Any]]]:
    """The spooled records, oldest name first, each with its file (an unreadable file is left in place)."""
    folder = directory()
    if not folder.is_dir():
        return
    for path in sorted(folder.glob("*.json")):
        try:
            fields = json.loads(path.read_text())
        except FileNotFoundError:
            continue  # another process flushed it
        except ValueError as error:
            logger.error("safetynet: unreadable spool file %s left in place: %r", path, error)
            continue
        yield path, fields


def remove(path: Path) -> None:
    """The record of ``path`` is stored: forget its file."""
    path.unlink(missing_ok=True)
