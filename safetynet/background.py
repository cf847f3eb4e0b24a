"""Background jobs: one runner per process for the periodic work safetynet does beside the tasks.

Each job has a name, a cadence and a lane; a lane is one daemon thread that runs its jobs when
they are due, one after the other. Jobs that must not wait for each other go in different lanes
(the heartbeat that keeps idempotency claims alive never waits for a slow stats flush; the relay
never waits for a housekeeping delete). A job that raises is logged and tried again at its next
turn; a job whose ``leader`` lock another process holds is skipped (hourly housekeeping runs in
one worker at a time). After a fork the child starts with no jobs: what it needs it adds again.

Jobs of the worker's main process (started at ``worker_ready``): relay, orphan sweep, spool
flush, housekeeping. Jobs of every process: the claims' heartbeat, the stats flush.
"""

from __future__ import annotations

import logging
import os
import threading
import time
import uuid
from collections.abc import Callable
from dataclasses import dataclass, field

from safetynet import shared

__all__ = ["Job", "Runner", "runner"]

logger = logging.getLogger("safetynet")


@dataclass(eq=False)
class Job:
    """A periodic job: ``run()`` returns the seconds until its next turn, or None for its ``interval``."""

    name: str
    run: Callable[[], float | None]
    #: Seconds between turns (a callable is read at every turn: settings may change).
    interval: float | Callable[[], float]
    lane: str = "background"
    #: A lock name: only the process holding it runs the job (for ``interval`` seconds at a time).
    leader: str | None = None
    #: Run at once when added (else after one interval).
    at_start: bool = True
    due: float = field(default=0.0, repr=False)

    def seconds(self) -> float:
        """The interval now."""
        return float(self.interval() if callable(self.interval) else self.interval)


class _Lane:
    """One thread running the jobs of a lane."""

    def __init__(self, name: str) -> None:
        self.name = name
        self.jobs: dict[str, Job] = {}
        self.wake = threading.Event()
        self.stopping = False
        self.thread: threading.Thread | None = None

    def ensure_running(self) -> None:
        if self.thread is None or not self.thread.is_alive():
            self.stopping = False
            self.thread = threading.Thread(target=self.loop, name=f"safetynet-{self.name}", daemon=True)
            self.thread.start()

    def loop(self) -> None:
        while not self.stopping:
            now = time.monotonic()
            jobs = list(self.jobs.values())
            for job in jobs:
                if self.stopping:
                    return
                if job.due <= now:
                    job.due = now + _turn(job)
                    now = time.monotonic()
            wait = min((job.due for job in self.jobs.values()), default=now + 60.0) - time.monotonic()
            if wait > 0 and self.wake.wait(min(wait, 60.0)):
                self.wake.clear()


def _turn(job: Job) -> float:
    """Run one turn of ``job``; the seconds until its next one."""
    try:
        if job.leader is not None and not _lead(job.leader, job.seconds()):
            return job.seconds()
        after = job.run()
        return job.seconds() if after is None else max(0.0, after)
    except Exception as error:  # never let a lane die: its jobs would stop for good
        logger.warning("safetynet: background job %s failed: %r", job.name, error, extra={"job": job.name})
        _close_connections()
        return job.seconds()


_owner = uuid.uuid4().hex


def _lead(lock: str, seconds: float) -> bool:
    """True if this process holds ``lock`` for the next ``seconds`` (taken now, or held already)."""
    holder = shared.add(f"leader:{lock}", _owner, max(1.0, seconds * 0.9))
    return holder is None or holder == _owner


def _close_connections() -> None:
    try:
        from django.db import close_old_connections

        close_old_connections()
    except Exception:  # closing must not disturb the runner
        logger.debug("safetynet: could not close old database connections", exc_info=True)


class Runner:
    """The jobs of this process, by lane."""

    def __init__(self) -> None:
        self.lock = threading.Lock()
        self.lanes: dict[str, _Lane] = {}
        self.pid = os.getpid()

    def add(self, job: Job) -> Job:
        """Run ``job`` from now on (a job of the same name already added stays as it is); return the job running."""
        with self.lock:
            self._after_fork()
            lane = self.lanes.get(job.lane)
            if lane is None:
                lane = self.lanes[job.lane] = _Lane(job.lane)
            current = lane.jobs.get(job.name)
            if current is None:
                job.due = time.monotonic() + (0.0 if job.at_start else job.seconds())
                lane.jobs[job.name] = current = job
                lane.wake.set()
            lane.ensure_running()
            return current

    def wake(self, lane: str, *, now: bool = False, job: str | None = None) -> None:
        """Look at ``lane``'s jobs again (their interval may have shrunk); ``now``: run ``job`` at once."""
        with self.lock:
            found = self.lanes.get(lane)
            if found is None:
                return
            if now and job is not None and job in found.jobs:
                found.jobs[job].due = 0.0
            found.wake.set()

    def has(self, name: str) -> bool:
        """Whether a job called ``name`` runs in this process."""
        with self.lock:
            self._after_fork()
            return any(name in lane.jobs for lane in self.lanes.values())

    def stop(self) -> None:
        """Stop every lane after the turn it is in (the jobs are forgotten)."""
        with self.lock:
            for lane in self.lanes.values():
                lane.stopping = True
                lane.wake.set()
            self.lanes = {}

    def _after_fork(self) -> None:
        if self.pid != os.getpid():  # the parent's threads did not come along: start afresh
            self.pid = os.getpid()
            self.lanes = {}


runner = Runner()


def _reset_in_child() -> None:
    runner.lock = threading.Lock()
    runner.pid = os.getpid()
    runner.lanes = {}


if hasattr(os, "register_at_fork"):
    os.register_at_fork(after_in_child=_reset_in_child)
