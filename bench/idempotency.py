"""What an idempotent task costs: against its floor (the database statements it needs), against the guard users write
by hand, with a realistic body, and what a retry costs against plain Celery's.

    .venv/bin/python bench/idempotency.py [--quick] [--tasks N] [--rounds R] [--slice S] [--prepared]

Systems, each a fresh solo worker per round on a queue of its own (the machinery of bench/overhead.py: messages
copied from ones Celery published, slices of each system alternating, the worker's wall and CPU time read between
a start and an end marker):

- ``plain``, ``safetynet``: the no-op, plain and as a safetynet task;
- ``idempotent``: the no-op with ``idempotency_key="noop-{n}"``, a fresh key per message;
- ``diy``: a plain Celery no-op behind the guard tutorials teach (``get_or_create`` of a row per operation, an
  "already done?" check, the body and a status update in ``transaction.atomic()``);
- ``realistic_plain``, ``realistic_idempotent``: a body that writes one row with the ORM and waits 5 ms;
- ``retry_plain``, ``retry_safetynet``: fails once, ``self.retry(countdown=0)``, then succeeds. Their slice ends
  once every retry has run (each counts itself in Redis; the end marker is sent after the last).

And, in this process, right after each slice of ``idempotent`` and as many: ``floor``, the claim's and the mark's
statements timed with psycopg directly on the same database and the same claim table (the ``INSERT … ON CONFLICT
… RETURNING`` that claims a fresh key, committed without waiting for the WAL flush as safetynet's claim is, then
the owner-checked ``UPDATE``, committed), sent as the workers' Django connections send them (no prepared
statements unless ``--prepared``).

The workers run without Celery's Django fixup (Django is configured in code, ``DJANGO_SETTINGS_MODULE`` is not
set), so each keeps its database connection from task to task. A project whose worker has the fixup (the usual
``celery.py`` sets ``DJANGO_SETTINGS_MODULE``) closes every database connection before and after each task unless
``CELERY_DB_REUSE_MAX`` is set: every task that touches the database, plain or idempotent, then opens a
connection of its own (see docs/idempotency.md, "What it costs").

Figures (medians over rounds):

    floor_us             the statements alone, per task (per round: its floor slices' time / their pairs)
    idempotent_extra_us  per-task wall time of ``idempotent`` minus ``plain``
    extra_vs_floor       idempotent_extra_us / floor_us
    idempotent_vs_diy    idempotent tasks/s / diy tasks/s
    realistic_ratio      realistic_idempotent tasks/s / realistic_plain tasks/s
    retry_cpu_ratio      plain Celery's CPU per retry / safetynet's (a retry: the failed run and its publish, i.e.
                         CPU per retrying task minus CPU per no-op of the same kind)

The last line: ``floor_us=… idempotent_extra_us=… extra_vs_floor=… idempotent_vs_diy=… realistic_ratio=…
retry_cpu_ratio=…``. Redis database 9 and PostgreSQL database ``safetynet_bench_overhead``, as bench/overhead.py.
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _postgres as bench_postgres  # noqa: E402
import overhead  # noqa: E402

overhead.WORKER_APP = "_idempotency_tasks"
overhead.KEYED |= {"diy", "realistic_plain", "realistic_idempotent"}

import _idempotency_tasks as tasks  # noqa: E402  (after the app: it adds its tasks to overhead's NOOPS)

bench = overhead.bench
SYSTEMS = ("plain", "safetynet", "idempotent", "diy", "realistic_plain", "realistic_idempotent", "retry_plain",
           "retry_safetynet")
RETRYING = {"retry_plain", "retry_safetynet"}
#: Tasks per slice relative to --slice: a realistic body waits 5 ms.
SCALE = {"realistic_plain": 0.1, "realistic_idempotent": 0.1, "retry_plain": 0.5, "retry_safetynet": 0.5}


class RetryMessages(overhead.Messages):
    """The retrying no-op's messages: each carries the run's counter; a slice's end marker is sent by ``run``."""

    def __init__(self, client, run_id: str, system: str, lock) -> None:
        self.counter = f"bench:{run_id}:{system}:retried"
        super().__init__(client, run_id, system, lock)
        self.noop = self._template(bench.NOOPS[system], (self.counter,))

    def load(self, tasks: int) -> None:
        client = self.client
        self.lock.renew()
        client.delete(self.counter)
        with client.pipeline(transaction=False) as pipe:
            pipe.delete(self.staging)
            pipe.lpush(self.staging, self._copy(self.start))
            pipe.lpush(self.staging, *(self._copy_noop() for _ in range(tasks)))
            pipe.rename(self.staging, self.queue)
            pipe.execute()


