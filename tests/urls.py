from django.contrib import admin
from django.urls import include, path

urlpatterns = [
    path("admin/", admin.site.urls),
    path("safetynet/", include("safetynet.dashboard.urls")),
    path("tasks/", include("safetynet.progress.urls")),
]
