"""The shop's one user-facing page: ask for a report, then watch it being made."""

from django.contrib.auth.decorators import login_required
from django.http import HttpRequest, HttpResponse, HttpResponseRedirect
from django.shortcuts import render
from django.urls import reverse
from django.views.decorators.http import require_http_methods

from shop import tasks

#: What the form can ask for: a report that works, and one whose template is broken.
KINDS = {"sales": tasks.build_sales_report, "broken": tasks.build_broken_report}


def home(request: HttpRequest) -> HttpResponse:
    return HttpResponseRedirect(reverse("reports"))


@login_required
@require_http_methods(["GET", "POST"])
def reports(request: HttpRequest) -> HttpResponse:
    """GET: the form; POST: send the report task, tracked for this user, and show its progress."""
    if request.method == "POST":
        task = KINDS.get(request.POST.get("kind", ""))
        if task is None:
            return render(request, "shop/reports.html", {"error": "Choose a report."}, status=400)
        result = task.apply_async(("2026-11",), progress_for=request.user)
        return HttpResponseRedirect(reverse("report", args=[result.id]))
    return render(request, "shop/reports.html", {})


@login_required
def report(request: HttpRequest, task_id: str) -> HttpResponse:
    """The progress widget of one report (the endpoint decides whether this user may see it)."""
    return render(request, "shop/report.html", {"task_id": task_id})
