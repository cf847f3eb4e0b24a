"""Durations in the units a person reads: ``250 ms``, ``5 s``, ``2 min 30 s``, ``1 h``, ``3 d``.

Pure, for ``explain``, ``RetryPolicy.describe`` and the docs; never ``0.000 s`` or ``600s``.
"""

from __future__ import annotations

import math

__all__ = ["duration", "duration_range"]

_UNITS = ((86400, "d"), (3600, "h"), (60, "min"), (1, "s"))


def duration(seconds: float) -> str:
    """``seconds`` in at most two units, rounded to what a person reads: ``0 s``, ``0.5 s``, ``1 min 30 s``."""
    if math.isinf(seconds):
        return "∞"
    if seconds < 0:
        return "-" + duration(-seconds)
    if seconds == 0:
        return "0 s"
    if seconds < 1:
        milliseconds = seconds * 1000
        return f"{milliseconds:.3g} ms" if milliseconds < 100 else f"{seconds:.2g} s"
    if seconds < 60:
        return f"{seconds:.3g} s"
    whole = round(seconds)
    for index, (size, unit) in enumerate(_UNITS):
        if whole >= size:
            smaller, small_unit = _UNITS[index + 1] if index + 1 < len(_UNITS) else (1, "")
            count, rest = divmod(whole, size)
            rest = round(rest / smaller)
            if rest * smaller == size:  # 59.6 min rounds up to the next hour
                count, rest = count + 1, 0
            return f"{count} {unit}" + (f" {rest} {small_unit}" if rest else "")
    return f"{whole} s"  # pragma: no cover (whole >= 1 here)


def duration_range(low: float, high: float) -> str:
    """``5 s`` when both ends are the same, else ``0 s–15 s``."""
    return duration(low) if low == high else f"{duration(low)}–{duration(high)}"
