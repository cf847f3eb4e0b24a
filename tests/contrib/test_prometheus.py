"""safetynet.contrib.prometheus: receivers, the Django view, multiprocess mode, a real worker, promtool."""

import os
import shutil
import socket
import subprocess
import sys
import textwrap
import time
import uuid
import urllib.request
from datetime import datetime, timezone
from pathlib import Path
from types import SimpleNamespace

import pytest

pytest.importorskip("prometheus_client", reason="prometheus_client is not installed (pip install '.[prometheus]')")

from celery import signals as celery_signals  # noqa: E402
from django.urls import path  # noqa: E402
from prometheus_client import REGISTRY, CollectorRegistry  # noqa: E402
from prometheus_client.multiprocess import MultiProcessCollector  # noqa: E402
from prometheus_client.parser import text_string_to_metric_families  # noqa: E402

from safetynet import signals  # noqa: E402
from safetynet.contrib import prometheus  # noqa: E402
from safetynet.exceptions import ConfigurationError  # noqa: E402
from safetynet.protocol.events import Outcome, TaskEnded  # noqa: E402
from safetynet.protocol.reasons import Reason  # noqa: E402
from tests.fixtures import tasks  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
URL = "/internal/metrics"

# The project's urls.py, as docs/prometheus.md shows it (used through pytest.mark.urls).
urlpatterns = [path(URL.lstrip("/"), prometheus.metrics_view)]

PING, FLAKY, PERMANENT, SNOOZER = (t.name for t in (tasks.ping, tasks.flaky_once, tasks.permanent, tasks.snoozer))


@pytest.fixture(autouse=True)
def installed():
    prometheus.install()


def value(name, **labels):
    """A sample of this process's default registry (0 when absent)."""
    return REGISTRY.get_sample_value(name, labels) or 0.0


