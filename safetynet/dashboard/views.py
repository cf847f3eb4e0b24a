"""The dashboard's pages and actions.

Who sees what: a page is for active staff users with the model permission it names (a superuser
has them all); an anonymous visitor is sent to ``LOGIN_URL``, anyone else gets 403. Actions are
POST only, CSRF-checked, and need the model's *change* permission:

    overview                     view_taskstats          the aggregates of a window (1h, 24h, 7d)
    failures                     view_deadletter         dead letters grouped by fingerprint
    dead letters, one letter     view_deadletter
    replay, discard (one, group) change_deadletter
    schedule                     view_scheduledmessage   durable retries and the outbox, by due time
    bring forward                change_scheduledmessage
    breakers                     view_breakerstate
    open, close by hand          change_breakerstate

Every list is paginated in the database and reads only the columns it shows.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from datetime import datetime, timezone
from typing import Any

from django import forms
from django.apps import apps
from django.contrib.auth.views import redirect_to_login
from django.core.exceptions import PermissionDenied
from django.core.paginator import Paginator
from django.db import DatabaseError
from django.db.models import Count, Max, Min, Q
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import get_object_or_404, render
from django.urls import reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.csrf import csrf_protect
from django.views.decorators.http import require_POST, require_safe
from kombu.exceptions import OperationalError

from safetynet import breakers, deadletter, redaction, stats
from safetynet import schedule as durable_schedule
from safetynet.dashboard import display
from safetynet.dashboard.charts import bar_chart
from safetynet.exceptions import ConfigurationError
from safetynet.models import DeadLetter, ScheduledMessage

__all__ = [
    "breaker_action", "breakers_page", "dead_letter", "dead_letter_action", "dead_letters", "failure_group_action",
    "failures", "overview", "schedule", "schedule_due_now",
]

logger = logging.getLogger("safetynet")

#: Rows per page of each list.
PAGE_SIZE = 50
#: The pages of the navigation bar: (url name, title, permission).
PAGES = (
    ("overview", "Overview", "safetynet.view_taskstats"),
    ("failures", "Failures", "safetynet.view_deadletter"),
    ("dead_letters", "Dead letters", "safetynet.view_deadletter"),
    ("schedule", "Schedule", "safetynet.view_scheduledmessage"),
    ("breakers", "Breakers", "safetynet.view_breakerstate"),
)
#: The columns a dead-letter list row shows (the rest of a row, tracebacks and arguments, stays in the database).
LIST_COLUMNS = ("id", "task_name", "task_id", "reason", "status", "attempts", "exception_type", "exception_message",
                "last_failed_at", "replay_count")


def staff_page(permission: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """Only active staff with ``permission``; anonymous visitors are sent to log in; never cached."""
    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        @functools.wraps(view)
        def guarded(request: HttpRequest, *args: Any, **kwargs: Any) -> HttpResponse:
            user = request.user
            if not user.is_authenticated:
                return redirect_to_login(request.get_full_path())
            if not (user.is_active and user.is_staff and user.has_perm(permission)):
                raise PermissionDenied(f"the safetynet dashboard needs a staff account with {permission}")
            return view(request, *args, **kwargs)

        return never_cache(guarded)

    return decorate


def staff_action(permission: str) -> Callable[[Callable[..., HttpResponse]], Callable[..., HttpResponse]]:
    """A POST-only, CSRF-checked :func:`staff_page`."""
    def decorate(view: Callable[..., HttpResponse]) -> Callable[..., HttpResponse]:
        return staff_page(permission)(csrf_protect(require_POST(view)))

    return decorate


def _tell(request: HttpRequest, level: str, text: str) -> None:
    """A message on the next page, when the project has the messages framework (else only the log)."""
    logger.info("safetynet dashboard: %s", text, extra={"user": request.user.get_username()})
    if apps.is_installed("django.contrib.messages"):
        from django.contrib import messages

        getattr(messages, level)(request, text, fail_silently=True)


def _render(request: HttpRequest, template: str, page: str, context: dict[str, Any], status: int = 200
            ) -> HttpResponse:
    user = request.user
    shown: list[Any] = []
    if apps.is_installed("django.contrib.messages"):
        from django.contrib.messages import get_messages

        shown = list(get_messages(request))
    navigation = [{"name": name, "title": title, "url": reverse(f"safetynet_dashboard:{name}"), "current": name == page}
                  for name, title, permission in PAGES if user.has_perm(permission)]
    return render(request, f"safetynet/dashboard/{template}",
                  {**context, "navigation": navigation, "notices": shown, "page": page}, status=status)


def _percent(rate: float | None) -> str:
    """A share as staff read it: 99.6 %, 100 %, or a dash when there is nothing to divide."""
    if rate is None:
        return "–"
    shown = f"{rate * 100:.1f}".removesuffix(".0")
    # 99.96 % is not 100 %: never round a failure away.
    if shown == "100" and rate < 1:
        shown = "99.9"
    return f"{shown} %"


def _utc(moment: float) -> datetime:
    return datetime.fromtimestamp(moment, tz=timezone.utc)


def _username(request: HttpRequest) -> str:
    return f"{request.user.get_username()} (dashboard)"


# -- overview ---------------------------------------------------------------------------------

@require_safe
@staff_page("safetynet.view_taskstats")
def overview(request: HttpRequest) -> HttpResponse:
    """Per task over a window: runs, success rate, retries, deaths by reason, p50/p95; charts over time."""
    window = request.GET.get("window") or "24h"
    status = 200
    if window not in stats.WINDOWS:
        status, window = 400, "24h"
        _tell(request, "error", f"Unknown window {request.GET['window']!r}: choose one of "
                                f"{', '.join(stats.WINDOWS)}. Showing 24h.")
    task = request.GET.get("task") or None
    if task is not None and not _storable(task):
        status, task = 400, None
        _tell(request, "error", "That task name cannot exist; showing every task.")
    data = stats.overview(stats.WINDOWS[window], task_name=task)
    charts = [
        bar_chart("chart-successes", "Successes", data.points, data.successes, data.step),
        bar_chart("chart-retries", "Retries", data.points, data.retries, data.step),
        bar_chart("chart-dead", "Given up (dead letters)", data.points, data.dead, data.step),
    ]
    return _render(request, "overview.html", "overview", {
        "window": window, "windows": list(stats.WINDOWS), "data": data, "charts": charts, "task": task or "",
        "rows": [{"summary": summary, "success": _percent(summary.success_rate)} for summary in data.tasks],
        "total_success": _percent(data.totals.success_rate),
        "dead_waiting": DeadLetter.objects.dead().count(),
        "scheduled": ScheduledMessage.objects.filter(state=ScheduledMessage.State.SCHEDULED).count(),
        "breakers": _breaker_states(only_unhealthy=True),
    }, status=status)


# -- failures grouped by fingerprint -----------------------------------------------------------

@require_safe
@staff_page("safetynet.view_deadletter")
def failures(request: HttpRequest) -> HttpResponse:
    """Dead letters waiting for a decision, grouped by fingerprint: count, first and last seen, an example."""
    page = _page_number(request)
    groups = list(
        DeadLetter.objects.dead().order_by().values("fingerprint")
        .annotate(count=Count("id"), first_seen=Min("first_failed_at"), last_seen=Max("last_failed_at"),
                  task_name=Max("task_name"), exception_type=Max("exception_type"), example=Max("id"),
                  reasons=Count("reason", distinct=True))
        .order_by("-count", "-last_seen", "fingerprint")[(page - 1) * PAGE_SIZE: page * PAGE_SIZE + 1]
    )
    more = len(groups) > PAGE_SIZE
    groups = groups[:PAGE_SIZE]
    examples = {row.id: row for row in DeadLetter.objects.filter(id__in=[group["example"] for group in groups])
                .only("id", "reason", "exception_message", "traceback", "detail")}
    for group in groups:
        group["example_row"] = examples.get(group["example"])
    return _render(request, "failures.html", "failures", {
        "groups": groups, "page_number": page, "has_next": more, "has_previous": page > 1,
        "can_act": request.user.has_perm("safetynet.change_deadletter"),
    })


@staff_action("safetynet.change_deadletter")
def failure_group_action(request: HttpRequest, fingerprint: str, action: str) -> HttpResponse:
    """POST: replay or discard every dead letter of a fingerprint."""
    rows = DeadLetter.objects.dead().filter(fingerprint=fingerprint)
    if not rows.exists():
        _tell(request, "warning", f"No dead letter waits with fingerprint {fingerprint[:12]}; nothing done.")
        return HttpResponseRedirect(reverse("safetynet_dashboard:failures"))
    _act(request, action, rows)
    return HttpResponseRedirect(reverse("safetynet_dashboard:failures"))


def _act(request: HttpRequest, action: str, rows: Any) -> None:
    """Replay or discard ``rows`` and say what happened; a broker or database that fails loses nothing."""
    if action == "discard":
        changed = deadletter.discard(rows, by=_username(request))
        _tell(request, "success" if changed else "warning",
              f"Discarded {changed} dead letter{'' if changed == 1 else 's'}." if changed
              else "Nothing discarded: already replayed or discarded.")
        return
    if action != "replay":
        raise Http404(f"no action {action!r}")
    try:
        outcomes = deadletter.replay(rows, by=_username(request))
    except (OperationalError, DatabaseError, ConfigurationError) as error:
        _tell(request, "error", f"Replay stopped: {type(error).__name__}: {error}. Rows not sent are left as they "
                                "were; see the log for any sent but not marked.")
        return
    done, refusals = display.replay_summary(outcomes)
    if done:
        _tell(request, "success", done)
    for refusal in refusals:
        _tell(request, "error", refusal)
    if not outcomes:
        _tell(request, "warning", "Nothing replayed: no dead letter waits there.")


# -- dead letters ---------------------------------------------------------------------------------

class DeadLetterFilters(forms.Form):
    """The dead-letter list's filters; a bad value is reported and left out, the others still apply."""

    STATUSES = [(status.value, status.label) for status in DeadLetter.Status] + [("all", "all")]

    task = forms.CharField(required=False, max_length=255, help_text="a task name, or a prefix ending in *")
    reason = forms.ChoiceField(required=False, choices=[("", "any reason"), *DeadLetter.Reason.choices])
    status = forms.ChoiceField(required=False, choices=STATUSES)
    q = forms.CharField(required=False, max_length=200, label="search",
                        help_text="a task id, or words of the exception")
    fingerprint = forms.CharField(required=False, max_length=40, widget=forms.HiddenInput)


