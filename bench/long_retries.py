"""Long retries: worker memory and duplicate runs, safetynet's durable schedule against Celery's ETA messages.

    .venv/bin/python bench/long_retries.py [--quick] [--tasks N] [--duplicate-tasks M] [--warmup W]
                                           [--delay SECONDS] [--hold SECONDS] [--visibility-timeout SECONDS]
                                           [--memory-visibility-timeout SECONDS] [--rounds R] [--keep]

The same task runs as a safetynet task and as a plain Celery task (``_long_retries_tasks.py``):
its first attempt calls ``self.retry(countdown=delay)``, its second one just runs, and every
execution writes a row to a table of the benchmark's own. A Celery retry with a countdown is an
ETA message that a worker fetches at once and holds in memory until it is due; on Redis, a
message held longer than the broker's ``visibility_timeout`` is delivered again, and the worker
then holds (and later runs) both copies. safetynet writes a retry delayed at least
``DURABLE_RETRY_SECONDS`` (5 s) as a ``ScheduledMessage`` row instead, and the relay thread of a
worker publishes it when it is due.

Each system has two workers, which run at the same time, each on a batch of its own:

- **memory** (visibility timeout 1 hour, the Redis transport's default): the worker first runs
  W warm-up tasks (600) that retry once, 6 s later (durable for safetynet, a short-held ETA
  message for Celery); then its RSS is read (its main process and its pool children, from
  /proc); then it gets N tasks (20,000; 1,000 with ``--quick``) that retry in an hour. Once
  every first attempt has run and its retry is handed over (safetynet: N scheduled rows; Celery:
  N retry messages received by the worker), the run waits ``--hold`` seconds (30; 20 with
  ``--quick``), reading the RSS every 5 s, and reads it a last time;
- **duplicates** (visibility timeout 10 s): M tasks (2,000; 300 with ``--quick``) that retry
  after ``--delay`` seconds (3 × the visibility timeout; 2 × with ``--quick``): longer than the
  visibility timeout, as a 1-hour retry is longer than any shorter timeout, so a held ETA
  message is delivered again, and short enough to come due within the run (the hour cannot).
  The run waits until every task's retry has run, then until nothing has run for 5 s with the
  broker empty, and counts duplicates = executions − distinct (task, attempt) pairs.

Why the memory batch keeps the default visibility timeout: with 10 s, Celery's worker receives
each of the messages it holds again every 10 s (20,000 held: 2,000 deliveries a second, each one
more copy in its memory), which is more than its main process can take on a small machine. In
a trial on two cores its first attempts slowed from 60/s to 13/s and its main process reached
1 GiB with 7,600 of the 20,000 tasks sent (108,479 retry messages received, 14 per task): the run
would have taken over 20 minutes, and its figure would have measured the run's length over
10 s rather than the retries. ``--memory-visibility-timeout 10`` runs it that way. With the
default timeout the memory batch shows the cost of holding each retry once; the duplicates
batch shows what a timeout shorter than the retry's delay adds.

Why the warm-up retries: Celery turns every retry into an ``ExceptionInfo`` that copies the
code positions of every frame of the traceback (billiard, on Python 3.11+): about half a
megabyte of small objects per retry, and a 45 KB result the pool child pickles to the main
process. Each pool child's RSS climbs by about 100 MiB over its first few hundred retries and
then stays there, in both systems (it is Celery's retry handling, which safetynet's retries go
through too; safetynet's children level off about 14 MiB higher). The warm-up takes the
workers past that climb (the report shows it: "fresh" and "after the warm-up"), so the two
readings compare what N long retries leave behind.

Why the publishing keeps pace with the worker (at most 200 tasks of a batch sent and not
started): see ``Feed``.

The same set-up for both systems: a private ``redis-server`` on a free port (never the shared
one: a visibility timeout of seconds would make our workers deliver again the messages other
programs' workers hold); each worker on a Redis database of its own (each database has its own
``unacked`` hash, so no worker sweeps another's messages), swept every 2 s; each worker on a
PostgreSQL database of its own (``bench_long_retries_<pid>_<system>_<batch>``, migrated, dropped
at the end unless ``--keep``), so a relay publishes to its own worker's broker only what its own
worker scheduled; prefork workers of 2 children, no gossip, mingle or heartbeat, started fresh
each round, all four from the same app module and settings (safetynet installed in all of
them), so that the decorator is the only difference.

With ``--rounds R`` the whole run is repeated with fresh workers and databases emptied; the
systems take turns at being published first, and the figures compared are medians over rounds.
The last line of output is::

    safetynet_rss_growth_pct=… safetynet_duplicates=… celery_rss_growth_pct=… celery_duplicates=…

The exit status is 1 when safetynet's worker grew 10 % or more, safetynet ran anything twice (in
either batch), or a retry of it never ran; 2 when the run could not finish (the message says why).
"""

