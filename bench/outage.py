"""Outage: an upstream that is down for 30 s while two workers process a steady stream of tasks.

    .venv/bin/python bench/outage.py [--quick] [--rate R] [--before S] [--outage S] [--after S]
                                     [--systems safetynet,celery] [--checks N] [--keep]
                                     [--failure-rate F] [--window S] [--min-calls N]
                                     [--consecutive-failures N] [--open-seconds S] [--probes N]

The same stream (``--rate`` tasks/s, 10 by default) runs through each system in turn, on the
same set-up: ``--before`` seconds with the upstream up (10 s), ``--outage`` seconds with it
down (30 s), ``--after`` seconds up again (10 s); then the run waits until every task has
ended, succeeded or dead. ``--quick``: 5 + 10 + 5 s at 10 tasks/s, and 2,000 breaker checks.

- the upstream is an HTTP stub in this process (``_outage_upstream.py``): 200 after 10 ms
  while up, 503 at once while down; it records every request with its time;
- each task calls it once per attempt (``_outage_tasks.py``): ``safetynet_call`` through the
  breaker "partner" with ``RetryPolicy(max_attempts=6, Exponential(1, 2), jitter="full",
  max_delay=16)``; ``celery_call`` with ``autoretry_for`` + ``retry_backoff=True`` (jitter),
  ``retry_backoff_max=16``, ``max_retries=5``: six runs each at most, the same backoff;
- two prefork workers of 2 children per system, on a queue of the system's own, on a private
  ``redis-server`` (the broker, safetynet's ``REDIS_URL`` where the breaker lives, and the
  workers' records); a PostgreSQL database ``bench_outage_<pid>`` of the run's own for
  safetynet (dead letters, the durable schedule of its deferrals), dropped at the end unless
  ``--keep``.

Per system it prints the upstream calls made during the outage, the tasks dead (safetynet:
DeadLetter rows; Celery: tasks whose ``task_failure`` fired, retries exhausted), and the time
to drain: from the upstream's recovery to the last task ended (``drain_s``; it includes the
``--after`` seconds of stream) and to the last task *sent before the recovery* ended
(``backlog_s``). For safetynet it also splits the outage's calls by the breaker's cycles (from
the outage's start, or a half-open, to the next half-open) and compares the most calls in one
cycle with the bound: threshold + half_open_probes, where threshold = the failures it takes to
open (the smaller of ``consecutive_failures`` and what the failure rate needs given the
successes still in the window) + the calls already past the breaker in the other 3 worker
processes when it opens.

Then ``--checks`` breaker checks in this process against the private Redis: ``enter`` alone,
``enter`` + ``leave(ok=True)`` (what a task through a closed breaker pays), and a refusal.
Last line::

    safetynet_upstream_calls=… safetynet_dead=… celery_upstream_calls=… celery_dead=… breaker_check_ms=…

with ``breaker_check_ms`` the median of ``enter`` + ``leave``. The exit status is 1 when
safetynet dead-lettered a task, did not complete every task, or a cycle exceeded the bound.
"""

from __future__ import annotations

import argparse
import json
import logging
import math
import os
import shutil
import signal
import statistics
import sys
import tempfile
import time
import uuid
from dataclasses import dataclass, field
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

from _outage_processes import RedisServer, Worker  # noqa: E402
from _outage_upstream import Call, Upstream  # noqa: E402

SYSTEMS = ("safetynet", "celery")
WORKERS = 2
CONCURRENCY = 2
STARTUP_TIMEOUT = 90.0


@dataclass
class Run:
    """One system's run: when the outage was, what the upstream saw, what became of the tasks."""

    system: str
    sent: int = 0
    sent_before_recovery: int = 0
    went_down: float = 0.0
    came_back: float = 0.0
    stream_end: float = 0.0
    calls: list[Call] = field(default_factory=list)
    ok: dict[int, float] = field(default_factory=dict)
    dead: dict[int, float] = field(default_factory=dict)
    dead_rows: int | None = None
    dead_reasons: dict[str, int] = field(default_factory=dict)
    attempts: dict[int, int] = field(default_factory=dict)
    retries: int = 0
    deferrals: int = 0
    deferral_delays: list[float] = field(default_factory=list)
    refused: dict[str, int] = field(default_factory=dict)
    transitions: list[tuple[float, str]] = field(default_factory=list)
    drained: bool = False
    drain_s: float = math.nan
    backlog_s: float = math.nan
    wall_s: float = 0.0
    load: tuple[float, float] = (0.0, 0.0)
    notes: list[str] = field(default_factory=list)

    @property
    def outage_calls(self) -> list[Call]:
        return [call for call in self.calls if call.status == 503]

    @property
    def ended(self) -> int:
        return len(self.ok.keys() | self.dead.keys())


