"""The durable schedule and the outbox, on real prefork workers, real brokers and PostgreSQL.

- outbox: with the broker (a private Redis) stopped, a task enqueued in a committed transaction
  runs exactly once after the broker is back; one enqueued in a rolled-back transaction never runs;
- a retry delayed at least DURABLE_RETRY_SECONDS is a database row, not an ETA message a worker
  holds, and runs once, within about a second of its due time; so is the retry of a retry (an
  attempt that came from the relay);
- a relay killed after sending, before committing: another relay sends the row again, and of the
  two copies one runs and the other is dropped on arrival;
- two workers (each with its relay thread) killed with ``kill -9`` and started again at random
  while 2,000 short scheduled retries go through them: every retry is published exactly once
  (exactly one relay token ever runs per retry; a second copy, if any, is dropped on arrival).

The tasks write every run into ``sched_ledger`` (tests/fixtures/scheduled_tasks.py); nothing is mocked.
"""

import ast
import os
import random
import signal
import socket
import subprocess
import sys
import threading
import time
import uuid
from collections import Counter, defaultdict

import pytest
from django.db import connection, transaction

from safetynet.models import ScheduledMessage
from tests.fixtures import scheduled_tasks
from tests.integration.conftest import BROKERS, ROOT, Worker, configure_app, release_app, wait_until

pytestmark = [pytest.mark.integration, pytest.mark.django_db(transaction=True)]

AMQP = "amqp://guest:guest@127.0.0.1:5672//"


# -- helpers -----------------------------------------------------------------------------------


@pytest.fixture
def ledger():
    """The ledger the tasks write, with the time of each run (``ran_at``, PostgreSQL's clock)."""
    with connection.cursor() as cursor:
        cursor.execute(f"CREATE TABLE IF NOT EXISTS {scheduled_tasks.LEDGER} "
                       "(name text, task_id text, attempt int, relayed text)")
        cursor.execute(f"ALTER TABLE {scheduled_tasks.LEDGER} ADD COLUMN IF NOT EXISTS ran_at double precision "
                       "DEFAULT extract(epoch from clock_timestamp())")

    def runs(name_or_prefix, prefix=False):
        """(task_id, attempt, relayed header or None, ran_at) of each run, in the order they ran."""
        with connection.cursor() as cursor:
            cursor.execute(
                f"SELECT name, task_id, attempt, relayed, ran_at FROM {scheduled_tasks.LEDGER} "
                f"WHERE {'starts_with(name, %s)' if prefix else 'name = %s'} ORDER BY ran_at",
                [name_or_prefix],
            )
            rows = cursor.fetchall()
        return [(name, task_id, attempt, None if relayed == "None" else tuple(ast.literal_eval(relayed)), ran_at)
                for name, task_id, attempt, relayed, ran_at in rows]

    return runs


def free_port():
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


class PrivateRedis:
    """A ``redis-server`` of the test's own on a free port (as bench/_chaos_processes.py starts one):
    append-only file fsynced on every write, so a ``kill -9`` and a start on the same port and
    directory bring back what it had (kombu's exchange bindings included)."""

    def __init__(self, directory):
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}"
        self.process = None

    def start(self, timeout=30):
        import redis

        self.process = subprocess.Popen(
            ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
             "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
             "--logfile", str(self.directory / "redis.log")],
            stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL, stderr=subprocess.STDOUT, start_new_session=True,
        )
        client = redis.Redis.from_url(self.url, socket_timeout=2, socket_connect_timeout=1)
        deadline = time.monotonic() + timeout
        while True:
            try:
                if client.ping():
                    return self
            except redis.RedisError:
                pass
            if self.process.poll() is not None or time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} did not start")
            time.sleep(0.05)

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)


@pytest.fixture
def private_redis(tmp_path):
    directory = tmp_path / "redis"
    directory.mkdir()
    server = PrivateRedis(directory).start()
    yield server
    server.kill()


def rows_of(task_id):
    return list(ScheduledMessage.objects.filter(task_id=task_id).values(
        "key", "kind", "state", "due_at", "token", "consumed_token", "publishes", "last_error"))