class RetryWorker(overhead.Worker):
    def run(self, tasks: int, timeout: float) -> tuple[float, float]:
        messages = self.messages
        messages.load(tasks)
        deadline = time.monotonic() + timeout
        started = self._pop(messages.start_key, deadline)
        while int(messages.client.get(messages.counter) or 0) < tasks:  # every retry has run
            if time.monotonic() > deadline or self.process.poll() is not None:
                raise RuntimeError(f"{messages.queue}: retries did not all run:\n{overhead._tail(self.log_path)}")
            messages.lock.renew()
            time.sleep(0.002)
        messages.client.lpush(messages.queue, messages._copy(messages.end))
        ended = self._pop(messages.end_key, deadline)
        return ended[0] - started[0], ended[1] - started[1]


class Floor:
    """The claim's and the mark's statements, with psycopg on the benchmark's database, timed in slices like a system.

    Sent as the workers send them: server-side binding, and prepared statements only with ``--prepared`` (the
    workers' Django connections prepare nothing by default: Django turns psycopg's prepared statements off,
    for connection poolers). On the claim table the workers use (its columns, its indexes), emptied before
    each round: a fresh key inserted (``INSERT … ON CONFLICT … DO UPDATE … WHERE`` the takeover's condition
    ``RETURNING``, committed without waiting for the WAL flush), then the owner-checked ``UPDATE`` to
    succeeded, committed. One connection per round, opened before it and warmed up.
    """

    TABLE = "safetynet_idempotencyclaim"
    CLAIM = (
        f"INSERT INTO {TABLE} (key, task_name, task_id, state, owner, lease_until, deliveries, result, "
        "result_stored, error, created_at, updated_at) VALUES (%s, %s, %s, 'in_progress', %s, %s, 1, NULL, false, "
        "'', %s, %s) ON CONFLICT (key) DO UPDATE SET owner = excluded.owner, state = 'in_progress', "
        f"lease_until = excluded.lease_until, deliveries = {TABLE}.deliveries + 1 "
        f"WHERE {TABLE}.state = 'failed' OR ({TABLE}.state = 'in_progress' AND {TABLE}.lease_until < %s) "
        "RETURNING deliveries, set_config('synchronous_commit', 'off', true)"
    )
    MARK = (f"UPDATE {TABLE} SET state = 'succeeded', updated_at = %s, result = NULL, result_stored = true "
            "WHERE key = %s AND owner = %s AND state = 'in_progress'")

    def __init__(self) -> None:
        import psycopg

        from _postgres import DB_HOST, DB_PORT, DB_USER

        self.connection = psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname=bench.DB_NAME,
                                          autocommit=True, prepare_threshold=bench_postgres.PREPARE_THRESHOLD)
        self.cursor = self.connection.cursor()
        self.run_id, self.count = uuid.uuid4().hex[:8], 0

    def run(self, pairs: int) -> float:
        """Claim and mark ``pairs`` fresh keys; the seconds it took."""
        cursor, claim, mark = self.cursor, self.CLAIM, self.MARK
        began = time.perf_counter()
        for _ in range(pairs):
            self.count += 1
            key, now = f"floor-{self.run_id}-{self.count}", time.time()
            cursor.execute(claim, (key, "bench.floor", key, key, now + 30, now, now, now))
            cursor.fetchone()
            cursor.execute(mark, (time.time(), key, key))
        return time.perf_counter() - began

    def close(self) -> None:
        self.connection.close()


