"""The charts' geometry and the human units: pure functions, no database."""

from datetime import datetime, timedelta, timezone

import pytest

from safetynet.dashboard.charts import line_chart, nice_ticks, stacked_chart
from safetynet.stats import human_duration


@pytest.mark.parametrize(("seconds", "shown"), [
    (None, "–"), (0.0002, "under 1 ms"), (0.0008, "1 ms"), (0.012, "12 ms"), (0.25, "250 ms"), (1.44, "1.4 s"),
    (2.0, "2 s"), (42, "42 s"), (200, "3 min 20 s"), (180, "3 min"), (7500, "2 h 5 min"), (90_000, "1 d 1 h"),
])
def test_durations_read_in_human_units(seconds, shown):
    assert human_duration(seconds) == shown


@pytest.mark.parametrize(("highest", "ticks"), [
    (0, [0, 1]), (7, [0, 2, 4, 6, 8]), (8, [0, 2, 4, 6, 8]), (123, [0, 25, 50, 75, 100, 125]),
    (1500, [0, 500, 1000, 1500]), (0.37, [0, 0.1, 0.2, 0.3, 0.4]),
])
def test_the_y_axis_has_round_steps_up_to_the_highest_value(highest, ticks):
    assert nice_ticks(highest) == pytest.approx(ticks)


def timezone_now_label(moment):
    from django.utils import timezone as django_timezone

    return django_timezone.localtime(moment).strftime("%H:%M")


def points(count, step=60):
    start = datetime(2026, 12, 5, 10, 0, tzinfo=timezone.utc)
    return [start + timedelta(seconds=step * index) for index in range(count)]


def test_a_stacked_column_adds_its_parts_bottom_up_and_links_where_it_is_told():
    chart = stacked_chart("c", "Outcomes", points(3), 60,
                          [("succeeded", "ok", [4, 0, 1]), ("given up", "bad", [1, 0, 0])],
                          link=lambda moment, biggest: f"/{moment:%H%M}/{biggest}")
    first, empty, last = chart.columns
    assert [part.value for part in first.segments] == [4, 1] and empty.segments == () and empty.url == ""
    bottom = chart.top + chart.plot_height
    assert first.segments[0].y + first.segments[0].height == pytest.approx(bottom)  # the first part sits on the axis
    assert first.segments[1].y + first.segments[1].height == pytest.approx(first.segments[0].y)  # the next on it
    assert first.url == "/1000/succeeded" and last.url == "/1002/succeeded"
    assert chart.legend == (("succeeded", "ok", "5"), ("given up", "bad", "1")) and chart.total == 6
    assert [tick.label for tick in chart.y_ticks] == ["0", "1", "2", "3", "4", "5"]
    # along the bottom: times in the current time zone (the admin's), not UTC
    assert timezone_now_label(points(1)[0]) in [tick.label for tick in chart.x_ticks]


def test_a_single_failure_among_many_is_still_a_visible_part():
    chart = stacked_chart("c", "Outcomes", points(1), 60, [("succeeded", "ok", [10_000]), ("given up", "bad", [1])])
    assert chart.columns[0].segments[1].height >= 1.0


def test_a_line_has_gaps_where_nothing_ran():
    chart = line_chart("l", "Run time", points(4), 60, [("p50", "p50", [0.1, None, 0.2, 0.3])])
    path = chart.lines[0].path
    assert path.count("M") == 2 and path.count("L") == 1  # pen up over the empty minute
    assert len(chart.lines[0].dots) == 3 and not chart.empty
    assert line_chart("l", "Run time", points(2), 60, [("p50", "p50", [None, None])]).empty


def test_values_and_points_must_match():
    with pytest.raises(ValueError, match="2 points but 1 values of succeeded"):
        stacked_chart("c", "t", points(2), 60, [("succeeded", "ok", [1])])