from __future__ import annotations

import argparse
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

from _chaos_processes import tail  # noqa: E402
from _long_retries_books import Books, Executions, create_template, drop_databases, server  # noqa: E402
from _chaos_processes import RedisServer  # noqa: E402
from _long_retries_processes import CONCURRENCY, MiB, Rss, Worker, stop  # noqa: E402

SYSTEMS = ("safetynet", "celery")
BATCHES = ("memory", "duplicates")
LONG_DELAY = 3600.0  # the memory batch's retry: due long after the run is over
STARTUP_TIMEOUT = 90.0
PUBLISH_CHUNK = 50  # tasks published at a time
WINDOW = 200  # tasks of a batch published and not started yet, at most (see Feed)
QUIET_SECONDS = 5.0  # the duplicates batch is over when nothing ran this long with the broker empty
SETTLE_SECONDS = 2.0  # after the warm-up, before the first RSS reading
SAMPLE_SECONDS = 5.0  # RSS is sampled this often during the hold
POLL_SECONDS = 0.5
SLOWEST_RATE = 10.0  # tasks/s per worker below which a wait is given up: far below any plausible rate


# -- the two batches ----------------------------------------------------------------------------


@dataclass
class Feed:
    """Tasks of a batch still to publish, no faster than the worker starts them.

    At most ``WINDOW`` tasks of a feed are published and not started yet. A Celery worker holding
    ETA messages fetches without limit once the broker delivers them again: each ETA message it
    receives raises its prefetch limit by one, and a copy delivered again (same delivery tag)
    raises it again while it still counts once as unacknowledged. With the whole batch in the
    queue, the worker would take all of it into its memory, where first attempts wait their turn
    longer than a short visibility timeout and run twice (a first try of this benchmark ran
    2,514 first attempts for 2,000 tasks). A producer that keeps pace with its workers is also the
    steady state the benchmark is about.
    """

    batch: str
    tasks: int
    delay: float
    sent: int = 0

    @property
    def complete(self) -> bool:
        return self.sent >= self.tasks


@dataclass
class Job:
    """One system's batch in a worker of its own, moved along by ``step()`` until ``done``."""

    system: str
    batch: str
    worker: Worker
    books: Books
    tasks: int
    delay: float
    deadline: float = 0.0
    stage: str = "starting"
    done: bool = False
    feed: Feed | None = None
    notes: list[str] = field(default_factory=list)

    def executions(self, batch: str | None = None) -> Executions:
        return self.books.executions(batch or self.batch)

    def start_feed(self, batch: str, tasks: int, delay: float, stage: str) -> None:
        self.feed = Feed(batch, tasks, delay)
        self.expect(stage, 60 + tasks / SLOWEST_RATE)

    def pump(self) -> bool:
        """Publish what the window allows; True once the whole feed is published."""
        feed = self.feed
        if not feed.complete:
            started = self.executions(feed.batch).distinct_first
            while not feed.complete and feed.sent - started + PUBLISH_CHUNK <= WINDOW:
                count = min(PUBLISH_CHUNK, feed.tasks - feed.sent)
                self.worker.publish(feed.batch, feed.sent + 1, count, feed.delay)
                feed.sent += count
        return feed.complete

    def handed_over(self, batch: str | None = None) -> int:
        """Retries out of the task's hands: safetynet's scheduled rows, or the retry (ETA) messages the
        Celery worker has received, and holds from then on."""
        if self.system == "safetynet":
            return sum(self.books.scheduled(batch or self.batch).values())
        return self.worker.received(batch or self.batch)[1]

    def pending(self, batch: str | None = None) -> int:
        """What is still to run: messages in the broker, and safetynet's rows not consumed yet."""
        pending = self.worker.backlog()
        if self.system == "safetynet":
            pending += sum(count for state, count in self.books.scheduled(batch or self.batch).items()
                           if state != "consumed")
        return pending

    def expect(self, stage: str, seconds: float) -> None:
        self.stage, self.deadline = stage, time.monotonic() + seconds

    def check_deadline(self, what: str, batch: str | None = None) -> None:
        self.worker.check_alive()
        if time.monotonic() > self.deadline:
            raise RuntimeError(f"{self.worker.name}: timed out {what} ({self.describe(batch)}); worker log:\n"
                               f"{tail(self.worker.log)}")

    def describe(self, batch: str | None = None) -> str:
        batch = batch or self.batch
        runs = self.executions(batch)
        first, retries = self.worker.received(batch)
        sent = f"{self.feed.sent} sent, " if self.feed is not None and self.feed.batch == batch else ""
        text = (f"batch {batch}: {sent}{runs.distinct_first} first attempts run, {runs.retried_tasks} retries run, "
                f"received {first} first and {retries} retry messages, {self.worker.backlog()} in the broker")
        if self.system == "safetynet":
            text += f", scheduled rows {self.books.scheduled(batch) or 0}"
        return text


