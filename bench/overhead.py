"""Throughput of a no-op safetynet task, plain and idempotent, against a plain Celery task, through real workers.

    .venv/bin/python bench/overhead.py [--quick] [--tasks N] [--rounds R] [--slice S] [--budget SECONDS]
                                           [--pool solo|prefork] [--without-prometheus] [--plain-guard]

Three systems are compared: a plain ``@shared_task`` no-op (in a plain Celery worker: safetynet's message guard and
background jobs, which every worker of a project with safetynet has, are not started in it; ``--plain-guard``
starts them), the same no-op as ``@safetynet.task``,
and the same no-op as an idempotent ``@safetynet.task(idempotency_key="noop-{n}")`` whose every
message has an ``n`` of its own, so every run claims a fresh key in PostgreSQL (a database of the
benchmark's own, created and migrated when missing, its claim table emptied before each round).
A round starts a fresh worker subprocess for each system (solo pool by default, each on a queue
of its own, started in parallel, warmed up), then makes each worker run N no-ops, in slices of S
tasks, alternating: plain, safetynet, idempotent, plain, safetynet, idempotent, ... A slice is:

1. ``[start marker, S no-ops, end marker]`` built in a staging list, then RENAMEd onto the
   worker's queue at once (the no-ops ignore their result; a marker records ``time.time()``
   and the worker's CPU time in Redis when it runs);
2. the time between the two markers, read when the end marker is in.

A round's figure for a system is N / (sum of its slices' times); with ``--budget`` (45 s under
``--quick``) a round may stop after fewer slices on a slow machine, and says so. So only the worker's
throughput is measured: not the publishing, not the start-up. Interleaving short slices makes
every system see the same noise of a shared machine; fresh workers each round keep one unlucky
process from biasing every round. Each round is printed; the figures compared are medians over
rounds, and the last line of output is
``plain_tps=… safetynet_tps=… ratio=… idempotent_tps=… idempotent_ratio=…``
(ratio = safetynet / plain, idempotent_ratio = idempotent / plain).

Redis: database 9 by default (``SAFETYNET_BENCH_REDIS``). A run holds a lock key there, so two
runs cannot spoil each other's figures; it names its keys after a run id and deletes every
``bench`` key (never the whole database) when it starts and ends.
"""

from __future__ import annotations

import argparse
import base64
import json
import os
import statistics
import subprocess
import sys
import tempfile
import time
import timeit
import uuid
from pathlib import Path

HERE = Path(__file__).resolve().parent
if str(HERE) not in sys.path:
    sys.path.insert(0, str(HERE))

import _overhead_tasks as bench  # noqa: E402

SYSTEMS = ("plain", "safetynet", "idempotent")
#: Systems whose no-op takes an ``n`` of its own per message (a fresh idempotency key each).
KEYED = {"idempotent"}
#: The module ``celery -A`` starts the workers from (bench/idempotency.py adds tasks in its own).
WORKER_APP = "_overhead_tasks"
#: Systems whose tasks are plain Celery tasks: their workers run without safetynet's message guard and background
#: jobs (a plain Celery worker; ``--plain-guard`` keeps both, as a project with safetynet installed has them for
#: plain tasks too).
#: bench/idempotency.py's plain systems are here too.
PLAIN_CELERY = {"plain", "diy", "realistic_plain", "retry_plain"}
IN_PROCESS = ("plain", "safetynet")  # the systems _in_process_costs times (no database)
STARTUP_TIMEOUT = 60.0  # seconds for a fresh worker to get through its warm-up
BATCH = 1000  # messages per LPUSH
LOCK = "bench:overhead:lock"
LOCK_SECONDS = 120  # the lock outlives a crashed run by this much; each slice renews it
MIN_SLICES = 3  # per system and round, whatever the --budget
STOP_SECONDS = 1.0  # about what stopping a round's workers takes


def _redis():
    import redis

    return redis.Redis.from_url(bench.BROKER_URL)


