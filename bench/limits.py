"""Limits: 2,000 calls to an upstream that allows 3 at once and 50 a second, from 2 workers x 2 processes.

    .venv/bin/python bench/limits.py [--quick] [--tasks N] [--rounds R] [--concurrency C] [--rate N/s]
                                     [--latency S] [--systems safetynet,celery] [--checks N] [--keep]

The same tasks run through each system in turn, alternating over ``--rounds`` rounds (2; 1 with
``--quick``), on the same set-up:

- the upstream is an HTTP stub in this process (``_limits_upstream.py``): every call takes
  ``--latency`` seconds (0.02) and is recorded with its start, its end and how many calls were
  in progress when it started;
- ``safetynet``: ``@safetynet.task(limit="partner")`` with ``SAFETYNET["LIMITS"] = {"partner":
  {"concurrency": 3, "rate": "50/s"}}``: shared by every worker (Redis), a task over the limit
  deferred until its turn (no worker slot held, no attempt used);
- ``celery``: ``@shared_task(rate_limit="50/s")``, Celery's own limit (per worker: two workers
  let twice the rate through; it has no concurrency limit);
- two prefork workers of 2 processes per system, on a queue of the system's own, on a private
  ``redis-server`` (broker, safetynet's ``REDIS_URL``, the workers' records) and a PostgreSQL
  database ``bench_limits_<pid>`` of the run's own (dead letters, the durable schedule of long
  deferrals), dropped at the end unless ``--keep``.

Each round puts every task in the queue (``--tasks``, 2,000; 300 with ``--quick``) before it starts
the workers, so they face the whole backlog at once, then waits until each has ended. Per system and
round it reports, from the stub's records:

- ``max_concurrent``: the most calls in progress at once;
- ``max_per_second``: the most calls started in any one-second window (sliding: from each call's
  start, not calendar seconds);
- ``throughput``: calls / (last call's end - first call's start), and ``throughput_vs_limit``:
  that over what the limit allows, min(rate, concurrency / mean call time);
- ``lost``: tasks sent that neither succeeded nor were dead-lettered; ``dead``: dead letters.

Then ``--checks`` limit checks in this process against the private Redis (a limit wide enough
never to refuse): ``acquire`` alone (one script, one round trip) and ``acquire`` + ``release``.
Last line (the worst round for each figure; ``celery_max_per_second`` is Celery's worst)::

    max_concurrent=… max_per_second=… throughput_vs_limit=… lost=… dead=… celery_max_per_second=… check_ms_p50=…

The exit status is 1 when safetynet went over the limit, lost or dead-lettered a task, or fell
under 0.9 of the limit's throughput.
"""

from __future__ import annotations

import argparse
import bisect
import json
import logging
import math
import os
import shutil
import signal
import statistics
import subprocess
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _chaos_processes import RedisServer, stop_worker, tail  # noqa: E402
from _limits_upstream import Call, Upstream  # noqa: E402

SYSTEMS = ("safetynet", "celery")
WORKERS = 2
PROCESSES = 2
STARTUP_TIMEOUT = 90.0


class Worker:
    """A prefork ``celery worker`` on one system's queue, in a session of its own."""

    def __init__(self, name: str, queue: str, env: dict[str, str], log_dir: Path) -> None:
        self.name = name
        self.ready_dir = log_dir / f"ready-{name}"
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**env, "SAFETYNET_LIMITS_READY_DIR": str(self.ready_dir)}
        self.command = [
            sys.executable, "-m", "celery", "-A", "_limits_tasks", "worker", "-Q", queue, "-n", f"{name}@%h",
            "--pool=prefork", f"--concurrency={PROCESSES}", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "warning",
        ]
        self.log = log_dir / f"{name}.log"
        self.process: subprocess.Popen | None = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=str(HERE), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.process is not None and (self.ready_dir / f"ready.{self.process.pid}").exists()):
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready after {timeout}s:\n{tail(self.log)}")
            time.sleep(0.1)

    def alive(self) -> bool:
        return self.process is not None and self.process.poll() is None

    def stop(self) -> None:
        stop_worker(self.process, 15.0)


