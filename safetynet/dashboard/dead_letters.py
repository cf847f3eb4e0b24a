"""The dead-letter pages: failures grouped by fingerprint, the list, one letter; replay and discard, confirmed."""

from __future__ import annotations

from datetime import timedelta
from typing import Any

from django import forms
from django.core.paginator import Paginator
from django.db import DatabaseError
from django.db.models import F, Q
from django.http import Http404, HttpRequest, HttpResponse, HttpResponseRedirect, JsonResponse
from django.shortcuts import get_object_or_404
from django.urls import reverse
from django.utils import timezone
from django.utils.html import format_html, format_html_join
from django.utils.http import url_has_allowed_host_and_scheme
from django.views.decorators.http import require_safe
from kombu.exceptions import OperationalError

from safetynet import deadletter, redaction
from safetynet.dashboard import display
from safetynet.dashboard.forms import ReplayForm, confirmed
from safetynet.dashboard.pages import (
    PAGE_SIZE,
    page_number,
    render_page,
    staff_action,
    staff_page,
    storable,
    tell,
    username,
)
from safetynet.exceptions import ConfigurationError
from safetynet.models import DeadLetter, FailureGroup, TaskStats

__all__ = ["bulk_action", "dead_letter", "dead_letter_action", "dead_letter_live", "dead_letters", "failure_group_action",
           "failures"]

#: The columns a dead-letter list row shows (the rest of a row, tracebacks and arguments, stays in the database;
#: the exception message is read only as far as the list shows it).
LIST_COLUMNS = ("id", "task_name", "task_id", "reason", "status", "attempts", "exception_type", "last_failed_at",
                "replay_count")

# -- failures grouped by fingerprint -----------------------------------------------------------

@require_safe
@staff_page("safetynet.view_deadletter")
def failures(request: HttpRequest) -> HttpResponse:
    """Dead letters waiting for a decision, grouped by fingerprint: count, first and last seen, an example."""
    page = page_number(request)
    # The summary kept on write (``FailureGroup``): a few hundred rows, never a GROUP BY over the store.
    groups = list(
        FailureGroup.objects.filter(count__gt=0)
        .values("fingerprint", "count", "first_seen", "last_seen", "task_name", "exception_type",
                example=F("example_id"))
        .order_by("-count", "-last_seen", "fingerprint")[(page - 1) * PAGE_SIZE: page * PAGE_SIZE + 1]
    )
    more = len(groups) > PAGE_SIZE
    groups = groups[:PAGE_SIZE]
    examples = {row.id: row for row in display.with_heads(
        DeadLetter.objects.filter(id__in=[group["example"] for group in groups]).only("id", "reason"),
        "exception_message", "traceback")}
    for group in groups:
        example = examples.get(group["example"])
        group["example_message"] = display.bounded_head(example, "exception_message") if example else ""
        group["example_traceback"] = display.bounded_head(example, "traceback") if example else ""
    return render_page(request, "failures.html", "failures", {
        "groups": groups, "page_number": page, "has_next": more, "has_previous": page > 1,
        "can_act": request.user.has_perm("safetynet.change_deadletter"),
    })


@staff_action("safetynet.change_deadletter")
def failure_group_action(request: HttpRequest, action: str) -> HttpResponse:
    """POST ``fingerprint``: ask to confirm, then (with ``confirm=yes``) replay or discard every dead letter of it.

    The fingerprint is a field, not a part of the URL: a stored one that is not hex still has its buttons.
    """
    fingerprint = request.POST.get("fingerprint")
    back = HttpResponseRedirect(reverse("safetynet_dashboard:failures"))
    if fingerprint is None or not storable(fingerprint):
        tell(request, "error", "Say which failures: a fingerprint is needed; nothing done.")
        return back
    rows = DeadLetter.objects.dead().filter(fingerprint=fingerprint)
    count = rows.count()
    if not count:
        tell(request, "warning", f"No dead letter waits with fingerprint {fingerprint[:12]!r}; nothing done.")
        return back
    if not confirmed(request.POST):
        example = display.with_heads(rows.only("id", "task_name", "exception_type").order_by("-id"),
                                     "exception_message", most=300).first()
        return render_page(request, "confirm.html", "failures", {
            "action": action, "count": count, "fingerprint": fingerprint, "example": example,
            "example_message": display.bounded_head(example, "exception_message") if example else "",
            "ids": display.ids_text(list(rows.order_by("id").values_list("id", flat=True)[:20])),
            "post_to": reverse("safetynet_dashboard:failure_group_action", args=[action]),
            "cancel": reverse("safetynet_dashboard:failures"),
        })
    _act(request, action, rows)
    return back