class Lock:
    """One run at a time on the benchmark's Redis database."""

    def __init__(self, client, run_id: str) -> None:
        self.client, self.value = client, f"{run_id} pid {os.getpid()} since {time.strftime('%H:%M:%S')}"
        if not client.set(LOCK, self.value, nx=True, ex=LOCK_SECONDS):
            holder = client.get(LOCK)
            raise SystemExit(
                f"overhead.py: another run holds {LOCK} in {bench.BROKER_URL} ({holder.decode() if holder else '?'});"
                f" two runs at once would measure each other. Wait for it, or delete the key if it is stale."
            )

    def renew(self) -> None:
        """Keep the lock; fail if it is gone, which means our keys were deleted under us."""
        if self.client.get(LOCK) != self.value.encode():
            raise RuntimeError(
                f"{LOCK} in {bench.BROKER_URL} is no longer ours: something flushed or used the database"
                " during the run (an older overhead.py flushes it at start and end)."
            )
        self.client.expire(LOCK, LOCK_SECONDS)

    def release(self) -> None:
        if self.client.get(LOCK) == self.value.encode():
            self.client.delete(LOCK)


def _delete_bench_keys(client) -> None:
    """Delete what benchmark runs leave in Redis: their queues, staging lists, markers, bindings."""
    for pattern in ("bench.*", "bench:*", "_kombu.binding.bench.*", "_kombu.binding_permanent.bench.*"):
        keys = [key for key in client.scan_iter(match=pattern, count=1000) if key != LOCK.encode()]
        for start in range(0, len(keys), 1000):
            client.delete(*keys[start:start + 1000])


class Messages:
    """Raw broker messages for one system's queue, copied from ones Celery itself published.

    Publishing through ``apply_async`` costs more than running a no-op, so each kind of message
    is published once by Celery, taken back, and copied with fresh ids (task id, delivery tag).
    The idempotent no-op's argument ``n`` is made fresh too (run id and a counter), in its
    base64-encoded body and its ``argsrepr``, so that every copy claims a key of its own.
    """

    PLACEHOLDER = "N" * 24

    def __init__(self, client, run_id: str, system: str, lock: Lock) -> None:
        self.queue = f"bench.{run_id}.{system}"
        self.staging = f"bench:{run_id}:{system}:staging"
        self.start_key, self.end_key = f"bench:{run_id}:{system}:start", f"bench:{run_id}:{system}:end"
        self.client, self.lock = client, lock
        self.system = system
        self.keyed = system in KEYED
        self.run_id, self.counter = run_id, 0
        self.noop = self._template(bench.NOOPS[system], (self.PLACEHOLDER,) if self.keyed else ())
        if self.keyed:
            self.body = json.loads(self.noop[0])["body"]
            self.decoded = base64.b64decode(self.body).decode()
        self.start = self._template(bench.mark, (self.start_key,))
        self.end = self._template(bench.mark, (self.end_key,))

    def _template(self, task, args: tuple = ()) -> tuple[str, str, str]:
        task.apply_async(args, queue=self.queue)
        raw = self.client.rpop(self.queue).decode()
        message = json.loads(raw)
        return raw, message["headers"]["id"], message["properties"]["delivery_tag"]

    @staticmethod
    def _copy(template: tuple[str, str, str]) -> str:
        raw, task_id, tag = template
        return raw.replace(task_id, str(uuid.uuid4())).replace(tag, str(uuid.uuid4()))

    def _copy_noop(self) -> str:
        raw = self._copy(self.noop)
        if not self.keyed:
            return raw
        self.counter += 1
        n = f"{self.run_id}-{self.counter:09d}"
        body = base64.b64encode(self.decoded.replace(self.PLACEHOLDER, n).encode()).decode()
        return raw.replace(self.body, body).replace(self.PLACEHOLDER, n)

    def _left_overs(self) -> str:
        """What an earlier slice left: the markers' lists and the tasks of the messages still queued."""
        client = self.client
        names = []
        for raw in client.lrange(self.queue, 0, 9):
            try:
                headers = json.loads(raw)["headers"]
                names.append(f"{headers.get('task')}[{headers.get('id')}] retries={headers.get('retries')}")
            except (ValueError, KeyError, TypeError):
                names.append(repr(raw[:80]))
        return (f"{client.llen(self.queue)} queued ({', '.join(names) or 'none'}), "
                f"{client.llen(self.start_key)} start and {client.llen(self.end_key)} end markers")

    def load(self, tasks: int) -> None:
        """Put ``[start marker, tasks no-ops, end marker]`` on the queue in one step."""
        client = self.client
        self.lock.renew()
        if client.exists(self.queue, self.start_key, self.end_key):
            raise RuntimeError(f"{self.queue}: left-overs of an earlier slice: {self._left_overs()}")
        with client.pipeline(transaction=False) as pipe:
            pipe.delete(self.staging)
            pipe.lpush(self.staging, self._copy(self.start))  # kombu's Redis transport: LPUSH, BRPOP
            for done in range(0, tasks, BATCH):
                pipe.lpush(self.staging, *(self._copy_noop() for _ in range(min(BATCH, tasks - done))))
            pipe.lpush(self.staging, self._copy(self.end))
            pipe.rename(self.staging, self.queue)  # wakes the worker's BRPOP with everything in place
            pipe.execute()