#: Past this page a failures list is empty anyway; a larger number would overflow the database's OFFSET.
MAX_PAGE = 100_000


def _page_number(request: HttpRequest) -> int:
    try:
        return min(MAX_PAGE, max(1, int(request.GET.get("page") or 1)))
    except ValueError:
        return 1


def _storable(text: str | None) -> bool:
    """A value PostgreSQL can compare with a text column (no NUL character) and of a sane length."""
    return text is not None and "\x00" not in text and len(text) <= 1000


@require_safe
@staff_page("safetynet.view_deadletter")
def dead_letters(request: HttpRequest) -> HttpResponse:
    """Dead letters, newest first, filtered and searched, a page at a time."""
    form = DeadLetterFilters(request.GET or None)
    wanted: dict[str, str] = {}
    if form.is_bound:
        form.is_valid()
        wanted = {name: value for name, value in form.cleaned_data.items() if value}
        for name, errors in form.errors.items():
            _tell(request, "error", f"Filter {name!r} left out: {' '.join(errors)}")
    status = wanted.get("status", DeadLetter.Status.DEAD)
    rows = DeadLetter.objects.matching(task=wanted.get("task"), reason=wanted.get("reason"),
                                       fingerprint=wanted.get("fingerprint"),
                                       status=None if status == "all" else status)
    search = wanted.get("q", "").strip()
    if search:
        rows = rows.filter(Q(task_id=search) | Q(exception_message__icontains=search)
                           | Q(exception_type__icontains=search))
    paginator = Paginator(rows.only(*LIST_COLUMNS).order_by("-last_failed_at", "-id"), PAGE_SIZE)
    page = paginator.get_page(request.GET.get("page"))
    keep = request.GET.copy()
    keep.pop("page", None)
    if not form.is_bound:
        form = DeadLetterFilters(initial={"status": DeadLetter.Status.DEAD})
    return _render(request, "dead_letters.html", "dead_letters", {
        "form": form, "page_obj": page, "rows": page.object_list, "query": keep.urlencode(),
        "filtered": bool(set(wanted) - {"status"}) or status != DeadLetter.Status.DEAD,
    })


