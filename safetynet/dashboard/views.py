"""The dashboard's pages and actions (the dead-letter pages live in ``dead_letters``, what they share in ``pages``).

Who sees what: a page is for active staff users with the model permission it names (a superuser
has them all); an anonymous visitor is sent to ``LOGIN_URL``, anyone else gets 403. Actions are
POST only, CSRF-checked, and need the model's *change* permission; replay and discard first answer
with a confirmation page, and act only on its POST (``confirm=yes``). Every response carries its own
``Content-Security-Policy`` (no script; the page's stylesheet by nonce), ``X-Frame-Options: DENY``,
``X-Content-Type-Options: nosniff`` and ``Referrer-Policy: same-origin``:

    overview                     view_taskstats          the aggregates of a window (1h, 24h, 7d)
    failures                     view_deadletter         dead letters grouped by fingerprint
    dead letters, one letter     view_deadletter
    replay, discard (one, group) change_deadletter
    schedule                     view_scheduledmessage   durable retries and the outbox, by due time
    bring forward                change_scheduledmessage
    upstreams (breakers/)        view_breakerstate       breakers, retry budgets and limits, with their use now
    open, close by hand          change_breakerstate

Every list is paginated in the database and reads only the columns it shows (of a long text, only
what it shows); nothing on a page is larger than the cap of one field (``DEAD_LETTER_MAX_*``).
"""

from __future__ import annotations

import time
from datetime import datetime, timedelta
from datetime import timezone as dt_timezone
from typing import Any
from urllib.parse import urlencode

from django.core.paginator import Paginator
from django.db import DatabaseError
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.template.loader import render_to_string
from django.urls import reverse
from django.utils import timezone
from django.views.decorators.http import require_safe

from safetynet import breakers, conf, deadletter, limits, stats
from safetynet.breakers import budgets
from safetynet import schedule as durable_schedule
from safetynet.dashboard import brokers
from safetynet.dashboard.charts import line_chart, stacked_chart
from safetynet.dashboard.dead_letters import (
    bulk_action,
    dead_letter,
    dead_letter_live,
    dead_letter_action,
    dead_letters,
    failure_group_action,
    failures,
)
from safetynet.dashboard.pages import (
    PAGE_SIZE,
    percent,
    render_page,
    staff_action,
    staff_page,
    storable,
    tell,
    utc,
)
from safetynet.exceptions import ConfigurationError
from safetynet.models import ScheduledMessage, TaskStats
from safetynet.stats import human_duration

__all__ = [
    "breaker_action", "breakers_page", "bulk_action", "dead_letter", "dead_letter_live", "dead_letter_action", "dead_letters", "failure_group_action",
    "failures", "live", "overview", "queues", "schedule", "schedule_due_now",
]


# -- overview ---------------------------------------------------------------------------------

#: The longest custom range (the hour rows are read beyond a few hours).
LONGEST_RANGE = 31 * 86_400


def _moment(text: str) -> datetime | None:
    """A moment from a link (ISO 8601) or a ``datetime-local`` field (the current time zone)."""
    try:
        parsed = datetime.fromisoformat(text.strip())
    except ValueError:
        return None
    return parsed if timezone.is_aware(parsed) else timezone.make_aware(parsed)


