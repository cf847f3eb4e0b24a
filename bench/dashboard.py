"""How fast the dashboard answers on a large store: 1,000,000 dead letters and 30 days of aggregates.

    .venv/bin/python bench/dashboard.py [--quick] [--rounds R] [--rebuild]

The data is made once per size in a PostgreSQL database of its own and kept for the next run
(``--rebuild`` makes it again): dead letters spread over 30 days, made by PostgreSQL itself
(``INSERT … SELECT … generate_series``: 30 tasks, 9 reasons, a few hundred fingerprints; 80 % dead,
15 % replayed, 5 % discarded; each with a three-attempt history, a traceback and arguments), the
failures page's summary rebuilt from them, and one ``TaskStats`` row per task and minute for 30
days plus the hour rows (COPY), as the workers' flushes leave them.

A real Celery worker runs on the bench's broker (``SAFETYNET_BENCH_BROKER``, default
``redis://127.0.0.1:6379/9``), with 25 messages waiting in a queue no worker takes. Each round
requests, as a logged-in superuser through Django's test client (the whole request: middleware,
session, queries, template), in an order that alternates from round to round:

- the dashboard's dead-letter list (``/safetynet/dead/``, the first page of 50, with its count),
  and, as the baseline on the same rows, Django's admin changelist of the same model
  (``/admin/safetynet/deadletter/``, the first page of 100: what staff used before);
- the overview for 24 h (the default), and for 1 h and 7 d;
- a filtered list (one reason), a search, page 500, and the failures-by-fingerprint page;
- the queues page (depths from the broker, the worker's answer cached a few seconds, as in use).

Then the queues page with a broker that accepts connections and never answers, each time with
nothing cached (the worst case). The figures are medians over rounds, in milliseconds; the last
line is ``deadletter_list_ms=… overview_ms=… …`` (targets: list, overview and failures below
150, queues below 300, queues with the silent broker below 2,000).
"""

from __future__ import annotations

import argparse
import io
import os
import random
import socket
import statistics
import subprocess
import sys
import threading
import time
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

from kombu import Exchange, Producer, Queue

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _dashboard_settings as bench  # noqa: E402

TARGET_MS = 150.0
QUEUES_TARGET_MS = 300.0
UNREACHABLE_TARGET_MS = 2000.0
DAYS = 30
REASONS = ["retries_exhausted", "permanent_error", "deadline_exceeded", "time_limit", "crash_loop", "unknown_task",
           "undecodable", "rejected", "worker_lost"]
EXCEPTIONS = [("ConnectionError", "connection refused by {host}"), ("TimeoutError", "read timed out after 10s"),
              ("ValueError", "order {n} does not exist"), ("KeyError", "'sku'"),
              ("HTTPError", "503 Service Unavailable for {host}"), ("IntegrityError", "duplicate key value")]


def _traceback(task: str, kind: str, message: str, line: int) -> str:
    return ("Traceback (most recent call last):\n"
            f'  File "/srv/app/{task.replace(".", "/")}.py", line {line}, in run\n    result = client.call(payload)\n'
            '  File "/srv/app/clients/http.py", line 88, in call\n    response.raise_for_status()\n'
            f"{kind}: {message}\n")