def breaker_fields(args: argparse.Namespace) -> dict:
    return {"failure_rate": args.failure_rate, "window": args.window, "min_calls": args.min_calls,
            "consecutive_failures": args.consecutive_failures or None, "open_seconds": args.open_seconds,
            "half_open_probes": args.probes}


def _read_records(run: Run, client) -> None:
    system = run.system
    run.ok = {int(n): at for n, at in client.zrange(f"outage:{system}:ok", 0, -1, withscores=True)}
    run.dead = {int(n): at for n, at in client.zrange(f"outage:{system}:dead", 0, -1, withscores=True)
                if n.lstrip("-").isdigit()}
    run.dead_reasons = {k: int(v) for k, v in client.hgetall(f"outage:{system}:dead_reasons").items()}
    run.attempts = {int(n): int(a) for n, a in client.hgetall(f"outage:{system}:attempts").items()}
    run.retries = int(client.get(f"outage:{system}:retry") or 0)
    if system == "safetynet":
        run.deferrals = int(client.get("outage:safetynet:snooze") or 0)
        run.deferral_delays = [float(d) for d in client.lrange("outage:safetynet:snooze_delays", 0, -1)]
        run.refused = {k: int(v) for k, v in client.hgetall("outage:safetynet:refused").items()}
        entries = [entry.split() for entry in client.lrange("outage:transitions", 0, -1)]
        run.transitions = sorted((float(at), state) for at, state in entries)


