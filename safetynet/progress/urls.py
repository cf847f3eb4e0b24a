"""The progress endpoint's URL: ``path("tasks/", include("safetynet.progress.urls"))``."""

from django.urls import path

from safetynet.progress import views

app_name = "safetynet_progress"

urlpatterns = [path("<str:task_id>/", views.status, name="status")]
