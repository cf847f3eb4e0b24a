"""The dead-letter admin: read-only rows, with replay and discard for those allowed to change them.

Rows are log-like: nobody adds or edits them here. The model's *view* permission shows
them; its *change* permission is used only for the replay and discard actions (the list
actions and the two buttons on the detail page), each of which asks to confirm first; its
*delete* permission deletes. Values are shown as stored, and the stored values are already
redacted; headers and free text are passed through the redaction rules once more on display,
never the other way round. Nothing shown is larger than the cap of one field
(``DEAD_LETTER_MAX_*``), and the list reads none of the long columns.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from django.contrib import admin, messages
from django.contrib.admin.options import IncorrectLookupParameters
from django.contrib.admin.utils import unquote
from django.contrib.auth import get_permission_codename
from django.core.exceptions import PermissionDenied
from django.db import DatabaseError
from django.db.models import Count, Max, QuerySet
from django.http import (
    HttpRequest,
    HttpResponse,
    HttpResponseNotAllowed,
    HttpResponseRedirect,
)
from django.template.loader import render_to_string
from django.template.response import TemplateResponse
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.http import urlencode
from django.utils.safestring import SafeString
from kombu.exceptions import OperationalError

from safetynet import deadletter, redaction
from safetynet.dashboard import display
from safetynet.dashboard.forms import ReplayForm, confirmed
from safetynet.models import DeadLetter, IdempotencyClaim, TaskRecord

__all__ = ["DeadLetterAdmin", "FingerprintFilter"]


class FingerprintFilter(admin.SimpleListFilter):
    """The most frequent failure fingerprints, each with its count and exception type."""

    title = "fingerprint"
    parameter_name = "fingerprint"
    #: How many fingerprints the filter lists (a fingerprint given in the URL filters regardless).
    most = 10

    def lookups(self, request: HttpRequest, model_admin: admin.ModelAdmin) -> list[tuple[str, str]]:
        top = (
            model_admin.get_queryset(request)
            .order_by()
            .values("fingerprint")
            .annotate(count=Count("id"), exception_type=Max("exception_type"), task_name=Max("task_name"))
            .order_by("-count", "fingerprint")[: self.most]
        )
        return [
            (item["fingerprint"],
             f"{item['exception_type'] or 'no exception'} in {item['task_name'].rsplit('.', 1)[-1]} "
             f"({item['count']}) · {item['fingerprint'][:8]}")
            for item in top
        ]

    def queryset(self, request: HttpRequest, queryset: QuerySet) -> QuerySet:
        value = self.value()
        return queryset.filter(fingerprint=value) if value else queryset


@admin.register(DeadLetter)
class DeadLetterAdmin(admin.ModelAdmin):
    """Inspect dead letters; replay or discard them (change permission); delete them (delete permission)."""

    list_display = ("id", "task_name", "reason", "status", "attempts", "exception_type", "last_failed_at",
                    "replay_count")
    list_display_links = ("id", "task_name")
    list_filter = ("task_name", "reason", "status", FingerprintFilter)
    date_hierarchy = "last_failed_at"
    search_fields = ("task_name", "task_id", "exception_type", "exception_message", "fingerprint")
    actions = ["replay_selected", "discard_selected"]
    change_form_template = "safetynet/admin/deadletter/change_form.html"
    fieldsets = (
        (None, {"fields": ("task_name", "task_id", "status", "reason", "detail_display", "attempts_display",
                           "first_failed_at", "last_failed_at", "worker", "delivery_display",
                           "fingerprint_display", "replays_display")}),
        ("Final failure", {"fields": ("exception_type", "exception_message_display", "traceback_display")}),
        ("Attempts", {"fields": ("timeline_display",)}),
        ("Arguments", {"fields": ("arguments_display", "headers_display", "raw_body_display")}),
        ("Audit trail", {"fields": ("audit_display",)}),
    )
    readonly_fields = (
        "task_name", "task_id", "status", "reason", "detail_display", "attempts_display", "first_failed_at",
        "last_failed_at", "worker", "delivery_display", "fingerprint_display", "replays_display",
        "exception_type", "exception_message_display", "traceback_display", "timeline_display", "arguments_display",
        "headers_display", "raw_body_display", "audit_display",
    )

    #: What the list never reads: most of a row, and all of a huge one.
    LONG_COLUMNS = ("args", "kwargs", "headers", "history", "traceback", "exception_message", "detail", "raw_body",
                    "audit", "redacted")

    def get_queryset(self, request: HttpRequest) -> QuerySet:
        rows = super().get_queryset(request)
        match = getattr(request, "resolver_match", None)
        if match is not None and str(match.url_name).endswith("_changelist"):
            if any("\x00" in value for _, values in request.GET.lists() for value in values):
                # PostgreSQL cannot compare text with a NUL: the admin's "invalid lookup" answer, not a 500
                raise IncorrectLookupParameters("a filter or search holds a NUL character")
            rows = rows.defer(*self.LONG_COLUMNS)  # the list and its actions (replay reads each row whole itself)
        return rows

    # -- permissions: log-like rows ---------------------------------------------------

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        # Nothing is edited through the form: the detail page is always read-only.
        # The model's change permission is what replay and discard require (has_act_permission).
        return False

    def has_act_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        """Replay and discard: staff (checked by the admin site) with the model's change permission."""
        opts = self.opts
        return request.user.has_perm(f"{opts.app_label}.{get_permission_codename('change', opts)}")

    # -- detail page fields -----------------------------------------------------------

    @admin.display(description="detail")
    def detail_display(self, row: DeadLetter) -> str:
        detail = display.shown(row)["detail"]
        return redaction.redact_text(detail) if detail else "-"

    @admin.display(description="exception message")
    def exception_message_display(self, row: DeadLetter) -> str:
        return display.shown(row)["exception_message"] or "-"

    @admin.display(description="attempts")
    def attempts_display(self, row: DeadLetter) -> str:
        if row.omitted_attempts:
            return f"{row.attempts} ({row.omitted_attempts} not kept in the history)"
        return str(row.attempts)

    @admin.display(description="delivery")
    def delivery_display(self, row: DeadLetter) -> str:
        parts = [f"queue {row.queue}" if row.queue else "",
                 f"exchange {row.exchange}" if row.exchange else "",
                 f"routing key {row.routing_key}" if row.routing_key and row.routing_key != row.queue else ""]
        return ", ".join(part for part in parts if part) or "-"

    @admin.display(description="fingerprint")
    def fingerprint_display(self, row: DeadLetter) -> SafeString:
        alike = DeadLetter.objects.filter(fingerprint=row.fingerprint).count()
        url = reverse(f"{self.admin_site.name}:safetynet_deadletter_changelist")
        return format_html('<code>{}</code> · <a href="{}?{}">{} alike failure{}</a>',
                           row.fingerprint, url, urlencode({"fingerprint": row.fingerprint}), alike,
                           "" if alike == 1 else "s")

    @admin.display(description="replays")
    def replays_display(self, row: DeadLetter) -> SafeString:
        parts = [format_html("replayed {} time{}", row.replay_count, "" if row.replay_count == 1 else "s")]
        if row.replayed_task_id:
            parts.append(format_html("last as <code>{}</code> at {} by {}", row.replayed_task_id,
                                     row.replayed_at.isoformat(timespec="seconds") if row.replayed_at else "?",
                                     row.replayed_by or "?"))
        if row.replay_of_id:
            url = reverse(f"{self.admin_site.name}:safetynet_deadletter_change", args=[row.replay_of_id])
            parts.append(format_html('this task was a replay of <a href="{}">#{}</a>', url, row.replay_of_id))
        return SafeString("; ".join(parts))

    @admin.display(description="traceback")
    def traceback_display(self, row: DeadLetter) -> SafeString:
        traceback = display.shown(row)["traceback"]
        return format_html('<pre class="safetynet-traceback">{}</pre>', traceback) if traceback else "-"

    @admin.display(description="timeline")
    def timeline_display(self, row: DeadLetter) -> SafeString:
        return render_to_string("safetynet/admin/deadletter/timeline.html",
                                {"entries": display.history_entries(row), "omitted": row.omitted_attempts})

    @admin.display(description="args / kwargs")
    def arguments_display(self, row: DeadLetter) -> SafeString:
        return render_to_string("safetynet/admin/deadletter/arguments.html", _arguments(row))

    @admin.display(description="headers")
    def headers_display(self, row: DeadLetter) -> SafeString:
        headers = display.shown(row)["headers"]
        if not headers:
            return "-"
        shown = headers if deadletter.is_truncated(headers) else redaction.masked_headers(headers)
        return format_html("<pre>{}</pre>", display.shown_json(shown))

    @admin.display(description="raw body")
    def raw_body_display(self, row: DeadLetter) -> str:
        # The raw body of an undecodable message is not redacted: its size only, never its content.
        if not row.raw_body:
            return "-"
        return f"{len(row.raw_body) * 3 // 4} bytes kept (not shown: an undecodable body cannot be redacted)"

    @admin.display(description="audit trail")
    def audit_display(self, row: DeadLetter) -> SafeString:
        return render_to_string("safetynet/admin/deadletter/audit.html", {"events": display.audit_events(row)})

    # -- actions --------------------------------------------------------------------

    @admin.action(description="Replay selected dead letters…", permissions=["act"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        if request.POST.get("post") != "yes":
            return self._confirm_selected(request, queryset, "replay_selected")
        self._replay(request, queryset)
        return None

    @admin.action(description="Discard selected dead letters…", permissions=["act"])
    def discard_selected(self, request: HttpRequest, queryset: QuerySet) -> HttpResponse | None:
        if request.POST.get("post") != "yes":
            return self._confirm_selected(request, queryset, "discard_selected")
        self._discard(request, queryset)
        return None

    def _confirm_selected(self, request: HttpRequest, queryset: QuerySet, action: str) -> HttpResponse:
        """The page that asks before a list action acts (like the admin's own delete_selected)."""
        from django.contrib.admin import helpers

        across = request.POST.get("select_across") == "1"
        count = queryset.count()
        return TemplateResponse(request, "safetynet/admin/deadletter/confirm_selected.html", {
            **self.admin_site.each_context(request), "opts": self.opts, "title": "Are you sure?",
            "action": action, "verb": "replay" if action == "replay_selected" else "discard", "count": count,
            "rows": list(queryset.order_by("id").only("id", "task_name", "exception_type", "status")[:20]),
            # "Select all": the filters of the URL say which rows; else the ids ticked (one page at most).
            "select_across": across,
            "ids": ([] if across else list(queryset.values_list("pk", flat=True)))
                   or list(queryset.values_list("pk", flat=True)[:1]),
            "action_checkbox_name": helpers.ACTION_CHECKBOX_NAME,
        })

    def _replay(self, request: HttpRequest, rows: Any, *, args: Any = None, kwargs: Any = None) -> None:
        rows = list(rows.only("id", "task_name", "task_id", "reason") if isinstance(rows, QuerySet) else rows)
        try:
            # by id: replay streams the rows itself, whole (the list's rows lack the long columns)
            outcomes = deadletter.replay(DeadLetter.objects.filter(id__in=[row.id for row in rows]),
                                         by=request.user.get_username(), args=args, kwargs=kwargs)
        except (OperationalError, DatabaseError) as error:
            self.message_user(request, f"Replay stopped: {type(error).__name__}: {error}. Rows not sent are left as "
                                       "they were; see the log for any sent but not marked.", messages.ERROR)
            return
        by_id = {row.id: row for row in rows}
        for outcome in outcomes:
            if outcome.new_task_id:
                self.log_change(request, by_id[outcome.dead_letter_id], f"Replayed as task {outcome.new_task_id}.")
        done, refusals = display.replay_summary(outcomes)
        if done:
            self.message_user(request, done, messages.SUCCESS)
        for refusal in refusals:
            self.message_user(request, refusal, messages.ERROR)

    def _discard(self, request: HttpRequest, rows: Any) -> None:
        rows = list(rows.only("id", "task_name", "task_id", "reason", "status") if isinstance(rows, QuerySet)
                    else rows)
        dead = {row.id for row in rows if row.status == DeadLetter.Status.DEAD}
        changed = deadletter.discard(rows, by=request.user.get_username())
        for row in rows:
            if row.id in dead:
                self.log_change(request, row, "Discarded.")
        if changed:
            self.message_user(request, f"Discarded {changed} dead letter{'' if changed == 1 else 's'}.",
                              messages.SUCCESS)
        skipped = [row.id for row in rows if row.id not in dead]
        if skipped:
            self.message_user(request, f"Not discarded, already handled: {display.ids_text(skipped)}.", messages.WARNING)

    # -- detail page buttons ----------------------------------------------------------

    def get_urls(self) -> list[Any]:
        info = self.opts.app_label, self.opts.model_name
        ours = [
            path("<path:object_id>/replay/", self.admin_site.admin_view(self.replay_view),
                 name="%s_%s_replay" % info),
            path("<path:object_id>/discard/", self.admin_site.admin_view(self.discard_view),
                 name="%s_%s_discard" % info),
        ]
        return ours + super().get_urls()  # before the catch-all "<object_id>/" redirect

    def _acted_on(self, request: HttpRequest, object_id: str) -> DeadLetter | HttpResponse:
        """The row a detail-page button posts about, or the response that refuses the request (GET never acts)."""
        if request.method != "POST":
            return HttpResponseNotAllowed(["POST"])
        if not self.has_act_permission(request):
            raise PermissionDenied
        row = self.get_object(request, unquote(object_id))
        if row is None:
            return self._get_obj_does_not_exist_redirect(request, self.opts, object_id)
        return row

    def _back_to(self, row: DeadLetter) -> HttpResponseRedirect:
        return HttpResponseRedirect(
            reverse(f"{self.admin_site.name}:safetynet_deadletter_change", args=[row.pk])
        )

    def replay_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: a page to confirm (replacement arguments may be given); with ``confirm=yes``, replay, then back."""
        row = self._acted_on(request, object_id)
        if isinstance(row, HttpResponse):
            return row
        form = ReplayForm(request.POST if confirmed(request.POST) else None)
        if form.is_bound and form.is_valid():
            self._replay(request, [row], args=form.cleaned_data["args"], kwargs=form.cleaned_data["kwargs"])
            return self._back_to(row)
        return self._confirm_one(request, row, "replay", form)

    def discard_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: a page to confirm; with ``confirm=yes``, discard one dead letter, then back to its page."""
        row = self._acted_on(request, object_id)
        if isinstance(row, HttpResponse):
            return row
        if confirmed(request.POST):
            self._discard(request, [row])
            return self._back_to(row)
        return self._confirm_one(request, row, "discard", None)

    def _confirm_one(self, request: HttpRequest, row: DeadLetter, verb: str, form: ReplayForm | None
                     ) -> HttpResponse:
        """The page that asks before a detail-page button acts; a replay says why it would be refused, if it would."""
        refusal = None
        if verb == "replay":
            from celery import current_app

            app = current_app._get_current_object()
            app.loader.import_default_modules()
            refusal = deadletter.replay_refusal(row, app.tasks.get(row.task_name))
        return TemplateResponse(request, "safetynet/admin/deadletter/confirm.html", {
            **self.admin_site.each_context(request), "opts": self.opts, "original": row, "verb": verb,
            "title": f"{verb.capitalize()} dead letter #{row.pk}?", "form": form, "refusal": refusal,
            "message": display.shown(row)["exception_message"], **_arguments(row),
            "post_to": reverse(f"{self.admin_site.name}:safetynet_deadletter_{verb}", args=[row.pk]),
            "cancel": reverse(f"{self.admin_site.name}:safetynet_deadletter_change", args=[row.pk]),
        }, status=400 if form is not None and form.is_bound else 200)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        context = {**(extra_context or {}), "safetynet_can_act": self.has_act_permission(request)}
        return super().change_view(request, object_id, form_url, extra_context=context)


def _arguments(row: DeadLetter) -> dict[str, Any]:
    """The context of ``arguments.html``: args and kwargs within the caps, what was redacted, what was cut."""
    shown = display.shown(row)
    return {"args": display.shown_json(shown["args"]), "kwargs": display.shown_json(shown["kwargs"]),
            "redacted": row.redacted, "truncated": shown["truncated"],
            "shown_cut": shown["shown_cut"],
            "placeholder": deadletter.REDACTED}


def _epoch(value: float) -> str:
    return datetime.fromtimestamp(value, tz=timezone.utc).isoformat(sep=" ", timespec="seconds") if value else "-"


@admin.register(IdempotencyClaim)
class IdempotencyClaimAdmin(admin.ModelAdmin):
    """Idempotency claims, read-only: who holds a key, what it returned, how often its runs died."""

    list_display = ("key", "state", "task_name", "task_id", "deliveries", "lease", "updated")
    list_filter = ("state",)  # (a task-name filter would read every row for its choices)
    search_fields = ("=key", "=task_id")  # the key is the primary key; a task id search reads the table
    ordering = ("-pk",)  # indexed: the table has no index on times (every run writes them)
    readonly_fields = ("key", "state", "task_name", "task_id", "owner", "lease", "deliveries",
                       "result_stored", "result", "error", "created", "updated")
    exclude = ("lease_until", "created_at", "updated_at")

    @admin.display(description="lease until (UTC)")
    def lease(self, claim: IdempotencyClaim) -> str:
        return _epoch(claim.lease_until) if claim.state == IdempotencyClaim.State.IN_PROGRESS else "-"

    @admin.display(description="created (UTC)")
    def created(self, claim: IdempotencyClaim) -> str:
        return _epoch(claim.created_at)

    @admin.display(description="updated (UTC)", ordering="updated_at")
    def updated(self, claim: IdempotencyClaim) -> str:
        return _epoch(claim.updated_at)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False


@admin.register(TaskRecord)
class TaskRecordAdmin(admin.ModelAdmin):
    """The results of ``django.tasks`` tasks, read-only: status, attempts, errors, the dead letter and replay links."""

    list_display = ("id", "module_path", "status", "attempts", "queue_name", "priority", "enqueued_at",
                    "finished_at", "dead_letter")
    list_filter = ("status", "backend")
    search_fields = ("=id", "module_path")
    ordering = ("-updated_at",)  # indexed
    readonly_fields = ("id", "backend", "module_path", "queue_name", "priority", "run_after", "args", "kwargs",
                       "status", "enqueued_at", "started_at", "last_attempted_at", "finished_at", "attempts",
                       "worker_ids", "errors_shown", "return_value", "dead_letter", "replay_of", "updated_at")
    exclude = ("errors", "dead_letter_id")

    @admin.display(description="errors (one per failed attempt)")
    def errors_shown(self, record: TaskRecord) -> str:
        return "\n\n".join(f"{error.get('exception_class_path', '?')}\n{error.get('traceback', '')}"
                           for error in record.errors or []) or "-"

    @admin.display(description="dead letter")
    def dead_letter(self, record: TaskRecord) -> Any:
        if record.dead_letter_id is None:
            return "-"
        url = reverse("admin:safetynet_deadletter_change", args=[record.dead_letter_id])
        return format_html('<a href="{}">#{}</a>', url, record.dead_letter_id)

    def has_add_permission(self, request: HttpRequest) -> bool:
        return False

    def has_change_permission(self, request: HttpRequest, obj: Any = None) -> bool:
        return False
