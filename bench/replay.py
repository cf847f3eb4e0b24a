"""Replay throughput of dead letters against plain ``apply_async`` of the same tasks, in one process.

    .venv/bin/python bench/replay.py [--quick] [--rows N] [--rounds R]

``safetynet dead replay --all`` hands every dead row to ``deadletter.replay``, which publishes
each one again (one producer per batch of 500) and bulk-updates the rows (status, replay count,
new task id, audit). The benchmark times ``deadletter.replay(DeadLetter.objects.dead(), by="bench")``,
reading the rows included. The baseline is what one would do by hand:
N plain ``task.apply_async(args, kwargs, queue=...)`` calls of the same task, with the producer
Celery's pool hands out as usual. No worker runs: only publishing (and, for replay, its
database work) is measured.

Each round:

1. deletes every dead letter, empties the broker queue, and bulk-creates N dead rows
   (realistic fields: args, kwargs, headers, a history of three attempts, an audit entry);
2. times, in an order that alternates from round to round, (a) ``replay`` of all dead rows and
   (b) N ``apply_async`` calls with each row's args and kwargs, emptying the queue after each and
   checking that exactly N messages were published and, for replay, that every row is marked.

Each round is printed; the figures compared are medians over rounds, and the last line of
output is ``replayed=… per_second=… apply_async_per_second=… ratio=…``
(ratio = median replay rows/s / median apply_async calls/s; target ≥ 0.8).
"""

from __future__ import annotations

import argparse
import os
import statistics
import sys
import time
import uuid
from datetime import datetime, timedelta, timezone
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _replay_settings as bench  # noqa: E402  (configures Django and the Celery app)

TARGET = 0.8
WARMUP_ROWS = 200  # unmeasured rows replayed (and calls made) once, before the first round


def _redis():
    import redis

    return redis.Redis.from_url(bench.BROKER_URL)


def _migrate() -> None:
    from django.core.management import call_command

    call_command("migrate", verbosity=0, interactive=False)


def _history(index: int, failed_at: float) -> list[dict]:
    """Three attempts as the runtime records them (``safetynet.protocol.history.entry_for``)."""
    traceback = (
        "Traceback (most recent call last):\n"
        '  File "/srv/app/billing/tasks.py", line 42, in charge\n'
        "    response = gateway.charge(order_id, amount)\n"
        '  File "/srv/app/billing/gateway.py", line 118, in charge\n'
        "    raise GatewayTimeout(f\"gateway did not answer in {timeout}s\")\n"
        f"billing.gateway.GatewayTimeout: gateway did not answer in 10s (order {index})\n"
    )
    entries = []
    for attempt, delay in ((1, 2.0), (2, 4.0), (3, None)):
        started = failed_at - (3 - attempt) * 5.0 - 1.0
        entries.append({
            "attempt": attempt,
            "started": round(started, 6),
            "duration": 0.8123,
            "exception": "billing.gateway.GatewayTimeout",
            "message": f"gateway did not answer in 10s (order {index})",
            "traceback": traceback,
            "worker": "celery@worker-1",
            "action": "retry" if delay is not None else "dead",
            "delay": delay,
            "reason": "transient" if delay is not None else "retries_exhausted",
        })
    return entries


def _args(index: int) -> tuple[list, dict]:
    return [index, "EUR", 1999 + index % 100], {"customer_id": f"cus_{index:08d}", "notify": True,
                                                 "items": [{"sku": "A-1", "qty": 2}, {"sku": "B-7", "qty": 1}]}


