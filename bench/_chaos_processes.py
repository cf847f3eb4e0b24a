"""The processes ``bench/chaos.py`` starts and kills: a private Redis and the Celery workers.

Every process is started in a session of its own, so ``os.killpg`` reaches a worker's main
process and its pool children at once (a ``kill -9`` of the whole worker, nothing of it left
to report the crash), and nothing else.
"""

from __future__ import annotations

import json
import os
import random
import shutil
import signal
import socket
import subprocess
import sys
import threading
import time
from pathlib import Path

HERE = Path(__file__).resolve().parent


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def _kill_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def tail(path: Path, lines: int = 40) -> str:
    try:
        return "\n".join(path.read_text(errors="replace").splitlines()[-lines:])
    except OSError:
        return "(no log)"


def stop_worker(process: subprocess.Popen | None, timeout: float = 15.0) -> None:
    """A worker's warm shutdown, then SIGKILL for whatever is left of its process group."""
    if process is None:
        return
    if process.poll() is None:
        _kill_group(process, signal.SIGTERM)
        try:
            process.wait(timeout=timeout)
        except subprocess.TimeoutExpired:
            pass
    _kill_group(process, signal.SIGKILL)  # pool children the warm shutdown left behind, if any
    try:
        process.wait(timeout=10)
    except subprocess.TimeoutExpired:
        pass


