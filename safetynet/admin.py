"""The dead-letter admin: read-only rows, with replay and discard for those allowed to change them.

Rows are log-like: nobody adds or edits them here. The model's *view* permission shows
them; its *change* permission is used only for the replay and discard actions (the list
actions and the two buttons on the detail page); its *delete* permission deletes. Values
are shown as stored, and the stored values are already redacted; headers and free text
are passed through the redaction rules once more on display, never the other way round.
"""

from __future__ import annotations

from datetime import datetime, timezone
from typing import Any

from django.contrib import admin, messages
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
from django.urls import path, reverse
from django.utils.html import format_html
from django.utils.safestring import SafeString
from kombu.exceptions import OperationalError

from safetynet import deadletter, redaction
from safetynet.dashboard import display
from safetynet.models import DeadLetter, IdempotencyClaim

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
        ("Final failure", {"fields": ("exception_type", "exception_message", "traceback_display")}),
        ("Attempts", {"fields": ("timeline_display",)}),
        ("Arguments", {"fields": ("arguments_display", "headers_display", "raw_body_display")}),
        ("Audit trail", {"fields": ("audit_display",)}),
    )
    readonly_fields = (
        "task_name", "task_id", "status", "reason", "detail_display", "attempts_display", "first_failed_at",
        "last_failed_at", "worker", "delivery_display", "fingerprint_display", "replays_display",
        "exception_type", "exception_message", "traceback_display", "timeline_display", "arguments_display",
        "headers_display", "raw_body_display", "audit_display",
    )

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
        return redaction.redact_text(row.detail) if row.detail else "-"

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
        return format_html('<code>{}</code> · <a href="{}?fingerprint={}">{} alike failure{}</a>',
                           row.fingerprint, url, row.fingerprint, alike, "" if alike == 1 else "s")

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
        return format_html('<pre class="safetynet-traceback">{}</pre>', row.traceback) if row.traceback else "-"

    @admin.display(description="timeline")
    def timeline_display(self, row: DeadLetter) -> SafeString:
        return render_to_string("safetynet/admin/deadletter/timeline.html",
                                {"entries": display.history_entries(row), "omitted": row.omitted_attempts})

    @admin.display(description="args / kwargs")
    def arguments_display(self, row: DeadLetter) -> SafeString:
        return render_to_string("safetynet/admin/deadletter/arguments.html", {
            "args": display.shown_json(row.args), "kwargs": display.shown_json(row.kwargs), "redacted": row.redacted,
            "placeholder": deadletter.REDACTED,
        })

    @admin.display(description="headers")
    def headers_display(self, row: DeadLetter) -> SafeString:
        return format_html("<pre>{}</pre>", display.shown_json(redaction.masked_headers(row.headers))) if row.headers else "-"

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

    @admin.action(description="Replay selected dead letters", permissions=["act"])
    def replay_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._replay(request, queryset)

    @admin.action(description="Discard selected dead letters", permissions=["act"])
    def discard_selected(self, request: HttpRequest, queryset: QuerySet) -> None:
        self._discard(request, queryset)

    def _replay(self, request: HttpRequest, rows: Any) -> None:
        rows = list(rows)
        try:
            outcomes = deadletter.replay(rows, by=request.user.get_username())
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
        rows = list(rows)
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
        """The row a detail-page button posts about, or the response that refuses the request."""
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
        """POST: replay one dead letter, then back to its page."""
        row = self._acted_on(request, object_id)
        if isinstance(row, HttpResponse):
            return row
        self._replay(request, [row])
        return self._back_to(row)

    def discard_view(self, request: HttpRequest, object_id: str) -> HttpResponse:
        """POST: discard one dead letter, then back to its page."""
        row = self._acted_on(request, object_id)
        if isinstance(row, HttpResponse):
            return row
        self._discard(request, [row])
        return self._back_to(row)

    def change_view(self, request: HttpRequest, object_id: str, form_url: str = "",
                    extra_context: dict[str, Any] | None = None) -> HttpResponse:
        context = {**(extra_context or {}), "safetynet_can_act": self.has_act_permission(request)}
        return super().change_view(request, object_id, form_url, extra_context=context)


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