def _tail(path: str, lines: int = 30) -> str:
    try:
        return "\n".join(Path(path).read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no worker log)"


class Worker:
    """A ``celery worker`` subprocess on one system's queue."""

    def __init__(self, messages: Messages, args: argparse.Namespace, log_path: str) -> None:
        self.messages, self.log_path = messages, log_path
        command = [
            sys.executable, "-m", "celery", "-A", WORKER_APP, "worker",
            "-Q", messages.queue, "-n", f"{messages.queue}.{uuid.uuid4().hex[:4]}@%h", f"--pool={args.pool}",
            "--without-gossip", "--without-mingle", "--without-heartbeat",
            "-l", "warning", "--prefetch-multiplier", str(args.prefetch),
        ]
        if args.pool != "solo":
            command += ["--concurrency", "1"]
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join(filter(None, [str(HERE), env.get("PYTHONPATH")]))
        env.pop("DJANGO_SETTINGS_MODULE", None)
        env["SAFETYNET_BENCH_REDIS"] = bench.BROKER_URL
        env["SAFETYNET_BENCH_SPOOL"] = os.path.join(os.path.dirname(log_path), "spool")
        if args.without_prometheus:
            env["SAFETYNET_BENCH_NO_PROMETHEUS"] = "1"
        if messages.system in PLAIN_CELERY and not args.plain_guard:
            env["SAFETYNET_BENCH_PLAIN_CELERY"] = "1"
        with open(log_path, "wb") as log:
            self.process = subprocess.Popen(
                command, env=env, cwd=str(HERE), stdin=subprocess.DEVNULL, stdout=log, stderr=subprocess.STDOUT,
                start_new_session=True,
            )

    def _pop(self, key: str, deadline: float) -> tuple[float, float]:
        """Wait for the marker ``key``: (wall time, worker CPU time)."""
        client = self.messages.client
        while True:
            item = client.blpop([key], timeout=1)
            if item is not None:
                wall, cpu = item[1].split()
                return float(wall), float(cpu)
            self.messages.lock.renew()
            if self.process.poll() is not None:
                raise RuntimeError(
                    f"{self.messages.queue} worker exited with {self.process.returncode}:\n{_tail(self.log_path)}"
                )
            if time.monotonic() > deadline:
                raise RuntimeError(
                    f"{self.messages.queue}: timed out waiting for {key} ({self._broker_state()}):\n"
                    f"{_tail(self.log_path)}"
                )

    def _broker_state(self) -> str:
        client, messages = self.messages.client, self.messages
        return (
            f"{client.llen(messages.queue)} messages queued, {client.hlen('unacked')} unacked,"
            f" {client.llen(messages.start_key)} start and {client.llen(messages.end_key)} end markers"
        )

    def run(self, tasks: int, timeout: float) -> tuple[float, float]:
        """Run a slice of ``tasks`` no-ops; return its (wall seconds, worker CPU seconds)."""
        self.messages.load(tasks)
        deadline = time.monotonic() + timeout
        started = self._pop(self.messages.start_key, deadline)
        ended = self._pop(self.messages.end_key, deadline)
        return ended[0] - started[0], ended[1] - started[1]

    def stop(self) -> None:
        process = self.process
        if process.poll() is None:
            process.terminate()  # warm shutdown
            try:
                process.wait(timeout=10)
            except subprocess.TimeoutExpired:
                try:
                    os.killpg(process.pid, 9)  # the worker was started in a session of its own
                except ProcessLookupError:
                    pass
                process.wait(timeout=10)


