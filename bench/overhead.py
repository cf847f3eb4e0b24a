"""Throughput of a no-op safetynet task against a plain Celery task, through a real worker on Redis.

    /tmp/venv/bin/python bench/overhead.py [--quick] [--tasks N] [--rounds R] [--pool solo|prefork]

Each round measures one system (plain ``@shared_task`` or ``@safetynet.task``); rounds alternate
plain, safetynet, plain, safetynet, ... A round:

1. fills a queue of its own with W warm-up no-ops, a start marker, N no-ops and an end marker
   (the no-ops ignore their result; a marker records ``time.time()`` in Redis when it runs);
2. starts a worker subprocess on that queue (solo pool by default: no IPC noise);
3. waits for the end marker, and counts tasks/s = N / (end marker time - start marker time).

So it measures the worker's throughput only: not the publishing, not the worker's start-up.
The machine may be noisy, so each round is printed and the figures compared are medians.
The last line of output is ``plain_tps=… safetynet_tps=… ratio=…`` (ratio = safetynet / plain).
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _overhead_tasks as bench  # noqa: E402

SYSTEMS = ("plain", "safetynet")
STARTUP_TIMEOUT = 60.0  # seconds for a worker to reach the start marker


def _redis():
    import redis

    return redis.Redis.from_url(bench.BROKER_URL)


def _template(queue: str, task, args: tuple = ()) -> tuple[str, str, str]:
    """Publish one message the ordinary way and take it back: its raw form and its two ids."""
    client = _redis()
    task.apply_async(args, queue=queue)
    raw = client.rpop(queue).decode()
    message = json.loads(raw)
    return raw, message["headers"]["id"], message["properties"]["delivery_tag"]


def _fill(client, queue: str, system: str, tasks: int, warmup: int, start_key: str, end_key: str) -> float:
    """Fill ``queue`` with the round's messages; return how long it took.

    Publishing through ``apply_async`` costs more than running a no-op, so each kind of message
    is published once by Celery and then copied with fresh ids (task id, delivery tag) straight
    into the Redis list, in the order ``apply_async`` would have put them.
    """
    began = time.perf_counter()
    noop = _template(queue, bench.NOOPS[system])
    start = _template(queue, bench.mark, (start_key,))
    end = _template(queue, bench.mark, (end_key,))

    def copy(template: tuple[str, str, str]) -> str:
        raw, task_id, tag = template
        return raw.replace(task_id, str(uuid.uuid4())).replace(tag, str(uuid.uuid4()))

    batch = 1000
    messages = [copy(noop) for _ in range(warmup)] + [copy(start)]
    with client.pipeline(transaction=False) as pipe:
        for chunk in range(0, warmup + 1, batch):
            pipe.lpush(queue, *messages[chunk:chunk + batch])  # kombu's Redis transport: LPUSH, BRPOP
        for chunk in range(0, tasks, batch):
            pipe.lpush(queue, *(copy(noop) for _ in range(min(batch, tasks - chunk))))
        pipe.lpush(queue, copy(end))
        pipe.execute()
    if client.llen(queue) != warmup + tasks + 2:
        raise RuntimeError(f"{queue}: expected {warmup + tasks + 2} messages, found {client.llen(queue)}")
    return time.perf_counter() - began


def _worker_command(queue: str, pool: str, prefetch: int) -> list[str]:
    command = [
        sys.executable, "-m", "celery", "-A", "_overhead_tasks", "worker",
        "-Q", queue, "-n", f"{queue}@%h", f"--pool={pool}",
        "--without-gossip", "--without-mingle", "--without-heartbeat",
        "-l", "warning", "--prefetch-multiplier", str(prefetch),
    ]
    if pool != "solo":
        command += ["--concurrency", "1"]
    return command


def _stop(worker: subprocess.Popen) -> None:
    if worker.poll() is not None:
        return
    worker.terminate()  # warm shutdown
    try:
        worker.wait(timeout=10)
    except subprocess.TimeoutExpired:
        try:
            os.killpg(worker.pid, 9)  # the worker was started in a session of its own
        except ProcessLookupError:
            pass
        worker.wait(timeout=10)


def _pop_time(client, key: str, deadline: float, worker: subprocess.Popen, log_path: str
              ) -> tuple[float, float]:
    """Wait for the marker ``key``: (wall time, worker CPU time); fail if the worker dies or ``deadline`` passes."""
    while True:
        item = client.blpop([key], timeout=1)
        if item is not None:
            wall, cpu = item[1].split()
            return float(wall), float(cpu)
        if worker.poll() is not None:
            raise RuntimeError(f"worker exited with {worker.returncode} before {key}:\n{_tail(log_path)}")
        if time.monotonic() > deadline:
            raise RuntimeError(f"timed out waiting for {key}:\n{_tail(log_path)}")


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no worker log)"


def run_round(number: int, system: str, args: argparse.Namespace, client, log_dir: str) -> tuple[float, float]:
    """Run one round; return (tasks/s of wall time, tasks/s of the worker's CPU time)."""
    queue = f"bench.r{number}.{system}"
    start_key, end_key = f"bench:{queue}:start", f"bench:{queue}:end"
    client.delete(queue, start_key, end_key)
    publish_seconds = _fill(client, queue, system, args.tasks, args.warmup, start_key, end_key)

    env = dict(os.environ)
    env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
    env.pop("DJANGO_SETTINGS_MODULE", None)
    env["SAFETYNET_BENCH_REDIS"] = bench.BROKER_URL
    log_path = os.path.join(log_dir, f"{queue}.log")
    with open(log_path, "wb") as log:
        launched = time.monotonic()
        worker = subprocess.Popen(
            _worker_command(queue, args.pool, args.prefetch), env=env, cwd=str(HERE),
            stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT, start_new_session=True,
        )
        try:
            started = _pop_time(client, start_key, launched + STARTUP_TIMEOUT, worker, log_path)
            startup_seconds = time.monotonic() - launched
            ended = _pop_time(client, end_key, time.monotonic() + args.round_timeout, worker, log_path)
        finally:
            _stop(worker)
    left = client.llen(queue)
    if left:
        raise RuntimeError(f"{queue}: {left} messages left after the end marker")
    wall, cpu = ended[0] - started[0], ended[1] - started[1]
    tps, cpu_tps = args.tasks / wall, args.tasks / cpu
    print(
        f"round {number} {system:<9} {args.tasks} tasks in {wall:6.3f}s = {tps:8.1f} tasks/s"
        f"  (worker CPU {cpu:6.3f}s = {cpu_tps:8.1f} tasks/CPU-s; published in {publish_seconds:.1f}s,"
        f" worker up in {startup_seconds:.1f}s; load {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    return tps, cpu_tps


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--tasks", type=int, help="no-op tasks per round (default 20000, 3000 with --quick)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds per system (default 3)")
    parser.add_argument("--warmup", type=int, help="no-ops run before the start marker (default N/20, 100..1000)")
    parser.add_argument("--pool", choices=("solo", "prefork"), default="solo", help="worker pool (prefork: -c 1)")
    parser.add_argument("--prefetch", type=int, default=64, help="worker prefetch multiplier (default 64)")
    parser.add_argument("--first", choices=SYSTEMS, default="plain",
                        help="which system runs first in each pair of rounds (default plain)")
    parser.add_argument("--round-timeout", type=float, help="seconds allowed per round after the start marker")
    args = parser.parse_args(argv)
    if args.tasks is None:
        args.tasks = 3000 if args.quick else 20000
    if args.tasks < 1 or args.rounds < 1:
        parser.error("--tasks and --rounds must be >= 1")
    if args.warmup is None:
        args.warmup = min(1000, max(100, args.tasks // 20))
    if args.round_timeout is None:
        args.round_timeout = 30.0 + args.tasks / 100.0  # far below any plausible rate

    import celery
    import django
    import safetynet

    print(
        f"safetynet {safetynet.__version__}, celery {celery.__version__}, django {django.__version__}, "
        f"python {sys.version.split()[0]}; broker {bench.BROKER_URL}; pool {args.pool}; "
        f"{args.tasks} tasks x {args.rounds} rounds per system, warm-up {args.warmup}",
        flush=True,
    )
    order = SYSTEMS if args.first == SYSTEMS[0] else SYSTEMS[::-1]
    client = _redis()
    client.flushdb()
    results: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    cpu_results: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    began = time.monotonic()
    try:
        with tempfile.TemporaryDirectory(prefix="safetynet-bench-") as log_dir:
            for number in range(1, args.rounds + 1):
                for system in order:
                    tps, cpu_tps = run_round(number, system, args, client, log_dir)
                    results[system].append(tps)
                    cpu_results[system].append(cpu_tps)
    finally:
        client.flushdb()

    def figures(values: list[float]) -> str:
        return " ".join(f"{value:.1f}" for value in values)

    plain, safe = statistics.median(results["plain"]), statistics.median(results["safetynet"])
    cpu_plain, cpu_safe = statistics.median(cpu_results["plain"]), statistics.median(cpu_results["safetynet"])
    pairs = " ".join(f"{s / p:.3f}" for p, s in zip(results["plain"], results["safetynet"]))
    print(f"plain     median {plain:8.1f} tasks/s  rounds: {figures(results['plain'])}")
    print(f"safetynet median {safe:8.1f} tasks/s  rounds: {figures(results['safetynet'])}")
    print(f"per-round ratios (safetynet/plain, wall): {pairs}")
    print(
        f"worker CPU: plain median {cpu_plain:.1f} tasks/CPU-s, safetynet median {cpu_safe:.1f} tasks/CPU-s, "
        f"ratio {cpu_safe / cpu_plain:.3f}; total {time.monotonic() - began:.1f}s"
    )
    print(f"plain_tps={plain:.1f} safetynet_tps={safe:.1f} ratio={safe / plain:.3f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