def create_rows(count: int) -> None:
    """Bulk-create ``count`` dead letters of the benchmark's task."""
    from safetynet.models import DeadLetter

    now = time.time()
    rows = []
    for index in range(count):
        failed_at = now - (count - index)
        args, kwargs = _args(index)
        at = datetime.fromtimestamp(failed_at, tz=timezone.utc)
        history = _history(index, failed_at)
        rows.append(DeadLetter(
            task_name=bench.TASK_NAME,
            task_id=str(uuid.uuid4()),
            args=args,
            kwargs=kwargs,
            redacted=[],
            headers={"tenant": "acme", "trace_id": uuid.uuid4().hex, "source": "checkout"},
            queue=bench.QUEUE,
            exchange="",
            routing_key=bench.QUEUE,
            reason=DeadLetter.Reason.RETRIES_EXHAUSTED,
            detail="3 attempts",
            exception_type="billing.gateway.GatewayTimeout",
            exception_message=f"gateway did not answer in 10s (order {index})",
            traceback=history[-1]["traceback"],
            history=history,
            attempts=3,
            first_failed_at=at - timedelta(seconds=11),
            last_failed_at=at,
            worker="celery@worker-1",
            fingerprint="0" * 40,
            status=DeadLetter.Status.DEAD,
            audit=[{"action": "dead", "at": at.isoformat(), "nonce": uuid.uuid4().hex}],
        ))
    DeadLetter.objects.bulk_create(rows, batch_size=1000)


def clear_rows() -> None:
    """Empty the dead-letter table of the benchmark's own database."""
    from django.db import connection

    from safetynet.models import DeadLetter

    with connection.cursor() as cursor:
        cursor.execute(f"TRUNCATE {connection.ops.quote_name(DeadLetter._meta.db_table)} RESTART IDENTITY")


def _drain(client, expected: int, what: str) -> None:
    """Check that ``expected`` messages were published, then empty the queue."""
    published = client.llen(bench.QUEUE)
    client.delete(bench.QUEUE)
    if published != expected:
        raise RuntimeError(f"{what}: {published} messages on {bench.QUEUE}, expected {expected}")


def time_replay(count: int, client) -> tuple[float, float]:
    """Replay every dead row as ``safetynet dead replay --all`` does; return (wall, CPU) seconds."""
    from safetynet import deadletter
    from safetynet.models import DeadLetter

    cpu, started = time.process_time(), time.perf_counter()
    outcomes = deadletter.replay(DeadLetter.objects.dead(), by="bench")
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    failed = [outcome for outcome in outcomes if outcome.error]
    if failed or len(outcomes) != count:
        raise RuntimeError(f"replay: {len(outcomes)} outcomes for {count} rows, {len(failed)} refused: {failed[:3]}")
    left = DeadLetter.objects.dead().count()
    if left:
        raise RuntimeError(f"replay: {left} rows still dead after replaying")
    _drain(client, count, "replay")
    return seconds, cpu


def time_apply_async(count: int, client) -> tuple[float, float]:
    """N plain ``apply_async`` calls of the same task with the same arguments; return (wall, CPU) seconds."""
    task = bench.replay_noop
    calls = [_args(index) for index in range(count)]
    queue = bench.QUEUE
    cpu, started = time.process_time(), time.perf_counter()
    for args, kwargs in calls:
        task.apply_async(args, kwargs, queue=queue)
    seconds, cpu = time.perf_counter() - started, time.process_time() - cpu
    _drain(client, count, "apply_async")
    return seconds, cpu


