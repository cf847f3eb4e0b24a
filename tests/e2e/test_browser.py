"""End to end in a real headless Chromium against the demo's pages, served with a live worker.

The session runs the demo (``demo/run.py``, which fills the dashboard with a realistic mix) in a
data directory of its own, on Redis (``$SAFETYNET_E2E_REDIS_URL``, else the test broker
``$SAFETYNET_TEST_BROKER``, else ``redis://127.0.0.1:6379/15``: a broker the dashboard can ask its
workers through), serves it with ``demo/serve.py``, and drives Debian's Chromium through
Playwright. Screenshots, kept as CI artefacts, go to ``$SAFETYNET_E2E_SCREENSHOTS`` (default
``artifacts/screenshots/``, ignored by git). Without Chromium the tests are skipped locally and
fail in CI (``CI=true``).
"""

from __future__ import annotations

import os
import re
import shutil
import socket
import subprocess
import sys
import time
import urllib.request
from pathlib import Path

import pytest

pytestmark = pytest.mark.e2e

ROOT = Path(__file__).resolve().parents[2]
DEMO = ROOT / "demo"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
SCREENSHOTS = Path(os.environ.get("SAFETYNET_E2E_SCREENSHOTS") or ROOT / "artifacts" / "screenshots")
REDIS_URL = (os.environ.get("SAFETYNET_E2E_REDIS_URL") or os.environ.get("SAFETYNET_TEST_BROKER")
             or "redis://127.0.0.1:6379/15")
PASSWORD = "safetynet-demo"
# Chromium on a closed network: no background connections, no sandbox (root), a fresh profile each run.
CHROMIUM_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-quic", "--no-first-run", "--disable-background-networking",
                 "--disable-component-update", "--disable-sync"]


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


@pytest.fixture(scope="session")
def demo_site(tmp_path_factory):
    """The demo's data made by a run of the demo, served with a worker; its base URL."""
    if not Path(CHROMIUM).exists():
        message = f"no Chromium at {CHROMIUM} (apt-get install chromium)"
        if os.environ.get("CI"):
            pytest.fail(message)
        pytest.skip(message)
    var = tmp_path_factory.mktemp("demo-var")
    env = {**os.environ, "SAFETYNET_DEMO_VAR": str(var), "SAFETYNET_DEMO_REDIS_URL": REDIS_URL}
    seeded = subprocess.run([sys.executable, str(DEMO / "run.py")], env=env, capture_output=True, text=True,
                            timeout=180)
    assert seeded.returncode == 0, f"the demo failed:\n{seeded.stdout[-3000:]}\n{seeded.stderr[-3000:]}"
    port = _free_port()
    server = subprocess.Popen([sys.executable, str(DEMO / "serve.py"), "--port", str(port)], env=env,
                              stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True)
    base = f"http://127.0.0.1:{port}"
    try:
        started = time.monotonic()
        line = server.stdout.readline()
        while line and not line.startswith("serving the demo"):
            if time.monotonic() - started > 90:
                break
            line = server.stdout.readline()
        assert line.startswith("serving the demo"), f"demo/serve.py did not start: {line!r}"
        urllib.request.urlopen(f"{base}/accounts/login/", timeout=5).close()
        yield base
    finally:
        server.terminate()
        try:
            server.wait(timeout=30)
        except subprocess.TimeoutExpired:
            server.kill()


@pytest.fixture(scope="session")
def browser(demo_site):
    from playwright.sync_api import sync_playwright

    SCREENSHOTS.mkdir(parents=True, exist_ok=True)
    print(f"\nscreenshots: {SCREENSHOTS}")
    with sync_playwright() as playwright:
        chromium = playwright.chromium.launch(executable_path=CHROMIUM, headless=True, args=CHROMIUM_ARGS)
        yield chromium
        chromium.close()


@pytest.fixture
def page(browser):
    context = browser.new_context(viewport={"width": 1280, "height": 900})
    context.set_default_timeout(20_000)
    yield context.new_page()
    context.close()


def log_in(page, base: str, user: str, then: str) -> None:
    page.goto(f"{base}{then}")
    assert "/accounts/login/" in page.url  # sent to log in first
    page.fill("#id_username", user)
    page.fill("#id_password", PASSWORD)
    page.click("#log-in")
    page.wait_for_load_state()


def wait_until(check, timeout: float = 30.0) -> None:
    """Poll ``check()`` from here (the dashboard's policy allows no eval, so no wait_for_function on its pages)."""
    deadline = time.monotonic() + timeout
    while not check():
        assert time.monotonic() < deadline, "timed out"
        time.sleep(0.25)