@dataclass
class MemoryJob(Job):
    """The memory batch: a warm-up, RSS before, N retries an hour away, RSS ``hold`` s after they are handed over.

    Stages: warm-up, warm (until ``start_batch``), sending, first attempts, holding, done.
    """

    hold: float = 30.0
    warmup: int = 600
    warmup_delay: float = 6.0
    fresh: Rss | None = None
    before: Rss | None = None
    after: Rss | None = None
    samples: list[tuple[float, Rss]] = field(default_factory=list)
    handed_over_at: float = 0.0
    next_sample: float = 0.0
    received_retries: int = 0
    scheduled: dict[str, int] = field(default_factory=dict)
    runs: Executions | None = None

    def start_warm_up(self) -> None:
        """W tasks that retry once, ``warmup_delay`` s later: through the same paths as the batch (see the
        module's docstring), and over before the first reading (the delay is under the visibility timeout)."""
        self.fresh = self.worker.rss()
        self.start_feed("warm", self.warmup, self.warmup_delay, "warm-up")
        self.deadline += self.warmup_delay

    def start_batch(self) -> None:
        self.before = self.worker.rss()
        self.start_feed(self.batch, self.tasks, self.delay, "sending")

    def step(self) -> None:
        now = time.monotonic()
        if self.stage == "warm-up":
            runs = self.executions("warm")
            if (self.pump() and runs.distinct_first >= self.warmup and runs.retried_tasks >= self.warmup
                    and not self.pending("warm")):
                self.stage = "warm"
            else:
                self.check_deadline("warming up", "warm")
        if self.stage == "sending":
            if self.pump():
                self.expect("first attempts", 60 + self.tasks / SLOWEST_RATE)
            else:
                self.check_deadline("sending the batch")
        if self.stage == "first attempts":
            if self.executions().distinct_first >= self.tasks and self.handed_over() >= self.tasks:
                self.handed_over_at = self.next_sample = now
                self.stage = "holding"
            else:
                self.check_deadline("waiting for the first attempts and their retries")
        if self.stage == "holding":
            self.worker.check_alive()
            if now - self.handed_over_at >= self.hold:
                self.after = self.worker.rss()
                self.samples.append((now - self.handed_over_at, self.after))
                self.received_retries = self.worker.received(self.batch)[1]
                if self.system == "safetynet":
                    self.scheduled = self.books.scheduled(self.batch)
                self.runs = self.executions()
                if self.runs.retry_rows:
                    self.notes.append(f"{self.runs.retry_rows} retries of the 1-hour batch ran within the run")
                self.stage, self.done = "done", True
            elif now >= self.next_sample:
                self.samples.append((now - self.handed_over_at, self.worker.rss()))
                self.next_sample += SAMPLE_SECONDS

    @property
    def growth_pct(self) -> float:
        return (self.after.total - self.before.total) / self.before.total * 100.0


