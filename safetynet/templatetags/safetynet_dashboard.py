"""Template filters of the dashboard: moments in the admin's format and time zone, durations in human units."""

from __future__ import annotations

from datetime import datetime
from typing import Any

from django import template
from django.utils import formats, timezone
from django.utils.html import format_html

from safetynet.stats import human_duration

register = template.Library()


@register.filter
def moment(value: Any) -> str:
    """``<time>`` in the admin's DATETIME_FORMAT and the current time zone; the exact second in its tooltip."""
    if not isinstance(value, datetime):
        return "–"
    local = timezone.localtime(value) if timezone.is_aware(value) else value
    return format_html('<time datetime="{}" title="{}">{}</time>', value.isoformat(),
                       local.strftime("%Y-%m-%d %H:%M:%S %Z").strip(), formats.date_format(local, "DATETIME_FORMAT"))


@register.filter
def duration(value: Any) -> str:
    """Seconds as people read them: 12 ms, 1.4 s, 3 min 20 s."""
    try:
        return human_duration(None if value is None or value == "" else float(value))
    except (TypeError, ValueError):
        return "–"