def shot(page, name: str) -> None:
    path = SCREENSHOTS / f"{name}.png"
    page.screenshot(path=str(path), full_page=True)
    assert path.stat().st_size > 5_000


def test_staff_see_the_overview_with_its_charts(page, demo_site):
    page.set_viewport_size({"width": 1440, "height": 900})
    log_in(page, demo_site, "staff", "/safetynet/")
    assert page.url.endswith("/safetynet/")
    outcomes = page.locator("svg#chart-outcomes")
    # a column an hour for the day (the demo makes up the day before its run), stacked by outcome
    assert outcomes.locator("g.column").count() >= 20
    assert set(outcomes.locator("rect").evaluate_all("parts => parts.map(p => p.dataset.series)")) == {
        "succeeded", "retried", "given up"}
    given_up = outcomes.locator('rect[data-series="given up"]').evaluate_all("parts => parts.map(p => +p.dataset.value)")
    assert sum(given_up) >= 5  # the demo's real deaths, this hour
    # axes: labelled gridlines up the side, hours along the bottom; a legend with each series' total
    assert outcomes.locator("line.grid").count() >= 3
    assert re.fullmatch(r"\d\d:00", outcomes.locator(".x-axis text").first.text_content())
    assert outcomes.locator(".y-axis text").first.text_content() == "0"
    legend = page.locator("#chart-outcomes-legend li").all_inner_texts()
    assert [item.split()[0] for item in legend] == ["succeeded", "retried", "given"]
    assert page.locator("#chart-outcomes-legend").is_visible()
    latency = page.locator("svg#chart-latency")
    assert latency.locator('path[data-series="p50"]').count() == 1 and latency.locator("circle").count() > 20
    assert re.search(r"\d+ (ms|s)", latency.locator(".y-axis").text_content())
    table = page.locator("#task-table").inner_text()
    assert "shop.tasks.sync_catalog" in table and "shop.tasks.import_row" in table
    assert "permanent_error" in table and "retries_exhausted" in table
    assert "0.000" not in table
    assert int(page.locator("#total-runs").inner_text()) > 100
    shot(page, "1-overview-1440")
    # a "given up" figure opens its rows, whatever their status now
    page.click("#total-dead")
    page.wait_for_load_state()
    assert "status=all" in page.url and page.locator("tr.dead-letter").count() >= 5


def test_no_sideways_scroll_on_a_phone(page, demo_site):
    page.set_viewport_size({"width": 390, "height": 844})
    log_in(page, demo_site, "staff", "/safetynet/")
    for path, name in (("/safetynet/", "9-overview-390"), ("/safetynet/dead/?status=all", "10-dead-letters-390"),
                       ("/safetynet/queues/", "11-queues-390")):
        page.goto(f"{demo_site}{path}")
        assert page.evaluate("document.documentElement.scrollWidth") <= 390, path
        assert page.locator("details.menu").is_visible() and not page.locator("nav.full").is_visible()
        shot(page, name)
    # the wide table scrolls inside its box, not the page
    page.goto(f"{demo_site}/safetynet/dead/?status=all")
    box = page.locator(".scroll").first
    assert box.evaluate("element => element.scrollWidth > element.clientWidth")
    page.click("details.menu summary")
    assert page.locator("details.menu nav a", has_text="Upstreams").is_visible()


def test_dark_mode_follows_the_system_and_the_admins_choice(browser, demo_site):
    context = browser.new_context(viewport={"width": 1440, "height": 900}, color_scheme="dark")
    context.set_default_timeout(20_000)
    page = context.new_page()
    try:
        log_in(page, demo_site, "staff", "/safetynet/")
        background = "getComputedStyle(document.body).backgroundColor"
        assert page.evaluate(background) == "rgb(18, 22, 32)"
        assert page.evaluate("getComputedStyle(document.querySelector('table')).backgroundColor") == "rgb(26, 31, 43)"
        shot(page, "12-overview-dark")
        # the admin's theme switch (its "theme" in localStorage) wins over the system's
        page.evaluate("localStorage.setItem('theme', 'light')")
        page.reload()
        assert page.evaluate(background) == "rgb(246, 247, 249)"
        page.evaluate("localStorage.setItem('theme', 'auto')")
        page.goto(f"{demo_site}/admin/")
        assert page.locator("#site-name").count() == 1  # the demo installs the admin, and the header links it
    finally:
        context.close()