@dataclass
class Run:
    """One system's round: what the upstream saw and what became of the tasks."""

    system: str
    round: int
    sent: int = 0
    calls: list[Call] = field(default_factory=list)
    ok: set[int] = field(default_factory=set)
    dead: set[int] = field(default_factory=set)
    dead_rows: int | None = None
    deferrals: int = 0
    waits: list[float] = field(default_factory=list)
    reasons: dict[str, int] = field(default_factory=dict)
    wall_s: float = 0.0
    notes: list[str] = field(default_factory=list)

    @property
    def max_concurrent(self) -> int:
        return max((call.concurrent for call in self.calls), default=0)

    @property
    def max_per_second(self) -> int:
        starts = sorted(call.start for call in self.calls)
        return max((bisect.bisect_left(starts, start + 1.0) - index for index, start in enumerate(starts)), default=0)

    @property
    def throughput(self) -> float:
        if len(self.calls) < 2:
            return math.nan
        span = max(call.end for call in self.calls) - min(call.start for call in self.calls)
        return len(self.calls) / span if span > 0 else math.nan

    @property
    def mean_call_s(self) -> float:
        return statistics.fmean(call.end - call.start for call in self.calls) if self.calls else math.nan

    @property
    def lost(self) -> int:
        return self.sent - len(self.ok | self.dead)

    @property
    def duplicates(self) -> int:
        return len(self.calls) - len({call.n for call in self.calls})


def limit_fields(args: argparse.Namespace) -> dict:
    return {"concurrency": args.concurrency, "rate": args.rate}


def limit_throughput(args: argparse.Namespace, mean_call_s: float) -> float:
    """What the limit lets through: min(rate, concurrency / mean call time), calls per second."""
    from safetynet.core.limits import parse_rate

    count, interval = parse_rate(args.rate)
    return min(count / interval, args.concurrency / mean_call_s) if mean_call_s > 0 else count / interval


