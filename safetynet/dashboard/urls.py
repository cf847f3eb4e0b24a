"""The dashboard's URLs: ``path("safetynet/", include("safetynet.dashboard.urls"))``."""

from django.urls import path, re_path

from safetynet.dashboard import views

app_name = "safetynet_dashboard"

urlpatterns = [
    path("", views.overview, name="overview"),
    path("queues/", views.queues, name="queues"),
    re_path(r"^live/(?P<what>overview|queues)/$", views.live, name="live"),
    path("failures/", views.failures, name="failures"),
    re_path(r"^failures/(?P<action>replay|discard)/$", views.failure_group_action, name="failure_group_action"),
    path("dead/", views.dead_letters, name="dead_letters"),
    path("dead/<int:pk>/", views.dead_letter, name="dead_letter"),
    path("dead/<int:pk>/live/", views.dead_letter_live, name="dead_letter_live"),
    re_path(r"^dead/bulk/(?P<action>replay|discard)/$", views.bulk_action, name="bulk_action"),
    re_path(r"^dead/(?P<pk>[0-9]+)/(?P<action>replay|discard)/$", views.dead_letter_action, name="dead_letter_action"),
    path("schedule/", views.schedule, name="schedule"),
    path("schedule/due-now/", views.schedule_due_now, name="schedule_due_now"),
    path("breakers/", views.breakers_page, name="breakers"),
    path("upstreams/", views.breakers_page, name="upstreams"),
    re_path(r"^breakers/(?P<name>[A-Za-z0-9_.:-]{1,100})/(?P<action>open|close)/$", views.breaker_action,
            name="breaker_action"),
]