def test_bulk_replay_of_selected_rows_asks_first(page, demo_site):
    log_in(page, demo_site, "staff", "/safetynet/dead/?task=import_row")
    rows = page.locator("tr.dead-letter")
    assert rows.count() >= 3  # part of a name is enough
    assert page.locator("#bulk-replay").is_disabled()
    rows.nth(0).locator("input[name=ids]").check()
    rows.nth(1).locator("input[name=ids]").check()
    assert page.locator("[data-selected-count]").inner_text() == "2" and page.locator("#bulk-replay").is_enabled()
    picked = [rows.nth(index).get_attribute("data-id") for index in (0, 1)]
    page.click("#bulk-replay")
    page.wait_for_load_state()
    assert page.locator("h1").inner_text() == "Replay 2 selected dead letters?"
    assert sorted(page.locator("#selected-rows tbody tr td:first-child").all_inner_texts()) == sorted(picked)
    shot(page, "13-bulk-replay-confirmation")
    page.click("#confirm-form button[type=submit]")
    page.wait_for_load_state()
    notice = page.locator(".notices li.success")
    assert notice.inner_text().startswith("Replayed 2 dead letters:")
    assert notice.locator("a").count() == 2
    assert "task=import_row" in page.url  # back to the same list
    shot(page, "14-bulk-replayed")


def test_staff_filter_dead_letters_replay_one_and_see_it_succeed(page, demo_site):
    log_in(page, demo_site, "staff", "/safetynet/dead/")
    every = page.locator("tr.dead-letter").count()
    assert every >= 7
    page.select_option("#filters select[name=reason]", "retries_exhausted")
    page.fill("#filters input[name=task]", "refresh_partner")
    page.click("#filters button[type=submit]")
    page.wait_for_load_state()
    rows = page.locator("tr.dead-letter")
    assert 0 < rows.count() < every
    assert set(rows.evaluate_all("rows => rows.map(r => r.dataset.reason)")) == {"retries_exhausted"}
    assert "shop.tasks.import_row" not in page.locator("#dead-letters").inner_text()
    shot(page, "2-dead-letters-filtered")

    rows.first.locator("a").first.click()
    page.wait_for_load_state()
    assert "refresh_partner_feed" in page.content()
    assert page.locator("#timeline tbody tr").count() >= 2  # two attempts
    page.click("#replay-form button[type=submit]")
    page.wait_for_load_state()
    assert "Replay dead letter #" in page.content()  # it asks first: nothing is sent yet
    assert page.locator("span.status.status-replayed").count() == 0
    shot(page, "3a-replay-confirmation")
    page.click("#confirm-form button[type=submit]")
    page.wait_for_load_state()
    assert page.locator("span.status.status-replayed").count() == 1
    assert re.search(r"Replayed 1 dead letter", page.content())
    # no reload: the page follows the new task and shows its outcome when it lands
    first_load = page.evaluate("performance.timeOrigin")
    wait_until(lambda: page.locator("#replay-outcome").get_attribute("data-state") == "SUCCESS")
    assert page.evaluate("performance.timeOrigin") == first_load  # the same document: not reloaded
    assert page.locator("#replay-outcome").inner_text() == "succeeded"
    shot(page, "3-replayed-and-succeeded")


def test_the_dashboard_is_styled_under_its_own_content_security_policy(page, demo_site):
    refused = []
    page.on("console", lambda message: refused.append(message.text)
            if "Content Security Policy" in message.text else None)
    log_in(page, demo_site, "staff", "/safetynet/failures/")
    response = page.reload()
    assert "style-src 'nonce-" in response.headers["content-security-policy"]
    assert response.headers["x-frame-options"] == "DENY"
    # the stylesheet applied (its nonce matched): the header bar is dark, the table has its border
    assert page.evaluate("getComputedStyle(document.querySelector('header')).backgroundColor") == "rgb(29, 36, 48)"
    page.goto(f"{demo_site}/safetynet/breakers/")
    assert refused == []


def test_a_user_who_is_not_staff_is_refused(page, demo_site):
    log_in(page, demo_site, "shopper", "/safetynet/")
    response = page.goto(f"{demo_site}/safetynet/dead/")
    assert response.status == 403
    assert "dead-letters" not in page.content()
    assert page.locator("#refused").inner_text() == "You cannot see this page"
    assert "not a staff account" in page.content() and page.locator("#log-out").is_visible()
    shot(page, "4-refused")


