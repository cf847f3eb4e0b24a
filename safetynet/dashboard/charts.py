"""Charts drawn as inline SVG on the server: axes, gridlines, a legend, and a link behind every column.

Two kinds: a stacked bar chart (outcomes per step: succeeded, retried, given up) and a line chart
(run time p50/p95 per step). The geometry is worked out here; the template only draws it.
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from dataclasses import dataclass
from datetime import datetime

from django.utils import timezone

from safetynet.stats import human_duration

__all__ = ["Chart", "Column", "Line", "Segment", "Tick", "line_chart", "nice_ticks", "stacked_chart"]

WIDTH, HEIGHT = 640, 220
LEFT, RIGHT, TOP, BOTTOM = 62, 8, 10, 26


@dataclass(frozen=True)
class Tick:
    """A labelled position on an axis (pixels in the chart's coordinates)."""

    at: float
    label: str


@dataclass(frozen=True)
class Segment:
    """One series' part of a column."""

    series: str
    css: str
    x: float
    y: float
    width: float
    height: float
    value: int


@dataclass(frozen=True)
class Column:
    """One step of a stacked chart: its segments, its tooltip and where it links."""

    x: float
    width: float
    label: str
    total: int
    segments: tuple[Segment, ...]
    url: str


@dataclass(frozen=True)
class Line:
    """One series of a line chart: SVG path data (gaps where there is no value) and its dots."""

    series: str
    css: str
    path: str
    dots: tuple[tuple[float, float, str], ...]


@dataclass(frozen=True)
class Chart:
    """A chart's geometry; ``safetynet/dashboard/_chart.html`` draws it."""

    id: str
    title: str
    width: int
    height: int
    left: int
    top: int
    plot_width: int
    plot_height: int
    y_ticks: tuple[Tick, ...]
    x_ticks: tuple[Tick, ...]
    legend: tuple[tuple[str, str, str], ...]  # (name, css class, what it adds up to)
    columns: tuple[Column, ...] = ()
    lines: tuple[Line, ...] = ()
    total: int = 0
    empty: bool = False

    @property
    def bottom(self) -> int:
        return self.top + self.plot_height

    @property
    def right(self) -> int:
        return self.left + self.plot_width


def nice_ticks(highest: float, *, most: int = 5) -> list[float]:
    """0 and round steps (1, 2, 5 × 10ⁿ) up to at least ``highest``: at most ``most`` + 1 values."""
    if highest <= 0:
        return [0.0, 1.0]
    rough = highest / most
    power = 10 ** math.floor(math.log10(rough))
    step = next(factor * power for factor in (1, 2, 2.5, 5, 10) if factor * power >= rough)
    count = math.ceil(highest / step - 1e-9)
    return [round(step * index, 10) for index in range(count + 1)]


def _label(moment: datetime, step: int, span: int) -> str:
    local = timezone.localtime(moment)
    if step < 3600:
        return local.strftime("%H:%M")
    return local.strftime("%a %H:00" if span > 86_400 else "%H:00")


def _x_ticks(points: Sequence[datetime], step: int, slot: float) -> tuple[Tick, ...]:
    span = step * len(points)
    every = max(1, math.ceil(len(points) / 6))
    return tuple(Tick(round(LEFT + index * slot, 2), _label(points[index], step, span))
                 for index in range(0, len(points), every))


def _frame(chart_id: str, title: str, highest: float, label: Callable[[float], str]) -> dict:
    plot_width, plot_height = WIDTH - LEFT - RIGHT, HEIGHT - TOP - BOTTOM
    ticks = nice_ticks(highest)
    top_value = ticks[-1]
    y_ticks = tuple(Tick(round(TOP + plot_height - plot_height * value / top_value, 2), label(value))
                    for value in ticks)
    return {"id": chart_id, "title": title, "width": WIDTH, "height": HEIGHT, "left": LEFT, "top": TOP,
            "plot_width": plot_width, "plot_height": plot_height, "y_ticks": y_ticks}, top_value


def _count_label(value: float) -> str:
    return f"{value:g}" if value < 10_000 else f"{value / 1000:g}k"


def stacked_chart(chart_id: str, title: str, points: Sequence[datetime], step: int,
                  series: Sequence[tuple[str, str, Sequence[int]]], *,
                  link: Callable[[datetime, str], str] | None = None) -> Chart:
    """Columns of ``series`` (name, css class, one value per point) stacked bottom up; each column links to
    ``link(point, series of its largest part)``."""
    for name, _, values in series:
        if len(values) != len(points):
            raise ValueError(f"{len(points)} points but {len(values)} values of {name}")
    totals = [sum(values[index] for _, _, values in series) for index in range(len(points))]
    frame, top_value = _frame(chart_id, title, max(totals, default=0), _count_label)
    plot_width, plot_height = frame["plot_width"], frame["plot_height"]
    slot = plot_width / max(1, len(points))
    gap = min(2.0, slot * 0.2)
    columns = []
    for index, moment in enumerate(points):
        x, width = round(LEFT + index * slot + gap / 2, 2), round(max(0.5, slot - gap), 2)
        base = float(TOP + plot_height)
        segments = []
        for name, css, values in series:
            value = int(values[index])
            if not value:
                continue
            # A non-zero part is at least one pixel high, so a single failure shows.
            height = max(1.0, plot_height * value / top_value)
            base -= height
            segments.append(Segment(name, css, x, round(base, 2), width, round(height, 2), value))
        words = ", ".join(f"{name} {int(values[index])}" for name, _, values in series)
        local = timezone.localtime(moment).strftime("%Y-%m-%d %H:%M")
        biggest = max(series, key=lambda item: int(item[2][index]))[0] if totals[index] else ""
        columns.append(Column(x=x, width=width, label=f"{local}: {words}", total=totals[index],
                              segments=tuple(segments), url=link(moment, biggest) if link and totals[index] else ""))
    legend = tuple((name, css, str(sum(int(value) for value in values))) for name, css, values in series)
    return Chart(**frame, x_ticks=_x_ticks(points, step, slot), legend=legend, columns=tuple(columns),
                 total=sum(totals), empty=not any(totals))


def line_chart(chart_id: str, title: str, points: Sequence[datetime], step: int,
               series: Sequence[tuple[str, str, Sequence[float | None]]]) -> Chart:
    """Lines of ``series`` (name, css class, one value or None per point), in seconds; gaps where None."""
    highest = max((value for _, _, values in series for value in values if value is not None), default=0.0)
    frame, top_value = _frame(chart_id, title, highest, lambda value: human_duration(value) if value else "0")
    plot_width, plot_height = frame["plot_width"], frame["plot_height"]
    slot = plot_width / max(1, len(points))
    lines = []
    for name, css, values in series:
        parts: list[str] = []
        dots = []
        pen_down = False
        for index, value in enumerate(values):
            if value is None:
                pen_down = False
                continue
            x = round(LEFT + index * slot + slot / 2, 2)
            y = round(TOP + plot_height - plot_height * value / top_value, 2)
            parts.append(f"{'L' if pen_down else 'M'}{x},{y}")
            pen_down = True
            local = timezone.localtime(points[index]).strftime("%Y-%m-%d %H:%M")
            dots.append((x, y, f"{local}: {name} {human_duration(value)}"))
        lines.append(Line(name, css, " ".join(parts), tuple(dots)))
    legend = tuple((name, css, human_duration(max((v for v in values if v is not None), default=None)) + " at most")
                   for name, css, values in series)
    return Chart(**frame, x_ticks=_x_ticks(points, step, slot), legend=legend, lines=tuple(lines),
                 empty=not any(line.dots for line in lines))
