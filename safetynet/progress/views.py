"""The progress endpoint: a task's state as JSON, for the user allowed to see it."""

from __future__ import annotations

from django.http import HttpRequest, JsonResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe

from safetynet import conf, progress
from safetynet.models import TaskProgress

__all__ = ["status"]


@never_cache
@require_safe
def status(request: HttpRequest, task_id: str) -> JsonResponse:
    """GET: the state of ``task_id``; 403 to anonymous visitors, 404 alike for unknown and not-yours."""
    if not request.user.is_authenticated and conf.get().progress_access is None:
        return JsonResponse({"error": "log in to see this task"}, status=403)
    # A NUL or an overlong id names no task (and PostgreSQL would refuse to compare it).
    row = (TaskProgress.objects.filter(task_id=task_id).first()
           if "\x00" not in task_id and len(task_id) <= 255 else None)
    if row is None or not progress.can_see(request, row):
        # The same answer whether the task exists or not: no one learns another user's task ids.
        return JsonResponse({"error": "not found"}, status=404)
    return JsonResponse(progress.as_json(row))  # never_cache: no-store, so no proxy keeps a user's state
