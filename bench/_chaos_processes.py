"""The processes ``bench/chaos.py`` starts and kills: a private Redis and the Celery workers.

Every process is started in a session of its own, so ``os.killpg`` reaches a worker's main
process and its pool children at once (a ``kill -9`` of the whole worker, nothing of it left
to report the crash), and nothing else.
"""

from __future__ import annotations

import os
import random
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


class RedisServer:
    """A ``redis-server`` of the run's own, append-only file fsynced on every write.

    A SIGKILL and a start on the same directory bring back everything it had acknowledged:
    queued messages, unacknowledged ones, scheduled retries.
    """

    def __init__(self, directory: Path) -> None:
        self.directory, self.port = directory, free_port()
        self.url = f"redis://127.0.0.1:{self.port}/0"
        self.log = directory / "redis.log"
        self.process: subprocess.Popen | None = None
        self.restarts = 0

    def start(self, timeout: float = 30.0) -> None:
        command = [
            "redis-server", "--port", str(self.port), "--bind", "127.0.0.1", "--dir", str(self.directory),
            "--appendonly", "yes", "--appendfsync", "always", "--save", "", "--daemonize", "no",
            "--logfile", str(self.log),
        ]
        self.process = subprocess.Popen(command, stdin=subprocess.DEVNULL, stdout=subprocess.DEVNULL,
                                        stderr=subprocess.STDOUT, start_new_session=True)
        self.wait_ready(timeout)

    def client(self):
        import redis

        return redis.Redis.from_url(self.url, socket_timeout=5, socket_connect_timeout=2)

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
        """A warm shutdown, then SIGKILL for whatever is left of the group."""
        process = self.process
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


class Killer(threading.Thread):
    """Every ``low``–``high`` seconds (seeded), ``kill -9`` one of the workers and start it again."""

    def __init__(self, workers: list[Worker], *, seed: int, low: float = 2.0, high: float = 5.0) -> None:
        super().__init__(name="chaos-killer", daemon=True)
        self.workers, self.low, self.high = workers, low, high
        self.rng = random.Random(seed)
        self.halt = threading.Event()
        self.kills = 0
        self.errors: list[str] = []

    def run(self) -> None:
        while not self.halt.wait(self.rng.uniform(self.low, self.high)):
            worker = self.rng.choice(self.workers)
            try:
                worker.kill()
                worker.start()
                self.kills += 1
            except Exception as error:  # noqa: BLE001 - reported by the benchmark
                self.errors.append(f"{worker.name}: {error!r}")

    def stop(self) -> None:
        self.halt.set()
        self.join(timeout=30)
