"""Fingerprints: alike failures get the same one, so they group (and alert once).

One outage should be one group, whichever row, customer, partner or host each failing task was about. The
message is normalised before it is hashed: the task's own argument values (``refresh_partner_feed("acme")``
failing with ``partner acme: feed.example.com refused the connection``), then URLs, e-mail addresses, UUIDs, IP
addresses, host names, hex ids, quoted values and numbers are replaced by placeholders.

A fingerprint is computed once, when the dead letter is recorded, and stored with it: a row keeps the fingerprint
it was recorded with when this normalisation changes, so right after an upgrade that changes it, one failure can
show as an old group (which stops growing) and a new one.
"""

from __future__ import annotations

import hashlib
import re
from collections.abc import Iterable, Iterator, Mapping
from typing import Any

from safetynet.redaction import REDACTED

__all__ = ["fingerprint", "normalise_message"]

_TOP_LEVEL_DOMAINS = (
    "com|net|org|io|dev|app|ai|cloud|co|biz|info|me|us|uk|de|fr|nl|eu|ch|jp|ca|au|in|br|ru|cn|"
    "internal|local|localdomain|lan|corp|home|intranet|example|test|invalid|svc|cluster"
)
_VOLATILE = [
    # An address with a scheme, up to a space, a quote or a closing bracket.
    (re.compile(r"\b[a-z][a-z0-9+.-]*://[^\s'\"<>()\[\]{}]+", re.I), "<url>"),
    (re.compile(r"\b[\w.+-]+@[a-z0-9-]+(?:\.[a-z0-9-]+)+\b", re.I), "<email>"),
    (re.compile(r"\b[0-9a-f]{8}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{4}-[0-9a-f]{12}\b", re.I), "<uuid>"),
    # IPv6: eight groups, or fewer around a "::" (a time such as 12:30:45 has neither).
    (re.compile(r"(?<![\w:])(?:[0-9a-f]{1,4}:){7}[0-9a-f]{1,4}(?![\w:])|"
                r"(?<![\w:])(?:[0-9a-f]{1,4}(?::[0-9a-f]{1,4})*)?::(?:[0-9a-f]{1,4}(?::[0-9a-f]{1,4})*)?(?![\w:])",
                re.I), "<ip>"),
    (re.compile(r"\b\d{1,3}(?:\.\d{1,3}){3}(?::\d{1,5})?\b"), "<ip>"),
    # A host name: labels ending in a known top-level domain (not a dotted Python name such as shop.tasks).
    (re.compile(rf"\b(?:[a-z0-9](?:[a-z0-9-]{{0,61}}[a-z0-9])?\.)+(?:{_TOP_LEVEL_DOMAINS})\b(?::\d{{1,5}})?|"
                r"\blocalhost(?::\d{1,5})?\b", re.I), "<host>"),
    (re.compile(r"\b0x[0-9a-f]+\b", re.I), "<hex>"),
    # A hex id (a hash, an object id): 8 or more hex digits with at least one digit and one letter.
    (re.compile(r"\b(?=[0-9a-f]*\d)(?=[0-9a-f]*[a-f])[0-9a-f]{8,}\b", re.I), "<hex>"),
    (re.compile(r"'[^']*'|\"[^\"]*\"|`[^`]*`|‘[^’]*’|“[^”]*”"), "<str>"),
    (re.compile(r"\d+(?:\.\d+)?"), "<n>"),
]
_FRAME = re.compile(r'File "([^"]+)", line \d+, in (\S+)')
#: Only the start of a message is read (the normalised basis keeps 500 characters anyway): a
#: message of megabytes costs no more than a long one.
_READ_CHARS = 8192
#: Argument values looked for in the message: texts of this many characters (a shorter one, "a" or "id", would
#: replace parts of words), at most this many of them.
_ARGUMENT_CHARS = (2, 200)
_ARGUMENTS_READ = 32


def _argument_texts(arguments: Any, depth: int = 0) -> Iterator[str]:
    """The short texts among a task's arguments (top level, and one level into lists and dicts)."""
    if isinstance(arguments, str):
        if _ARGUMENT_CHARS[0] <= len(arguments) <= _ARGUMENT_CHARS[1] and arguments != REDACTED \
                and not arguments.isdigit():
            yield arguments
    elif depth < 2 and isinstance(arguments, Mapping):
        for value in list(arguments.values())[:_ARGUMENTS_READ]:
            yield from _argument_texts(value, depth + 1)
    elif depth < 2 and isinstance(arguments, (list, tuple)):
        for value in arguments[:_ARGUMENTS_READ]:
            yield from _argument_texts(value, depth + 1)


def _without_arguments(message: str, arguments: Iterable[Any]) -> str:
    texts = sorted({text for value in arguments for text in _argument_texts(value, 1)}, key=len, reverse=True)
    for text in texts[:_ARGUMENTS_READ]:
        message = re.sub(rf"(?<!\w){re.escape(text)}(?!\w)", "<arg>", message)
    return message


def normalise_message(message: str, arguments: Iterable[Any] = ()) -> str:
    """A failure message with the task's argument values, URLs, addresses, hosts, ids, numbers and quoted values
    replaced, so alike failures group. ``arguments`` are the task's argument values (positional ones, then keyword
    ones), as stored."""
    message = _without_arguments(message, arguments)
    for pattern, placeholder in _VOLATILE:
        message = pattern.sub(placeholder, message)
    return message.strip()[:500]


def fingerprint(task_name: str, exception_type: str, message: str, traceback: str = "", *,
                arguments: Iterable[Any] = ()) -> str:
    """sha1 of task, exception type and normalised message (the top frame when there is no message).

    ``arguments``: the task's argument values (``[*args, *kwargs.values()]``), whose texts in the message are
    replaced too.
    """
    basis = normalise_message(message[:_READ_CHARS], arguments)
    if not basis:
        frames = _FRAME.findall((traceback or "")[-_READ_CHARS:])
        basis = ":".join(frames[-1]) if frames else ""
    return hashlib.sha1(f"{task_name}\n{exception_type}\n{basis}".encode()).hexdigest()
