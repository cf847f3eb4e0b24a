"""Enqueue + run of no-op ``django.tasks`` tasks through safetynet's ``CeleryBackend``, against the same no-op as a
plain Celery task sent with ``apply_async``, and (when it is installed) through django-tasks-fennel.

    .venv/bin/python bench/django_tasks.py [--quick] [--tasks N] [--rounds R] [--pool solo|prefork]

Needs Django's tasks API: Django 6 (or the django-tasks backport on 5.2).

One worker subprocess (solo pool by default) consumes the benchmark's queue and runs every system's tasks (so
the plain Celery no-op runs in a worker that has safetynet's message guard, ~5 µs a message, about 1 % of a
no-op: ``bench/overhead.py`` compares a plain Celery worker with a safetynet one). A
round runs, for each system in turn (the order rotates from round to round, so none always goes first), a slice
of N no-ops (5,000; 500 with ``--quick``):

1. the clock starts; this process enqueues the N no-ops one by one, as an application would
   (``django_noop.enqueue()``: validate, write the ``TaskRecord``, publish; ``celery_noop.apply_async()``;
   ``safetynet_noop.apply_async()``, a plain ``@safetynet.task``, for reference: safetynet's own path without
   django.tasks; ``fennel_noop.enqueue()``), then a marker task;
2. the worker runs them in order as they arrive; the marker records when it ran: every no-op before it has.

A slice's figure is N / (the marker's time − the start): enqueueing and running, overlapped as in production.
safetynet's records are truncated before each round so every round starts from the same table. Each round is
printed; the figures compared are the medians over rounds, and the last line is
``backend_tps=… celery_tps=… ratio=… fennel_ratio=…`` (ratio = backend / celery, fennel_ratio = fennel / celery,
or ``n/a`` with the reason on the line before when django-tasks-fennel is not installed); the line before it gives
``safetynet_ratio`` (plain safetynet / celery) and each system's CPU time a task, in this process and the worker.

Redis: database 11 by default (``SAFETYNET_BENCH_DJTASKS_REDIS``); the run deletes the keys it made (its queue,
its markers, fennel's results), never the whole database. PostgreSQL: a database of its own
(``SAFETYNET_BENCH_DJTASKS_DB``, default ``safetynet_bench_djtasks``), created and migrated when missing.
"""

from __future__ import annotations

import argparse
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
ROOT = HERE.parent
for path in (str(HERE), str(ROOT)):
    if path not in sys.path:
        sys.path.insert(0, path)

import _django_tasks_app as bench  # noqa: E402

STARTUP_TIMEOUT = 60.0
SLICE_TIMEOUT = 600.0


def _redis():
    import redis

    return redis.Redis.from_url(bench.REDIS_URL)


def _clean(client, run_id: str) -> None:
    """Delete what the run left in Redis: its queue, markers and fennel's result keys."""
    client.delete(bench.QUEUE)
    for pattern in (f"bench:djtasks:{run_id}:*", "celery-task-meta-*", "django-tasks-*"):
        keys = list(client.scan_iter(match=pattern, count=1000))
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])


def _migrate() -> None:
    from django.core.management import call_command

    bench.ensure_database()
    call_command("migrate", verbosity=0, interactive=False)


def _truncate_records() -> None:
    from django.db import connection

    from safetynet.models import TaskRecord

    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {connection.ops.quote_name(TaskRecord._meta.db_table)}")


def _wait_marker(client, key: str, timeout: float) -> tuple[float, float]:
    """When the worker ran the marker, and its CPU time then."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        value = client.get(key)
        if value is not None:
            when, cpu = value.split()
            return float(when), float(cpu)
        time.sleep(0.01)
    raise RuntimeError(f"the worker did not reach marker {key} within {timeout:.0f}s")


class Worker:
    def __init__(self, pool: str, concurrency: int, log: Path) -> None:
        env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(HERE), str(ROOT), os.environ.get("PYTHONPATH", "")])}
        command = [sys.executable, "-m", "celery", "-A", "_django_tasks_app", "worker", "-Q", bench.QUEUE,
                   f"--pool={pool}", f"--concurrency={concurrency}", "--without-gossip", "--without-mingle",
                   "--without-heartbeat", "-l", "warning", "-n", f"bench-djtasks-{uuid.uuid4().hex[:6]}@%h"]
        self.log = log
        self.process = subprocess.Popen(command, env=env, cwd=HERE, stdout=log.open("w"), stderr=subprocess.STDOUT,
                                        start_new_session=True)

    def stop(self) -> None:
        import signal

        if self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=30)
            except subprocess.TimeoutExpired:
                os.killpg(self.process.pid, signal.SIGKILL)
                self.process.wait(timeout=10)


def _senders() -> dict[str, object]:
    """Each system's way to enqueue one no-op."""
    senders = {
        "backend": bench.django_noop.enqueue,
        "celery": bench.celery_noop.apply_async,
        "safetynet": bench.safetynet_noop.apply_async,
    }
    if not bench.FENNEL_MISSING:
        senders["fennel"] = bench.fennel_noop.enqueue
    return senders


