"""Fingerprints: alike failures get the same one, so they group (and alert once)."""

from __future__ import annotations

import hashlib
import re

__all__ = ["fingerprint", "normalise_message"]

_VOLATILE = [
    (re.compile(r"[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}", re.I), "<uuid>"),
    (re.compile(r"0x[0-9a-f]+", re.I), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\""), "<str>"),
    (re.compile(r"\d+(\.\d+)?"), "<n>"),
]
_FRAME = re.compile(r'File "([^"]+)", line \d+, in (\S+)')
#: Only the start of a message is read (the normalised basis keeps 500 characters anyway): a
#: message of megabytes costs no more than a long one.
_READ_CHARS = 8192


def normalise_message(message: str) -> str:
    """A failure message with ids, numbers and quoted values replaced, so alike failures group."""
    for pattern, placeholder in _VOLATILE:
        message = pattern.sub(placeholder, message)
    return message.strip()[:500]


def fingerprint(task_name: str, exception_type: str, message: str, traceback: str = "") -> str:
    """sha1 of task, exception type and normalised message (the top frame when there is no message)."""
    basis = normalise_message(message[:_READ_CHARS])
    if not basis:
        frames = _FRAME.findall((traceback or "")[-_READ_CHARS:])
        basis = ":".join(frames[-1]) if frames else ""
    return hashlib.sha1(f"{task_name}\n{exception_type}\n{basis}".encode()).hexdigest()