# -- 1. the outbox with the broker down ------------------------------------------------------------


def test_outbox_with_the_broker_down_runs_the_committed_task_once_and_never_the_rolled_back_one(
        tmp_path, worker_database, spool_dir, private_redis, ledger):
    # Only the broker is stopped: results go to the machine's Redis (a result consumer left
    # subscribed to a stopped Redis fails noisily when it is garbage-collected).
    broker, backend = f"{private_redis.url}/0", BROKERS["redis"][1]
    app = configure_app(broker, backend)
    worker = Worker("outbox", broker, backend, tmp_path, concurrency=2, database=worker_database,
                    spool_dir=spool_dir).start(app)
    try:
        run_id = uuid.uuid4().hex[:8]
        committed, rolled_back = f"committed-{run_id}", f"rolled-back-{run_id}"
        private_redis.kill()
        app = configure_app(broker, backend)  # no broker connection yet, as in a process that never published

        began = time.monotonic()
        with transaction.atomic():
            kept = scheduled_tasks.outboxed.apply_async((committed,), queue=worker.queue)
        commit_seconds = time.monotonic() - began  # includes the failed attempt to publish at once
        assert commit_seconds < 3, f"the commit waited {commit_seconds:.1f}s for the broker that is down"

        class Rollback(Exception):
            pass

        with pytest.raises(Rollback), transaction.atomic():
            dropped = scheduled_tasks.outboxed.apply_async((rolled_back,), queue=worker.queue)
            assert len(rows_of(dropped.id)) == 1  # written in the transaction...
            raise Rollback
        assert rows_of(dropped.id) == []  # ...and gone with it

        [row] = rows_of(kept.id)
        assert (row["key"], row["kind"], row["state"], row["publishes"]) == (kept.id, "outbox", "scheduled", 0)
        time.sleep(5)  # the broker is away: nothing can run, and the worker's relay fails to publish it too
        assert ledger(committed) == [] and ledger(rolled_back) == []
        [row] = rows_of(kept.id)
        assert row["state"] == "scheduled"

        private_redis.start()  # the same port, the same data
        back = time.monotonic()
        wait_until(lambda: ledger(committed), 60, "the committed outbox task ran once Redis was back")
        ran_after = time.monotonic() - back
        time.sleep(5)  # a second run would show by now
        runs = ledger(committed)
        assert [(task_id, attempt) for _, task_id, attempt, _, _ in runs] == [(kept.id, 1)]
        [(_, _, _, relayed, _)] = runs
        assert relayed is not None and relayed[0] == kept.id  # published by a relay (the worker's), from the row
        assert ledger(rolled_back) == []
        [row] = rows_of(kept.id)
        assert row["state"] == "consumed" and row["consumed_token"] == relayed[1]
        relay_failures = worker.log.read_text().count("relay could not publish")
        print(f"\noutbox: commit (with the failed publish attempt) took {commit_seconds:.2f}s; the worker's relay "
              f"failed {relay_failures} time(s) while Redis was down; the task ran {ran_after:.1f}s after Redis was "
              f"back; row last_error={row['last_error']!r}")
    finally:
        worker.stop()
        release_app(app)


# -- 2. a long retry is a row, not an ETA message ------------------------------------------------


