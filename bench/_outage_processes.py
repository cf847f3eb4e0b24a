"""The processes ``bench/outage.py`` starts: a private Redis and the Celery workers.

Each one is started in a session of its own, so ``os.killpg`` reaches a worker's main
process and its pool children, and nothing else.
"""

from __future__ import annotations

import subprocess
import sys
import time
from pathlib import Path

# The private Redis, a free port and a log's tail are the chaos benchmark's.
from _chaos_processes import RedisServer, free_port, stop_worker, tail  # noqa: F401

HERE = Path(__file__).resolve().parent


class Worker:
    """A prefork ``celery worker`` on one system's queue."""

    def __init__(self, name: str, queue: str, env: dict[str, str], log_dir: Path, concurrency: int) -> None:
        self.name, self.log_dir = name, log_dir
        self.ready_dir = log_dir / f"ready-{name}"
        self.ready_dir.mkdir(parents=True, exist_ok=True)
        self.env = {**env, "SAFETYNET_OUTAGE_READY_DIR": str(self.ready_dir)}
        self.command = [
            sys.executable, "-m", "celery", "-A", "_outage_tasks", "worker", "-Q", queue, "-n", f"{name}@%h",
            "--pool=prefork", f"--concurrency={concurrency}", "--without-gossip", "--without-mingle",
            "--without-heartbeat", "-l", "info",
        ]
        self.process: subprocess.Popen | None = None
        self.log = log_dir / f"{name}.log"

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

    def stop(self, timeout: float = 15.0) -> None:
        stop_worker(self.process, timeout)