def _range(request: HttpRequest) -> tuple[str, int, datetime | None, list[str]]:
    """(window name or "custom", seconds, end or None for now, errors) from ``window`` or ``since``/``until``."""
    errors = []
    since_text, until_text = request.GET.get("since") or "", request.GET.get("until") or ""
    if since_text or until_text:
        since, until = _moment(since_text), _moment(until_text) if until_text else timezone.now()
        if since is None or until is None:
            errors.append("A custom range needs two moments such as 2026-12-05T14:00; showing 24h.")
        elif not since < until:
            errors.append("A custom range must start before it ends; showing 24h.")
        elif (until - since).total_seconds() > LONGEST_RANGE:
            errors.append("A custom range is at most 31 days long; showing 24h.")
        else:
            seconds = (until - since).total_seconds()
            step = TaskStats.MINUTE if seconds <= 3600 else TaskStats.HOUR
            # Whole steps, ending with the step that holds ``until``.
            return "custom", int(-(-seconds // step) * step), until - timedelta(microseconds=1), errors
        return "24h", stats.WINDOWS["24h"], None, errors
    window = request.GET.get("window") or "24h"
    if window not in stats.WINDOWS:
        errors.append(f"Unknown window {window!r}: choose one of {', '.join(stats.WINDOWS)}. Showing 24h.")
        window = "24h"
    return window, stats.WINDOWS[window], None, errors


def _iso(moment: datetime) -> str:
    return moment.astimezone(dt_timezone.utc).strftime("%Y-%m-%dT%H:%M:%SZ").replace("Z", "+00:00")


def _dead_link(task: str | None, since: datetime, until: datetime, **more: str) -> str:
    """The dead-letter list of every status behind a "given up" figure (one task, or all), over a range."""
    query = {"status": "all", "since": _iso(since), "until": _iso(until), **more}
    if task:
        query["task"] = f"={task}"
    return reverse("safetynet_dashboard:dead_letters") + "?" + urlencode(query)


def _overview_data(request: HttpRequest) -> tuple[dict[str, Any], list[str]]:
    name, seconds, end, errors = _range(request)
    task = request.GET.get("task") or None
    if task is not None and not storable(task):
        task = None
        errors.append("That task name cannot exist; showing every task.")
    data = stats.overview(seconds, now=end, task_name=task)
    return {"window": name, "seconds": seconds, "data": data, "task": task or ""}, errors


def _overview_figures(found: dict[str, Any]) -> dict[str, Any]:
    totals = found["data"].totals
    return {"total_runs": totals.runs, "total_success": percent(totals.success_rate), "total_retries": totals.retries,
            "total_dead": totals.dead, "dead_waiting": deadletter.waiting_count(),
            "scheduled": ScheduledMessage.objects.filter(state=ScheduledMessage.State.SCHEDULED).count()}


@require_safe
@staff_page("safetynet.view_taskstats")
def overview(request: HttpRequest) -> HttpResponse:
    """Per task over a window or a range: runs, success rate, retries, deaths by reason, p50/p95; charts over time."""
    found, errors = _overview_data(request)
    for error in errors:
        tell(request, "error", error)
    data, task = found["data"], found["task"] or None

    def link(moment: datetime, biggest: str) -> str:
        after = moment + timedelta(seconds=data.step)
        if biggest == "given up":
            return _dead_link(task, moment, after)
        if data.step == TaskStats.HOUR:  # zoom into the hour, a bar a minute
            return "?" + urlencode({"since": _iso(moment), "until": _iso(after), **({"task": task} if task else {})})
        return ""

    charts = [
        stacked_chart("chart-outcomes", "Outcomes", data.points, data.step,
                      [("succeeded", "series-succeeded", data.successes), ("retried", "series-retried", data.retries),
                       ("given up", "series-given-up", data.dead)], link=link),
        line_chart("chart-latency", "Run time of an attempt", data.points, data.step,
                   [("p50", "series-p50", data.p50s), ("p95", "series-p95", data.p95s)]),
    ]
    query = request.GET.copy()
    return render_page(request, "overview.html", "overview", {
        **found, "windows": list(stats.WINDOWS), "charts": charts, "figures": _overview_figures(found),
        "rows": [{"summary": summary, "success": percent(summary.success_rate),
                  "dead_url": _dead_link(summary.task_name, data.start, data.end),
                  "reasons": [(reason, count, _dead_link(summary.task_name, data.start, data.end, reason=reason))
                              for reason, count in summary.dead_by_reason.items()]}
                 for summary in data.tasks],
        "dead_url": _dead_link(task, data.start, data.end),
        "breakers": _breaker_states(only_unhealthy=True),
        "live_url": reverse("safetynet_dashboard:live", args=["overview"]) + "?" + query.urlencode(),
        "since_value": timezone.localtime(data.start).strftime("%Y-%m-%dT%H:%M"),
        "until_value": timezone.localtime(data.end).strftime("%Y-%m-%dT%H:%M"),
        "time_zone": timezone.get_current_timezone_name(),
    }, status=400 if errors else 200)


# -- queues and workers ---------------------------------------------------------------------------

def _queue_figures(snapshot: brokers.Snapshot) -> dict[str, Any]:
    figures: dict[str, Any] = {}
    for queue in snapshot.queues:
        for field in ("depth", "in_flight", "scheduled"):
            figures[f"queue:{queue['name']}:{field}"] = queue[field]
    for worker in snapshot.workers:
        figures[f"worker:{worker['name']}:active"] = worker["active"]
        figures[f"worker:{worker['name']}:reserved"] = worker["reserved"]
        figures[f"worker:{worker['name']}:last"] = (
            human_duration(max(0.0, time.time() - worker["last_answer"])) + " ago")
    figures["workers_count"] = sum(1 for worker in snapshot.workers if worker["answering"])
    return figures


@require_safe
@staff_page("safetynet.view_taskstats")
def queues(request: HttpRequest) -> HttpResponse:
    """Each queue's depth (from the broker), in flight and scheduled; the workers that answer. Read-only."""
    from celery import current_app

    snapshot = brokers.snapshot(current_app._get_current_object())
    return render_page(request, "queues.html", "queues", {
        "snapshot": snapshot, "figures": _queue_figures(snapshot), "now": time.time(),
        "durable": ScheduledMessage.objects.filter(state=ScheduledMessage.State.SCHEDULED).count(),
        "timeout": brokers.BROKER_TIMEOUT, "inspect_timeout": brokers.INSPECT_TIMEOUT,
        "live_url": reverse("safetynet_dashboard:live", args=["queues"]),
    })


# -- live figures ---------------------------------------------------------------------------------

@require_safe
@staff_page("safetynet.view_taskstats")
def live(request: HttpRequest, what: str) -> HttpResponse:
    """The figures of a page as JSON, for the page's script to refresh them without a reload."""
    if what == "overview":
        found, _ = _overview_data(request)
        return JsonResponse({"figures": _overview_figures(found)})
    if what == "queues":
        from celery import current_app

        snapshot = brokers.snapshot(current_app._get_current_object())
        figures = _queue_figures(snapshot)
        context = {"snapshot": snapshot, "figures": figures}
        # The rows themselves, drawn as the page draws them: a worker or a queue that appears shows up too.
        return JsonResponse({"figures": figures, "fragments": {
            "queue-rows": render_to_string("safetynet/dashboard/_queue_rows.html", context, request),
            "worker-rows": render_to_string("safetynet/dashboard/_worker_rows.html", context, request)}})
    raise Http404(f"no live figures for {what!r}")


# -- the durable schedule and the outbox --------------------------------------------------------

@require_safe
@staff_page("safetynet.view_scheduledmessage")
def schedule(request: HttpRequest) -> HttpResponse:
    """Scheduled retries and outbox messages not yet taken by a worker, soonest first."""
    kind = request.GET.get("kind") or ""
    waiting = ScheduledMessage.objects.filter(state__in=[ScheduledMessage.State.SCHEDULED,
                                                         ScheduledMessage.State.PUBLISHED])
    counts = {item["kind"]: item["count"] for item in waiting.order_by().values("kind").annotate(count=Count("key"))}
    if kind in ScheduledMessage.Kind.values:
        waiting = waiting.filter(kind=kind)
    paginator = Paginator(waiting.defer("message").order_by("due_at", "key"), PAGE_SIZE)
    page = paginator.get_page(request.GET.get("page"))
    now = time.time()
    rows = [{"row": row, "due": utc(row.due_at), "in_seconds": row.due_at - now,
             "age": now - row.created_at} for row in page.object_list]
    return render_page(request, "schedule.html", "schedule", {
        "rows": rows, "page_obj": page, "kind": kind, "kinds": ScheduledMessage.Kind.choices, "counts": counts,
        "kind_counts": [{"label": label, "count": counts.get(value, 0)} for value, label in ScheduledMessage.Kind.choices],
        "can_act": request.user.has_perm("safetynet.change_scheduledmessage"),
    })


@staff_action("safetynet.change_scheduledmessage")
def schedule_due_now(request: HttpRequest) -> HttpResponse:
    """POST ``key``: make one scheduled message due now (the relay publishes it within a poll).

    The key is a field, not a part of the URL: any stored key (a task id is whatever its sender chose) has a button.
    """
    key = request.POST.get("key")
    if key is None or not storable(key):
        raise Http404("no such scheduled message")
    changed = durable_schedule.bring_forward(ScheduledMessage.objects.filter(key=key))
    tell(request, "success" if changed else "warning",
         f"{key} is due now; a relay publishes it within a poll." if changed
         else f"{key} is not waiting any more; nothing done.")
    return HttpResponseRedirect(reverse("safetynet_dashboard:schedule"))


# -- breakers -------------------------------------------------------------------------------------

def _breaker_states(*, only_unhealthy: bool = False) -> list[dict[str, Any]]:
    """Each declared breaker's state, failure rate and time to half-open; a store that fails is shown, not raised."""
    now = time.time()
    shown = []
    for name, config in sorted(breakers.declared().items()):
        try:
            state = breakers.state_of(name)
        except Exception as error:  # Redis and the database both away: the page still shows the others
            shown.append({"name": name, "config": config, "state": "unknown", "error": f"{type(error).__name__}"})
            continue
        if only_unhealthy and state["state"] == breakers.CLOSED:
            continue
        calls, failed = state["calls"], state["failures"]
        shown.append({**state, "config": config, "failure_rate": failed / calls if calls else None,
                      "half_open_in": max(0.0, state["until"] - now) if state["state"] == breakers.OPEN else None,
                      "changed_at": utc(state["changed"]) if state["changed"] else None})
    return shown


def _budget_uses() -> list[dict[str, Any]]:
    """The retry budgets in use: each breaker's and each named one's first attempts and retries in the window."""
    budget = conf.get().retry_budget
    if budget is None:
        return []
    from safetynet.runtime.registry import user_tasks

    scopes = [("breaker", name) for name in sorted(breakers.declared())]
    named = sorted({task.retry_budget for task in user_tasks().values()
                    if isinstance(getattr(task, "retry_budget", None), str)})
    scopes += [("budget", name) for name in named]
    shown = []
    for kind, name in scopes:
        try:
            counted = budgets.usage(f"{'named' if kind == 'budget' else kind}:{name}")
        except Exception as error:  # the store is away: shown, not raised
            shown.append({"kind": kind, "name": name, "error": type(error).__name__})
            continue
        if counted is None:
            continue
        firsts, retries = counted
        allowed = max(budget.min_retries, int(budget.ratio * firsts))
        shown.append({"kind": kind, "name": name, "firsts": firsts, "retries": retries, "allowed": allowed,
                      "spent": retries >= allowed})
    return shown


def _limit_states() -> list[dict[str, Any]]:
    """Each declared limit with its use now; a store that fails is shown, not raised."""
    shown = []
    for name, config in sorted(limits.declared().items()):
        row: dict[str, Any] = {"name": name, "config": config, "rule": config.describe(),
                               "concurrency": config.concurrency, "rate_count": config.rate_count}
        try:
            row.update(limits.state_of(name))
        except Exception as error:
            row["error"] = type(error).__name__
        shown.append(row)
    return shown


@require_safe
@staff_page("safetynet.view_breakerstate")
def breakers_page(request: HttpRequest) -> HttpResponse:
    """The upstreams: every declared breaker (state, failure rate over its window, time to half-open; open or close
    by hand), the retry budgets in use, and every limit with its use now."""
    return render_page(request, "breakers.html", "breakers", {
        "breakers": _breaker_states(), "can_act": request.user.has_perm("safetynet.change_breakerstate"),
        "budget": conf.get().retry_budget, "budgets": _budget_uses(), "limits": _limit_states(),
    })


@staff_action("safetynet.change_breakerstate")
def breaker_action(request: HttpRequest, name: str, action: str) -> HttpResponse:
    """POST: open (for ``seconds``, default its open_seconds) or close a breaker by hand."""
    if name not in breakers.declared():
        raise Http404(f"no breaker named {name!r} in SAFETYNET['BREAKERS']")
    seconds = None
    if action == "open" and request.POST.get("seconds"):
        try:
            seconds = float(request.POST["seconds"])
            if not 1 <= seconds <= 86_400:
                raise ValueError
        except ValueError:
            tell(request, "error", f"Breaker {name!r} not opened: seconds must be a number from 1 to 86400, "
                                   f"got {request.POST['seconds']!r}.")
            return HttpResponseRedirect(reverse("safetynet_dashboard:breakers"))
    try:
        breakers.force(name, breakers.OPEN if action == "open" else breakers.CLOSED, seconds=seconds)
    except (DatabaseError, ConfigurationError) as error:
        tell(request, "error", f"Breaker {name!r} not changed: {error}")
    else:
        tell(request, "success", f"Breaker {name!r} {'opened' if action == 'open' else 'closed'} by hand.")
    return HttpResponseRedirect(reverse("safetynet_dashboard:breakers"))