@dataclass
class DuplicatesJob(Job):
    """The duplicates batch: M retries due after ``delay`` seconds; wait for them all, then count.

    Stages: sending, first attempts, retries, settling, done.
    """

    settle_cap: float = 60.0
    quiet_since: float = 0.0
    last_rows: int = -1
    result: Executions | None = None

    def start_batch(self) -> None:
        self.start_feed(self.batch, self.tasks, self.delay, "sending")

    def step(self) -> None:
        now = time.monotonic()
        if self.stage == "sending":
            if self.pump():
                self.expect("first attempts", 60 + self.tasks / SLOWEST_RATE)
            else:
                self.check_deadline("sending the batch")
        if self.stage == "first attempts":
            if self.executions().distinct_first >= self.tasks:
                self.expect("retries", self.delay + 60 + self.tasks / SLOWEST_RATE)
            else:
                self.check_deadline("waiting for the first attempts")
        if self.stage == "retries":
            if self.executions().retried_tasks >= self.tasks:
                self.expect("settling", self.settle_cap)
                self.quiet_since, self.last_rows = now, -1
            else:
                self.check_deadline(f"waiting for the retries (due {self.delay:g}s after the first attempts)")
        if self.stage == "settling":
            self.worker.check_alive()
            runs = self.executions()
            pending = self.pending()
            if runs.rows != self.last_rows or pending:
                self.quiet_since, self.last_rows = now, runs.rows
            if now - self.quiet_since >= QUIET_SECONDS:
                self.result, self.stage, self.done = runs, "done", True
            elif now > self.deadline:
                self.notes.append(f"still running or in the broker after {self.settle_cap:g}s of settling "
                                  f"({pending} in the broker); counted what had run")
                self.result, self.stage, self.done = runs, "done", True


# -- a round ------------------------------------------------------------------------------------


@dataclass
class Round:
    number: int
    order: tuple[str, ...]
    memory: dict[str, MemoryJob]
    duplicates: dict[str, DuplicatesJob]
    seconds: float = 0.0


def run_round(number: int, args: argparse.Namespace, redis_server: RedisServer, books: dict[tuple[str, str], Books],
              env: dict[str, str], work_dir: Path) -> Round:
    order = SYSTEMS if number % 2 else SYSTEMS[::-1]
    redis_server.client().flushall()  # the server is the run's own
    for book in books.values():
        book.empty()
    log_dir = work_dir / f"round-{number}"
    log_dir.mkdir()

    def worker(system: str, batch: str) -> Worker:
        redis_db = 1 + SYSTEMS.index(system) * len(BATCHES) + BATCHES.index(batch)
        timeout = args.memory_visibility_timeout if batch == "memory" else args.visibility_timeout
        return Worker(system, batch, redis_db, redis_server, books[system, batch].name, timeout, env, log_dir,
                      args.run_id)

    memory = {system: MemoryJob(system, "memory", worker(system, "memory"), books[system, "memory"], args.tasks,
                                LONG_DELAY, hold=args.hold, warmup=args.warmup, warmup_delay=args.warmup_delay)
              for system in order}
    duplicates = {system: DuplicatesJob(system, "duplicates", worker(system, "duplicates"),
                                        books[system, "duplicates"], args.duplicate_tasks, args.delay,
                                        settle_cap=max(60.0, 3 * args.visibility_timeout + 30))
                  for system in order}
    round_ = Round(number, order, memory, duplicates)
    jobs: list[Job] = [*memory.values(), *duplicates.values()]
    began = time.monotonic()
    last_report = began

    def tick(active: list[Job]) -> None:
        """Move the published batches along; say where they are now and then."""
        nonlocal last_report
        time.sleep(POLL_SECONDS)
        for job in active:
            if not job.done:
                job.step()
                if job.done:  # its figures are in: its CPU to the others (the round's end waits for it)
                    job.worker.terminate()
        if time.monotonic() - last_report >= 15 and not all(job.done for job in jobs):
            last_report = time.monotonic()
            print(f"round {number} after {last_report - began:.0f}s: "
                  + "; ".join(f"{job.worker.name} {job.stage} ({job.feed.batch}: {job.feed.sent} sent, "
                              f"{job.executions(job.feed.batch).distinct_first} started)"
                              for job in jobs if not job.done), flush=True)

    try:
        for job in jobs:
            job.worker.start()
        for job in jobs:
            job.worker.wait_ready(STARTUP_TIMEOUT)
        # The duplicates batches start at once (nothing is measured in their workers but executions),
        # so that their retries' delay passes while the memory workers warm up.
        for system in order:
            duplicates[system].start_batch()
            memory[system].start_warm_up()
        while not all(job.stage == "warm" for job in memory.values()):
            tick(jobs)
        settled = time.monotonic() + SETTLE_SECONDS  # the last warm-up results acknowledged and freed
        while time.monotonic() < settled:
            tick(jobs)
        for system in order:
            memory[system].start_batch()
        print(f"round {number}: memory workers warm after {time.monotonic() - began:.1f}s; RSS before: "
              + ", ".join(f"{system} {memory[system].before}" for system in order), flush=True)
        while not all(job.done for job in jobs):
            tick(jobs)
    finally:
        for job in jobs:
            job.worker.close()
        stop([job.worker.process for job in jobs if job.worker.process is not None], timeout=20)
    round_.seconds = time.monotonic() - began
    return round_


