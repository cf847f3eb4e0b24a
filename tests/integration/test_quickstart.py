"""The quickstart followed as written: a fresh Django project made from its code blocks runs its task on a worker.

``django-admin startproject`` and ``startapp`` make the project the quickstart starts from; every marked block of
docs/quickstart.md (see tests/fixtures/quickstart.py) is applied in order: files written, settings and URLs added,
commands run, a real ``celery worker`` started; the outputs the page shows are compared with what the commands
print. Only the machine differs: the broker, the result backend, a PostgreSQL database of its own, the spool folder
and the warehouse's address (a small HTTP server here) are set at the end of the settings.
"""

from __future__ import annotations

import json
import os
import shlex
import subprocess
import sys
import threading
import time
import uuid
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import psycopg
import pytest

from tests.fixtures.quickstart import blocks
from tests.integration.conftest import stop_process_group

pytestmark = pytest.mark.integration

BROKER = os.environ.get("SAFETYNET_TEST_BROKER", "redis://127.0.0.1:6379/15")
BACKEND = os.environ.get("SAFETYNET_TEST_BACKEND", "redis://127.0.0.1:6379/14")
DB_HOST = os.environ.get("SAFETYNET_TEST_DB_HOST", "127.0.0.1")
DB_PORT = os.environ.get("SAFETYNET_TEST_DB_PORT", "5432")
DB_USER = os.environ.get("SAFETYNET_TEST_DB_USER", "postgres")
BIN = Path(sys.executable).parent


class Warehouse(BaseHTTPRequestHandler):
    """``GET /stock/SKU-1`` answers a quantity of 7; any other SKU is unknown (404)."""

    def do_GET(self):  # noqa: N802 (http.server's name)
        if self.path == "/stock/SKU-1":
            body, status = json.dumps({"quantity": 7}).encode(), 200
        else:
            body, status = b'{"detail": "no such SKU"}', 404
        self.send_response(status)
        self.send_header("Content-Type", "application/json")
        self.send_header("Content-Length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args):
        pass


@pytest.fixture
def warehouse():
    server = ThreadingHTTPServer(("127.0.0.1", 0), Warehouse)
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    yield f"http://127.0.0.1:{server.server_address[1]}"
    server.shutdown()
    server.server_close()


@pytest.fixture
def database():
    """A PostgreSQL database of the test's own, dropped afterwards."""
    name = f"safetynet_quickstart_{uuid.uuid4().hex[:12]}"
    dsn = f"host={DB_HOST} port={DB_PORT} user={DB_USER} dbname=postgres"
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f'CREATE DATABASE "{name}"')
    yield name
    with psycopg.connect(dsn, autocommit=True) as connection:
        connection.execute(f'DROP DATABASE IF EXISTS "{name}" WITH (FORCE)')


class Project:
    """The fresh project in ``root``: files, commands, a worker."""

    def __init__(self, root: Path):
        self.root = root
        self.env = {key: value for key, value in os.environ.items()
                    if key not in ("DJANGO_SETTINGS_MODULE", "PYTHONPATH") and not key.startswith("SAFETYNET_TEST")}
        self.worker: subprocess.Popen | None = None
        self.worker_log = root.parent / "worker.log"

    def argv(self, command: str) -> list[str]:
        """A command as the page writes it, run with this interpreter's tools."""
        words = shlex.split(command)
        if words[0] == "python":
            return [sys.executable, *words[1:]]
        if words[0] in ("pytest", "celery"):
            return [sys.executable, "-m", *words]
        if words[0] == "django-admin":
            return [str(BIN / "django-admin"), *words[1:]]
        raise AssertionError(f"the quickstart runs a command this test does not know: {command!r}")

    def run(self, command: str, timeout: float = 120) -> str:
        started = time.monotonic()
        done = subprocess.run(self.argv(command), cwd=self.root, env=self.env, capture_output=True, text=True,
                              timeout=timeout)
        assert done.returncode == 0, f"$ {command}\nexit {done.returncode}\n{done.stdout}\n{done.stderr}\n" + \
            self.worker_tail()
        print(f"{time.monotonic() - started:6.1f}s  $ {command}")
        return done.stdout

    def start_worker(self, command: str) -> None:
        self.worker = subprocess.Popen(self.argv(command), cwd=self.root, env=self.env,
                                       stdout=self.worker_log.open("w"), stderr=subprocess.STDOUT,
                                       start_new_session=True)

    def worker_tail(self) -> str:
        return f"\nworker log:\n{self.worker_log.read_text()[-4000:]}" if self.worker_log.exists() else ""

    def stop_worker(self) -> None:
        stop_process_group(self.worker, 30)

    def apply(self, block) -> None:
        path = self.root / block.target
        if block.action == "write":
            path.parent.mkdir(parents=True, exist_ok=True)
            path.write_text(block.body + "\n")
        else:
            assert path.exists(), f"the quickstart adds to {block.target}, which the project does not have"
            path.write_text(path.read_text() + "\n" + block.as_addition() + "\n")


