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
from typing import Any

from django.core.paginator import Paginator
from django.db import DatabaseError
from django.db.models import Count
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.urls import reverse
from django.views.decorators.http import require_safe

from safetynet import breakers, conf, limits, stats
from safetynet.breakers import budgets
from safetynet import schedule as durable_schedule
from safetynet.dashboard.charts import bar_chart
from safetynet.dashboard.dead_letters import (
    dead_letter,
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
from safetynet.models import DeadLetter, ScheduledMessage

__all__ = [
    "breaker_action", "breakers_page", "dead_letter", "dead_letter_action", "dead_letters", "failure_group_action",
    "failures", "overview", "schedule", "schedule_due_now",
]


# -- overview ---------------------------------------------------------------------------------

@require_safe
@staff_page("safetynet.view_taskstats")
def overview(request: HttpRequest) -> HttpResponse:
    """Per task over a window: runs, success rate, retries, deaths by reason, p50/p95; charts over time."""
    window = request.GET.get("window") or "24h"
    status = 200
    if window not in stats.WINDOWS:
        status, window = 400, "24h"
        tell(request, "error", f"Unknown window {request.GET['window']!r}: choose one of "
                               f"{', '.join(stats.WINDOWS)}. Showing 24h.")
    task = request.GET.get("task") or None
    if task is not None and not storable(task):
        status, task = 400, None
        tell(request, "error", "That task name cannot exist; showing every task.")
    data = stats.overview(stats.WINDOWS[window], task_name=task)
    charts = [
        bar_chart("chart-successes", "Successes", data.points, data.successes, data.step),
        bar_chart("chart-retries", "Retries", data.points, data.retries, data.step),
        bar_chart("chart-dead", "Given up (dead letters)", data.points, data.dead, data.step),
    ]
    return render_page(request, "overview.html", "overview", {
        "window": window, "windows": list(stats.WINDOWS), "data": data, "charts": charts, "task": task or "",
        "rows": [{"summary": summary, "success": percent(summary.success_rate)} for summary in data.tasks],
        "total_success": percent(data.totals.success_rate),
        "dead_waiting": DeadLetter.objects.dead().count(),
        "scheduled": ScheduledMessage.objects.filter(state=ScheduledMessage.State.SCHEDULED).count(),
        "breakers": _breaker_states(only_unhealthy=True),
    }, status=status)


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