def make_dead_letters(count: int, now: datetime, rng: random.Random) -> None:
    """``count`` dead letters over 30 days, made by PostgreSQL itself (``INSERT … SELECT`` over
    ``generate_series``: a million rows in a minute or two, nothing built in Python)."""
    from django.db import connection

    from safetynet.models import DeadLetter

    table = DeadLetter._meta.db_table
    reasons = "ARRAY[" + ", ".join(f"'{reason}'" for reason in REASONS) + "]"
    kinds = "ARRAY[" + ", ".join(f"'{kind}'" for kind, _ in EXCEPTIONS) + "]"
    sql = f"""
        INSERT INTO {table} (task_name, task_id, args, kwargs, redacted, headers, queue, exchange, routing_key,
            reason, detail, exception_type, exception_message, traceback, history, omitted_attempts, attempts,
            first_failed_at, last_failed_at, worker, fingerprint, raw_body, status, replay_count,
            replayed_task_id, replayed_by, audit, created_at)
        SELECT task, md5(g::text || 'bench')::uuid::text, jsonb_build_array(g),
            jsonb_build_object('order_id', g, 'card_token', '[redacted]'), '["kwargs.card_token"]'::jsonb,
            '{{}}'::jsonb, CASE WHEN g %% 7 = 0 THEN 'imports' ELSE 'celery' END, '', '',
            ({reasons})[1 + (g * 7919) %% {len(REASONS)}], '', kind, message,
            'Traceback (most recent call last):' || chr(10) || '  File "/srv/app/' || replace(task, '.', '/')
                || '.py", line 43, in run' || chr(10) || '    result = client.call(payload)' || chr(10)
                || kind || ': ' || message || chr(10),
            jsonb_build_array(
                jsonb_build_object('attempt', 1, 'started', extract(epoch from failed) - 120, 'duration', 0.3,
                                   'exception', kind, 'message', message, 'action', 'retry', 'delay', 2.0,
                                   'worker', 'celery@w1'),
                jsonb_build_object('attempt', 2, 'started', extract(epoch from failed) - 60, 'duration', 0.3,
                                   'exception', kind, 'message', message, 'action', 'retry', 'delay', 4.0,
                                   'worker', 'celery@w1'),
                jsonb_build_object('attempt', 3, 'started', extract(epoch from failed), 'duration', 0.3,
                                   'exception', kind, 'message', message, 'action', 'dead', 'worker', 'celery@w1')),
            0, 3, failed - interval '2 minutes', failed, 'celery@w1',
            substr(md5(task || kind || (g %% 10)::text), 1, 40), '',
            CASE WHEN g %% 20 < 16 THEN 'dead' WHEN g %% 20 < 19 THEN 'replayed' ELSE 'discarded' END, 0, '', '',
            '[]'::jsonb, failed
        FROM (
            SELECT g, task, kind, failed,
                CASE kind WHEN 'ConnectionError' THEN 'connection refused by api-' || (g %% 5) || '.example.com'
                          WHEN 'ValueError' THEN 'order ' || g || ' does not exist'
                          WHEN 'HTTPError' THEN '503 Service Unavailable for api-' || (g %% 5) || '.example.com'
                          ELSE 'read timed out after 10s' END AS message
            FROM (
                SELECT g,
                    'shop.tasks.job_' || lpad((floor(30 * power((g * 104729 %% 1000003) / 1000003.0, 3)))::int::text,
                                              2, '0') AS task,
                    ({kinds})[1 + (g * 31 + g / 10) %% {len(EXCEPTIONS)}] AS kind,
                    %s::timestamptz - make_interval(secs => (g * 2654435761 %% {DAYS * 86_400})) AS failed
                FROM generate_series(1::bigint, %s) AS g
            ) AS base
        ) AS shaped
    """
    with connection.cursor() as cursor:
        cursor.execute(sql, [now, count])


def make_aggregates(task_count: int, now: datetime, rng: random.Random) -> int:
    """30 days of minute rows and hour rows for ``task_count`` tasks, loaded with COPY."""
    import json

    from django.db import connection

    from safetynet import stats
    from safetynet.models import DeadLetter, TaskStats

    buckets = len(stats.RUNTIME_BUCKETS)
    end = now.replace(second=0, microsecond=0)
    minutes = DAYS * 1440
    columns = ("period", "start", "task_name", "runs", "successes", "retries", "snoozes", "dead", "dead_by_reason",
               "runtime_sum", "runtime_buckets")
    table = TaskStats._meta.db_table
    hours: dict[tuple[str, datetime], list] = {}
    written = 0
    with connection.cursor() as cursor:
        for task_index in range(task_count):
            task = f"shop.tasks.job_{task_index:02d}"
            rate = 5 + 40 * rng.random()
            rows = io.StringIO()
            for minute in range(minutes):
                start = end - timedelta(minutes=minutes - minute)
                successes = int(rng.expovariate(1 / rate))
                retries, dead = successes // 20, int(rng.random() < 0.05)
                runs = successes + retries + dead
                histogram = [0] * buckets
                histogram[min(buckets - 1, 8 + task_index % 6)] = runs
                reasons = {"retries_exhausted": dead} if dead else {}
                rows.write("\t".join(map(str, (60, start.isoformat(), task, runs, successes, retries, 0, dead,
                                               json.dumps(reasons), runs * 0.05, json.dumps(histogram)))) + "\n")
                hour = hours.setdefault((task, start.replace(minute=0)), [0, 0, 0, 0, [0] * buckets])
                hour[0] += runs
                hour[1] += successes
                hour[2] += retries
                hour[3] += dead
                hour[4] = [a + b for a, b in zip(hour[4], histogram, strict=True)]
                written += 1
            rows.seek(0)
            with cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
                copy.write(rows.read())
        rows = io.StringIO()
        for (task, start), (runs, successes, retries, dead, histogram) in hours.items():
            reasons = {"retries_exhausted": dead} if dead else {}
            rows.write("\t".join(map(str, (3600, start.isoformat(), task, runs, successes, retries, 0, dead,
                                           json.dumps(reasons), runs * 0.05, json.dumps(histogram)))) + "\n")
            written += 1
        rows.seek(0)
        with cursor.cursor.copy(f"COPY {table} ({', '.join(columns)}) FROM STDIN") as copy:
            copy.write(rows.read())
        cursor.execute(f"ANALYZE {table}")
        cursor.execute(f"ANALYZE {DeadLetter._meta.db_table}")
    return written