def run_system(system: str, args: argparse.Namespace, redis_server: RedisServer, work_dir: Path) -> Run:
    import _outage_tasks as tasks

    run = Run(system)
    log_dir = work_dir / system
    log_dir.mkdir()
    client = redis_server.client(socket_timeout=10, decode_responses=True)
    client.flushall()  # the server is the run's own: queues, breaker state and records start empty
    queue = f"outage.{args.run_id}.{system}"
    task = tasks.safetynet_call if system == "safetynet" else tasks.celery_call
    upstream = Upstream(latency=args.latency).start()
    env = {
        **os.environ,
        "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")])),
        "DJANGO_SETTINGS_MODULE": "_outage_settings",
        "SAFETYNET_OUTAGE_UPSTREAM": upstream.url,
    }
    workers = [Worker(f"{system}-{number}", queue, env, log_dir, CONCURRENCY) for number in range(1, WORKERS + 1)]
    began = time.monotonic()
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready(STARTUP_TIMEOUT)
        total = int(round(args.rate * (args.before + args.outage + args.after)))
        print(f"[{system}] workers ready; {total} tasks at {args.rate:g}/s to {queue}: upstream up "
              f"{args.before:g}s, down {args.outage:g}s, up again {args.after:g}s", flush=True)
        load_before = os.getloadavg()[0]
        t0 = time.time() + 0.2
        down_at, up_at = t0 + args.before, t0 + args.before + args.outage
        last_report = time.monotonic()

        def toggles(now: float) -> None:
            if not run.went_down and now >= down_at:
                run.went_down = upstream.set_down(True)
                print(f"[{system}] upstream down at +{run.went_down - t0:.1f}s", flush=True)
            if run.went_down and not run.came_back and now >= up_at:
                run.came_back = upstream.set_down(False)
                run.sent_before_recovery = run.sent
                print(f"[{system}] upstream up again at +{run.came_back - t0:.1f}s "
                      f"({run.sent} tasks sent so far)", flush=True)

        def progress(label: str) -> None:
            ended = client.zcard(f"outage:{system}:ok") + client.zcard(f"outage:{system}:dead")
            calls = upstream.snapshot()
            down = sum(1 for call in calls if call.status == 503)
            print(f"[{system}] {label}: sent {run.sent}, ended {ended}, upstream calls {len(calls)} "
                  f"({down} during the outage)", flush=True)

        for n in range(total):
            due = t0 + n / args.rate
            while True:
                now = time.time()
                toggles(now)
                if now >= due:
                    break
                pending = [at for at in (down_at, up_at) if at > now]
                time.sleep(max(0.0, min([due, *pending]) - now))
            task.apply_async(kwargs={"n": n}, queue=queue)
            run.sent += 1
            if time.monotonic() - last_report >= 5:
                last_report = time.monotonic()
                progress(f"+{time.time() - t0:.0f}s")
        while not run.came_back:  # --after 0: the stream ended with the outage
            toggles(time.time())
            time.sleep(0.01)
        run.stream_end = time.time()

        last_ended, last_progress = -1, time.monotonic()
        while True:
            ended = client.zcard(f"outage:{system}:ok") + client.zcard(f"outage:{system}:dead")
            now = time.monotonic()
            if ended > last_ended:
                last_ended, last_progress = ended, now
            if ended >= total:
                run.drained = True
                break
            if now - last_progress > args.stall_seconds or time.time() - run.stream_end > args.drain_cap:
                run.notes.append(f"gave up waiting: {total - ended} tasks had not ended "
                                 f"{time.time() - run.stream_end:.0f}s after the stream ended")
                break
            dead_workers = [worker.name for worker in workers if not worker.alive()]
            if dead_workers:
                run.notes.append(f"worker(s) exited: {', '.join(dead_workers)}")
                break
            if now - last_report >= 5:
                last_report = now
                progress("draining")
            time.sleep(0.2)
        run.load = (load_before, os.getloadavg()[0])
    finally:
        for worker in workers:
            worker.stop()
        upstream.stop()
    run.wall_s = time.monotonic() - began
    run.calls = upstream.snapshot()
    _read_records(run, client)
    if run.ok.keys() & run.dead.keys():
        run.notes.append(f"{len(run.ok.keys() & run.dead.keys())} task(s) both succeeded and died")
    finished = {**run.dead, **run.ok}
    if finished and run.came_back:
        run.drain_s = max(finished.values()) - run.came_back
        backlog = [at for n, at in finished.items() if n < run.sent_before_recovery]
        run.backlog_s = max(backlog) - run.came_back if backlog else 0.0
    if system == "safetynet":
        from safetynet.models import DeadLetter

        rows = DeadLetter.objects.filter(task_name=tasks.SAFETYNET_TASK)
        run.dead_rows = rows.count()
        reasons: dict[str, int] = {}
        for reason in rows.values_list("reason", flat=True):
            reasons[reason] = reasons.get(reason, 0) + 1
        if reasons != run.dead_reasons:
            run.notes.append(f"dead letters by reason in the database {reasons} vs task_dead signals "
                             f"{run.dead_reasons}")
    if not args.keep:
        shutil.rmtree(log_dir, ignore_errors=True)
    return run


@dataclass
class Cycles:
    """The safetynet outage's calls split by the breaker's cycles, and the bound."""

    counts: list[int]
    starts: list[float]
    opens: int
    consecutive_rule: int | None
    rate_rule: int | None
    successes_in_window: int
    in_flight: int
    threshold: int
    bound: int


def cycles_of(run: Run, args: argparse.Namespace) -> Cycles:
    """Cycles: from the outage's start, or a half-open, to the next half-open (or the recovery).

    The first holds the failures that opened the breaker and the calls already past it in the
    other worker processes; each later one the probe(s) of one half-open.
    """
    half_opens = [at for at, state in run.transitions if state == "half_open" and run.went_down <= at < run.came_back]
    opens = sum(1 for at, state in run.transitions if state == "open" and run.went_down <= at <= run.came_back)
    starts = [run.went_down, *half_opens]
    ends = [*half_opens, run.came_back + 1e-9]
    calls = run.outage_calls
    counts = [sum(1 for call in calls if start <= call.at < end) for start, end in zip(starts, ends, strict=True)]
    # The failure rate over the window needs, with S successes still in it, F failures with
    # F >= rate * (S + F) and S + F >= min_calls. S is counted over a window and one bucket
    # (the window is kept in 12 buckets; the oldest leaves whole), so this is an upper bound.
    span = args.window * 13 / 12
    successes = sum(1 for call in run.calls if call.status == 200 and run.went_down - span <= call.at < run.went_down)
    if args.failure_rate >= 1:
        rate_rule = None if successes else args.min_calls
    else:
        rate_rule = max(1, math.ceil(args.failure_rate * successes / (1 - args.failure_rate) - 1e-9),
                        args.min_calls - successes)
    consecutive = args.consecutive_failures or None
    rules = [rule for rule in (consecutive, rate_rule) if rule is not None]
    in_flight = WORKERS * CONCURRENCY - 1
    threshold = (min(rules) if rules else 10**9) + in_flight
    return Cycles(counts, starts, opens, consecutive, rate_rule, successes, in_flight, threshold,
                  threshold + args.probes)