@require_safe
@staff_page("safetynet.view_deadletter")
def dead_letter(request: HttpRequest, pk: int) -> HttpResponse:
    """One dead letter: what failed, every attempt, its arguments (redacted), what was done to it."""
    row = get_object_or_404(DeadLetter, pk=pk)
    return _render(request, "dead_letter.html", "dead_letters", {
        "row": row, "entries": display.history_entries(row), "events": display.audit_events(row),
        "headers": redaction.masked_headers(row.headers), "detail": redaction.redact_text(row.detail),
        "args": display.shown_json(row.args), "kwargs": display.shown_json(row.kwargs),
        "placeholder": deadletter.REDACTED,
        "replay": _replay_outcome(row), "alike": DeadLetter.objects.filter(fingerprint=row.fingerprint).count(),
        "can_act": request.user.has_perm("safetynet.change_deadletter"),
    })


def _replay_outcome(row: DeadLetter) -> dict[str, str] | None:
    """How the latest replay of ``row`` went: died again (a dead letter of its own), or the result backend's state."""
    if not row.replayed_task_id:
        return None
    again = DeadLetter.objects.filter(task_id=row.replayed_task_id).only("id").first()
    if again is not None:
        return {"state": "FAILURE", "text": "died again", "dead_letter": str(again.id)}
    from celery import current_app

    try:
        state = current_app.AsyncResult(row.replayed_task_id).state
    except Exception as error:  # no result backend, or it is away: say so, the page still shows
        return {"state": "UNKNOWN", "text": f"unknown (the result backend did not say: {type(error).__name__})"}
    text = {"SUCCESS": "succeeded", "FAILURE": "failed", "RETRY": "retrying", "STARTED": "running",
            "PENDING": "waiting (or the result backend keeps no record of it)"}.get(state, state.lower())
    return {"state": state, "text": text}


