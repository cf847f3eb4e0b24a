"""``{% load safetynet_progress %}{% progress_widget task_id %}``: a progress bar that turns into ✓ or an error."""

from __future__ import annotations

from typing import Any

from django import template
from django.urls import reverse

register = template.Library()


@register.inclusion_tag("safetynet/progress/widget.html")
def progress_widget(task_id: Any, url: str | None = None, interval: int = 1000, unit: str = "",
                    css: bool = True) -> dict[str, Any]:
    """The widget for ``task_id``: polls the progress endpoint (or ``url``) every ``interval`` ms.

    ``unit`` names what is counted ("parts": "2 of 5 parts done"); ``css=False`` leaves out the default
    stylesheet (``safetynet/progress.css``, which any rule of the project's own overrides anyway).
    """
    if isinstance(interval, bool) or not isinstance(interval, int) or interval < 200:
        raise template.TemplateSyntaxError(f"progress_widget: interval is milliseconds, 200 or more, got {interval!r}")
    return {"task_id": str(task_id), "interval": interval, "unit": str(unit), "css": bool(css),
            "url": url or reverse("safetynet_progress:status", args=[str(task_id)])}
