"""How close ``realistic_ratio`` (bench/idempotency.py) can come to 1 on this machine: the database statements of the
realistic body, plain and idempotent, with no Python framework around them.

    .venv/bin/python bench/idempotency_ceiling.py [--quick] [--tasks N] [--rounds R]

Three sequences, each a "task" whose body writes one ledger row and waits 5 ms (the realistic body), sent with
psycopg directly on the benchmark's database (its claim and ledger tables), in slices that alternate:

- ``plain``: the ledger ``INSERT`` in autocommit (committed, waiting for the WAL flush), then the wait;
- ``claimed``: what an idempotent run sends today: the claim (``INSERT … ON CONFLICT … RETURNING``, committed
  without waiting for the flush), ``BEGIN``, the ledger ``INSERT``, the wait, then the mark and ``COMMIT`` in one
  round trip (pipeline mode);
- ``claimed_min``: the fewest round trips that keep the claim committed before the body runs (the crash count of
  poison messages needs it; so does a duplicate that must see the key taken, not wait on a row lock): the claim and
  ``BEGIN`` in one round trip (``safetynet.driver.run_together``, as an idempotent run sends them now), the
  ``INSERT``, the wait, the mark and ``COMMIT`` in one.

A Celery worker adds its own per-task time ``W`` to both systems alike, which moves the ratio towards 1:
``(plain + W) / (claimed_min + W)``. The last line gives the ratios without it and the ``W`` a worker would have to
spend per task for the ratio to reach 0.95 with no Python at all on safetynet's side:

    plain_us=… claimed_us=… claimed_min_us=… statements_extra_us=… ceiling_ratio=… worker_us_for_095=…

Compare ``worker_us_for_095`` with the plain realistic task's time in a real worker minus ``plain_us``
(bench/idempotency.py prints ``realistic_plain`` tasks/s). PostgreSQL database ``safetynet_bench_overhead``, as
bench/overhead.py (created and migrated when missing); the rows it writes are deleted when it ends.
"""

from __future__ import annotations

import argparse
import statistics
import sys
import time
import types
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _overhead_tasks as bench  # noqa: E402  (configures Django: the tables come from its migrations)
from _idempotency_tasks import API_CALL_SECONDS  # noqa: E402
from idempotency import Floor  # noqa: E402

from safetynet.driver import run_together  # noqa: E402

LEDGER = "_bench_app_ledgerrow"
INSERT = f"INSERT INTO {LEDGER} (name, created_at) VALUES (%s, now())"
SEQUENCES = ("plain", "claimed", "claimed_min")


class Sequences:
    def __init__(self) -> None:
        import psycopg

        from _postgres import DB_HOST, DB_PORT, DB_USER

        self.connection = psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname=bench.DB_NAME,
                                          autocommit=True)
        self.cursor = self.connection.cursor()
        self.django_like = types.SimpleNamespace(connection=self.connection)  # what run_together reads
        self.prefix, self.count = f"ceiling-{uuid.uuid4().hex[:8]}", 0

    def _key(self) -> str:
        self.count += 1
        return f"{self.prefix}-{self.count}"

    def plain(self, key: str) -> None:
        self.cursor.execute(INSERT, (key,))
        time.sleep(API_CALL_SECONDS)

    def _claim_params(self, key: str) -> tuple:
        now = time.time()
        return key, "bench.ceiling", key, key, now + 30, now, now, now

    def _body_and_mark(self, key: str) -> None:
        self.cursor.execute(INSERT, (key,))
        time.sleep(API_CALL_SECONDS)
        run_together(self.django_like, [(Floor.MARK, (time.time(), key, key)), ("COMMIT", ())])

    def claimed(self, key: str) -> None:
        cursor = self.cursor
        cursor.execute(Floor.CLAIM, self._claim_params(key))
        cursor.fetchone()
        cursor.execute("BEGIN")
        self._body_and_mark(key)

    def claimed_min(self, key: str) -> None:
        # safetynet's own helper: a sync after the claim, so it commits before the BEGIN (psycopg's pipeline would
        # send both in one implicit transaction, which the BEGIN would then take in: the claim not committed)
        run_together(self.django_like, [(Floor.CLAIM, self._claim_params(key)), ("BEGIN", ())])
        self._body_and_mark(key)

    def run(self, sequence: str, tasks: int) -> float:
        """Seconds per task of ``tasks`` runs of ``sequence``."""
        step = getattr(self, sequence)
        began = time.perf_counter()
        for _ in range(tasks):
            step(self._key())
        return (time.perf_counter() - began) / tasks

    def clean(self) -> None:
        self.cursor.execute(f"DELETE FROM {LEDGER} WHERE name LIKE %s", (f"{self.prefix}-%",))
        self.cursor.execute(f"DELETE FROM {Floor.TABLE} WHERE key LIKE %s", (f"{self.prefix}-%",))
        self.connection.close()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--tasks", type=int, help="tasks per slice (default 50; 20 quick)")
    parser.add_argument("--rounds", type=int, help="slices of each sequence (default 40; 12 quick)")
    args = parser.parse_args(argv)
    tasks = args.tasks or (20 if args.quick else 50)
    rounds = args.rounds or (12 if args.quick else 40)
    bench.ensure_database()
    sequences = Sequences()
    times: dict[str, list[float]] = {name: [] for name in SEQUENCES}
    try:
        for name in SEQUENCES:  # warm-up
            sequences.run(name, tasks)
        for number in range(rounds):
            order = SEQUENCES if number % 2 == 0 else SEQUENCES[::-1]
            for name in order:
                times[name].append(sequences.run(name, tasks))
    finally:
        sequences.clean()
    us = {name: statistics.median(values) * 1e6 for name, values in times.items()}
    for name in SEQUENCES:
        print(f"{name:<12} median {us[name]:8.0f} us a task ({rounds} slices of {tasks})")
    target = 0.95
    needed = max(0.0, (target * us["claimed_min"] - us["plain"]) / (1 - target))
    print(f"plain_us={us['plain']:.0f} claimed_us={us['claimed']:.0f} claimed_min_us={us['claimed_min']:.0f} "
          f"statements_extra_us={us['claimed_min'] - us['plain']:.0f} "
          f"ceiling_ratio={us['plain'] / us['claimed_min']:.3f} worker_us_for_095={needed:.0f}")
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