def run_system(system: str, number: int, args: argparse.Namespace, redis_server: RedisServer, work_dir: Path) -> Run:
    import _limits_tasks as tasks

    run = Run(system, number)
    log_dir = work_dir / f"{system}-{number}"
    log_dir.mkdir()
    client = redis_server.client(socket_timeout=10, decode_responses=True)
    client.flushall()  # the server is the run's own: queues, limit state and records start empty
    if system == "safetynet":
        from safetynet.models import DeadLetter, ScheduledMessage

        DeadLetter.objects.all().delete()
        ScheduledMessage.objects.all().delete()
    queue = f"limits.{args.run_id}.{system}.{number}"
    task = tasks.safetynet_call if system == "safetynet" else tasks.celery_call
    upstream = Upstream(latency=args.latency).start()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "DJANGO_SETTINGS_MODULE": "_limits_settings",
        "SAFETYNET_LIMITS_UPSTREAM": upstream.url,
        "SAFETYNET_LIMITS_CELERY_RATE": args.rate,
    }
    workers = [Worker(f"{system}-{number}-{index}", queue, env, log_dir) for index in range(1, WORKERS + 1)]
    began = time.monotonic()
    try:
        # Every task is in the queue before a worker starts: a backlog of --tasks, whatever the speed of sending.
        for n in range(args.tasks):
            task.apply_async(kwargs={"n": n}, queue=queue)
            run.sent += 1
        print(f"[{system} {number}] {run.sent} tasks sent to {queue} in {time.monotonic() - began:.1f}s; "
              "starting the workers", flush=True)
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(STARTUP_TIMEOUT)
        last_ended, last_progress, last_report = -1, time.monotonic(), time.monotonic()
        while True:
            ended = client.zcard(f"limits:{system}:ok") + client.zcard(f"limits:{system}:dead")
            now = time.monotonic()
            if ended > last_ended:
                last_ended, last_progress = ended, now
            if ended >= run.sent:
                break
            if now - last_progress > args.stall_seconds:
                run.notes.append(f"gave up waiting: {run.sent - ended} tasks had not ended after "
                                 f"{args.stall_seconds:g}s without progress")
                break
            dead_workers = [worker.name for worker in workers if not worker.alive()]
            if dead_workers:
                run.notes.append(f"worker(s) exited: {', '.join(dead_workers)}")
                break
            if now - last_report >= 5:
                last_report = now
                print(f"[{system} {number}] +{now - began:.0f}s: ended {ended}, upstream calls "
                      f"{len(upstream.snapshot())}", flush=True)
            time.sleep(0.2)
    finally:
        for worker in workers:
            worker.stop()
        upstream.stop()
    run.wall_s = time.monotonic() - began
    run.calls = [call for call in upstream.snapshot() if call.system == system]
    run.ok = {int(n) for n in client.zrange(f"limits:{system}:ok", 0, -1)}
    run.dead = {int(n) for n in client.zrange(f"limits:{system}:dead", 0, -1) if n.lstrip("-").isdigit()}
    if system == "safetynet":
        from safetynet.models import DeadLetter

        run.dead_rows = DeadLetter.objects.filter(task_name=tasks.SAFETYNET_TASK).count()
        run.deferrals = int(client.get("limits:safetynet:snooze") or 0)
        run.waits = [float(wait) for wait in client.lrange("limits:safetynet:waits", 0, -1)]
        run.reasons = {key: int(value) for key, value in client.hgetall("limits:safetynet:reasons").items()}
        retries = int(client.get("limits:safetynet:retry") or 0)
        if retries:
            run.notes.append(f"{retries} retries (an attempt used): the upstream failed")
    if not args.keep:
        shutil.rmtree(log_dir, ignore_errors=True)
    return run


def measure_checks(count: int) -> dict[str, tuple[float, float, int]]:
    """Median and p95 (ms), and how many, of ``acquire`` and ``acquire`` + ``release`` on the limit "check"."""
    from safetynet import limits

    logging.getLogger("safetynet").setLevel(logging.ERROR)
    timings: dict[str, list[float]] = {"acquire": [], "acquire+release": []}
    for _ in range(200):  # warm up: the scripts are loaded, the connection made
        limits.release(limits.acquire([("check", "")]))
    clock = time.perf_counter
    for _ in range(count):
        began = clock()
        ticket = limits.acquire([("check", "")])
        timings["acquire"].append(clock() - began)
        limits.release(ticket)
        began = clock()
        limits.release(limits.acquire([("check", "")]))
        timings["acquire+release"].append(clock() - began)
    result = {}
    for kind, values in timings.items():
        ordered = sorted(values)
        result[kind] = (statistics.median(ordered) * 1000,
                        ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)] * 1000, len(ordered))
    return result


def _row(label: str, values: list[object]) -> str:
    return f"{label:<46}" + "".join(f"{value!s:>16}" for value in values)