class Slice:
    """One slice's figures: tasks a second (enqueue + run), and CPU microseconds a task in this process
    (enqueueing, with its background writes) and in the worker (from marker to marker; solo pool only)."""

    def __init__(self, tps: float, enqueue_cpu: float, worker_cpu: float | None) -> None:
        self.tps, self.enqueue_cpu, self.worker_cpu = tps, enqueue_cpu, worker_cpu


_last_worker_cpu: list[float] = []


def run_slice(client, run_id: str, send, n: int) -> Slice:
    key = f"bench:djtasks:{run_id}:{uuid.uuid4().hex}"
    started, cpu = time.time(), time.process_time()
    for _ in range(n):
        send()
    bench.marker.apply_async((key,))
    enqueue_cpu = (time.process_time() - cpu) / n * 1e6
    ended, worker_cpu = _wait_marker(client, key, SLICE_TIMEOUT)
    previous = _last_worker_cpu[-1] if _last_worker_cpu else None
    _last_worker_cpu.append(worker_cpu)
    return Slice(n / (ended - started), enqueue_cpu, (worker_cpu - previous) / n * 1e6 if previous else None)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="500 tasks a slice, 3 rounds")
    parser.add_argument("--tasks", type=int, default=None, help="no-ops per slice (default 5000, --quick 500)")
    parser.add_argument("--rounds", type=int, default=None, help="rounds (default 5, --quick 3)")
    parser.add_argument("--pool", choices=("solo", "prefork"), default="solo")
    parser.add_argument("--concurrency", type=int, default=1)
    parser.add_argument("--without-records", action="store_true",
                        help="an experiment: the backend writes no TaskRecord rows (get_result() finds nothing); "
                             "what the durable records cost here")
    options = parser.parse_args(argv)
    if options.without_records:
        os.environ["SAFETYNET_BENCH_DJTASKS_NO_RECORDS"] = "1"  # the worker's (its environment is this one's)
        bench.without_records()
    n = options.tasks or (500 if options.quick else 5000)
    rounds = options.rounds or (3 if options.quick else 5)
    if n < 1 or rounds < 1:
        parser.error("--tasks and --rounds must be at least 1")

    _migrate()
    client = _redis()
    run_id = uuid.uuid4().hex[:8]
    _clean(client, run_id)
    senders = _senders()
    systems = list(senders)
    print(f"django.tasks bench: {n} no-ops a slice, {rounds} rounds, systems {', '.join(systems)}, "
          + ("WITHOUT the backend's TaskRecord rows (an experiment), " if options.without_records else "") +
          f"worker pool {options.pool} x{options.concurrency}, Redis {bench.REDIS_URL}, database {bench.DB_NAME}",
          flush=True)
    if bench.FENNEL_MISSING:
        print(f"fennel: n/a ({bench.FENNEL_MISSING})", flush=True)
    log = Path(tempfile.mkdtemp(prefix="bench-djtasks-")) / "worker.log"
    worker = Worker(options.pool, options.concurrency, log)
    figures: dict[str, list[float]] = {system: [] for system in systems}
    cpu: dict[str, tuple[list[float], list[float]]] = {system: ([], []) for system in systems}
    try:
        warm = f"bench:djtasks:{run_id}:warm"
        bench.marker.apply_async((warm,))
        try:
            _wait_marker(client, warm, STARTUP_TIMEOUT)
        except RuntimeError:
            print(log.read_text()[-3000:], file=sys.stderr)
            raise
        for system in systems:  # warm-up: imports, connections, the first records
            run_slice(client, run_id, senders[system], min(n, 200))
        for number in range(rounds):
            _truncate_records()
            order = systems[number % len(systems):] + systems[:number % len(systems)]
            line = []
            for system in order:
                figures_of = run_slice(client, run_id, senders[system], n)
                figures[system].append(figures_of.tps)
                cpu[system][0].append(figures_of.enqueue_cpu)
                if figures_of.worker_cpu is not None:
                    cpu[system][1].append(figures_of.worker_cpu)
                line.append(f"{system}={figures_of.tps:.0f}/s")
            print(f"round {number + 1}: " + " ".join(line), flush=True)
    finally:
        worker.stop()
        _clean(client, run_id)
    medians = {system: statistics.median(values) for system, values in figures.items()}
    ratio = medians["backend"] / medians["celery"]
    fennel = f"{medians['fennel'] / medians['celery']:.3f}" if "fennel" in medians else "n/a"
    print("medians: " + " ".join(f"{system}={value:.0f}/s" for system, value in medians.items()))
    print("CPU a task (median, microseconds): " + " ".join(
        f"{system}: enqueue {statistics.median(cpu[system][0]):.0f}"
        + (f" worker {statistics.median(cpu[system][1]):.0f}" if cpu[system][1] and options.pool == "solo" else "")
        for system in systems))
    print(f"safetynet_tps={medians['safetynet']:.0f} safetynet_ratio={medians['safetynet'] / medians['celery']:.3f}")
    print(f"backend_tps={medians['backend']:.0f} celery_tps={medians['celery']:.0f} ratio={ratio:.3f} "
          f"fennel_ratio={fennel}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