def run_round(number: int, messages: dict, args: argparse.Namespace, log_dir: str) -> dict[str, tuple[float, float]]:
    workers: dict[str, overhead.Worker] = {}
    bench.clear_claims()
    tasks.Operation.objects.all().delete()
    tasks.LedgerRow.objects.all().delete()
    from django.db import connection

    connection.close()  # the workers are what is measured
    floor = Floor()
    floor_seconds, floor_pairs = 0.0, 0
    try:
        for system in SYSTEMS:
            kind = RetryWorker if system in RETRYING else overhead.Worker
            workers[system] = kind(messages[system], args, os.path.join(log_dir, f"r{number}.{system}.log"))
        for system in SYSTEMS:
            workers[system].run(max(10, int(args.warmup * SCALE.get(system, 1.0))), overhead.STARTUP_TIMEOUT)
        floor.run(args.floor_pairs)  # warm-up
        wall = dict.fromkeys(SYSTEMS, 0.0)
        cpu = dict.fromkeys(SYSTEMS, 0.0)
        counts = dict.fromkeys(SYSTEMS, 0)
        done = 0
        while done < args.tasks:
            size = min(args.slice, args.tasks - done)
            for system in SYSTEMS:
                share = max(1, int(size * SCALE.get(system, 1.0)))
                slice_wall, slice_cpu = workers[system].run(share, args.slice_timeout)
                wall[system] += slice_wall
                cpu[system] += slice_cpu
                counts[system] += share
                if system == "idempotent":  # the floor's slice, right after the idempotent one's
                    floor_seconds += floor.run(share)
                    floor_pairs += share
            done += size
    finally:
        floor.close()
        for worker in workers.values():
            worker.stop()
    results = {"floor": (floor_pairs / floor_seconds, 0.0)}
    print(f"round {number} floor {floor_seconds / floor_pairs * 1e6:.0f} us per claim and mark (psycopg, "
          f"{floor_pairs} pairs in slices after the idempotent ones)", flush=True)
    for system in SYSTEMS:
        results[system] = counts[system] / wall[system], counts[system] / cpu[system]
        print(f"round {number} {system:<21} {counts[system]:6d} tasks, {results[system][0]:8.1f} tasks/s "
              f"({results[system][1]:8.1f} tasks/CPU-s)", flush=True)
    return results


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--tasks", type=int, help="no-ops per round for the no-op systems (default 5000; 400 quick)")
    parser.add_argument("--rounds", type=int, help="rounds (default 3; 2 quick)")
    parser.add_argument("--slice", type=int, default=200, help="no-op tasks per slice (default 200)")
    parser.add_argument("--warmup", type=int, default=200, help="no-ops each fresh worker runs first (default 200)")
    parser.add_argument("--floor-pairs", type=int, help="claim-and-mark pairs the floor warms up with (default 200)")
    parser.add_argument("--prepared", action="store_true",
                        help="Django's connections (the workers') and the floor's prepare statements after 5 runs "
                             "(psycopg's prepare_threshold=5; Django's default prepares none)")
    args = parser.parse_args(argv)
    if args.prepared:
        os.environ["SAFETYNET_BENCH_PREPARE_THRESHOLD"] = "5"  # the workers' environment
        bench_postgres.PREPARE_THRESHOLD = 5
    args.tasks = args.tasks or (400 if args.quick else 5000)
    args.rounds = args.rounds or (2 if args.quick else 3)
    args.floor_pairs = args.floor_pairs or 200
    args.pool, args.prefetch, args.without_prometheus, args.plain_guard = "solo", 64, False, False
    args.slice_timeout = 120.0
    began = time.monotonic()
    client = overhead._redis()
    run_id = uuid.uuid4().hex[:8]
    lock = overhead.Lock(client, run_id)
    results: dict[str, list[tuple[float, float]]] = {system: [] for system in SYSTEMS}
    floors: list[float] = []
    try:
        bench.ensure_database()
        overhead._delete_bench_keys(client)
        messages = {system: (RetryMessages if system in RETRYING else overhead.Messages)(client, run_id, system, lock)
                    for system in SYSTEMS}
        with tempfile.TemporaryDirectory(prefix="safetynet-bench-") as log_dir:
            for number in range(1, args.rounds + 1):
                for system, figures in run_round(number, messages, args, log_dir).items():
                    if system == "floor":
                        floors.append(1e6 / figures[0])
                    else:
                        results[system].append(figures)
    finally:
        overhead._delete_bench_keys(client)
        try:
            bench.clear_claims()
        finally:
            lock.release()

    def tps(system: str) -> float:
        return statistics.median(figure[0] for figure in results[system])

    def cpu_us(system: str) -> float:
        return statistics.median(1e6 / figure[1] for figure in results[system])

    floor = statistics.median(floors)
    extra = 1e6 / tps("idempotent") - 1e6 / tps("plain")
    plain_retry = cpu_us("retry_plain") - cpu_us("plain")
    safetynet_retry = cpu_us("retry_safetynet") - cpu_us("safetynet")
    for system in SYSTEMS:
        print(f"{system:<21} median {tps(system):8.1f} tasks/s, {cpu_us(system):8.1f} us CPU per task")
    print(f"CPU per retry: plain Celery {plain_retry:.0f} us, safetynet {safetynet_retry:.0f} us; "
          f"load {os.getloadavg()[0]:.2f}; total {time.monotonic() - began:.0f}s")
    print(f"floor_us={floor:.0f} idempotent_extra_us={extra:.0f} extra_vs_floor={extra / floor:.2f} "
          f"idempotent_vs_diy={tps('idempotent') / tps('diy'):.3f} "
          f"realistic_ratio={tps('realistic_idempotent') / tps('realistic_plain'):.3f} "
          f"retry_cpu_ratio={plain_retry / safetynet_retry:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
