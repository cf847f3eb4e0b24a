"""The progress endpoint: a task's state as JSON, for the user allowed to see it."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.urls import NoReverseMatch, reverse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from safetynet import conf, progress
from safetynet.models import TaskProgress

__all__ = ["status"]


@never_cache
@require_safe
def status(request: HttpRequest, task_id: str) -> JsonResponse:
    """GET: the state of ``task_id``; 403 to anonymous visitors, 404 alike for unknown and not-yours.

    A failed task whose dead letter was replayed adds where it goes on, if this user may see the replay:
    ``replayed_as`` (the new task id) and ``replayed_url`` (this endpoint for it), which the widget follows.
    """
    if not request.user.is_authenticated and conf.get().progress_access is None:
        return JsonResponse({"error": "log in to see this task"}, status=403)
    # A NUL or an overlong id names no task (and PostgreSQL would refuse to compare it).
    row = (TaskProgress.objects.filter(task_id=task_id).first()
           if "\x00" not in task_id and len(task_id) <= 255 else None)
    if row is None or not progress.can_see(request, row):
        # The same answer whether the task exists or not: no one learns another user's task ids.
        return JsonResponse({"error": "not found"}, status=404)
    shown = progress.as_json(row)
    replay = progress.replayed_as(row)
    if replay is not None and progress.can_see(request, replay):
        shown["replayed_as"] = replay.task_id
        try:  # this endpoint for the new id, under whatever namespace the project included it
            shown["replayed_url"] = reverse(request.resolver_match.view_name, kwargs={"task_id": replay.task_id})
        except (AttributeError, NoReverseMatch):
            pass
    return JsonResponse(shown)  # never_cache: no-store, so no proxy keeps a user's state