def run_round(number: int, order: tuple[str, ...], messages: dict[str, Messages], args: argparse.Namespace,
              log_dir: str, deadline: float | None) -> dict[str, tuple[float, float]]:
    """Run one round; return, per system, (tasks/s of wall time, tasks/s of the worker's CPU time).

    With a ``deadline`` (``--budget``), the round stops early, after whole turns of slices (one
    per system) and at least MIN_SLICES of them, when the next turn would end past it.
    """
    workers: dict[str, Worker] = {}
    bench.clear_claims()  # the previous round's claims (no worker is running)
    try:
        launched = time.monotonic()
        for system in order:
            workers[system] = Worker(messages[system], args, os.path.join(log_dir, f"r{number}.{system}.log"))
        for system in order:
            workers[system].run(args.warmup, STARTUP_TIMEOUT)
        startup = time.monotonic() - launched
        wall = dict.fromkeys(order, 0.0)
        cpu = dict.fromkeys(order, 0.0)
        slices = tasks = 0
        while tasks < args.tasks:
            turn_began = time.monotonic()
            size = min(args.slice, args.tasks - tasks)
            for system in order:
                slice_wall, slice_cpu = workers[system].run(size, args.slice_timeout)
                wall[system] += slice_wall
                cpu[system] += slice_cpu
            slices += 1
            tasks += size
            now = time.monotonic()
            if deadline is not None and slices >= MIN_SLICES and now + (now - turn_began) + STOP_SECONDS > deadline:
                break
    finally:
        for worker in workers.values():
            worker.stop()
    cut = "" if tasks == args.tasks else f" (cut from {args.tasks} to fit --budget)"
    results = {}
    for system in order:
        tps, cpu_tps = tasks / wall[system], tasks / cpu[system]
        results[system] = tps, cpu_tps
        print(
            f"round {number} {system:<10} {tasks} tasks{cut} in {slices} slices, {wall[system]:6.3f}s ="
            f" {tps:8.1f} tasks/s  (worker CPU {cpu[system]:6.3f}s = {cpu_tps:8.1f} tasks/CPU-s)",
            flush=True,
        )
    print(
        f"round {number} ratio {results['safetynet'][0] / results['plain'][0]:.3f}"
        f" idempotent_ratio {results['idempotent'][0] / results['plain'][0]:.3f}"
        f"  (workers up and warm in {startup:.1f}s; load {os.getloadavg()[0]:.2f})",
        flush=True,
    )
    return results


