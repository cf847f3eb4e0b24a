"""``{% load safetynet_progress %}{% progress_widget task_id %}``: a progress bar that turns into ✓ or an error."""

from __future__ import annotations

from typing import Any

from django import template
from django.urls import reverse

register = template.Library()


@register.inclusion_tag("safetynet/progress/widget.html")
def progress_widget(task_id: Any, url: str | None = None, interval: int = 1000) -> dict[str, Any]:
    """The widget for ``task_id``: polls the progress endpoint (or ``url``) every ``interval`` ms."""
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 200:
        raise template.TemplateSyntaxError(f"progress_widget: interval is milliseconds, 200 or more, got {interval!r}")
    return {"task_id": str(task_id), "interval": interval,
            "url": url or reverse("safetynet_progress:status", args=[str(task_id)])}