def _quantiles(values: list[float]) -> tuple[float, float]:
    ordered = sorted(values)
    return statistics.median(ordered), ordered[min(len(ordered) - 1, math.ceil(0.95 * len(ordered)) - 1)]


def measure_breaker_check(count: int) -> dict[str, tuple[float, float, int]]:
    """Median and p95 (ms), and how many, of ``enter``, ``enter`` + ``leave(ok=True)`` and a refusal."""
    import _outage_tasks as tasks
    from safetynet import breakers
    from safetynet import signals as safetynet_signals

    # This process imported the tasks module: its receivers write records to Redis. Not timed.
    safetynet_signals.breaker_changed.disconnect(tasks.record_breaker_change)
    safetynet_signals.breaker_refused.disconnect(tasks.record_refusal)
    logging.getLogger("safetynet").setLevel(logging.ERROR)  # force() logs each change by hand
    name = tasks.BREAKER
    timings: dict[str, list[float]] = {"enter": [], "enter+leave": [], "refused": []}
    breakers.force(name, "closed")
    for _ in range(200):  # warm up: the scripts are loaded, the connection made
        breakers.leave(breakers.enter(name), ok=True)
    clock = time.perf_counter
    for _ in range(count):
        began = clock()
        ticket = breakers.enter(name)
        timings["enter"].append(clock() - began)
        began = clock()
        breakers.leave(breakers.enter(name), ok=True)
        timings["enter+leave"].append(clock() - began)
        del ticket
    breakers.force(name, "open", seconds=3600)
    for _ in range(min(count, 2000)):
        began = clock()
        try:
            breakers.enter(name)
        except breakers.BreakerOpen:
            pass
        timings["refused"].append(clock() - began)
    breakers.force(name, "closed")
    return {kind: (*(v * 1000 for v in _quantiles(values)), len(values)) for kind, values in timings.items()}


def _row(label: str, values: list[object]) -> str:
    return f"{label:<44}" + "".join(f"{value!s:>20}" for value in values)


def _seconds(value: float) -> str:
    return "-" if math.isnan(value) else f"{value:.1f}"


def _backlog(run: Run) -> list[float]:
    """When each task still waiting at the recovery (sent before it, not ended) ended, from the recovery."""
    finished = {**run.dead, **run.ok}
    return sorted(at - run.came_back for n, at in finished.items()
                  if n < run.sent_before_recovery and at > run.came_back)


def _spread(run: Run) -> str:
    ended = _backlog(run)
    if not ended:
        return "-"
    picks = [ended[min(len(ended) - 1, math.ceil(share * len(ended)) - 1)] for share in (0.5, 0.9, 0.99)]
    return ", ".join(f"{value:.1f}" for value in picks)