def parse(text):
    """{(sample name, sorted labels): value} of an exposition text."""
    return {
        (sample.name, tuple(sorted(sample.labels.items()))): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def sample(parsed, name, **labels):
    return parsed.get((name, tuple(sorted(labels.items()))), 0.0)


def retrying(task, delay, action="retry"):
    return signals.task_retrying.send_robust(
        sender=task, task_id="t-1", attempt=1, delay=delay, reason="retry_on ConnectionError",
        exception=ConnectionError("down"), entry={"attempt": 1, "action": action, "delay": delay},
    )


def make_dead_letter(task_name, status="dead", reason="permanent_error", **fields):
    from safetynet.models import DeadLetter

    now = datetime.now(timezone.utc)
    return DeadLetter.objects.create(
        task_name=task_name, task_id=fields.pop("task_id", None) or f"{task_name}-{time.monotonic_ns()}",
        reason=reason, status=status, first_failed_at=now, last_failed_at=now, fingerprint="f" * 40, **fields,
    )


# -- receivers -----------------------------------------------------------------------------

def test_a_retry_counts_an_attempt_and_observes_its_delay():
    attempts, count, total = (value("safetynet_task_attempts_total", task=FLAKY, outcome="retry"),
                              value("safetynet_task_retry_delay_seconds_count", task=FLAKY),
                              value("safetynet_task_retry_delay_seconds_sum", task=FLAKY))
    below_5 = value("safetynet_task_retry_delay_seconds_bucket", task=FLAKY, le="5.0")
    below_2 = value("safetynet_task_retry_delay_seconds_bucket", task=FLAKY, le="2.0")

    assert all(error is None for _, error in retrying(tasks.flaky_once, 5.0))

    assert value("safetynet_task_attempts_total", task=FLAKY, outcome="retry") == attempts + 1
    assert value("safetynet_task_retry_delay_seconds_count", task=FLAKY) == count + 1
    assert value("safetynet_task_retry_delay_seconds_sum", task=FLAKY) == total + 5.0
    assert value("safetynet_task_retry_delay_seconds_bucket", task=FLAKY, le="5.0") == below_5 + 1
    assert value("safetynet_task_retry_delay_seconds_bucket", task=FLAKY, le="2.0") == below_2


def test_a_snooze_is_its_own_outcome():
    snoozes = value("safetynet_task_attempts_total", task=SNOOZER, outcome="snooze")
    retries = value("safetynet_task_attempts_total", task=SNOOZER, outcome="retry")
    retrying(tasks.snoozer, 10.0, action="snooze")
    assert value("safetynet_task_attempts_total", task=SNOOZER, outcome="snooze") == snoozes + 1
    assert value("safetynet_task_attempts_total", task=SNOOZER, outcome="retry") == retries


def ended(task_name, reason=None, runtime=None):
    outcome = Outcome.DEAD if reason else Outcome.SUCCEEDED
    signals.announce(TaskEnded(task_name=task_name, task_id=str(uuid.uuid4()), outcome=outcome,
                               reason=Reason(reason) if reason else None, runtime=runtime))


def test_a_task_given_up_is_counted_by_reason_once():
    dead = value("safetynet_task_dead_total", task=PERMANENT, reason="permanent_error")
    attempts = value("safetynet_task_attempts_total", task=PERMANENT, outcome="dead")
    ended(PERMANENT, "permanent_error")
    assert value("safetynet_task_dead_total", task=PERMANENT, reason="permanent_error") == dead + 1
    assert value("safetynet_task_attempts_total", task=PERMANENT, outcome="dead") == attempts + 1


def test_every_reason_is_counted_from_the_one_terminal_event():
    time_limit = value("safetynet_task_dead_total", task=PING, reason="time_limit")
    exhausted = value("safetynet_task_dead_total", task=PING, reason="retries_exhausted")
    ended(PING, "time_limit")
    ended(PING, "retries_exhausted")
    assert value("safetynet_task_dead_total", task=PING, reason="time_limit") == time_limit + 1
    assert value("safetynet_task_dead_total", task=PING, reason="retries_exhausted") == exhausted + 1


def task_labels():
    """Every value of the ``task`` label in this process's registry."""
    return {sample.labels["task"] for family in REGISTRY.collect() if family.name.startswith("safetynet_task")
            for sample in family.samples if "task" in sample.labels}


@pytest.mark.parametrize("reason", ["unknown_task", "undecodable", "malformed"])
def test_names_only_a_message_gave_are_one_label(reason):
    """A thousand garbage task names from the broker make one label value, not a thousand."""
    before = value("safetynet_task_dead_total", task="(unregistered)", reason=reason)
    names = [f"garbage.{uuid.uuid4().hex}\x00{'x' * 300}" for _ in range(1000)]
    for name in names:
        ended(name, reason)
    assert value("safetynet_task_dead_total", task="(unregistered)", reason=reason) == before + 1000
    assert not task_labels() & set(names)


def test_a_malformed_message_under_a_registered_name_keeps_the_name():
    before = value("safetynet_task_dead_total", task=PING, reason="malformed")
    ended(PING, "malformed")
    assert value("safetynet_task_dead_total", task=PING, reason="malformed") == before + 1


@pytest.mark.django_db
def test_the_gauge_gives_unregistered_names_one_label():
    for n in range(50):
        make_dead_letter(f"garbage.{n}", reason="unknown_task")
        make_dead_letter(f"other.{n}", reason="malformed")
    make_dead_letter(PING, reason="malformed")
    make_dead_letter("a.task.that.ran", reason="permanent_error")  # a task that ran keeps its name
    [family] = prometheus.DeadLetterCollector().collect()
    counts = {sample.labels["task"]: sample.value for sample in family.samples}
    assert counts == {"(unregistered)": 100, PING: 1, "a.task.that.ran": 1}


def test_eviction_is_counted():
    from safetynet.models import DeadLetter

    before = value("safetynet_dead_letters_evicted_total")
    signals.dead_letters_evicted.send_robust(sender=DeadLetter, count=7, cap=100, oldest=None)
    assert value("safetynet_dead_letters_evicted_total") == before + 7


def test_real_tasks_run_eagerly_count_success_retry_dead_and_run_time():
    def snapshot():
        return {
            "ping ok": value("safetynet_task_attempts_total", task=PING, outcome="success"),
            "ping runs": value("safetynet_task_runtime_seconds_count", task=PING),
            "flaky retry": value("safetynet_task_attempts_total", task=FLAKY, outcome="retry"),
            "flaky ok": value("safetynet_task_attempts_total", task=FLAKY, outcome="success"),
            "flaky runs": value("safetynet_task_runtime_seconds_count", task=FLAKY),
            "permanent dead": value("safetynet_task_dead_total", task=PERMANENT, reason="permanent_error"),
            "permanent runs": value("safetynet_task_runtime_seconds_count", task=PERMANENT),
        }

    before = snapshot()
    assert tasks.ping.apply().get() == "pong"
    assert tasks.flaky_once.apply(("k",)).get()["attempt"] == 2  # the eager retry runs inside the first attempt
    assert tasks.permanent.apply().state == "FAILURE"
    after = snapshot()
    assert {key: after[key] - before[key] for key in before} == {
        "ping ok": 1, "ping runs": 1, "flaky retry": 1, "flaky ok": 1, "flaky runs": 2,
        "permanent dead": 1, "permanent runs": 1,
    }


def test_plain_celery_tasks_are_not_counted():
    plain = tasks.plain_send_welcome_email
    celery_signals.task_prerun.send(sender=plain, task_id="p", task=plain, args=(), kwargs={})
    celery_signals.task_postrun.send(sender=plain, task_id="p", task=plain, args=(), kwargs={}, retval=None,
                                     state="SUCCESS")
    assert REGISTRY.get_sample_value("safetynet_task_attempts_total",
                                     {"task": plain.name, "outcome": "success"}) is None
    assert REGISTRY.get_sample_value("safetynet_task_runtime_seconds_count", {"task": plain.name}) is None


def test_install_is_idempotent_and_uninstall_disconnects():
    prometheus.install()
    prometheus.install()
    before = value("safetynet_task_attempts_total", task=FLAKY, outcome="retry")
    retrying(tasks.flaky_once, 1.0)
    assert value("safetynet_task_attempts_total", task=FLAKY, outcome="retry") == before + 1
    prometheus.uninstall()
    try:
        retrying(tasks.flaky_once, 1.0)
        assert value("safetynet_task_attempts_total", task=FLAKY, outcome="retry") == before + 1
    finally:
        prometheus.install()


def test_the_app_config_installs_the_receivers_when_prometheus_client_is_installed():
    code = textwrap.dedent("""
        import django
        django.setup()
        from celery import signals as celery_signals
        from safetynet import signals
        uids = [key[0] for key, *_ in signals.task_ended.receivers + signals.task_retrying.receivers]
        uids += list(signals._consumers)  # safetynet's own consumers of the terminal event
        print(sorted(uid for uid in uids if str(uid).startswith("safetynet.contrib.prometheus")))
    """)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                         env={**os.environ, "DJANGO_SETTINGS_MODULE": "tests.settings", "PYTHONPATH": str(ROOT)})
    assert out.returncode == 0, out.stderr
    assert out.stdout.strip() == (
        "['safetynet.contrib.prometheus.on_task_ended', 'safetynet.contrib.prometheus.on_task_retrying']"
    ), "safetynet.apps.SafetynetConfig.ready() should call safetynet.contrib.prometheus.install()"


