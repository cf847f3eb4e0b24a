"""Real Celery worker processes against the real Redis, RabbitMQ and PostgreSQL of the machine."""

import atexit
import os
import signal
import subprocess
import sys
import time
import uuid
from pathlib import Path

import pytest
from celery.states import READY_STATES

ROOT = Path(__file__).resolve().parents[2]

# Each developer may keep to Redis databases and a RabbitMQ vhost of their own (SAFETYNET_TEST_BROKER/_BACKEND,
# SAFETYNET_TEST_AMQP_VHOST); by default the ones below.
BROKERS = {
    # broker, result backend
    "redis": (os.environ.get("SAFETYNET_TEST_BROKER", "redis://127.0.0.1:6379/15"),
              os.environ.get("SAFETYNET_TEST_BACKEND", "redis://127.0.0.1:6379/14")),
    "rabbitmq+postgresql": (
        f"amqp://guest:guest@127.0.0.1:5672/{os.environ.get('SAFETYNET_TEST_AMQP_VHOST', '')}",
        "db+postgresql+psycopg://postgres@127.0.0.1:5432/test",
    ),
}


class Worker:
    """A `celery worker` subprocess consuming one queue of its own."""

    def __init__(self, name, broker, backend, tmp_path, pool="prefork", concurrency=4, database=None,
                 spool_dir=None, extra_env=None):
        self.name = name
        self.queue = f"safetynet-test-{uuid.uuid4().hex[:8]}"
        self.broker, self.backend = broker, backend
        self.log = tmp_path / f"worker-{name}.log"
        self.env = {
            **os.environ,
            "SAFETYNET_TEST_BROKER": broker,
            "SAFETYNET_TEST_BACKEND": backend,
            "SAFETYNET_TEST_RECORD": "1",
            "PYTHONPATH": str(ROOT),
            "DJANGO_SETTINGS_MODULE": "tests.settings",
            **({"SAFETYNET_TEST_DB": database} if database else {}),
            **({"SAFETYNET_TEST_SPOOL": str(spool_dir)} if spool_dir else {}),
            **(extra_env or {}),
        }
        self.command = [
            sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-Q", self.queue,
            f"--pool={pool}", f"--concurrency={concurrency}", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "info", "-n", f"{name}-{self.queue}@%h",
        ]
        self.process = None

    def start(self, app):
        self.process = subprocess.Popen(
            self.command, env=self.env, cwd=ROOT, stdout=self.log.open("w"), stderr=subprocess.STDOUT,
            start_new_session=True,
        )
        _running.add(self.process)
        from tests.fixtures import tasks

        result = tasks.ping.apply_async(queue=self.queue)
        try:
            assert result.get(timeout=60) == "pong"
        except Exception:
            self.stop()
            raise RuntimeError(f"worker did not start; log:\n{self.log.read_text()[-3000:]}") from None
        return self

    def stop(self):
        stop_process_group(self.process, 20)
        _running.discard(self.process)


def stop_process_group(process, grace):
    """Stop a worker started in a session of its own: a warm shutdown, killed (with its children) after ``grace``
    seconds."""
    if process is not None and process.poll() is None:
        os.killpg(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout=grace)
        except subprocess.TimeoutExpired:
            os.killpg(process.pid, signal.SIGKILL)
            process.wait(timeout=10)


#: Workers started and not stopped yet: killed (their whole process group) when the test run exits, however it
#: ends, so that none outlives it holding the test database open (pytest then cannot drop it).
_running: set[subprocess.Popen] = set()


@pytest.fixture(scope="session", autouse=True)
def _no_worker_outlives_the_run(django_db_setup):
    """Before the test database is dropped (this fixture ends before ``django_db_setup``): kill what a failed test
    left running."""
    yield
    _kill_leftover_workers()


@atexit.register
def _kill_leftover_workers():
    for process in list(_running):
        if process.poll() is None:
            try:
                os.killpg(process.pid, signal.SIGKILL)
            except ProcessLookupError:
                pass


def configure_app(broker, backend):
    """Point the test process's Celery app at ``broker``/``backend``."""
    from tests.celery_app import app

    app.conf.broker_url = broker
    app.conf.result_backend = backend
    for name in ("backend", "amqp", "pool", "producer_pool", "_pool"):
        app.__dict__.pop(name, None)
    if hasattr(app, "_local"):
        app._local.__dict__.pop("backend", None)
    return app


def release_app(app):
    """Drop the test process's broker connections after a test, like ``app.close()`` but keeping the app registered:
    ``close()`` also takes it out of Celery's active apps, and a task declared later in the same run (a shared task
    defined inside a test) would then never be registered on it."""
    app._pool = None


@pytest.fixture(scope="session")
def worker_database(django_db_setup, django_db_blocker):
    """The test database's name, for worker processes (pytest-django made and migrated it)."""
    from django.db import connection

    return connection.settings_dict["NAME"]


@pytest.fixture(scope="session")
def spool_dir(tmp_path_factory):
    return tmp_path_factory.mktemp("spool")


@pytest.fixture(scope="module", params=sorted(BROKERS))
def worker(request, tmp_path_factory, worker_database, spool_dir):
    broker, backend = BROKERS[request.param]
    app = configure_app(broker, backend)
    running = Worker(request.param, broker, backend, tmp_path_factory.mktemp(request.param),
                     database=worker_database, spool_dir=spool_dir).start(app)
    yield running
    running.stop()
    release_app(app)


def wait_for(result, timeout):
    """Poll ``result`` until it is ready; return the states seen on the way."""
    seen = []
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        state = result.state
        if not seen or seen[-1] != state:
            seen.append(state)
        if state in READY_STATES:
            return seen
        time.sleep(0.2)
    raise AssertionError(f"{result.id} not ready after {timeout}s; states seen {seen}")


def wait_until(condition, timeout, what):
    """Poll ``condition`` every 0.1 s until it is true; AssertionError naming ``what`` after ``timeout`` s."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if condition():
            return
        time.sleep(0.1)
    raise AssertionError(f"not within {timeout}s: {what}")