def prepare(dead_letters: int, tasks: int, rebuild: bool) -> None:
    """Migrate, and make the data unless this database already holds it."""
    from django.core.management import call_command

    from safetynet.models import DeadLetter, FailureGroup, TaskStats

    call_command("migrate", verbosity=0, interactive=False)
    if not rebuild and DeadLetter.objects.count() == dead_letters and TaskStats.objects.exists() and (
            FailureGroup.objects.exists()):
        print(f"data: kept from an earlier run ({dead_letters} dead letters, "
              f"{TaskStats.objects.count()} stats rows)", flush=True)
        return
    from django.db import connection

    with connection.cursor() as cursor:  # TRUNCATE: a million rows go at once
        for model in (DeadLetter, TaskStats, FailureGroup):
            cursor.execute(f"TRUNCATE {model._meta.db_table} CASCADE")
    rng = random.Random(20261204)
    now = datetime.now(tz=timezone.utc)
    began = time.perf_counter()
    make_dead_letters(dead_letters, now, rng)
    from safetynet import deadletter

    groups = deadletter.rebuild_failure_groups()  # what recording keeps on write, made in one go here
    with connection.cursor() as cursor:  # as autovacuum leaves a table in use: visibility map set, statistics read
        cursor.execute(f"VACUUM ANALYZE {DeadLetter._meta.db_table}")
    rows = make_aggregates(tasks, now, rng)
    print(f"data: made {dead_letters} dead letters ({groups} failure groups) and {rows} stats rows "
          f"in {time.perf_counter() - began:.0f}s", flush=True)


def main() -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="20,000 dead letters, 5 tasks' aggregates, 8 rounds (the full run: 1,000,000, 20, 30)")
    parser.add_argument("--rounds", type=int, default=None)
    parser.add_argument("--rebuild", action="store_true", help="make the data again")
    options = parser.parse_args()
    dead_letters, tasks = (20_000, 5) if options.quick else (1_000_000, 20)
    rounds = options.rounds or (8 if options.quick else 30)
    bench.configure(f"{bench.DB_PREFIX}_{dead_letters}_{tasks}")
    prepare(dead_letters, tasks, options.rebuild)

    from django.contrib.auth.models import User
    from django.test import Client

    user = User.objects.filter(username="bench").first() or User.objects.create_superuser("bench", "", "x")
    client = Client()
    client.force_login(user)
    pages = {
        "queues": "/safetynet/queues/",
        "deadletter_list": "/safetynet/dead/",
        "admin_list": "/admin/safetynet/deadletter/",
        "overview": "/safetynet/",
        "overview_1h": "/safetynet/?window=1h",
        "overview_7d": "/safetynet/?window=7d",
        "filtered": "/safetynet/dead/?reason=crash_loop",
        "search": "/safetynet/dead/?q=api-3",
        "page_500": "/safetynet/dead/?page=500&status=all",
        "failures": "/safetynet/failures/",
    }
    worker, broker = start_worker()
    try:
        return measure(client, pages, rounds, dead_letters, broker)
    finally:
        stop_worker(worker)