# -- the Django view -----------------------------------------------------------------------

@pytest.mark.django_db
@pytest.mark.urls(__name__)
def test_the_view_exposes_the_counters_and_the_dead_letter_gauge(client):
    make_dead_letter("shop.tasks.charge")
    make_dead_letter("shop.tasks.charge", reason="retries_exhausted")
    make_dead_letter("shop.tasks.charge", status="replayed")
    make_dead_letter("shop.tasks.charge", status="discarded")
    make_dead_letter("shop.tasks.mail", reason="time_limit")
    retrying(tasks.flaky_once, 2.0)

    response = client.get(URL)

    assert response.status_code == 200
    assert response["Content-Type"].startswith("text/plain; version=0.0.4")
    assert "no-cache" in response["Cache-Control"]
    parsed = parse(response.content.decode())
    assert sample(parsed, "safetynet_dead_letters", task="shop.tasks.charge") == 2
    assert sample(parsed, "safetynet_dead_letters", task="shop.tasks.mail") == 1
    assert ("safetynet_dead_letters", (("task", PING),)) not in parsed
    assert sample(parsed, "safetynet_task_attempts_total", task=FLAKY, outcome="retry") == value(
        "safetynet_task_attempts_total", task=FLAKY, outcome="retry") >= 1
    assert sample(parsed, "safetynet_task_retry_delay_seconds_count", task=FLAKY) >= 1
    assert ("safetynet_dead_letters_evicted_total", ()) in parsed
    assert ("process_cpu_seconds_total", ()) in parsed  # the default registry, the project's own metrics too