def _act(request: HttpRequest, action: str, rows: Any, *, args: Any = None, kwargs: Any = None) -> None:
    """Replay or discard ``rows`` and say what happened; a broker or database that fails loses nothing."""
    if action == "discard":
        changed = deadletter.discard(rows, by=username(request))
        tell(request, "success" if changed else "warning",
             f"Discarded {changed} dead letter{'' if changed == 1 else 's'}." if changed
             else "Nothing discarded: already replayed or discarded.")
        return
    if action != "replay":
        raise Http404(f"no action {action!r}")
    try:
        outcomes = deadletter.replay(rows, by=username(request), args=args, kwargs=kwargs)
    except (OperationalError, DatabaseError, ConfigurationError) as error:
        tell(request, "error", f"Replay stopped: {type(error).__name__}: {error}. Rows not sent are left as they "
                               "were; see the log for any sent but not marked.")
        return
    _, refusals = display.replay_summary(outcomes)
    sent = [outcome for outcome in outcomes if outcome.new_task_id]
    if sent:
        # Each replayed letter's page follows its new task until it ends: link there.
        links = format_html_join(", ", '<a href="{}">#{}</a> as <code>{}</code>', (
            (reverse("safetynet_dashboard:dead_letter", args=[outcome.dead_letter_id]), outcome.dead_letter_id,
             outcome.new_task_id) for outcome in sent[:20]))
        more = f" and {len(sent) - 20} more" if len(sent) > 20 else ""
        tell(request, "success", format_html("Replayed {} dead letter{}: {}{}.", len(sent),
                                             "" if len(sent) == 1 else "s", links, more))
    for refusal in refusals:
        tell(request, "error", refusal)
    if not outcomes:
        tell(request, "warning", "Nothing replayed: no dead letter waits there.")


# -- dead letters ---------------------------------------------------------------------------------

class DeadLetterFilters(forms.Form):
    """The dead-letter list's filters; a bad value is reported and left out, the others still apply."""

    STATUSES = [(status.value, status.label) for status in DeadLetter.Status] + [("all", "all")]

    task = forms.CharField(required=False, max_length=255,
                           help_text="part of a task name (import_row finds shop.tasks.import_row); "
                                     "shop.* for names that start with shop.; =name for exactly that name")
    reason = forms.ChoiceField(required=False, choices=[("", "any reason"), *DeadLetter.Reason.choices])
    status = forms.ChoiceField(required=False, choices=STATUSES)
    queue = forms.CharField(required=False, max_length=255)
    q = forms.CharField(required=False, max_length=200, label="Search",
                        help_text="a task id, or words of the exception")
    since = forms.DateTimeField(required=False, widget=forms.HiddenInput)
    until = forms.DateTimeField(required=False, widget=forms.HiddenInput)
    fingerprint = forms.CharField(required=False, max_length=40, widget=forms.HiddenInput)
    sort = forms.ChoiceField(required=False, widget=forms.HiddenInput, choices=[
        (key, key) for name in ("last_failed", "id", "task", "reason", "status", "attempts") for key in (name, f"-{name}")])


#: The list's sortable columns: ``?sort=name`` (ascending) or ``-name``; the newest failure first by default.
SORTS = {"last_failed": ("last_failed_at", "id"), "id": ("id",), "task": ("task_name", "id"),
         "reason": ("reason", "id"), "status": ("status", "id"), "attempts": ("attempts", "id")}
DEFAULT_SORT = "-last_failed"


def task_filter(text: str) -> Q:
    """What the task field matches: ``=name`` exactly, ``prefix*`` by its start, anything else as part of a name."""
    text = text.strip()
    if text.startswith("="):
        return Q(task_name=text[1:])
    if text.endswith("*"):
        return Q(task_name__startswith=text.rstrip("*"))
    return Q(task_name__icontains=text)


def task_suggestions() -> list[str]:
    """Task names to suggest in the filter: those with dead letters waiting and those that ran this week."""
    week = timezone.now() - timedelta(days=7)
    names = set(FailureGroup.objects.values_list("task_name", flat=True)[:500])
    names.update(TaskStats.objects.filter(period=TaskStats.HOUR, start__gte=week)
                 .values_list("task_name", flat=True).distinct()[:500])
    return sorted(names)


def _sorted_headers(query: Any, sort: str) -> dict[str, dict[str, Any]]:
    """Each sortable column's link (toggling its direction) and whether the list is sorted by it."""
    headers = {}
    for name in SORTS:
        current = sort.lstrip("-") == name
        wanted = (name if sort.startswith("-") else f"-{name}") if current else (
            f"-{name}" if name in ("last_failed", "id", "attempts") else name)
        keep = query.copy()
        keep["sort"] = wanted
        keep.pop("page", None)
        headers[name] = {"url": "?" + keep.urlencode(), "current": current, "up": current and not sort.startswith("-")}
    return headers


