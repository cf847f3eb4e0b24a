"""The processes ``bench/long_retries.py`` starts: a private Redis and the Celery workers, and their memory.

Every process is started in a session of its own, so that a signal to its process group reaches
a worker's main process and its pool children at once, and nothing else.
"""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from dataclasses import dataclass
from pathlib import Path

from _chaos_processes import RedisServer, tail

HERE = Path(__file__).resolve().parent
CONCURRENCY = 2
MiB = 1024.0


def _signal_group(process: subprocess.Popen, sig: int) -> None:
    try:
        os.killpg(process.pid, sig)
    except ProcessLookupError:
        pass


def stop(processes: list[subprocess.Popen], timeout: float) -> None:
    """SIGTERM every process group at once, wait up to ``timeout`` s, then SIGKILL what is left."""
    running = [process for process in processes if process.poll() is None]
    for process in running:
        _signal_group(process, signal.SIGTERM)
    deadline = time.monotonic() + timeout
    for process in running:
        try:
            process.wait(timeout=max(0.1, deadline - time.monotonic()))
        except subprocess.TimeoutExpired:
            pass
    for process in running:  # not a group that was gone already: its id may belong to someone else by now
        _signal_group(process, signal.SIGKILL)  # pool children a warm shutdown left behind, if any
        try:
            process.wait(timeout=10)
        except subprocess.TimeoutExpired:
            pass


@dataclass
class Rss:
    """Resident set sizes (KiB) of a worker's main process and of its pool children."""

    main: int
    children: list[int]

    @property
    def total(self) -> int:
        return self.main + sum(self.children)

    @property
    def pool(self) -> int:
        return sum(self.children)

    def __str__(self) -> str:
        return f"{self.total / MiB:.1f} MiB"


def _vm_rss(pid: int) -> int | None:
    try:
        for line in Path(f"/proc/{pid}/status").read_text().splitlines():
            if line.startswith("VmRSS:"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _children(pid: int) -> list[int]:
    found = []
    for entry in os.scandir("/proc"):
        if not entry.name.isdigit():
            continue
        try:
            stat = Path(entry.path, "stat").read_text()
        except OSError:
            continue
        if int(stat.rsplit(")", 1)[1].split()[1]) == pid:  # the field after the command name is the ppid
            found.append(int(entry.name))
    return sorted(found)


class Worker:
    """A prefork ``celery worker`` (2 children) on a queue, a Redis database and a PostgreSQL database of its own."""

    def __init__(self, system: str, batch: str, redis_db: int, redis_server: RedisServer, database: str,
                 visibility_timeout: float, env: dict[str, str], log_dir: Path, run_id: str) -> None:
        self.system, self.batch = system, batch
        self.name = f"{system}/{batch}"
        self.queue = f"long.{run_id}.{system}.{batch}"
        self.broker_url = redis_server.url_for(redis_db)
        self.client = redis_server.client(redis_db, socket_timeout=10)
        self.ready_dir = log_dir / f"ready-{system}-{batch}"
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        self.log = log_dir / f"{system}-{batch}.log"
        self.env = {**env, "SAFETYNET_LONG_BROKER": self.broker_url, "SAFETYNET_LONG_DB": database,
                    "SAFETYNET_LONG_VISIBILITY": str(visibility_timeout),
                    "SAFETYNET_LONG_READY_DIR": str(self.ready_dir)}
        self.command = [
            sys.executable, "-m", "celery", "-A", "_long_retries_tasks", "worker", "-Q", self.queue,
            "-n", f"long-{run_id}-{system}-{batch}@%h", "--pool=prefork", f"--concurrency={CONCURRENCY}",
            "--without-gossip", "--without-mingle", "--without-heartbeat", "-l", "warning",
        ]
        self.process: subprocess.Popen | None = None
        self.connection = self.producer = None

    def start(self) -> None:
        with open(self.log, "ab") as log:
            self.process = subprocess.Popen(self.command, env=self.env, cwd=str(HERE), stdin=subprocess.DEVNULL,
                                            stdout=log, stderr=subprocess.STDOUT, start_new_session=True)

    def wait_ready(self, timeout: float) -> None:
        deadline = time.monotonic() + timeout
        while not (self.ready_dir / f"ready.{self.process.pid}").exists():
            self.check_alive()
            if time.monotonic() > deadline:
                raise RuntimeError(f"worker {self.name} not ready after {timeout:g}s:\n{tail(self.log)}")
            time.sleep(0.1)
        from _long_retries_tasks import app

        # The benchmark publishes to the worker's own Redis database through a producer of its own.
        self.connection = app.connection_for_write(self.broker_url)
        self.producer = app.amqp.Producer(self.connection)

    def terminate(self) -> None:
        """Ask for a warm shutdown and go on (``stop`` waits for it)."""
        if self.process is not None and self.process.poll() is None:
            _signal_group(self.process, signal.SIGTERM)

    def check_alive(self) -> None:
        if self.process is None or self.process.poll() is not None:
            code = None if self.process is None else self.process.returncode
            raise RuntimeError(f"worker {self.name} exited ({code}):\n{tail(self.log)}")

    def publish(self, batch: str, first: int, count: int, delay: float) -> None:
        import _long_retries_tasks as tasks

        task = tasks.TASKS[self.system]
        for n in range(first, first + count):
            task.apply_async((n, delay), task_id=tasks.task_id(batch, n), queue=self.queue, producer=self.producer)

    def rss(self) -> Rss:
        main = _vm_rss(self.process.pid)
        if main is None:
            self.check_alive()
            raise RuntimeError(f"cannot read the RSS of worker {self.name} (pid {self.process.pid})")
        children = [size for size in map(_vm_rss, _children(self.process.pid)) if size is not None]
        return Rss(main, children)

    def received(self, batch: str) -> tuple[int, int]:
        """Task messages of ``batch`` the worker received: (first attempts, retries). Lags up to 0.5 s."""
        from _long_retries_tasks import RECEIVED

        counts = self.client.hgetall(RECEIVED)
        return (int(counts.get(f"{batch}:first".encode(), 0)), int(counts.get(f"{batch}:retry".encode(), 0)))

    def backlog(self) -> int:
        """Messages still in the broker: queued, or delivered and not acknowledged."""
        return self.client.llen(self.queue) + self.client.hlen("unacked")

    def close(self) -> None:
        if self.connection is not None:
            self.connection.release()
            self.connection = self.producer = None