def report(runs: list[Run], args: argparse.Namespace, checks: dict[str, tuple[float, float, int]]) -> int:
    print()
    print(f"{args.tasks} tasks per round, all queued before the workers start; upstream call "
          f"{args.latency * 1000:g} ms; "
          f"{WORKERS} prefork workers x {PROCESSES} processes per system")
    print(f"safetynet: limit 'partner' = {json.dumps(limit_fields(args))} (shared); celery: rate_limit="
          f"{args.rate!r} (per worker)")
    print()
    print(_row("", [f"{run.system} {run.round}" for run in runs]))
    lines = [
        ("tasks sent", lambda r: r.sent),
        ("succeeded", lambda r: len(r.ok)),
        ("dead", lambda r: r.dead_rows if r.dead_rows is not None else len(r.dead)),
        ("lost (neither succeeded nor dead)", lambda r: r.lost),
        ("upstream calls", lambda r: len(r.calls)),
        ("  a task's second call", lambda r: r.duplicates),
        ("max_concurrent", lambda r: r.max_concurrent),
        ("max_per_second (any 1 s window)", lambda r: r.max_per_second),
        ("mean call (ms)", lambda r: f"{r.mean_call_s * 1000:.1f}"),
        ("throughput (calls/s)", lambda r: f"{r.throughput:.1f}"),
        ("throughput_vs_limit", lambda r: f"{r.throughput / limit_throughput(args, r.mean_call_s):.3f}"),
        ("deferrals (no attempt used)", lambda r: r.deferrals if r.system == "safetynet" else "-"),
        ("  per task", lambda r: f"{r.deferrals / max(1, r.sent):.2f}" if r.system == "safetynet" else "-"),
        ("  wait median / max (s)", lambda r: f"{statistics.median(r.waits):.2f} / {max(r.waits):.1f}"
         if r.waits else "-"),
        ("wall time (s)", lambda r: f"{r.wall_s:.1f}"),
    ]
    for label, value in lines:
        print(_row(label, [value(run) for run in runs]))
    for run in runs:
        if run.reasons:
            print(f"{run.system} {run.round}: deferrals by reason: "
                  + ", ".join(f"{key}={value}" for key, value in sorted(run.reasons.items())))
        for note in run.notes:
            print(f"note ({run.system} {run.round}): {note}")
    print()
    for kind, (median, p95, calls) in checks.items():
        print(f"limit check ({kind}, Redis, in-process, {calls} calls): median {median:.3f} ms, p95 {p95:.3f} ms")
    print(f"(load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    ours = [run for run in runs if run.system == "safetynet"]
    theirs = [run for run in runs if run.system == "celery"]
    failed = []
    figures = {}
    if ours:
        figures = {
            "max_concurrent": max(run.max_concurrent for run in ours),
            "max_per_second": max(run.max_per_second for run in ours),
            "throughput_vs_limit": min(run.throughput / limit_throughput(args, run.mean_call_s) for run in ours),
            "lost": sum(run.lost for run in ours),
            "dead": sum(run.dead_rows or 0 for run in ours),
        }
        count, interval = _rate(args)
        per_second = count / interval
        if figures["max_concurrent"] > args.concurrency:
            failed.append(f"{figures['max_concurrent']} calls at once, over {args.concurrency}")
        if figures["max_per_second"] > per_second:
            failed.append(f"{figures['max_per_second']} calls in one second, over {per_second:g}")
        if not figures["throughput_vs_limit"] >= 0.9:
            failed.append(f"throughput {figures['throughput_vs_limit']:.3f} of the limit, under 0.9")
        if figures["lost"] or figures["dead"]:
            failed.append(f"{figures['lost']} lost, {figures['dead']} dead")
    if failed:
        print("safetynet FAILED: " + "; ".join(failed))
    print()
    celery_figure = str(max(run.max_per_second for run in theirs)) if theirs else "-"
    shown = {key: (f"{value:.3f}" if isinstance(value, float) else str(value)) for key, value in figures.items()}
    print(f"max_concurrent={shown.get('max_concurrent', '-')} max_per_second={shown.get('max_per_second', '-')} "
          f"throughput_vs_limit={shown.get('throughput_vs_limit', '-')} lost={shown.get('lost', '-')} "
          f"dead={shown.get('dead', '-')} celery_max_per_second={celery_figure} "
          f"check_ms_p50={checks['acquire'][0]:.3f}", flush=True)
    return 1 if failed else 0


def _rate(args: argparse.Namespace) -> tuple[int, float]:
    from safetynet.core.limits import parse_rate

    return parse_rate(args.rate)


def _drop_database(name: str) -> None:
    import psycopg
    from django.db import connections
    from psycopg import sql

    from _postgres import DB_HOST, DB_PORT, DB_USER

    connections.close_all()
    with psycopg.connect(host=DB_HOST, port=DB_PORT, user=DB_USER, dbname="postgres", autocommit=True) as conn:
        conn.execute(sql.SQL("DROP DATABASE IF EXISTS {} WITH (FORCE)").format(sql.Identifier(name)))


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="300 tasks, 1 round, 2,000 checks")
    parser.add_argument("--tasks", type=int, help="tasks per round and system (2000; 300 quick)")
    parser.add_argument("--rounds", type=int, help="rounds, each system once per round, alternating (2; 1 quick)")
    parser.add_argument("--concurrency", type=int, default=3, help="the limit's concurrency (3)")
    parser.add_argument("--rate", default="50/s", help="the limit's rate, and Celery's rate_limit (50/s)")
    parser.add_argument("--latency", type=float, default=0.02, help="seconds each upstream call takes (0.02)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which systems, in this order (both)")
    parser.add_argument("--checks", type=int, help="limit checks timed (5000; 2000 quick)")
    parser.add_argument("--stall-seconds", type=float, default=90.0,
                        help="give up waiting after this long without a task ending (90)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the worker logs")
    args = parser.parse_args(argv)
    args.run_id = uuid.uuid4().hex[:8]
    for name, full, quick in (("tasks", 2000, 300), ("rounds", 2, 1), ("checks", 5000, 2000)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if not systems or any(name not in SYSTEMS for name in systems) or len(set(systems)) != len(systems):
        parser.error(f"--systems takes {', '.join(SYSTEMS)}, each once")
    if args.tasks < 2 or args.rounds < 1 or args.concurrency < 1 or args.latency < 0:
        parser.error("--tasks must be >= 2, --rounds and --concurrency >= 1, --latency >= 0")
    try:
        _rate(args)
    except ValueError as error:
        parser.error(str(error))

    def terminate(signum, frame):  # run the clean-up below on SIGTERM too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    work_dir = Path(tempfile.mkdtemp(prefix="safetynet-limits-"))
    redis_server = RedisServer(work_dir, durable=False)
    database = f"bench_limits_{os.getpid()}"
    created = False
    began = time.monotonic()
    try:
        redis_server.start()
        os.environ["SAFETYNET_LIMITS_REDIS"] = redis_server.url
        os.environ["SAFETYNET_LIMITS_DB"] = database
        os.environ["SAFETYNET_LIMITS_SPOOL"] = str(work_dir / "spool")
        os.environ["SAFETYNET_LIMITS_LIMIT"] = json.dumps(limit_fields(args))
        os.environ["DJANGO_SETTINGS_MODULE"] = "_limits_settings"
        from _postgres import ensure_database

        created = ensure_database(database)
        import celery
        import django

        django.setup()
        from django.core.management import call_command

        import safetynet

        call_command("migrate", verbosity=0)
        print(f"safetynet {safetynet.__version__}, celery {celery.__version__}, django {django.__version__}; "
              f"redis {redis_server.url} (private); database {database}; logs {work_dir}", flush=True)
        runs = []
        for number in range(1, args.rounds + 1):
            order = systems if number % 2 else list(reversed(systems))  # alternating: neither always goes first
            for system in order:
                runs.append(run_system(system, number, args, redis_server, work_dir))
        checks = measure_checks(args.checks)
        status = report(runs, args, checks)
        print(f"(whole run {time.monotonic() - began:.0f}s)", file=sys.stderr)
        return status
    finally:
        redis_server.stop()
        if created and not args.keep:
            try:
                _drop_database(database)
            except Exception as error:  # noqa: BLE001
                print(f"could not drop the database {database}: {error!r}", file=sys.stderr)
        if args.keep:
            print(f"logs kept in {work_dir}; database {database} kept", file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