def start_worker() -> tuple[subprocess.Popen, Any]:
    """A real worker on the bench's broker (answering ``inspect``), and the app the dashboard reads it with."""
    import _dashboard_worker

    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    worker = subprocess.Popen([sys.executable, "-m", "celery", "-A", "_dashboard_worker", "worker", "--pool=solo",
                               "--without-gossip", "--without-mingle", "-l", "warning", "-n", f"bench-{os.getpid()}@%h"],
                              cwd=HERE, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    app = _dashboard_worker.app
    app.set_current()
    deadline = time.monotonic() + 60
    while time.monotonic() < deadline:
        if app.control.inspect(timeout=0.5).ping():
            break
        time.sleep(0.3)
    else:
        stop_worker(worker)
        raise SystemExit("the bench's worker did not answer a ping within 60 s")
    with app.connection_for_write() as connection:  # a few messages waiting in a queue no worker takes
        queue = Queue("bench-dashboard-waiting", Exchange("bench-dashboard-waiting"), "bench-dashboard-waiting")
        queue(connection.default_channel).declare()
        queue(connection.default_channel).purge()
        producer = Producer(connection.default_channel)
        for number in range(25):
            producer.publish({"n": number}, exchange=queue.exchange, routing_key=queue.routing_key)
    app.conf.task_routes = {"bench.never_sent": {"queue": "bench-dashboard-waiting"}}
    return worker, app


def stop_worker(worker: subprocess.Popen) -> None:
    worker.terminate()
    try:
        worker.wait(timeout=20)
    except subprocess.TimeoutExpired:
        worker.kill()


class SilentBroker:
    """A port that accepts connections and never answers: the slowest broker there is."""

    def __init__(self) -> None:
        self.server = socket.socket()
        self.server.bind(("127.0.0.1", 0))
        self.server.listen(100)
        self.server.settimeout(0.2)
        self.held: list[socket.socket] = []
        self.stopping = threading.Event()
        self.thread = threading.Thread(target=self._accept, daemon=True)
        self.thread.start()
        self.url = f"redis://127.0.0.1:{self.server.getsockname()[1]}/0"

    def _accept(self) -> None:
        while not self.stopping.is_set():
            try:
                self.held.append(self.server.accept()[0])
            except OSError:
                continue

    def close(self) -> None:
        self.stopping.set()
        self.thread.join()
        for held in self.held:
            held.close()
        self.server.close()


def measure(client: Any, pages: dict[str, str], rounds: int, dead_letters: int, broker: Any) -> int:
    from celery import Celery

    from safetynet.dashboard import brokers

    for name, path in pages.items():  # warm-up, and every page must answer 200
        response = client.get(path)
        if response.status_code != 200:
            print(f"{name}: {path} answered {response.status_code}", file=sys.stderr)
            return 1
    timings: dict[str, list[float]] = {name: [] for name in pages}
    for round_number in range(rounds):
        order = list(pages) if round_number % 2 == 0 else list(reversed(pages))
        for name in order:
            began = time.perf_counter()
            response = client.get(pages[name])
            timings[name].append((time.perf_counter() - began) * 1000)
            assert response.status_code == 200, (name, response.status_code)
    # The queues page with a broker that accepts and never answers, every time as the first time (no cached answer).
    silent = SilentBroker()
    away = Celery("away", broker=silent.url, set_as_current=False)
    away.set_current()
    try:
        timings["queues_unreachable"] = []
        pages["queues_unreachable"] = f"/safetynet/queues/ (broker {silent.url}, silent)"
        for _ in range(max(3, rounds // 4)):
            brokers.forget()
            began = time.perf_counter()
            response = client.get("/safetynet/queues/")
            timings["queues_unreachable"].append((time.perf_counter() - began) * 1000)
            assert response.status_code == 200 and b'id="broker-error"' in response.content
    finally:
        broker.set_current()
        silent.close()
    shown = client.get("/safetynet/queues/").content.decode()
    assert 'class="depth">25<' in shown, "the queues page does not show the 25 waiting messages"
    assert "answering" in shown, "the queues page does not show the bench's worker"
    medians = {name: statistics.median(values) for name, values in timings.items()}
    for name, values in timings.items():
        print(f"{name:16s} median {medians[name]:7.1f} ms  min {min(values):7.1f}  max {max(values):7.1f}  "
              f"({pages[name]})")
    ratio = medians["deadletter_list"] / medians["admin_list"]
    ok = (all(medians[name] < TARGET_MS for name in ("deadletter_list", "overview", "failures"))
          and medians["queues"] < QUEUES_TARGET_MS and medians["queues_unreachable"] < UNREACHABLE_TARGET_MS)
    print(f"targets: list, overview and failures below {TARGET_MS:g} ms, queues below {QUEUES_TARGET_MS:g} ms, "
          f"queues with a silent broker below {UNREACHABLE_TARGET_MS:g} ms (medians): {'met' if ok else 'NOT met'}; "
          f"the list against the admin's changelist on the same rows: {ratio:.2f}")
    print(" ".join([f"deadletter_list_ms={medians['deadletter_list']:.1f}", f"overview_ms={medians['overview']:.1f}",
                    f"overview_1h_ms={medians['overview_1h']:.1f}", f"overview_7d_ms={medians['overview_7d']:.1f}",
                    f"failures_ms={medians['failures']:.1f}", f"search_ms={medians['search']:.1f}",
                    f"queues_ms={medians['queues']:.1f}", f"queues_unreachable_ms={medians['queues_unreachable']:.1f}",
                    f"admin_list_ms={medians['admin_list']:.1f}", f"list_vs_admin_ratio={ratio:.2f}",
                    f"dead_letters={dead_letters}", f"rounds={rounds}"]))
    return 0 if ok else 1


if __name__ == "__main__":
    sys.exit(main())
