"""The demo's pages: log in, the shop's reports (the progress widget), the staff dashboard, the admin, the progress
endpoint."""

from django.contrib import admin
from django.contrib.auth import views as auth_views
from django.urls import include, path

from shop import views

urlpatterns = [
    path("", views.home, name="home"),
    path("accounts/login/", auth_views.LoginView.as_view(), name="login"),
    path("accounts/logout/", auth_views.LogoutView.as_view(), name="logout"),
    path("reports/", views.reports, name="reports"),
    path("reports/<str:task_id>/", views.report, name="report"),
    path("safetynet/", include("safetynet.dashboard.urls")),
    path("admin/", admin.site.urls),
    path("tasks/", include("safetynet.progress.urls")),
]