def test_a_retry_longer_than_the_threshold_waits_in_the_database_and_runs_once_when_due(
        tmp_path, worker_database, spool_dir, ledger):
    broker, backend = BROKERS["redis"]
    app = configure_app(broker, backend)
    # DURABLE_RETRY_SECONDS is the tests' default, 5 s.
    worker = Worker("durable", broker, backend, tmp_path, concurrency=2, database=worker_database,
                    spool_dir=spool_dir).start(app)
    try:
        run_id = uuid.uuid4().hex[:8]
        durable, short = f"durable-{run_id}", f"short-{run_id}"
        long_retry = scheduled_tasks.retry_later.apply_async((durable, 8), queue=worker.queue)
        eta_retry = scheduled_tasks.retry_later.apply_async((short, 3), queue=worker.queue)  # below the threshold
        wait_until(lambda: rows_of(long_retry.id), 30, "the long retry was written to the schedule")
        [row] = rows_of(long_retry.id)
        assert (row["key"], row["kind"], row["state"]) == (long_retry.id, "retry", "scheduled")
        due_at = row["due_at"]

        def held_by_the_worker():
            replies = app.control.inspect(timeout=2).scheduled() or {}
            mine = [node for node in replies if worker.queue in node]
            assert mine, f"no reply from the worker to inspect().scheduled(): {sorted(replies)}"
            return {entry["request"]["id"] for node in mine for entry in replies[node]}

        # The short retry is an ETA message the worker holds; the long one is not.
        wait_until(lambda: eta_retry.id in held_by_the_worker(), 10, "the short retry is held as an ETA message")
        assert long_retry.id not in held_by_the_worker()
        assert rows_of(eta_retry.id) == []
        assert ledger(durable) == []

        assert long_retry.get(timeout=30) == 2
        assert eta_retry.get(timeout=30) == 2
        time.sleep(2)
        [(_, task_id, attempt, relayed, ran_at)] = ledger(durable)
        assert (task_id, attempt) == (long_retry.id, 2)
        assert relayed is not None and relayed[0] == long_retry.id
        late = ran_at - due_at
        assert -0.05 <= late <= 1.5, f"ran {late:.2f}s after its due time"
        [row] = rows_of(long_retry.id)
        assert (row["state"], row["consumed_token"], row["publishes"]) == ("consumed", relayed[1], 1)
        [(_, _, _, eta_relayed, _)] = ledger(short)
        assert eta_relayed is None
        print(f"\ndurable retry: ran {late:.3f}s after its due time")
    finally:
        worker.stop()
        release_app(app)



def test_every_retry_of_a_task_waits_in_the_database_not_only_the_first(tmp_path, worker_database, spool_dir,
                                                                        ledger):
    """The second retry comes from a relayed message (attempt 2): it must not travel as an ETA
    message carrying the first retry's relay header."""
    broker, backend = BROKERS["redis"]
    app = configure_app(broker, backend)
    worker = Worker("twice", broker, backend, tmp_path, concurrency=2, database=worker_database,
                    spool_dir=spool_dir).start(app)
    try:
        name = f"twice-{uuid.uuid4().hex[:8]}"
        sent = scheduled_tasks.retry_twice.apply_async((name, 6), queue=worker.queue)  # above the 5 s threshold
        wait_until(lambda: len(ledger(name)) >= 2, 30, "the first retry ran")
        time.sleep(1)
        held = {entry["request"]["id"] for entries in (app.control.inspect(timeout=2).scheduled() or {}).values()
                for entry in entries}
        keys = sorted(row["key"] for row in rows_of(sent.id))
        assert sent.get(timeout=30) == 3
        runs = ledger(name)
        assert [attempt for _, _, attempt, _, _ in runs] == [1, 2, 3]
        [(_, _, _, first, _), (_, _, _, second, _), (_, _, _, third, _)] = runs
        assert first is None and second is not None and second[0] == sent.id
        # One row per task: the second retry wrote over the first's (its history entry is later).
        assert (sent.id not in held, keys, third and third[0], third and third[1] != second[1]) == (
            True, [sent.id], sent.id, True), (
            f"the second retry was held by the worker as an ETA message: {sent.id in held}; rows {keys}; "
            f"attempt 3 arrived with relay header {third} (attempt 2's was {second})")
    finally:
        worker.stop()
        release_app(app)

# -- 3. two relays killed at random --------------------------------------------------------------

TASKS = 2_000
SEND_SECONDS = 25.0  # the tasks are sent over this long, while the workers are being killed
CHAOS_SECONDS = 35.0
SEED = int(os.environ.get("SAFETYNET_TEST_CHAOS_SEED", "20240611"))