def _in_process_costs(pairs: int = 150, calls: int = 200) -> dict[str, float]:
    """What one no-op costs without a broker, in microseconds, through Celery's own tracer.

    Celery's worker runs a task through the function ``build_tracer`` makes; timing it here, in
    one process, shows the per-task cost safetynet adds, free of the broker. The two systems are
    timed in short turns (ABBA order) and the median of the paired differences is what counts,
    which keeps most of a noisy machine's bursts out. Returns each system's median cost, the
    median difference ("added"), and the same difference for the task's ``run`` alone.
    """
    from celery.app.trace import build_tracer

    tracers, runs = {}, {}
    for system in IN_PROCESS:
        task = bench.NOOPS[system]
        task = getattr(task, "_get_current_object", lambda task=task: task)()
        tracer = build_tracer(task.name, task, eager=False, propagate=False, app=bench.app, hostname="bench@local")
        task_id = str(uuid.uuid4())
        request = {"id": task_id, "hostname": "bench@local", "ignore_result": True,
                   "delivery_info": {"exchange": "", "routing_key": "bench", "priority": 0, "redelivered": False}}
        tracer(task_id, (), {}, request)
        tracers[system] = lambda tracer=tracer, task_id=task_id, request=request: tracer(task_id, (), {}, request)
        runs[system] = task.run
    traced: dict[str, list[float]] = {system: [] for system in IN_PROCESS}
    added, run_added = [], []
    for turn in range(pairs):
        trace, run = {}, {}
        for system in (IN_PROCESS if turn % 2 else IN_PROCESS[::-1]):
            trace[system] = timeit.timeit(tracers[system], number=calls) / calls * 1e6
            run[system] = timeit.timeit(runs[system], number=calls * 10) / (calls * 10) * 1e6
            traced[system].append(trace[system])
        added.append(trace["safetynet"] - trace["plain"])
        run_added.append(run["safetynet"] - run["plain"])
    costs = {system: statistics.median(values) for system, values in traced.items()}
    costs["added"], costs["run_added"] = statistics.median(added), statistics.median(run_added)
    return costs