class RedisServer:
    """A ``redis-server`` of the run's own on a free port.

    ``durable=True`` (the chaos run): an append-only file fsynced on every write, so a SIGKILL and a
    start on the same directory bring back everything it had acknowledged: queued messages,
    unacknowledged ones, scheduled retries. ``durable=False``: in memory only.
    """

    def __init__(self, directory: Path, *, durable: bool = True) -> None:
        self.directory, self.port, self.durable = directory, free_port(), durable
        self.url = self.url_for(0)
        self.log = directory / "redis.log"
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def url_for(self, db: int) -> str:
        return f"redis://127.0.0.1:{self.port}/{db}"

    def start(self, timeout: float = 30.0) -> None:
        if shutil.which("redis-server") is None:
            raise SystemExit("this benchmark needs redis-server on the PATH (it runs a private one)")
        persistence = (["--appendonly", "yes", "--appendfsync", "always",
                        "--auto-aof-rewrite-percentage", "0"]  # the whole history stays, for lost_in_transport
                       if self.durable else ["--appendonly", "no"])
        command = ["redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
                   *persistence, "--save", "", "--daemonize", "no", "--logfile", str(self.log)]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)

    def client(self, db: int = 0, socket_timeout: float = 5, decode_responses: bool = False):
        import redis

        return redis.Redis.from_url(self.url_for(db), socket_timeout=socket_timeout, socket_connect_timeout=2,
                                    decode_responses=decode_responses)

    def wait_ready(self, timeout: float) -> None:
        import redis

        deadline = time.monotonic() + timeout
        client = self.client()
        while True:
            try:
                if client.ping():  # answers only once the append-only file is loaded
                    return
            except redis.RedisError:
                pass
            if self.process is not None and self.process.poll() is not None:
                raise RuntimeError(f"redis-server exited with {self.process.returncode}:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"redis-server on port {self.port} not ready after {timeout}s:\n{tail(self.log)}")
            time.sleep(0.05)

    def stop(self, timeout: float = 10.0) -> None:
        """SIGTERM, then SIGKILL after ``timeout``."""
        if self.process is not None and self.process.poll() is None:
            _kill_group(self.process, signal.SIGTERM)
            try:
                self.process.wait(timeout=timeout)
            except subprocess.TimeoutExpired:
                self.kill()

    def restart(self, down_seconds: float) -> float:
        """SIGKILL it, leave it down ``down_seconds``, start it again; return how long it was away."""
        began = time.monotonic()
        self.kill()
        time.sleep(down_seconds)
        self.start()
        self.restarts += 1
        return time.monotonic() - began

    def kill(self) -> None:
        if self.process is not None and self.process.poll() is None:
            _kill_group(self.process, signal.SIGKILL)
            self.process.wait(timeout=10)


class Worker:
    """A prefork ``celery worker`` (4 children) on one system's queue; killed and started again."""

    def __init__(self, name: str, queue: str, env: dict[str, str], log_dir: Path, concurrency: int) -> None:
        self.name, self.queue, self.log_dir = name, queue, log_dir
        self.ready_dir = log_dir / f"ready-{name}"
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**env, "SAFETYNET_CHAOS_READY_DIR": str(self.ready_dir)}
        self.command = [
            sys.executable, "-m", "celery", "-A", "_chaos_tasks", "worker", "-Q", queue, "-n", f"{name}@%h",
            "--pool=prefork", f"--concurrency={concurrency}", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "info",
        ]
        self.process: subprocess.Popen | None = None
        self.generation = 0
        self.log = log_dir / f"{name}.log"

    def start(self) -> None:
        self.generation += 1
        with open(self.log, "ab") as log:
            log.write(f"\n===== chaos: start #{self.generation} at {time.strftime('%H:%M:%S')} =====\n".encode())
            log.flush()
            self.process = subprocess.Popen(self.command, env=self.env, cwd=str(HERE), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def is_ready(self) -> bool:
        return self.process is not None and (self.ready_dir / f"ready.{self.process.pid}").exists()

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not self.is_ready():
            if self.process is None or self.process.poll() is not None:
                raise RuntimeError(f"worker {self.name} exited:\n{tail(self.log)}")
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready after {timeout}s:\n{tail(self.log)}")
            time.sleep(0.1)

    def kill(self) -> None:
        """``kill -9`` the whole worker: main process and pool children."""
        if self.process is not None:
            with open(self.log, "ab") as log:
                log.write(f"\n===== chaos: kill -9 at {time.strftime('%H:%M:%S')} =====\n".encode())
            _kill_group(self.process, signal.SIGKILL)
            self.process.wait(timeout=10)

    def stop(self, timeout: float = 15.0) -> None:
        stop_worker(self.process, timeout)


class Chaos(threading.Thread):
    """The workers' supervisor, and their chaos while ``killing`` is on.

    Every ``low``-``high`` seconds (seeded) one of the workers, picked at random, gets
    ``kill -9`` and is started again. Like a process supervisor (systemd, Kubernetes), it
    also starts again a worker that exited by itself, until ``stop()``.
    """

    def __init__(self, workers: list[Worker], *, seed: int, low: float = 2.0, high: float = 5.0) -> None:
        super().__init__(name="chaos", daemon=True)
        self.workers, self.low, self.high = workers, low, high
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.killing = True
        self.kills = 0
        self.exits: list[str] = []
        self.errors: list[str] = []

    def run(self) -> None:
        next_kill = time.monotonic() + self.rng.uniform(self.low, self.high)
        while not self.halt.wait(0.25):
            for worker in self.workers:
                code = worker.process.poll() if worker.process is not None else None
                if code is not None:
                    self.exits.append(f"{worker.name} #{worker.generation} exited with {code}")
                    self._restart(worker, kill=False)
            if self.killing and time.monotonic() >= next_kill:
                self._restart(self.rng.choice(self.workers), kill=True)
                next_kill = time.monotonic() + self.rng.uniform(self.low, self.high)

    def _restart(self, worker: Worker, *, kill: bool) -> None:
        try:
            if kill:
                worker.kill()
                self.kills += 1
            worker.start()
        except Exception as error:  # noqa: BLE001 - reported by the benchmark
            self.errors.append(f"{worker.name}: {error!r}")

    def stop_killing(self) -> None:
        self.killing = False

    def stop(self) -> None:
        self.halt.set()
        if self.is_alive():
            self.join(timeout=30)


class RedisBroker:
    """The private Redis as the broker: queues are lists, messages in flight sit in ``unacked``."""

    name = "redis"

    def __init__(self, redis_server: RedisServer) -> None:
        self.redis_server, self.url = redis_server, redis_server.url

    def reset(self, queue: str) -> None:
        self.redis_server.client().flushall()  # the server is the run's own

    def backlog(self, queue: str) -> int:
        """Messages still in the broker: queued (any priority), unacknowledged or scheduled."""
        client = self.redis_server.client()
        backlog = client.hlen("unacked")
        for key in client.scan_iter(match=f"{queue}*", count=1000):
            if client.type(key) == b"list":
                backlog += client.llen(key)
        return backlog

    def copies(self, queue: str, task_id: str) -> int:
        """Copies of a task's message still in the broker."""
        client = self.redis_server.client()
        found = sum(1 for value in client.hvals("unacked") if task_id.encode() in value)
        for key in client.scan_iter(match=f"{queue}*"):
            if client.type(key) == b"list":
                found += sum(1 for value in client.lrange(key, 0, -1) if task_id.encode() in value)
        return found

    def cleanup(self, queue: str) -> None:
        pass

    def lost_in_transport(self, queue: str, task_ids: set[str]) -> set[str]:
        """Which of ``task_ids`` had a message taken off the queue and never recorded as unacknowledged.

        kombu's Redis transport takes a message with BRPOP, then records it in the ``unacked``
        hash with a second command; a worker killed in between takes the message with it. The
        append-only file holds every write since the run's FLUSHALL, so this is read from it:
        a message pushed onto the queue (published, or put back after its visibility timeout)
        with no ``HSET unacked`` of its delivery tag afterwards, and not in the broker now, was
        popped and dropped.
        """
        pushed: dict[str, int] = {}  # delivery tag -> index of its last push
        recorded: dict[str, int] = {}  # delivery tag -> index of its last HSET unacked
        owner: dict[str, str] = {}  # delivery tag -> task id
        wanted = {task_id.encode() for task_id in task_ids}
        for index, command in enumerate(self._commands()):
            name = command[0].upper()
            if name == b"FLUSHALL":  # the start of this system's run
                pushed, recorded, owner = {}, {}, {}
            elif name in (b"LPUSH", b"RPUSH") and command[1].startswith(queue.encode()):
                for value in command[2:]:
                    if any(task_id in value for task_id in wanted):
                        message = json.loads(value)
                        tag = message["properties"]["delivery_tag"]
                        pushed[tag], owner[tag] = index, message["headers"]["id"]
            elif name == b"HSET" and command[1] == b"unacked":
                recorded[command[2].decode()] = index
        in_broker = {task_id for task_id in task_ids if self.copies(queue, task_id)}
        return {owner[tag] for tag, index in pushed.items()
                if recorded.get(tag, -1) < index and owner[tag] not in in_broker}

    def _commands(self):
        """The commands of the append-only files, oldest first (RESP arrays of bulk strings)."""
        directory = self.redis_server.directory / "appendonlydir"
        manifest = next(directory.glob("*.manifest"), None)
        if manifest is None:
            return
        for line in manifest.read_text().splitlines():
            fields = line.split()
            if len(fields) >= 6 and fields[5] == "i":
                data = (directory / fields[1]).read_bytes()
                position = 0
                while position < len(data):
                    end = data.index(b"\r\n", position)
                    header, position = data[position:end], end + 2
                    if not header.startswith(b"*"):
                        continue
                    command = []
                    for _ in range(int(header[1:])):
                        end = data.index(b"\r\n", position)
                        length = int(data[position + 1:end])
                        command.append(data[end + 2:end + 2 + length])
                        position = end + 2 + length + 2
                    yield command


class RabbitBroker:
    """A RabbitMQ server (shared: the run uses queues of its own and deletes them)."""

    name = "rabbitmq"

    def __init__(self, url: str) -> None:
        self.url = url

    def reset(self, queue: str) -> None:
        self.cleanup(queue)

    def backlog(self, queue: str) -> int:
        """Ready plus unacknowledged messages of the queue (``rabbitmqctl``; ready only without it)."""
        try:
            listing = subprocess.run(
                ["rabbitmqctl", "list_queues", "-q", "name", "messages_ready", "messages_unacknowledged"],
                capture_output=True, text=True, timeout=20, check=True,
            ).stdout
            for line in listing.splitlines():
                fields = line.split()
                if len(fields) == 3 and fields[0] == queue:
                    return int(fields[1]) + int(fields[2])
            return 0
        except (OSError, subprocess.SubprocessError, ValueError):
            from kombu import Connection

            with Connection(self.url) as connection:
                _, ready, _ = connection.default_channel.queue_declare(queue=queue, passive=True)
                return ready

    def copies(self, queue: str, task_id: str) -> int:
        return -1  # not looked for: reading would take the messages

    def lost_in_transport(self, queue: str, task_ids: set[str]) -> set[str]:
        return set()  # RabbitMQ puts back what a dead consumer held

    def cleanup(self, queue: str) -> None:
        from kombu import Connection

        try:
            with Connection(self.url) as connection:
                connection.default_channel.queue_delete(queue=queue)
        except Exception:  # noqa: BLE001 - not there
            pass