class ChaosWorker:
    """A prefork ``celery worker`` on a shared queue; killed (``kill -9`` of its whole process group)
    and started again; its log is kept across restarts."""

    def __init__(self, name, queue, log_dir, env):
        self.name, self.queue = name, queue
        self.log = log_dir / f"worker-{name}.log"
        self.env = env
        self.command = [
            sys.executable, "-m", "celery", "-A", "tests.celery_app", "worker", "-Q", queue, "--pool=prefork",
            "--concurrency=4", "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "info",
            "-n", f"{name}-{queue}@%h",
        ]
        self.process = None
        self.starts = 0
        self._offset = 0

    def start(self):
        self.starts += 1
        with self.log.open("ab") as log:
            log.write(f"\n===== start #{self.starts} at {time.strftime('%H:%M:%S')} =====\n".encode())
            self._offset = log.tell()
            self.process = subprocess.Popen(self.command, env=self.env, cwd=ROOT, stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def ready(self):
        with self.log.open("rb") as log:
            log.seek(self._offset)
            return b" ready." in log.read()

    def wait_ready(self, timeout=60):
        wait_until(self.ready, timeout, f"worker {self.name} is ready:\n{self.log.read_text()[-3000:]}")

    def kill(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGKILL)
            self.process.wait(timeout=10)
            with self.log.open("ab") as log:
                log.write(f"\n===== kill -9 at {time.strftime('%H:%M:%S')} =====\n".encode())

    def stop(self):
        if self.process is not None and self.process.poll() is None:
            os.killpg(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout=20)
            except subprocess.TimeoutExpired:
                pass
        if self.process is not None:
            try:
                os.killpg(self.process.pid, signal.SIGKILL)  # whatever the warm shutdown left
            except ProcessLookupError:
                pass
            self.process.wait(timeout=10)


class Chaos(threading.Thread):
    """Every 2-6 s (seeded), ``kill -9`` one worker (the other one than last time, mostly) and start it again."""

    def __init__(self, workers, rng):
        super().__init__(name="chaos", daemon=True)
        self.workers, self.rng = workers, rng
        self.halt = threading.Event()
        self.kills = Counter()
        self.errors = []

    def run(self):
        index = self.rng.randrange(len(self.workers))
        while not self.halt.wait(self.rng.uniform(2.0, 6.0)):
            index = index if self.rng.random() < 0.2 else 1 - index
            worker = self.workers[index]
            try:
                worker.kill()
                self.kills[worker.name] += 1
                worker.start()
            except Exception as error:  # noqa: BLE001 - reported by the test
                self.errors.append(f"{worker.name}: {error!r}")

    def stop(self):
        self.halt.set()
        self.join(timeout=30)


def delete_queue(queue):
    from kombu import Connection

    try:
        with Connection(AMQP) as broker:
            broker.default_channel.queue_delete(queue=queue)
    except Exception:  # noqa: BLE001 - not there
        pass


def test_two_relays_killed_at_random_publish_every_scheduled_retry_exactly_once(tmp_path, worker_database, ledger):
    """RabbitMQ as broker: it gives a killed consumer's unacknowledged messages to the other one at
    once, so a kill re-runs what was in flight (a redelivered first attempt must not schedule its
    retry twice; a redelivered retry runs again with the same token) and nothing waits for a
    visibility timeout. No result backend: the ledger tells what ran."""
    rng = random.Random(SEED)
    run_id = uuid.uuid4().hex[:8]
    queue = f"safetynet-sched-{run_id}"
    app = configure_app(AMQP, "")
    env = {
        **os.environ,
        "SAFETYNET_TEST_BROKER": AMQP,
        "SAFETYNET_TEST_BACKEND": "",  # disabled
        "PYTHONPATH": str(ROOT),
        "DJANGO_SETTINGS_MODULE": "tests.settings",
        "SAFETYNET_TEST_DB": worker_database,
        "SAFETYNET_TEST_DURABLE_RETRY_SECONDS": "0.5",
    }
    env.pop("SAFETYNET_TEST_RECORD", None)
    workers = [ChaosWorker(name, queue, tmp_path, env) for name in ("a", "b")]
    chaos = Chaos(workers, rng)
    task_ids = {}
    started = time.monotonic()
    try:
        for worker in workers:
            worker.start()
        for worker in workers:
            worker.wait_ready()
        chaos.start()
        for index in range(TASKS):  # paced: the kills hit first attempts, relays and retries alike
            name = f"{run_id}-{index:04d}"
            delay = round(rng.uniform(1.0, 3.0), 2)
            task_ids[name] = scheduled_tasks.retry_later_acked_late.apply_async((name, delay), queue=queue).id
            pause = started + (index + 1) * SEND_SECONDS / TASKS - time.monotonic()
            if pause > 0:
                time.sleep(pause)
        sent_at = time.monotonic() - started
        time.sleep(max(0.0, CHAOS_SECONDS - (time.monotonic() - started)))
        chaos.stop()
        assert not chaos.errors, chaos.errors
        for worker in workers:
            if worker.process.poll() is not None:
                worker.start()
        for worker in workers:
            worker.wait_ready()

        def retried():
            with connection.cursor() as cursor:
                cursor.execute(f"SELECT count(DISTINCT name) FROM {scheduled_tasks.LEDGER} "
                               "WHERE starts_with(name, %s) AND attempt = 2", [run_id])
                return cursor.fetchone()[0]

        wait_until(lambda: retried() == TASKS, 90, f"every retry ran ({retried()} of {TASKS})")
        drained_at = time.monotonic() - started
        time.sleep(5)  # a late second copy would show by now
    finally:
        chaos.stop()
        for worker in workers:
            worker.stop()
        delete_queue(queue)
        release_app(app)

    runs = ledger(run_id, prefix=True)
    first_runs = Counter(name for name, _, attempt, _, _ in runs if attempt == 1)
    retry_tokens = defaultdict(Counter)
    for name, _task_id, attempt, relayed, _ in runs:
        if attempt >= 2:
            retry_tokens[name][relayed] += 1
    rows = {row["task_id"]: row for row in ScheduledMessage.objects.filter(task_id__in=task_ids.values()).values(
        "task_id", "key", "state", "token", "consumed_token", "publishes")}
    rows_per_task = Counter(ScheduledMessage.objects.filter(task_id__in=task_ids.values())
                            .values_list("task_id", flat=True))
    logs = "".join(worker.log.read_text(errors="replace") for worker in workers)
    summary = {
        "seed": SEED,
        "tasks": TASKS,
        "kills": dict(chaos.kills),
        "sent in (s)": round(sent_at, 1),
        "all retries ran after (s)": round(drained_at, 1),
        "first attempts run again (broker redelivery)": sum(count - 1 for count in first_runs.values()),
        "retries run again with the same token (broker redelivery)":
            sum(count - 1 for tokens in retry_tokens.values() for count in tokens.values()),
        "retries run with two or more tokens (two copies ran)":
            sum(1 for tokens in retry_tokens.values() if len(tokens) > 1),
        "second copies dropped on arrival": logs.count("a second copy of relayed message"),
        "relayed copies run unchecked (database error)": logs.count("could not check its relayed copy"),
        "rows published by more than one committed relay pass": sum(1 for row in rows.values()
                                                                   if row["publishes"] > 1),
        "relay publish failures": logs.count("relay could not publish"),
    }
    print("\nscheduled retries under kill -9:", summary)

    assert not chaos.errors, chaos.errors
    assert sum(chaos.kills.values()) >= 6, summary
    assert set(first_runs) == set(task_ids), summary  # every task ran (its first attempt at least once)
    missing = sorted(set(task_ids) - set(retry_tokens))
    assert not missing, (f"{len(missing)} retries never ran, e.g. {missing[:5]}", summary)
    twice = {name: dict(tokens) for name, tokens in retry_tokens.items() if len(tokens) > 1}
    assert not twice, (f"{len(twice)} retries were published and run more than once: {list(twice.items())[:5]}",
                       summary)
    not_relayed = [name for name, tokens in retry_tokens.items() if None in tokens]
    assert not not_relayed, (f"retries that did not go through the schedule: {not_relayed[:5]}", summary)
    beyond = [(name, attempt) for name, _, attempt, _, _ in runs if attempt > 2]
    assert not beyond, (beyond[:5], summary)
    # One row per task (a redelivered first attempt scheduled nothing twice), each consumed by the
    # copy that ran.
    assert set(rows_per_task.values()) == {1} and len(rows_per_task) == TASKS, summary
    wrong = []
    for name, task_id in task_ids.items():
        row = rows[task_id]
        [(key, token)] = retry_tokens[name]
        if (key, row["key"], row["state"], row["consumed_token"]) != (task_id,) * 2 + ("consumed", token):
            wrong.append((name, row, key, token))
    assert not wrong, (wrong[:5], summary)


# -- 4. a relay killed between sending and committing --------------------------------------------

# A relay pass in a process of its own that gets SIGKILL right after sending its messages, before
# its transaction commits: the moment the chaos test can only hope to hit. Everything else is the
# real relay (safetynet.schedule.relay) on the real broker and database.
DIE_BEFORE_COMMIT = """
import os, signal
import tests.celery_app
from safetynet import schedule
from safetynet.schedule import _relay

send = _relay._publish

def send_then_die(app, using, rows, token, *args, **kwargs):
    send(app, using, rows, token, *args, **kwargs)
    print("sent with token", token, "; dying before the commit", flush=True)
    os.kill(os.getpid(), signal.SIGKILL)

_relay._publish = send_then_die
schedule.relay(tests.celery_app.app)
"""


def test_a_relay_killed_after_sending_before_committing_leaves_a_second_copy_that_is_dropped(
        tmp_path, worker_database, spool_dir, ledger):
    broker, backend = BROKERS["redis"]
    app = configure_app(broker, backend)
    worker = Worker("copies", broker, backend, tmp_path, concurrency=2, database=worker_database,
                    spool_dir=spool_dir)  # started only once both copies are in its queue
    env = {**worker.env, "SAFETYNET_TEST_RECORD": ""}
    name = f"copies-{uuid.uuid4().hex[:8]}"
    with transaction.atomic():  # an outbox message due in an hour: nothing is published at the commit
        sent = scheduled_tasks.outboxed.apply_async((name,), queue=worker.queue, countdown=3600)
    [row] = rows_of(sent.id)
    assert (row["state"], row["publishes"]) == ("scheduled", 0)
    ScheduledMessage.objects.filter(key=sent.id).update(due_at=time.time())

    dying = subprocess.run([sys.executable, "-c", DIE_BEFORE_COMMIT], env=env, cwd=ROOT, capture_output=True,
                           text=True, timeout=60)
    assert dying.returncode == -signal.SIGKILL, dying.stderr[-3000:]
    assert "; dying before the commit" in dying.stdout, dying.stdout
    first_token = dying.stdout.split("sent with token ", 1)[1].split()[0]
    [row] = rows_of(sent.id)
    assert (row["state"], row["publishes"], row["token"]) == ("scheduled", 0, "")  # its pass rolled back

    again = subprocess.run([sys.executable, "tests/manage.py", "safetynet", "relay", "--once"], env=env, cwd=ROOT,
                           capture_output=True, text=True, timeout=60)
    assert again.returncode == 0, again.stderr[-3000:]
    [row] = rows_of(sent.id)
    assert (row["state"], row["publishes"]) == ("published", 1)
    second_token = row["token"]
    assert second_token != first_token

    import redis

    assert redis.Redis.from_url(broker).llen(worker.queue) == 2  # two copies of one message wait

    worker.start(app)  # two pool processes: the two copies may well be taken at the same moment
    try:
        assert sent.get(timeout=30) == name
        wait_until(lambda: "a second copy of relayed message" in worker.log.read_text(), 30, "the copy was dropped")
        time.sleep(2)
        [(_, task_id, attempt, relayed, _)] = ledger(name)  # one run, of one of the two copies
        assert (task_id, attempt) == (sent.id, 1)
        key, token = relayed
        assert key == sent.id and token in (first_token, second_token)
        [row] = rows_of(sent.id)
        assert (row["state"], row["consumed_token"]) == ("consumed", token)
        assert worker.log.read_text().count("a second copy of relayed message") == 1
        print(f"\nrelay killed before its commit: the copy of the {'dead' if token == first_token else 'second'} "
              "relay pass ran, the other was dropped")
    finally:
        worker.stop()
        release_app(app)