@staff_action("safetynet.change_deadletter")
def dead_letter_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    """POST: replay or discard one dead letter, then back to its page."""
    row = get_object_or_404(DeadLetter, pk=pk)
    if row.status != DeadLetter.Status.DEAD:
        _tell(request, "warning", f"Dead letter #{row.id} is already {row.status}; nothing done.")
    else:
        _act(request, action, [row])
    return HttpResponseRedirect(reverse("safetynet_dashboard:dead_letter", args=[row.id]))


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
    rows = [{"row": row, "due": _utc(row.due_at), "in_seconds": row.due_at - now,
             "age": now - row.created_at} for row in page.object_list]
    return _render(request, "schedule.html", "schedule", {
        "rows": rows, "page_obj": page, "kind": kind, "kinds": ScheduledMessage.Kind.choices, "counts": counts,
        "can_act": request.user.has_perm("safetynet.change_scheduledmessage"),
    })


@staff_action("safetynet.change_scheduledmessage")
def schedule_due_now(request: HttpRequest, key: str) -> HttpResponse:
    """POST: make one scheduled message due now (the relay publishes it within a poll)."""
    if not _storable(key):
        raise Http404("no such scheduled message")
    changed = durable_schedule.bring_forward(ScheduledMessage.objects.filter(key=key))
    _tell(request, "success" if changed else "warning",
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
                      "changed_at": _utc(state["changed"]) if state["changed"] else None})
    return shown


@require_safe
@staff_page("safetynet.view_breakerstate")
def breakers_page(request: HttpRequest) -> HttpResponse:
    """Every declared breaker: state, failure rate over its window, time to half-open; open or close by hand."""
    return _render(request, "breakers.html", "breakers", {
        "breakers": _breaker_states(), "can_act": request.user.has_perm("safetynet.change_breakerstate"),
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
            _tell(request, "error", f"Breaker {name!r} not opened: seconds must be a number from 1 to 86400, "
                                    f"got {request.POST['seconds']!r}.")
            return HttpResponseRedirect(reverse("safetynet_dashboard:breakers"))
    try:
        breakers.force(name, breakers.OPEN if action == "open" else breakers.CLOSED, seconds=seconds)
    except (DatabaseError, ConfigurationError) as error:
        _tell(request, "error", f"Breaker {name!r} not changed: {error}")
    else:
        _tell(request, "success", f"Breaker {name!r} {'opened' if action == 'open' else 'closed'} by hand.")
    return HttpResponseRedirect(reverse("safetynet_dashboard:breakers"))