# -- the report ---------------------------------------------------------------------------------


def _pct(after: float, before: float) -> str:
    return f"{(after - before) / before * 100:+.1f}%" if before else "n/a"


def report_round(round_: Round, args: argparse.Namespace) -> None:
    print(f"round {round_.number} ({' then '.join(round_.order)} in each publishing turn), {round_.seconds:.0f}s:")
    for system in SYSTEMS:
        job = round_.memory[system]
        before, after = job.before, job.after
        print(f"  {system:<9} memory: {args.tasks} tasks retrying in {LONG_DELAY:g}s: RSS {before} -> {after} "
              f"({job.growth_pct:+.1f}%); main process {before.main / MiB:.1f} -> {after.main / MiB:.1f} MiB "
              f"({_pct(after.main, before.main)}), {len(after.children)} pool children {before.pool / MiB:.1f} -> "
              f"{after.pool / MiB:.1f} MiB ({_pct(after.pool, before.pool)})")
        trace = ", ".join(f"{seconds:.0f}s {rss.total / MiB:.0f}" for seconds, rss in job.samples)
        print(f"  {system:<9}   RSS in MiB: fresh {job.fresh.total / MiB:.0f} (pool {job.fresh.pool / MiB:.0f}), after "
              f"the warm-up {before.total / MiB:.0f} (pool {before.pool / MiB:.0f}); from the hand-over of the last "
              f"retry: {trace}")
        if system == "safetynet":
            states = ", ".join(f"{state} {count}" for state, count in sorted(job.scheduled.items())) or "none"
            print(f"  {system:<9}   ScheduledMessage rows of the batch: {sum(job.scheduled.values())} ({states}); "
                  f"retry messages the worker received: {job.received_retries}")
        else:
            print(f"  {system:<9}   retry (ETA) messages the worker received: {job.received_retries}, "
                  f"{job.received_retries / args.tasks:.2f} per task; it holds each one in memory until it is due")
        if job.runs.duplicate_first:
            print(f"  {system:<9}   first attempts run twice or more: {job.runs.duplicate_first} "
                  f"({job.runs.first_attempts} executions for {job.runs.distinct_first} tasks)")
        for note in job.notes:
            print(f"  {system:<9}   note: {note}")
    for system in SYSTEMS:
        job = round_.duplicates[system]
        runs = job.result
        print(f"  {system:<9} duplicates: {args.duplicate_tasks} tasks retrying in {args.delay:g}s: "
              f"{runs.rows} executions ({runs.first_attempts} of first attempts, {runs.retry_rows} of the retries of "
              f"{runs.retried_tasks} tasks): {runs.duplicates} duplicate executions ({runs.duplicate_first} of first "
              f"attempts, {runs.duplicates - runs.duplicate_first} of retries); retries that never ran: "
              f"{args.duplicate_tasks - runs.retried_tasks}")
        for note in job.notes:
            print(f"  {system:<9}   note: {note}")


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (1000 + 300 tasks per system)")
    parser.add_argument("--tasks", type=int, help="memory batch: tasks per system (default 20000, 1000 with --quick)")
    parser.add_argument("--duplicate-tasks", type=int,
                        help="duplicates batch: tasks per system (default 2000, 300 with --quick)")
    parser.add_argument("--warmup", type=int, default=600,
                        help="memory batch: warm-up tasks, which retry once (600)")
    parser.add_argument("--visibility-timeout", type=float, default=10.0,
                        help="duplicates batch: the Redis broker's visibility timeout, both systems (10)")
    parser.add_argument("--memory-visibility-timeout", type=float, default=3600.0,
                        help="memory batch: the Redis broker's visibility timeout, both systems (3600, the Redis "
                             "transport's default; see the module's docstring before making it short)")
    parser.add_argument("--delay", type=float, help="duplicates batch: the retry's countdown "
                                                    "(default 3 x --visibility-timeout, 2 x with --quick)")
    parser.add_argument("--hold", type=float, help="memory batch: seconds from the hand-over of every retry to "
                                                   "the last RSS reading (default 30, 20 with --quick)")
    parser.add_argument("--rounds", type=int, default=1, help="rounds; the figures are medians over rounds (1)")
    parser.add_argument("--keep", action="store_true", help="keep the databases and the worker logs")
    args = parser.parse_args(argv)
    if args.tasks is None:
        args.tasks = 1000 if args.quick else 20000
    if args.duplicate_tasks is None:
        args.duplicate_tasks = 300 if args.quick else 2000
    if args.delay is None:
        args.delay = (2 if args.quick else 3) * args.visibility_timeout
    if args.hold is None:
        args.hold = 20.0 if args.quick else 30.0
    if (min(args.tasks, args.duplicate_tasks, args.rounds) < 1 or args.warmup < 0 or args.hold < 0
            or min(args.visibility_timeout, args.memory_visibility_timeout) <= 0):
        parser.error("--tasks, --duplicate-tasks and --rounds must be >= 1, --warmup and --hold >= 0, "
                     "the visibility timeouts > 0")
    args.run_id = uuid.uuid4().hex[:8]

    def terminate(signum, frame):  # run the clean-up below on SIGTERM too
        raise SystemExit(128 + signum)

    signal.signal(signal.SIGTERM, terminate)
    began = time.monotonic()
    work_dir = Path(tempfile.mkdtemp(prefix="safetynet-long-retries-"))
    redis_server = RedisServer(work_dir, durable=False)
    template = f"bench_long_retries_{os.getpid()}"
    books = {(system, batch): Books(f"{template}_{system}_{batch}") for system in SYSTEMS for batch in BATCHES}
    # Before Django and the Celery app are imported, here and in the workers: the run's own
    # databases and Redis. The benchmark process's Django database is the template.
    os.environ["SAFETYNET_LONG_DB"] = template
    os.environ["SAFETYNET_LONG_SPOOL"] = str(work_dir / "spool")
    os.environ["SAFETYNET_LONG_BROKER"] = redis_server.url_for(0)
    os.environ["DJANGO_SETTINGS_MODULE"] = "_long_retries_settings"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join(filter(None, [str(HERE), os.environ.get("PYTHONPATH")]))}
    keep_logs = args.keep
    created = False
    rounds: list[Round] = []
    try:
        server().close()  # a clear message now if PostgreSQL is away
        redis_server.start()
        import celery
        import django

        import _long_retries_tasks  # noqa: F401  (sets Django up and makes the Celery app)
        import safetynet
        from safetynet import conf

        durable = conf.get().durable_retry_seconds
        args.warmup_delay = (durable or 0) + 1.0
        if durable is None or args.warmup_delay >= args.memory_visibility_timeout or args.delay <= durable:
            raise SystemExit(f"long_retries.py: needs DURABLE_RETRY_SECONDS ({durable}) + 1 s below the memory "
                             f"batch's visibility timeout ({args.memory_visibility_timeout:g}s), and below --delay "
                             f"({args.delay:g}s)")
        created = True
        create_template(template)
        for book in books.values():
            book.create(template)
        print(f"safetynet {safetynet.__version__}, celery {celery.__version__}, django {django.__version__}, "
              f"python {sys.version.split()[0]}; private redis on port {redis_server.port} (a database per worker, "
              f"swept every 2s); PostgreSQL databases {template}_*; DURABLE_RETRY_SECONDS {durable:g}", flush=True)
        print(f"per system: a memory worker (visibility_timeout {args.memory_visibility_timeout:g}s; {args.warmup} "
              f"warm-up tasks retrying in {args.warmup_delay:g}s, then {args.tasks} tasks retrying in {LONG_DELAY:g}s, "
              f"RSS read until {args.hold:g}s after every retry is handed over) and a duplicates worker "
              f"(visibility_timeout {args.visibility_timeout:g}s; {args.duplicate_tasks} tasks retrying in "
              f"{args.delay:g}s); prefork, {CONCURRENCY} children each; {args.rounds} round(s)", flush=True)
        for number in range(1, args.rounds + 1):
            round_ = run_round(number, args, redis_server, books, env, work_dir)
            rounds.append(round_)
            report_round(round_, args)
    except RuntimeError as error:  # a timeout, or a process that died: the message has the log's tail
        keep_logs = True
        print(f"long_retries.py: {error}", file=sys.stderr)
        return 2
    except SystemExit as error:
        if not isinstance(error.code, str):  # SIGTERM: clean up below, and exit
            raise
        print(error.code, file=sys.stderr)  # a service missing, or a setting that cannot work
        return 2
    finally:
        redis_server.stop()
        for book in books.values():
            book.close()
        if created and not args.keep:
            try:
                drop_databases([template, *(book.name for book in books.values())])
            except Exception as error:  # noqa: BLE001 - reported, the run is over anyway
                print(f"could not drop the databases {template}_*: {error!r}", file=sys.stderr)
        if keep_logs:
            print(f"logs kept in {work_dir}" + (f"; databases {template}* kept" if args.keep else ""),
                  file=sys.stderr)
        else:
            shutil.rmtree(work_dir, ignore_errors=True)

    growth = {system: statistics.median(r.memory[system].growth_pct for r in rounds) for system in SYSTEMS}
    duplicates = {system: statistics.median(r.duplicates[system].result.duplicates for r in rounds)
                  for system in SYSTEMS}
    safetynet_failed = any(
        r.memory["safetynet"].runs.duplicates or r.duplicates["safetynet"].result.duplicates
        or r.duplicates["safetynet"].result.retried_tasks < args.duplicate_tasks
        for r in rounds
    )
    print()
    print(f"RSS growth: the sum of VmRSS of a worker's main process and its {CONCURRENCY} pool children, read after "
          f"the warm-up and again {args.hold:g}s after all {args.tasks} retries were handed over.")
    print(f"Duplicates: executions beyond one per task and attempt, counted on the duplicates batch, because a "
          f"1-hour retry cannot come due within a run: its {args.delay:g}s retries wait longer than its visibility "
          f"timeout ({args.visibility_timeout:g}s), as a 1-hour retry waits longer than any shorter timeout, and "
          f"Redis delivers every held ETA message again each time the timeout passes.")
    if args.warmup < 600:
        print(f"note: {args.warmup} warm-up tasks may leave the pool children short of the climb every retrying "
              f"worker makes over its first few hundred retries (see the module's docstring): the growth then "
              f"includes it, in both systems, in the pool figures")
    if len(rounds) > 1:
        print(f"medians over {len(rounds)} rounds")
    if duplicates["celery"] == 0:
        print("note: plain Celery ran nothing twice in this run: the duplicates batch did not show the redelivery")
    print(f"total {time.monotonic() - began:.0f}s")
    print(f"safetynet_rss_growth_pct={growth['safetynet']:.1f} safetynet_duplicates={duplicates['safetynet']:g} "
          f"celery_rss_growth_pct={growth['celery']:.1f} celery_duplicates={duplicates['celery']:g}", flush=True)
    return 1 if growth["safetynet"] >= 10 or safetynet_failed else 0


if __name__ == "__main__":
    sys.exit(main())
