"""Where limits show: the dashboard's Upstreams page, ``explain``, Prometheus."""

import uuid
from io import StringIO

import pytest
import redis
from django.core.management import call_command
from django.test import override_settings
from django.urls import reverse

from safetynet import LimitReached, limits
from tests.fixtures.web import logged_in, person
from tests.limits.test_limits import REDIS_URL, limited  # noqa: F401  (registers the task)

pytestmark = pytest.mark.django_db(transaction=True)


@pytest.fixture
def declared():
    name = f"lim-{uuid.uuid4().hex[:8]}"
    settings = {"REDIS_URL": REDIS_URL, "LIMITS": {name: {"concurrency": 2, "rate": "100/m"},
                                                   "lim-task": {"concurrency": 1, "rate": "5/s",
                                                                "partition_by": "customer_id"}}}
    with override_settings(SAFETYNET=settings):
        yield name
    client = redis.Redis.from_url(REDIS_URL)
    for key in client.scan_iter("safetynet:limit:lim-*"):
        client.delete(key)


def test_the_upstreams_page_shows_each_limit_with_its_use(declared):
    held = limits.acquire([(declared, "")])
    try:
        client = logged_in(person("root", superuser=True))
        response = client.get(reverse("safetynet_dashboard:upstreams"))
    finally:
        limits.release(held)
    assert response.status_code == 200
    page = response.content.decode()
    assert "<h1>Upstreams</h1>" in page and 'id="limits"' in page and 'id="budgets"' in page
    [shown] = [row for row in response.context["limits"] if row["name"] == declared]
    assert (shown["in_use"], shown["calls"], shown["rule"]) == (1, 1, "2 at once, 100 per min")
    assert f'data-name="{declared}"' in page and "1 / 2" in page
    assert client.get(reverse("safetynet_dashboard:breakers")).status_code == 200  # the old address still works


def test_explain_shows_a_tasks_limits(declared):
    out = StringIO()
    call_command("safetynet", "explain", "tests.limits.test_limits.limited", stdout=out)
    text = out.getvalue()
    assert "Limit: lim-task  (1 at once, 5 per s, per customer_id; shared by every worker)" in text
    assert "deferred until its turn (no attempt used" in text


def test_prometheus_counts_deferrals_and_reads_the_slots_in_use(declared):
    from safetynet.contrib import prometheus

    prometheus.install()
    held = [limits.acquire([(declared, "")]) for _ in range(2)]
    try:
        with pytest.raises(LimitReached):
            limits.acquire([(declared, "")], task_id="t-1")
        from prometheus_client.exposition import generate_latest

        text = generate_latest(prometheus.collector_registry()).decode()
    finally:
        for ticket in held:
            limits.release(ticket)
    assert f'safetynet_limit_slots_in_use{{limit="{declared}"}} 2.0' in text
    assert f'safetynet_limit_calls_in_window{{limit="{declared}"}} 2.0' in text
    assert f'safetynet_limit_deferrals_total{{limit="{declared}",reason="concurrency"}} 1.0' in text
    assert f'safetynet_limit_wait_seconds_count{{limit="{declared}"}} 1.0' in text



def test_prometheus_counts_the_pauses_a_429_asked_for_not_those_by_hand(declared):
    from prometheus_client.exposition import generate_latest

    from safetynet.contrib import prometheus

    prometheus.install()
    metric = f'safetynet_limit_pauses_total{{limit="{declared}"}}'
    limits.pause(declared, seconds=5, by_hand=True)  # staff: `safetynet limits pause`
    assert metric not in generate_latest(prometheus.collector_registry()).decode()
    limits.pause(declared, seconds=5)  # what a 429 does (tighten_on_429)
    assert f"{metric} 1.0" in generate_latest(prometheus.collector_registry()).decode()