@pytest.mark.django_db
@pytest.mark.urls(__name__)
def test_the_view_speaks_openmetrics_when_asked_and_refuses_post(client):
    from prometheus_client.openmetrics.parser import text_string_to_metric_families as openmetrics_families

    response = client.get(URL, HTTP_ACCEPT="application/openmetrics-text; version=1.0.0")
    assert response["Content-Type"].startswith("application/openmetrics-text")
    names = {family.name for family in openmetrics_families(response.content.decode())}
    assert {"safetynet_task_attempts", "safetynet_dead_letters"} <= names
    assert client.post(URL).status_code == 405


@pytest.mark.django_db
@pytest.mark.urls(__name__)
def test_a_database_error_leaves_the_gauge_out_not_the_scrape(client, monkeypatch, caplog):
    from django.db import OperationalError

    from safetynet.models import DeadLetterQuerySet

    def down(self):
        raise OperationalError("connection refused")

    monkeypatch.setattr(DeadLetterQuerySet, "dead", down)
    response = client.get(URL)
    assert response.status_code == 200
    names = {family.name for family in text_string_to_metric_families(response.content.decode())}
    assert "safetynet_task_attempts" in names and "safetynet_dead_letters" not in names
    assert "dead-letter gauge left out" in caplog.text


@pytest.mark.django_db
def test_the_gauge_is_one_grouped_query(django_assert_num_queries):
    make_dead_letter("a.task")
    with django_assert_num_queries(1) as captured:
        list(prometheus.DeadLetterCollector().collect())
    sql = captured.captured_queries[0]["sql"]
    assert "GROUP BY" in sql and "ORDER BY" not in sql


@pytest.mark.django_db
def test_a_time_limit_recorded_through_the_store_is_counted_once():
    from safetynet import deadletter

    before = value("safetynet_task_dead_total", task=PING, reason="time_limit")
    for _ in range(2):  # the same task id twice: one row, one count
        deadletter.give_up(deadletter.Failure(task_name=PING, task_id="time-limit-1", reason="time_limit",
                                              detail="hard time limit"), log=False)
    assert value("safetynet_task_dead_total", task=PING, reason="time_limit") == before + 1


@pytest.mark.django_db
@pytest.mark.urls(__name__)
def test_promtool_check_metrics_finds_no_problem(client):
    promtool = shutil.which("promtool")
    if promtool is None:
        pytest.skip("promtool is not installed (Debian/Ubuntu: apt-get install prometheus)")
    make_dead_letter("shop.tasks.charge")
    retrying(tasks.flaky_once, 3.0)
    retrying(tasks.snoozer, 30.0, action="snooze")
    tasks.ping.apply()
    tasks.permanent.apply()
    text = client.get(URL).content.decode()
    assert "safetynet_dead_letters{" in text and "safetynet_task_runtime_seconds_bucket{" in text

    check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True, timeout=60)

    assert (check.returncode, check.stdout + check.stderr) == (0, "")