def test_the_quickstart_as_written_runs_a_task_on_a_worker(tmp_path, warehouse, database):
    root = tmp_path / "site"
    root.mkdir()
    project = Project(root)
    # The project the page starts from (its first paragraph): startproject, startapp, "shop" installed.
    project.run("django-admin startproject proj .")
    project.run("python manage.py startapp shop")
    settings = root / "proj" / "settings.py"
    settings.write_text(settings.read_text() + '\nINSTALLED_APPS += ["shop"]\n')

    steps = blocks()
    for block in steps:
        if block.action in ("write", "add"):
            project.apply(block)
    # This machine, not the page's: the services, a database of the test's own, the spool, the warehouse.
    settings.write_text(settings.read_text() + f"""
# -- the test's machine (not part of the quickstart) --
CELERY_BROKER_URL = {BROKER!r}
CELERY_RESULT_BACKEND = {BACKEND!r}
# a queue of its own: other workers of the test run (the demo's, which has a shop.tasks.sync_inventory of its own)
# may consume the default queue on the same broker
CELERY_TASK_DEFAULT_QUEUE = {"quickstart-" + uuid.uuid4().hex[:8]!r}
DATABASES = {{"default": {{"ENGINE": "django.db.backends.postgresql", "NAME": {database!r}, "HOST": {DB_HOST!r},
                          "PORT": {DB_PORT!r}, "USER": {DB_USER!r}}}}}
SAFETYNET["SPOOL_DIR"] = {str(tmp_path / "spool")!r}
WAREHOUSE_URL = {warehouse!r}
""")
    # An existing project has its own apps migrated already, so the page's migrate output is safetynet's alone:
    # auth (and contenttypes, which it needs) are those safetynet's migrations depend on.
    project.run("python manage.py migrate auth")

    try:
        seen = set()
        for block in steps:
            seen.add(block.action)
            if block.action == "worker":
                (command,) = block.commands
                project.start_worker(command)
            elif block.action == "run":
                for command in block.commands:
                    if command.startswith("pip install "):
                        for package in command.split()[2:]:  # installed with the dev extra: importable?
                            project.run(f"python -c 'import {package.replace('-', '_')}'")
                        continue
                    output = project.run(command)
                    if "SKU-1'" in command:
                        assert output.strip().splitlines()[-1] == "7", output  # after shell's "N objects imported"
                    if command.startswith("pytest"):
                        assert "2 passed" in output, output
            elif block.action == "output":
                (command,) = block.commands
                if "dead list" in command:
                    check_dead_list(project, command, block.output)
                else:
                    printed = project.run(command).rstrip("\n").splitlines()
                    assert printed == block.output, (
                        f"$ {command} prints something else than docs/quickstart.md shows:\n" + "\n".join(printed))
        assert seen == {"write", "add", "run", "worker", "output"}
        assert (root / "staticfiles" / "safetynet" / "progress.js").exists()  # collectstatic copied it
    finally:
        project.stop_worker()


def check_dead_list(project: Project, command: str, shown: list[str]) -> None:
    """The page's ``dead list``: the same header; the same row but for the time and the exception's text."""
    deadline = time.monotonic() + 60
    while True:
        printed = project.run(command).rstrip("\n").splitlines()
        if len(printed) > 1 or time.monotonic() > deadline:
            break
        time.sleep(0.5)
    assert printed[0] == shown[0]
    assert len(printed) == len(shown) == 2, "\n".join(printed) + project.worker_tail()
    assert printed[1].split()[:5] == shown[1].split()[:5]
    assert printed[1].split()[7] == shown[1].split()[7]  # the exception's type (after the date and the time)