@require_safe
@staff_page("safetynet.view_deadletter")
def dead_letters(request: HttpRequest) -> HttpResponse:
    """Dead letters, newest first (or sorted by a column), filtered and searched, a page at a time."""
    form = DeadLetterFilters(request.GET or None)
    wanted: dict[str, Any] = {}
    if form.is_bound:
        form.is_valid()
        wanted = {name: value for name, value in form.cleaned_data.items() if value}
        for name, errors in form.errors.items():
            tell(request, "error", f"Filter {name!r} left out: {' '.join(errors)}")
    status = wanted.get("status", DeadLetter.Status.DEAD)
    rows = DeadLetter.objects.matching(reason=wanted.get("reason"), fingerprint=wanted.get("fingerprint"),
                                       status=None if status == "all" else status,
                                       since=wanted.get("since"), until=wanted.get("until"))
    if wanted.get("task"):
        rows = rows.filter(task_filter(wanted["task"]))
    if wanted.get("queue"):
        rows = rows.filter(queue=wanted["queue"])
    search = wanted.get("q", "").strip()
    if search:
        rows = rows.filter(Q(task_id=search) | Q(exception_message__icontains=search)
                           | Q(exception_type__icontains=search))
    sort = wanted.get("sort") or DEFAULT_SORT
    columns = SORTS[sort.lstrip("-")]
    ordering = [f"-{column}" if sort.startswith("-") else column for column in columns]
    unfiltered = not (set(wanted) - {"status", "sort"})
    paginator = Paginator(display.with_heads(rows.only(*LIST_COLUMNS), "exception_message", most=200)
                          .order_by(*ordering), PAGE_SIZE)
    if unfiltered and status == DeadLetter.Status.DEAD:
        # The waiting letters are counted in the failures' summary: no COUNT over the table for the usual page.
        paginator.count = deadletter.waiting_count()  # type: ignore[misc]
    elif set(wanted) - {"sort", "status"} == {"fingerprint"} and status == DeadLetter.Status.DEAD:
        group = FailureGroup.objects.filter(fingerprint=wanted["fingerprint"]).first()
        paginator.count = group.count if group else 0  # type: ignore[misc]
    page = paginator.get_page(request.GET.get("page"))
    keep = request.GET.copy()
    keep.pop("page", None)
    if not form.is_bound:
        form = DeadLetterFilters(initial={"status": DeadLetter.Status.DEAD})
    return render_page(request, "dead_letters.html", "dead_letters", {
        "form": form, "page_obj": page, "rows": page.object_list, "query": keep.urlencode(),
        "filtered": not unfiltered or status != DeadLetter.Status.DEAD,
        "range": (wanted.get("since"), wanted.get("until")) if wanted.get("since") or wanted.get("until") else None,
        "headers": _sorted_headers(request.GET, sort), "suggestions": task_suggestions(),
        "can_act": request.user.has_perm("safetynet.change_deadletter"),
        "back": request.get_full_path(),
    })


@staff_action("safetynet.change_deadletter")
def bulk_action(request: HttpRequest, action: str) -> HttpResponse:
    """POST ``ids`` (the rows ticked in the list): ask to confirm with their count, then replay or discard them."""
    if action not in ("replay", "discard"):
        raise Http404(f"no action {action!r}")
    back_to = request.POST.get("back") or ""
    if not url_has_allowed_host_and_scheme(back_to, allowed_hosts={request.get_host()}) or not back_to.startswith("/"):
        back_to = reverse("safetynet_dashboard:dead_letters")
    back = HttpResponseRedirect(back_to)
    try:
        ids = sorted({int(value) for value in request.POST.getlist("ids")})
    except ValueError:
        tell(request, "error", "Those rows are not dead-letter numbers; nothing done.")
        return back
    if not ids:
        tell(request, "warning", "Tick the rows to act on first; nothing done.")
        return back
    if len(ids) > MOST_SELECTED:
        tell(request, "error", f"At most {MOST_SELECTED} rows at once (a page); nothing done.")
        return back
    rows = DeadLetter.objects.filter(id__in=ids)
    waiting = rows.dead()
    count = waiting.count()
    if not count:
        tell(request, "warning", "None of the ticked dead letters is waiting any more (already replayed or "
                                 "discarded); nothing done.")
        return back
    if not confirmed(request.POST):
        shown = list(waiting.only("id", "task_name", "exception_type", "reason").order_by("id")[:MOST_SELECTED])
        return render_page(request, "confirm.html", "dead_letters", {
            "action": action, "count": count, "selected": shown, "skipped": len(ids) - count,
            "ids": display.ids_text([row.id for row in shown]), "post_to": request.path, "cancel": back_to,
            "back": back_to,
        })
    _act(request, action, waiting)
    return back