def _task_hooks() -> str:
    """The receivers of Celery's task_prerun and task_postrun: code every task runs in the worker."""
    import weakref

    from celery import signals as celery_signals

    names = []
    for signal in (celery_signals.task_prerun, celery_signals.task_postrun):
        for _key, receiver in signal.receivers:
            if isinstance(receiver, weakref.ReferenceType):
                receiver = receiver()
            names.append(f"{getattr(receiver, '__module__', '?')}.{getattr(receiver, '__qualname__', receiver)}")
    return ", ".join(names) or "none"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--quick", action="store_true", help="a smaller run (under a minute)")
    parser.add_argument("--tasks", type=int, help="no-op tasks per round and system (default 20000, 3000 with --quick)")
    parser.add_argument("--rounds", type=int, default=3, help="rounds (default 3: medians of 3)")
    parser.add_argument("--slice", type=int, default=250,
                        help="tasks per slice; the systems alternate every slice (default 250; --slice N: one slice)")
    parser.add_argument("--warmup", type=int,
                        help="no-ops each fresh worker runs first, unmeasured (default 300, 200 with --quick)")
    parser.add_argument("--pool", choices=("solo", "prefork"), default="solo", help="worker pool (prefork: -c 1)")
    parser.add_argument("--prefetch", type=int, default=64, help="worker prefetch multiplier (default 64)")
    parser.add_argument("--first", choices=SYSTEMS, default="plain",
                        help="which system runs first in each turn (the others follow in the usual order)")
    parser.add_argument("--slice-timeout", type=float, help="seconds allowed per slice")
    parser.add_argument("--budget", type=float,
                        help="seconds for the whole run (best effort): rounds run fewer tasks on a slow machine"
                             " (default: none, 45 with --quick)")
    parser.add_argument("--without-prometheus", action="store_true",
                        help="disconnect safetynet's Prometheus receivers (connected whenever prometheus_client"
                             " is installed), to see what they cost")
    parser.add_argument("--plain-guard", action="store_true",
                        help="run the plain system's worker with safetynet's message guard and background jobs, as"
                             " a project with safetynet installed runs plain Celery tasks (default: a plain Celery"
                             " worker)")
    args = parser.parse_args(argv)
    began = time.monotonic()
    if args.tasks is None:
        args.tasks = 3000 if args.quick else 20000
    if args.warmup is None:
        args.warmup = 200 if args.quick else 300
    if args.budget is None and args.quick:
        args.budget = 45.0
    if min(args.tasks, args.rounds, args.slice, args.prefetch) < 1 or args.warmup < 0:
        parser.error("--tasks, --rounds, --slice and --prefetch must be >= 1, --warmup >= 0")
    if args.slice_timeout is None:
        args.slice_timeout = 30.0 + min(args.slice, args.tasks) / 100.0  # far below any plausible rate

    import celery
    import django
    import safetynet

    if args.without_prometheus:
        bench.disable_prometheus()
    print(
        f"safetynet {safetynet.__version__}, celery {celery.__version__}, django {django.__version__}, "
        f"python {sys.version.split()[0]}; broker {bench.BROKER_URL}; pool {args.pool}; {args.rounds} rounds of "
        f"{args.tasks} no-ops per system, alternating every {min(args.slice, args.tasks)}; warm-up {args.warmup}",
        flush=True,
    )
    print(f"task_prerun/task_postrun receivers in the workers: {_task_hooks()}", flush=True)
    print("plain: " + ("a worker with safetynet's message guard and background jobs (--plain-guard)"
                       if args.plain_guard else "a plain Celery worker (no safetynet message guard or background jobs)"),
          flush=True)
    client = _redis()
    run_id = uuid.uuid4().hex[:8]
    lock = Lock(client, run_id)
    results: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    cpu_results: dict[str, list[float]] = {system: [] for system in SYSTEMS}
    try:
        bench.ensure_database()
        costs = _in_process_costs(pairs=60 if args.quick else 150)
        print(
            f"in-process, one no-op through Celery's tracer, no broker: plain {costs['plain']:.2f} us,"
            f" safetynet {costs['safetynet']:.2f} us; safetynet adds {costs['added']:+.2f} us per task"
            f" ({costs['run_added']:+.2f} us in its run() wrapper)",
            flush=True,
        )
        first = SYSTEMS.index(args.first)
        order = SYSTEMS[first:] + SYSTEMS[:first]
        _delete_bench_keys(client)  # what earlier runs may have left
        messages = {system: Messages(client, run_id, system, lock) for system in SYSTEMS}
        with tempfile.TemporaryDirectory(prefix="safetynet-bench-") as log_dir:
            for number in range(1, args.rounds + 1):
                deadline = None
                if args.budget is not None:
                    now = time.monotonic()
                    deadline = now + (began + args.budget - now) / (args.rounds - number + 1)
                for system, (tps, cpu_tps) in run_round(number, order, messages, args, log_dir, deadline).items():
                    results[system].append(tps)
                    cpu_results[system].append(cpu_tps)
    finally:
        _delete_bench_keys(client)
        try:
            bench.clear_claims()
        finally:
            lock.release()

    def figures(values: list[float]) -> str:
        return " ".join(f"{value:.1f}" for value in values)

    plain, safe, keyed = (statistics.median(results[system]) for system in SYSTEMS)
    cpu_plain, cpu_safe, cpu_keyed = (statistics.median(cpu_results[system]) for system in SYSTEMS)
    for system in SYSTEMS:
        print(f"{system:<10} median {statistics.median(results[system]):8.1f} tasks/s"
              f"  rounds: {figures(results[system])}")
    print(
        f"worker CPU: plain median {cpu_plain:.1f} tasks/CPU-s, safetynet median {cpu_safe:.1f} tasks/CPU-s "
        f"(ratio {cpu_safe / cpu_plain:.3f}), idempotent median {cpu_keyed:.1f} tasks/CPU-s "
        f"(ratio {cpu_keyed / cpu_plain:.3f}); total {time.monotonic() - began:.1f}s"
    )
    print(
        f"plain_tps={plain:.1f} safetynet_tps={safe:.1f} ratio={safe / plain:.3f}"
        f" idempotent_tps={keyed:.1f} idempotent_ratio={keyed / plain:.3f}"
    )
    return 0


if __name__ == "__main__":
    sys.exit(main())