def test_the_progress_widget_turns_into_a_check_mark(page, demo_site):
    log_in(page, demo_site, "shopper", "/reports/")
    page.click("#sales-report")
    widget = page.locator(".safetynet-progress")
    page.wait_for_function("document.querySelector('.safetynet-progress')?.dataset.state === 'running'")
    assert page.locator("progress.safetynet-progress-bar").is_visible()
    page.wait_for_function("document.querySelector('.safetynet-progress-message')?.textContent.includes('parts done')")
    assert re.search(r"· \d of 5 parts done$", page.locator(".safetynet-progress-message").inner_text())
    assert "%" not in page.locator(".safetynet-progress-message").inner_text()
    shot(page, "5-progress-running")
    page.wait_for_function("document.querySelector('.safetynet-progress')?.dataset.state === 'succeeded'")
    assert page.locator(".safetynet-progress-done").is_visible()
    assert not page.locator("progress.safetynet-progress-bar").is_visible()
    assert "✓" in widget.inner_text() and "is ready" in widget.inner_text()
    result = page.locator("a.safetynet-progress-result")  # the result's link, in its slot
    assert result.is_visible() and result.get_attribute("href") == "/reports/?month=2026-11"
    # the default stylesheet applies: the widget has its border
    assert page.evaluate("getComputedStyle(document.querySelector('.safetynet-progress')).borderTopStyle") == "solid"
    shot(page, "6-progress-done")


def test_the_progress_widget_shows_an_error_for_a_task_that_dies(page, demo_site):
    log_in(page, demo_site, "shopper", "/reports/")
    page.click("#broken-report")
    page.wait_for_function("document.querySelector('.safetynet-progress')?.dataset.state === 'failed'")
    error = page.locator(".safetynet-progress-error")
    assert error.is_visible()
    assert error.inner_text() == "Sorry, this did not work. The team has been told."
    task_id = page.locator(".safetynet-progress").get_attribute("data-task-id")
    assert page.locator(".safetynet-progress-reference").inner_text() == f"Reference: {task_id}"
    content = page.content()
    for leak in ("demo-secret-42", "Traceback", "KeyError", "no field 'margin'", "sales.html"):
        assert leak not in content
    shot(page, "7-progress-failed")


def test_the_progress_widget_follows_a_replay_of_its_task(browser, page, demo_site):
    log_in(page, demo_site, "shopper", "/reports/")
    page.click("#broken-report")
    page.wait_for_function("document.querySelector('.safetynet-progress')?.dataset.state === 'failed'")
    first = page.locator(".safetynet-progress").get_attribute("data-task-id")

    # Staff replay its dead letter from the dashboard, in a browser of their own.
    staff = browser.new_context(viewport={"width": 1280, "height": 900})
    staff.set_default_timeout(20_000)
    desk = staff.new_page()
    try:
        log_in(desk, demo_site, "staff", f"/safetynet/dead/?q={first}")
        desk.locator("tr.dead-letter a").first.click()
        desk.wait_for_load_state()
        desk.click("#replay-form button[type=submit]")
        desk.wait_for_load_state()
        desk.click("#confirm-form button[type=submit]")
        desk.wait_for_load_state()
        second = desk.locator("#replayed-task-id").inner_text()
    finally:
        staff.close()
    assert second and second != first

    # The shopper's page, left open on the failure, follows the replay (it is broken too: it fails again).
    page.wait_for_function(f"document.querySelector('.safetynet-progress')?.dataset.taskId === '{second}'",
                           timeout=60_000)
    page.wait_for_function("document.querySelector('.safetynet-progress')?.dataset.state === 'failed'")
    shot(page, "8-progress-followed-the-replay")
    # A page opened later on the first task follows at once.
    page.goto(f"{demo_site}/reports/{first}/")
    page.wait_for_function(f"document.querySelector('.safetynet-progress')?.dataset.taskId === '{second}'")


def test_the_queues_page_shows_the_demo_queue_depth_and_its_worker(page, demo_site):
    from celery import Celery

    app = Celery("e2e", broker=REDIS_URL, set_as_current=False)
    log_in(page, demo_site, "staff", "/safetynet/queues/")
    worker = page.locator('tr.worker[data-worker^="demo-"]')  # the demo's (another may share the broker)
    worker.wait_for()  # in the page, or added by its next refresh when the workers were slow to answer
    assert worker.count() == 1
    assert worker.locator(".state").inner_text() == "answering"
    assert re.fullmatch(r"(under 1 ms|[\d.]+ (ms|s)) ago", worker.locator(".heartbeat").inner_text())
    name = worker.get_attribute("data-worker")
    # The worker stops taking from the demo's queue for a moment: what is sent waits there, and the page shows it.
    app.control.cancel_consumer("celery", destination=[name], reply=True, timeout=5)
    try:
        for number in range(5):
            app.send_task("shop.tasks.sync_catalog", (number,), queue="celery")
        depth = page.locator('tr.queue[data-queue="celery"] .depth')
        first_load = page.evaluate("performance.timeOrigin")
        wait_until(lambda: depth.inner_text().strip() == "5")  # no reload: the figures refresh themselves
        assert page.evaluate("performance.timeOrigin") == first_load
        shot(page, "15-queues")
    finally:
        app.control.add_consumer("celery", destination=[name], reply=True, timeout=5)