#: The most rows one bulk action takes (one page of the list).
MOST_SELECTED = PAGE_SIZE


@require_safe
@staff_page("safetynet.view_deadletter")
def dead_letter(request: HttpRequest, pk: int) -> HttpResponse:
    """One dead letter: what failed, every attempt, its arguments (redacted), what was done to it."""
    row = get_object_or_404(DeadLetter, pk=pk)
    return render_page(request, "dead_letter.html", "dead_letters", {
        **_shown(row), "replay": _replay_outcome(row),
        "alike": DeadLetter.objects.filter(fingerprint=row.fingerprint).exclude(pk=row.pk).count(),
        "live_url": reverse("safetynet_dashboard:dead_letter_live", args=[row.id]) if row.replayed_task_id else "",
        "live_interval": 1500,
        "can_act": request.user.has_perm("safetynet.change_deadletter"),
    })


def _shown(row: DeadLetter) -> dict[str, Any]:
    """What a page shows of one dead letter: every long field within its cap, secrets masked once more."""
    shown = display.shown(row)
    headers = shown["headers"]
    return {
        "row": row, "entries": display.history_entries(row), "events": display.audit_events(row),
        "headers": redaction.masked_headers(headers) if not deadletter.is_truncated(headers) else headers,
        "detail": redaction.redact_text(shown["detail"]), "message": shown["exception_message"],
        "traceback": shown["traceback"], "args": display.shown_json(shown["args"]),
        "kwargs": display.shown_json(shown["kwargs"]), "placeholder": deadletter.REDACTED,
        "truncated": shown["truncated"],
            "shown_cut": shown["shown_cut"],
    }


#: The replay states after which nothing changes any more.
FINAL_STATES = ("SUCCESS", "FAILURE", "REVOKED")


@require_safe
@staff_page("safetynet.view_deadletter")
def dead_letter_live(request: HttpRequest, pk: int) -> HttpResponse:
    """How the latest replay of one dead letter is going, as JSON: the detail page shows it when it lands."""
    row = get_object_or_404(DeadLetter.objects.only("id", "replayed_task_id"), pk=pk)
    outcome = _replay_outcome(row) or {"state": "NONE", "text": "not replayed"}
    again = outcome.get("dead_letter")
    return JsonResponse({
        "figures": {"replay-text": outcome["text"]}, "states": {"replay": outcome["state"]},
        "links": {"replay-dead-letter": {"url": reverse("safetynet_dashboard:dead_letter", args=[again]),
                                         "text": f"dead letter #{again}"} if again else None},
        "done": outcome["state"] in FINAL_STATES,
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
            "PENDING": "waiting for a worker (or the result backend keeps no record of it)"}.get(state, state.lower())
    return {"state": state, "text": text}


@staff_action("safetynet.change_deadletter")
def dead_letter_action(request: HttpRequest, pk: int, action: str) -> HttpResponse:
    """POST: ask to confirm (with replacement arguments for a replay), then, with ``confirm=yes``, replay or
    discard one dead letter and go back to its page."""
    row = get_object_or_404(DeadLetter, pk=pk)
    back = HttpResponseRedirect(reverse("safetynet_dashboard:dead_letter", args=[row.id]))
    if row.status != DeadLetter.Status.DEAD:
        tell(request, "warning", f"Dead letter #{row.id} is already {row.status}; nothing done.")
        return back
    form = ReplayForm(request.POST if confirmed(request.POST) else None)
    if action == "replay" and form.is_bound and form.is_valid():
        _act(request, action, [row], args=form.cleaned_data["args"], kwargs=form.cleaned_data["kwargs"])
        return back
    if action == "discard" and form.is_bound:
        _act(request, action, [row])
        return back
    return render_page(request, "confirm.html", "dead_letters", {
        **_shown(row), "action": action, "form": form, "refusal": _refusal(row) if action == "replay" else None,
        "post_to": reverse("safetynet_dashboard:dead_letter_action", args=[row.id, action]),
        "cancel": reverse("safetynet_dashboard:dead_letter", args=[row.id]),
    }, status=400 if form.is_bound else 200)


def _refusal(row: DeadLetter) -> str | None:
    """Why a replay of ``row`` with its stored arguments would be refused (None: it would be sent)."""
    from celery import current_app

    app = current_app._get_current_object()
    app.loader.import_default_modules()
    return deadletter.replay_refusal(row, app.tasks.get(row.task_name))