def report(runs: list[Run], args: argparse.Namespace, checks: dict[str, tuple[float, float, int]]) -> int:
    print()
    fields = breaker_fields(args)
    print(f"stream {args.rate:g} tasks/s: upstream up {args.before:g}s, down {args.outage:g}s (503 at once), "
          f"up {args.after:g}s (200 after {args.latency * 1000:g} ms); {WORKERS} prefork workers x "
          f"{CONCURRENCY} per system")
    print("breaker 'partner': " + ", ".join(f"{k}={v}" for k, v in fields.items()))
    print("both: at most 6 runs per task, backoff 1, 2, 4, 8, 16 s with full jitter")
    print()
    print(_row("", [run.system for run in runs]))
    lines = [
        ("tasks sent", lambda r: r.sent),
        ("  of which before the recovery", lambda r: r.sent_before_recovery),
        ("succeeded", lambda r: len(r.ok)),
        ("dead", lambda r: r.dead_rows if r.dead_rows is not None else len(r.dead)),
        ("  by reason", lambda r: ", ".join(f"{k}:{v}" for k, v in sorted(r.dead_reasons.items())) or "-"),
        ("not ended", lambda r: r.sent - r.ended),
        ("upstream calls, all", lambda r: len(r.calls)),
        ("upstream calls during the outage", lambda r: len(r.outage_calls)),
        ("  per second of outage", lambda r: f"{len(r.outage_calls) / max(1e-9, r.came_back - r.went_down):.2f}"),
        ("retries (an attempt used)", lambda r: r.retries),
        ("deferrals by the breaker (no attempt)", lambda r: r.deferrals if r.system == "safetynet" else "-"),
        ("most runs of a task that succeeded", lambda r: max(r.attempts.values(), default=0)),
        ("drain_s (recovery -> last task ended)", lambda r: _seconds(r.drain_s)),
        ("backlog_s (recovery -> last sent before)", lambda r: _seconds(r.backlog_s)),
        ("tasks waiting at the recovery", lambda r: len(_backlog(r))),
        ("  ended 50%, 90%, 99% by (s after it)", _spread),
        ("wall time (s)", lambda r: f"{r.wall_s:.1f}"),
        ("load average (1 min) before, after", lambda r: f"{r.load[0]:.2f}, {r.load[1]:.2f}"),
    ]
    for label, value in lines:
        print(_row(label, [value(run) for run in runs]))
    failed = []
    for run in runs:
        if run.system != "safetynet":
            continue
        print()
        cycles = cycles_of(run, args)
        rules = []
        if cycles.consecutive_rule is not None:
            rules.append(f"{cycles.consecutive_rule} consecutive failures")
        rules.append(f"{cycles.rate_rule if cycles.rate_rule is not None else 'no'} failures for the rate "
                     f"({cycles.successes_in_window} successes in the last {args.window:g}s before the outage)")
        print(f"safetynet: threshold = {cycles.threshold} = the smaller of {' and '.join(rules)}, + "
              f"{cycles.in_flight} calls already past the breaker in the other worker processes; "
              f"bound per cycle = threshold + {args.probes} probe(s) = {cycles.bound}")
        print(f"safetynet: {len(cycles.counts)} cycle(s) during the outage ({cycles.opens} opening(s)); calls per "
              f"cycle: {', '.join(map(str, cycles.counts))}; most {max(cycles.counts, default=0)} (bound "
              f"{cycles.bound}); all {sum(cycles.counts)} (bound {len(cycles.counts)} x {cycles.bound} = "
              f"{len(cycles.counts) * cycles.bound})")
        times = ", ".join(f"{state}@+{at - run.went_down:.2f}" for at, state in run.transitions)
        print(f"safetynet: breaker changes (s from the outage's start): {times or 'none'}")
        closed = [at for at, state in run.transitions if state == "closed" and at >= run.came_back]
        if closed:
            print(f"safetynet: it closed {closed[0] - run.came_back:.2f}s after the recovery, at the first probe "
                  f"after it (0 to open_seconds={args.open_seconds:g}s later, by where the recovery falls in the "
                  f"cycle)")
        if run.deferral_delays:
            median, p95 = _quantiles(run.deferral_delays)
            print(f"safetynet: deferral delays: median {median:.2f}s, p95 {p95:.2f}s, max "
                  f"{max(run.deferral_delays):.2f}s; refusals by state: "
                  + ", ".join(f"{k}={v}" for k, v in sorted(run.refused.items())))
        if max(cycles.counts, default=0) > cycles.bound:
            worst = max(range(len(cycles.counts)), key=cycles.counts.__getitem__)
            print(f"safetynet: EXCEEDED: cycle {worst} (from +{cycles.starts[worst] - run.went_down:.2f}s) made "
                  f"{cycles.counts[worst]} calls, over the bound {cycles.bound}")
            failed.append("a cycle exceeded the bound")
        if run.dead_rows:
            failed.append(f"{run.dead_rows} task(s) dead-lettered")
        if len(run.ok) != run.sent:
            failed.append(f"{run.sent - len(run.ok)} task(s) did not succeed")
    for run in runs:
        for note in run.notes:
            print(f"note ({run.system}): {note}")
    print()
    for kind, (median, p95, calls) in checks.items():
        print(f"breaker check ({kind}, Redis, in-process, {calls} calls): median {median:.3f} ms, "
              f"p95 {p95:.3f} ms")
    print(f"breaker_check_ms below: the median of enter + leave(ok=True), what a task through a closed breaker "
          f"pays (load average {os.getloadavg()[0]:.2f} on {os.cpu_count()} CPUs)")
    if failed:
        print("safetynet FAILED: " + "; ".join(failed))
    by_system = {run.system: run for run in runs}

    def figure(system: str, what: str) -> str:
        run = by_system.get(system)
        if run is None:
            return "-"
        if what == "calls":
            return str(len(run.outage_calls))
        return str(run.dead_rows if run.dead_rows is not None else len(run.dead))

    print()
    print(f"safetynet_upstream_calls={figure('safetynet', 'calls')} safetynet_dead={figure('safetynet', 'dead')} "
          f"celery_upstream_calls={figure('celery', 'calls')} celery_dead={figure('celery', 'dead')} "
          f"breaker_check_ms={checks['enter+leave'][0]:.3f}", flush=True)
    return 1 if failed else 0


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
    parser.add_argument("--quick", action="store_true", help="5 s up, 10 s down, 5 s up; 2,000 breaker checks")
    parser.add_argument("--rate", type=float, default=10.0, help="tasks sent per second (10)")
    parser.add_argument("--before", type=float, help="seconds of stream before the outage (10; 5 quick)")
    parser.add_argument("--outage", type=float, help="seconds the upstream is down (30; 10 quick)")
    parser.add_argument("--after", type=float, help="seconds of stream after the recovery (10; 5 quick)")
    parser.add_argument("--latency", type=float, default=0.01, help="seconds the upstream takes while up (0.01)")
    parser.add_argument("--systems", default=",".join(SYSTEMS), help="which systems, in this order (both)")
    parser.add_argument("--checks", type=int, help="breaker checks timed (5000; 2000 quick)")
    parser.add_argument("--failure-rate", type=float, default=0.5, help="the breaker's failure_rate (0.5)")
    parser.add_argument("--window", type=float, default=10.0, help="the breaker's window, s (10)")
    parser.add_argument("--min-calls", type=int, default=10, help="the breaker's min_calls (10)")
    parser.add_argument("--consecutive-failures", type=int, default=5,
                        help="the breaker's consecutive_failures (5; 0: None, the rate only)")
    parser.add_argument("--open-seconds", type=float, default=5.0, help="the breaker's open_seconds (5)")
    parser.add_argument("--probes", type=int, default=1, help="the breaker's half_open_probes (1)")
    parser.add_argument("--stall-seconds", type=float, default=90.0,
                        help="give up waiting after this long without a task ending (90)")
    parser.add_argument("--drain-cap", type=float, default=300.0,
                        help="give up waiting this long after the stream ended (300)")
    parser.add_argument("--keep", action="store_true", help="keep the database and the worker logs")
    args = parser.parse_args(argv)
    args.run_id = uuid.uuid4().hex[:8]
    for name, full, quick in (("before", 10.0, 5.0), ("outage", 30.0, 10.0), ("after", 10.0, 5.0),
                              ("checks", 5000, 2000)):
        if getattr(args, name) is None:
            setattr(args, name, quick if args.quick else full)
    systems = [name.strip() for name in args.systems.split(",") if name.strip()]
    if not systems or any(name not in SYSTEMS for name in systems) or len(set(systems)) != len(systems):
        parser.error(f"--systems takes {', '.join(SYSTEMS)}, each once")
    if args.rate <= 0 or args.outage <= 0 or args.before < 0 or args.after < 0:
        parser.error("--rate and --outage must be > 0, --before and --after >= 0")

    def terminate(signum, frame):  # run the clean-up below on SIGTERM too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    work_dir = Path(tempfile.mkdtemp(prefix="safetynet-outage-"))
    redis_server = RedisServer(work_dir, durable=False)
    database = f"bench_outage_{os.getpid()}"
    created = False
    began = time.monotonic()
    try:
        redis_server.start()
        os.environ["SAFETYNET_OUTAGE_REDIS"] = redis_server.url
        os.environ["SAFETYNET_OUTAGE_DB"] = database
        os.environ["SAFETYNET_OUTAGE_SPOOL"] = str(work_dir / "spool")
        os.environ["SAFETYNET_OUTAGE_BREAKER"] = json.dumps(breaker_fields(args))
        os.environ["DJANGO_SETTINGS_MODULE"] = "_outage_settings"
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
        runs = [run_system(system, args, redis_server, work_dir) for system in systems]
        checks = measure_breaker_check(args.checks)
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