# -- the worker's HTTP port ----------------------------------------------------------------

def test_the_worker_port_comes_from_the_environment(monkeypatch):
    monkeypatch.delenv(prometheus.PORT_ENVIRONMENT_VARIABLE, raising=False)
    assert prometheus.worker_http_address() is None
    monkeypatch.setenv(prometheus.PORT_ENVIRONMENT_VARIABLE, "9808")
    assert prometheus.worker_http_address() == ("0.0.0.0", 9808)
    for wrong in ("http", "70000", "-1"):
        monkeypatch.setenv(prometheus.PORT_ENVIRONMENT_VARIABLE, wrong)
        with pytest.raises(ConfigurationError, match="port"):
            prometheus.worker_http_address()


def test_the_worker_port_setting_and_the_environment_winning_over_it(monkeypatch, settings):
    monkeypatch.delenv(prometheus.PORT_ENVIRONMENT_VARIABLE, raising=False)
    settings.SAFETYNET = {**settings.SAFETYNET, "PROMETHEUS_WORKER_PORT": 9809,
                          "PROMETHEUS_WORKER_ADDRESS": "127.0.0.1"}
    assert prometheus.worker_http_address() == ("127.0.0.1", 9809)
    monkeypatch.setenv(prometheus.PORT_ENVIRONMENT_VARIABLE, "9810")  # one host, several workers: one port each
    assert prometheus.worker_http_address() == ("127.0.0.1", 9810)


def test_worker_ready_serves_the_counters_without_the_database_gauge(monkeypatch, caplog):
    from celery.concurrency.prefork import TaskPool

    monkeypatch.setenv(prometheus.PORT_ENVIRONMENT_VARIABLE, "0")
    monkeypatch.setattr(prometheus, "_worker_server", None)
    retrying(tasks.flaky_once, 1.0)
    prometheus.on_worker_ready(sender=SimpleNamespace(pool=object.__new__(TaskPool)))  # sender: the consumer
    server = prometheus._worker_server
    assert server is not None, caplog.text
    try:
        with urllib.request.urlopen(f"http://127.0.0.1:{server.server_port}/metrics", timeout=10) as response:
            parsed = parse(response.read().decode())
    finally:
        server.shutdown()
        server.server_close()
    assert sample(parsed, "safetynet_task_attempts_total", task=FLAKY, outcome="retry") >= 1
    assert not any(name == "safetynet_dead_letters" for name, _ in parsed)  # the web view's job, exposed once
    assert "without PROMETHEUS_MULTIPROC_DIR under the prefork pool" in caplog.text


def test_a_wrong_port_is_logged_and_the_worker_goes_on(monkeypatch, caplog):
    monkeypatch.setenv(prometheus.PORT_ENVIRONMENT_VARIABLE, "metrics")
    monkeypatch.setattr(prometheus, "_worker_server", None)
    prometheus.on_worker_ready(sender=None)
    assert prometheus._worker_server is None
    assert "SAFETYNET_PROMETHEUS_WORKER_PORT must be a port number" in caplog.text


# -- multiprocess mode ---------------------------------------------------------------------

FORKING_SCRIPT = textwrap.dedent("""
    import multiprocessing, os, sys
    import django
    django.setup()
    from safetynet.contrib import prometheus
    from safetynet.protocol.events import Outcome, TaskEnded
    from safetynet.protocol.reasons import Reason
    from tests.fixtures import tasks

    def work(times):
        for _ in range(times):
            prometheus.on_task_retrying(sender=tasks.flaky_once, delay=2.0, entry={"action": "retry"})
            prometheus.on_task_ended(event=TaskEnded(task_name=tasks.permanent.name, task_id="t",
                                                      outcome=Outcome.DEAD, reason=Reason.PERMANENT_ERROR))

    work(1)  # the parent counts too, then forks like Celery's prefork pool
    children = [multiprocessing.get_context("fork").Process(target=work, args=(5,)) for _ in range(2)]
    for child in children:
        child.start()
    for child in children:
        child.join()
    sys.exit(max(child.exitcode for child in children))
""")