def run_round(number: int, rows: int, client, replay_first: bool) -> tuple[float, float, tuple[float, float]]:
    """One round; return replay rows/s, apply_async calls/s, and both per second of this process's CPU."""
    clear_rows()
    client.delete(bench.QUEUE)
    create_rows(rows)
    figures: dict[str, tuple[float, float]] = {}
    order = ("replay", "apply_async") if replay_first else ("apply_async", "replay")
    for system in order:
        figures[system] = (time_replay if system == "replay" else time_apply_async)(rows, client)
    (replay_wall, replay_cpu), (plain_wall, plain_cpu) = figures["replay"], figures["apply_async"]
    replay_rate, plain_rate = rows / replay_wall, rows / plain_wall
    cpu_rates = rows / replay_cpu, rows / plain_cpu
    print(
        f"round {number} ({order[0]} first): replay {rows} rows in {replay_wall:6.3f}s = {replay_rate:7.1f}/s"
        f" (CPU {replay_cpu:6.3f}s); apply_async {rows} calls in {plain_wall:6.3f}s = {plain_rate:7.1f}/s"
        f" (CPU {plain_cpu:6.3f}s); ratio {replay_rate / plain_rate:.3f}  (load {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    return replay_rate, plain_rate, cpu_rates


def _clean_up(client) -> None:
    """Leave no rows and no messages behind; never hide the error that ended the run."""
    try:
        client.delete(bench.QUEUE)
        clear_rows()
    except Exception as error:  # the database or Redis went away: the run has failed already
        print(f"clean-up failed: {error!r}", file=sys.stderr)


def _retrying(step, attempts: int = 3):
    """Run a round again when the database went away in the middle of it (it is restarted by others)."""
    from django.db import InterfaceError, OperationalError, connection

    for attempt in range(1, attempts + 1):
        try:
            return step()
        except (OperationalError, InterfaceError) as error:
            if attempt == attempts:
                raise
            print(f"  the database went away ({str(error).strip()[:80]}); redoing this step", flush=True)
            connection.close()
            deadline = time.monotonic() + 60
            while True:
                try:
                    connection.ensure_connection()
                    break
                except (OperationalError, InterfaceError):
                    if time.monotonic() > deadline:
                        raise
                    time.sleep(1)
    raise AssertionError("unreachable")


def warm_up(client) -> None:
    """Connections, imports, the producer pool and Django's caches, before anything is timed."""
    clear_rows()
    client.delete(bench.QUEUE)
    create_rows(WARMUP_ROWS)
    time_replay(WARMUP_ROWS, client)
    time_apply_async(WARMUP_ROWS, client)
    clear_rows()


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--rows", type=int, help="dead letters per round (default 5000, 1000 with --quick)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3: medians of 3)")
    args = parser.parse_args(argv)
    if args.rows is None:
        args.rows = 1000 if args.quick else 5000
    if min(args.rows, args.rounds) < 1:
        parser.error("--rows and --rounds must be >= 1")

    import celery
    import django
    import kombu

    import safetynet

    created = bench.ensure_database()
    _migrate()
    client = _redis()
    client.ping()
    print(
        f"safetynet {safetynet.__version__} ({Path(safetynet.__file__).parent}), celery {celery.__version__}, kombu {kombu.__version__},"
        f" django {django.__version__}, python {sys.version.split()[0]}; database {bench.DB_NAME}"
        f"{' (created)' if created else ''} on {bench.DB_HOST}:{bench.DB_PORT}; broker {bench.BROKER_URL},"
        f" queue {bench.QUEUE}; {args.rounds} rounds of {args.rows} rows",
        flush=True,
    )
    began = time.monotonic()
    replay_rates: list[float] = []
    plain_rates: list[float] = []
    cpu_rates: list[tuple[float, float]] = []
    try:
        _retrying(lambda: warm_up(client))
        for number in range(1, args.rounds + 1):
            replay_rate, plain_rate, cpu = _retrying(
                lambda number=number: run_round(number, args.rows, client, replay_first=number % 2 == 1))
            replay_rates.append(replay_rate)
            plain_rates.append(plain_rate)
            cpu_rates.append(cpu)
    finally:
        _clean_up(client)

    def figures(values: list[float]) -> str:
        return " ".join(f"{value:.1f}" for value in values)

    replay_rate, plain_rate = statistics.median(replay_rates), statistics.median(plain_rates)
    ratio = replay_rate / plain_rate
    print(f"replay      median {replay_rate:8.1f} rows/s   rounds: {figures(replay_rates)}")
    print(f"apply_async median {plain_rate:8.1f} calls/s  rounds: {figures(plain_rates)}")
    cpu_replay = statistics.median(replay for replay, _ in cpu_rates)
    cpu_plain = statistics.median(plain for _, plain in cpu_rates)
    print(
        f"per second of this process's CPU: replay median {cpu_replay:.1f}, apply_async median {cpu_plain:.1f},"
        f" ratio {cpu_replay / cpu_plain:.3f} (the database's work is not in it)"
    )
    print(
        f"ratio {ratio:.3f} (target >= {TARGET}: {'met' if ratio >= TARGET else 'NOT met'});"
        f" total {time.monotonic() - began:.1f}s",
        flush=True,
    )
    print(f"replayed={args.rows} per_second={replay_rate:.1f} apply_async_per_second={plain_rate:.1f} ratio={ratio:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
