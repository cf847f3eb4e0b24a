"""Bar charts drawn as inline SVG on the server: no script, no framework on the page."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from datetime import datetime

__all__ = ["Bar", "Chart", "bar_chart"]


@dataclass(frozen=True)
class Bar:
    """One bar: its box in the chart's coordinates, and what its tooltip says."""

    x: float
    y: float
    width: float
    height: float
    value: int
    label: str


@dataclass(frozen=True)
class Chart:
    """A bar chart's geometry; the template draws it."""

    id: str
    title: str
    width: int
    height: int
    bars: tuple[Bar, ...]
    highest: int
    total: int
    first_label: str
    last_label: str


def _label(moment: datetime, step: int) -> str:
    return moment.strftime("%H:%M" if step < 3600 else "%d %b %H:00")


def bar_chart(chart_id: str, title: str, points: Sequence[datetime], values: Sequence[int], step: int, *,
              width: int = 600, height: int = 120) -> Chart:
    """Bars for ``values`` over ``points`` (one per step), scaled to the highest value."""
    if len(points) != len(values):
        raise ValueError(f"{len(points)} points but {len(values)} values")
    highest = max(values, default=0)
    slot = width / max(1, len(values))
    gap = min(2.0, slot * 0.2)
    bars = []
    for index, (moment, value) in enumerate(zip(points, values, strict=True)):
        # A bar of a non-zero value is at least one pixel high, so a single failure shows.
        bar_height = 0.0 if not highest or not value else max(1.0, height * value / highest)
        bars.append(Bar(x=round(index * slot + gap / 2, 2), y=round(height - bar_height, 2),
                        width=round(max(0.5, slot - gap), 2), height=round(bar_height, 2), value=int(value),
                        label=f"{_label(moment, step)} UTC: {value}"))
    return Chart(id=chart_id, title=title, width=width, height=height, bars=tuple(bars), highest=highest,
                 total=sum(values), first_label=_label(points[0], step) if points else "",
                 last_label=_label(points[-1], step) if points else "")