def test_multiprocess_mode_sums_what_forked_processes_counted(tmp_path):
    directory = tmp_path / "prometheus"
    directory.mkdir()
    env = {**os.environ, "PROMETHEUS_MULTIPROC_DIR": str(directory), "DJANGO_SETTINGS_MODULE": "tests.settings",
           "PYTHONPATH": str(ROOT)}
    run = subprocess.run([sys.executable, "-c", FORKING_SCRIPT], env=env, cwd=ROOT, capture_output=True, text=True,
                         timeout=120)
    assert run.returncode == 0, run.stderr
    assert len(list(directory.glob("counter_*.db"))) == 3  # one file per process

    registry = CollectorRegistry()
    MultiProcessCollector(registry, path=str(directory))
    parsed = {(s.name, tuple(sorted(s.labels.items()))): s.value for f in registry.collect() for s in f.samples}

    assert sample(parsed, "safetynet_task_attempts_total", task=FLAKY, outcome="retry") == 11
    assert sample(parsed, "safetynet_task_retry_delay_seconds_count", task=FLAKY) == 11
    assert sample(parsed, "safetynet_task_retry_delay_seconds_sum", task=FLAKY) == 22.0
    assert sample(parsed, "safetynet_task_retry_delay_seconds_bucket", task=FLAKY, le="2.0") == 11
    assert sample(parsed, "safetynet_task_dead_total", task=PERMANENT, reason="permanent_error") == 11


# -- a real worker -------------------------------------------------------------------------

# The worker with the receivers installed whether or not the AppConfig does it.
WORKER_BOOT = ("import sys; from tests.celery_app import app; from safetynet.contrib import prometheus; "
               "prometheus.install(); app.worker_main(sys.argv[1:])")


def free_port():
    with socket.socket() as probe:
        probe.bind(("127.0.0.1", 0))
        return probe.getsockname()[1]


def scrape(port):
    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=10) as response:
        return response.read().decode()


@pytest.fixture
def worker_database(django_db_setup, django_db_blocker):
    from django.db import connection

    return connection.settings_dict["NAME"]


@pytest.mark.integration
@pytest.mark.django_db(transaction=True)
@pytest.mark.urls(__name__)
def test_a_prefork_worker_with_two_children_exposes_the_sums(tmp_path, worker_database, client, monkeypatch):
    from tests.integration.conftest import BROKERS, Worker, configure_app, release_app

    broker, backend = BROKERS["redis"]
    app = configure_app(broker, backend)
    directory = tmp_path / "prometheus"
    directory.mkdir()
    port = free_port()
    worker = Worker("prometheus", broker, backend, tmp_path, pool="prefork", concurrency=2,
                    database=worker_database, spool_dir=tmp_path / "spool",
                    extra_env={"PROMETHEUS_MULTIPROC_DIR": str(directory),
                               prometheus.PORT_ENVIRONMENT_VARIABLE: str(port)})
    worker.command = [sys.executable, "-c", WORKER_BOOT, *worker.command[worker.command.index("worker"):]]
    worker.start(app)  # runs one ping
    try:
        q = {"queue": worker.queue}
        results = [tasks.ping.apply_async(**q) for _ in range(3)]
        results += [tasks.flaky_once.apply_async((f"k{n}",), **q) for n in range(2)]
        results.append(tasks.permanent.apply_async(**q))
        app.send_task("tests.contrib.no_such_task", queue=worker.queue)  # dead-lettered by the main process
        for result in results:
            result.get(timeout=60, propagate=False)
        expected = {
            ("safetynet_task_attempts_total", (("outcome", "success"), ("task", PING))): 4,
            ("safetynet_task_runtime_seconds_count", (("task", PING),)): 4,
            ("safetynet_task_attempts_total", (("outcome", "retry"), ("task", FLAKY))): 2,
            ("safetynet_task_attempts_total", (("outcome", "success"), ("task", FLAKY))): 2,
            ("safetynet_task_runtime_seconds_count", (("task", FLAKY),)): 4,
            ("safetynet_task_retry_delay_seconds_count", (("task", FLAKY),)): 2,
            ("safetynet_task_retry_delay_seconds_sum", (("task", FLAKY),)): 2.0,
            ("safetynet_task_attempts_total", (("outcome", "dead"), ("task", PERMANENT))): 1,
            ("safetynet_task_dead_total", (("reason", "permanent_error"), ("task", PERMANENT))): 1,
            ("safetynet_task_runtime_seconds_count", (("task", PERMANENT),)): 1,
            ("safetynet_task_dead_total", (("reason", "unknown_task"), ("task", "(unregistered)"))): 1,
        }
        # task_postrun runs after the result is stored: wait for the last counts to land
        deadline = time.monotonic() + 30
        while True:
            exposed = parse(scrape(port))
            seen = {key: exposed.get(key, 0.0) for key in expected}
            if seen == expected or time.monotonic() > deadline:
                break
            time.sleep(0.2)
        assert seen == expected, worker.log.read_text()[-3000:]
        assert not any(name == "safetynet_dead_letters" for name, _ in exposed)
        assert len(list(directory.glob("counter_*.db"))) >= 2  # the main process and at least one child

        # The web side reading the same directory: the same sums, and the gauge from the database.
        monkeypatch.setenv("PROMETHEUS_MULTIPROC_DIR", str(directory))
        text = client.get(URL).content.decode()
        from_view = parse(text)
        assert {key: from_view.get(key, 0.0) for key in expected} == expected
        assert sample(from_view, "safetynet_dead_letters", task=PERMANENT) == 1
        assert sample(from_view, "safetynet_dead_letters", task="(unregistered)") == 1

        promtool = shutil.which("promtool")
        if promtool:
            check = subprocess.run([promtool, "check", "metrics"], input=text, capture_output=True, text=True,
                                   timeout=60)
            assert (check.returncode, check.stdout + check.stderr) == (0, "")
    finally:
        worker.stop()
        release_app(app)


def test_successes_counted_in_batches_read_as_if_observed_one_by_one():
    """Successes are added to the metrics in batches; a scrape of this process sees every one, bucketed as
    ``observe`` would (the bounds included: a run of exactly 0.005 s is in the 0.005 bucket)."""
    from prometheus_client import Histogram

    name = f"tests.batched.{uuid.uuid4().hex[:6]}"
    runtimes = [0.0, 0.001, 0.005, 0.0051, 0.3, 7.0, 4000.0, 0.005]
    reference = Histogram("reference_runtime", "", buckets=prometheus.RUNTIME_BUCKETS, registry=None)
    for runtime in runtimes:
        signals.announce_success(SimpleNamespace(task=SimpleNamespace(name=name)), None, runtime)
        reference.observe(runtime)
    assert prometheus._BATCHED  # this prometheus_client takes batches
    assert value("safetynet_task_attempts_total", task=name, outcome="success") == len(runtimes)
    expected = {sample.labels["le"]: sample.value for sample in reference.collect()[0].samples
                if sample.name.endswith("_bucket")}
    for bound, count in expected.items():
        assert REGISTRY.get_sample_value("safetynet_task_runtime_seconds_bucket", {"task": name, "le": bound}) == count
    assert value("safetynet_task_runtime_seconds_sum", task=name) == pytest.approx(sum(runtimes))
    prometheus.flush()  # nothing pending: nothing changes
    assert value("safetynet_task_attempts_total", task=name, outcome="success") == len(runtimes)
