"""What the queues page asks the broker and the workers: read-only, bounded in time, cached.

- Queue depth: a passive ``queue_declare`` per queue (kombu's: ``LLEN`` of the queue's lists on
  Redis, the queue's message count on RabbitMQ). A queue the broker does not know has no depth
  (Redis keeps no empty list: "empty"; RabbitMQ: "not declared").
- Workers: one ``inspect`` broadcast each for ``active_queues``, ``active``, ``reserved`` and
  ``scheduled``, sent at the same time with a short timeout; the answer is cached for a few seconds
  and served while a new one is asked (stale while revalidating), so a page never waits for workers
  that are not there.

Every call to the broker runs on a small thread pool with a deadline: a broker that is slow or away
makes the page say "unknown" within ``BROKER_TIMEOUT`` seconds, never hang it. At most one probe
of each kind runs at a time; a request arriving meanwhile waits for the same one.
"""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor
from concurrent.futures import TimeoutError as FutureTimeout
from dataclasses import dataclass, field
from typing import Any

__all__ = ["BROKER_TIMEOUT", "DEPTH_CACHE_SECONDS", "WORKER_CACHE_SECONDS", "Snapshot", "snapshot"]

#: How long the page waits for the broker (connect and every reply), in seconds.
BROKER_TIMEOUT = 1.0
#: How long the workers are asked each time (an inspect broadcast waits this long for replies).
INSPECT_TIMEOUT = 0.6
#: How long a depth reading and a workers' answer are served before being asked again.
DEPTH_CACHE_SECONDS = 2.0
WORKER_CACHE_SECONDS = 5.0
#: An answer older than this is not shown while the workers are asked again: the page waits for the new one.
STALE_SECONDS = 30.0

_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="safetynet-broker")
#: The four inspect broadcasts of one probe run side by side here (never on ``_pool``, which runs the probe).
_inspect_pool = ThreadPoolExecutor(max_workers=4, thread_name_prefix="safetynet-inspect")
_lock = threading.Lock()
_running: dict[str, Future] = {}
_cache: dict[str, tuple[float, Any]] = {}
#: When each worker last answered, per broker: a worker that stops answering is shown as silent, not dropped.
_seen: dict[str, dict[str, float]] = {}
#: How long a worker that stopped answering stays on the page.
SILENT_SHOWN_SECONDS = 600.0


@dataclass
class Snapshot:
    """One reading of the broker and the workers, as the queues page shows it."""

    queues: list[dict[str, Any]] = field(default_factory=list)
    workers: list[dict[str, Any]] = field(default_factory=list)
    #: Why the depths or the workers are unknown ("" when they are known).
    broker_error: str = ""
    workers_error: str = ""
    #: When the workers were last asked (epoch seconds; None: never answered yet).
    workers_asked_at: float | None = None
    broker: str = ""


def _start(key: str, job: Callable[[], Any], *, fresh_for: float) -> tuple[tuple[float, Any] | None, Future | None]:
    """The cached answer of ``job`` (with its age) and, when it is older than ``fresh_for``, the probe asking again
    (one at a time per key: a request arriving meanwhile gets the running one)."""
    now = time.monotonic()
    with _lock:
        cached = _cache.get(key)
        if cached is not None and now - cached[0] < fresh_for:
            return cached, None
        future = _running.get(key)
        if future is None:
            future = _pool.submit(job)
            _running[key] = future

            def done(finished: Future, key: str = key) -> None:
                with _lock:
                    _running.pop(key, None)
                    # A failure is remembered too: the next page does not wait for it again at once.
                    _cache[key] = (time.monotonic(), finished.exception() or finished.result())

            future.add_done_callback(done)
    return cached, future


def _answer(cached: tuple[float, Any] | None, future: Future | None, deadline: float) -> tuple[Any, str]:
    """What a probe answered by ``deadline`` (monotonic), else the cached answer, else why there is none."""
    value: Any = cached[1] if cached is not None else None
    if future is not None:
        try:
            value = future.result(timeout=max(0.0, deadline - time.monotonic()))
        except FutureTimeout:
            if cached is None:
                return None, f"no answer within {BROKER_TIMEOUT:g} s"
        except Exception as error:
            return None, _said(error)
    if isinstance(value, BaseException):
        return None, _said(value)
    return value, ""


def _said(error: BaseException) -> str:
    text = str(error).splitlines()[0][:200] if str(error) else ""
    return f"{type(error).__name__}{': ' + text if text else ''}"


#: Transports whose every reply waits at most ``socket_timeout`` (kombu's Redis ones); the others (RabbitMQ's
#: ``connect_timeout`` aside) take no such option: SQLAlchemy's would refuse it.
_SOCKET_TIMEOUT_TRANSPORTS = ("redis", "rediss", "sentinel")


def _connection(app: Any) -> Any:
    options: dict[str, Any] = {}
    if str(app.connection_for_read().transport_cls) in _SOCKET_TIMEOUT_TRANSPORTS:
        options = {"socket_timeout": BROKER_TIMEOUT, "socket_connect_timeout": BROKER_TIMEOUT}
    return app.connection_for_read(connect_timeout=BROKER_TIMEOUT, transport_options=options)


def _depths(app: Any, names: list[str]) -> dict[str, tuple[int | None, str]]:
    """Each queue's depth by a passive declare: (count, note)."""
    found: dict[str, tuple[int | None, str]] = {}
    with _connection(app) as connection:
        connection.ensure_connection(max_retries=1, timeout=BROKER_TIMEOUT)
        channel = connection.channel()
        try:
            for name in names:
                try:
                    _, count, _ = channel.queue_declare(queue=name, passive=True)
                    found[name] = (int(count), "")
                except Exception as error:
                    if "NOT_FOUND" not in str(error) and "404" not in str(error):
                        raise
                    # Redis keeps no empty list; RabbitMQ closes the channel on a queue it does not know.
                    found[name] = (0, "empty") if connection.transport_cls in ("redis", "rediss") else (
                        None, "not declared")
                    channel = connection.channel()
        finally:
            try:
                channel.close()
            except Exception:
                pass
    return found


def _ask_workers(app: Any) -> dict[str, Any]:
    """``active_queues``, ``active``, ``reserved`` and ``scheduled`` of every worker that answers, in parallel."""
    def ask(method: str) -> dict[str, Any]:
        with _connection(app) as connection:
            inspect = app.control.inspect(timeout=INSPECT_TIMEOUT, connection=connection)
            return getattr(inspect, method)() or {}

    futures = {method: _inspect_pool.submit(ask, method) for method in ("active_queues", "active", "reserved", "scheduled")}
    answers = {method: future.result(timeout=INSPECT_TIMEOUT + BROKER_TIMEOUT + 1)
               for method, future in futures.items()}
    return {"asked_at": time.time(), **answers}


def _routing_key(task: Any) -> str:
    request = task.get("request", task) if isinstance(task, dict) else {}
    info = request.get("delivery_info") or {}
    return str(info.get("routing_key") or "")


def known_queues(app: Any, workers: dict[str, Any] | None) -> list[str]:
    """The default queue, the declared ones, those of static routes, and those the workers consume."""
    names = [app.conf.task_default_queue or "celery"]
    for queue in app.conf.task_queues or ():
        names.append(getattr(queue, "name", str(queue)))
    routes = app.conf.task_routes
    for route in (routes.values() if isinstance(routes, dict) else ()):
        if isinstance(route, dict) and route.get("queue"):
            names.append(str(route["queue"]))
    for queues in ((workers or {}).get("active_queues") or {}).values():
        for queue in queues or ():
            if isinstance(queue, dict) and queue.get("name") and not queue.get("exclusive"):
                names.append(str(queue["name"]))
    return sorted(set(names), key=lambda name: (name != names[0], name))


def snapshot(app: Any) -> Snapshot:
    """Queues with their depth, in-flight and scheduled counts, and the workers that answered.

    The broker and the workers are asked at the same time; the page waits for neither longer than
    ``BROKER_TIMEOUT`` (the workers' last answer, if any, is shown while they are asked again).
    """
    broker = app.connection_for_read().as_uri()  # the password masked
    workers_key = f"{broker}|workers"
    cached_workers = _cache.get(workers_key)
    known = cached_workers[1] if cached_workers and isinstance(cached_workers[1], dict) else None
    names = known_queues(app, known)
    began = time.monotonic()
    workers_cached, workers_probe = _start(workers_key, lambda: _ask_workers(app),
                                           fresh_for=WORKER_CACHE_SECONDS)
    depths_cached, depths_probe = _start(f"{broker}|depth:" + ",".join(names), lambda: _depths(app, names),
                                         fresh_for=DEPTH_CACHE_SECONDS)
    depths, broker_error = _answer(depths_cached, depths_probe, began + BROKER_TIMEOUT)
    # Stale while revalidating: with a recent answer, the page does not wait for the workers; with an old one
    # (nobody looked for a while) it waits for the new answer, up to its deadline.
    recent = workers_cached is not None and time.monotonic() - workers_cached[0] < STALE_SECONDS
    workers, workers_error = _answer(workers_cached, None if recent else workers_probe,
                                     began + max(BROKER_TIMEOUT, INSPECT_TIMEOUT + 0.2))
    if workers is None and workers_cached is None and workers_probe is not None and not workers_error:
        workers_error = "asking them"
    shown = Snapshot(broker=broker, broker_error=broker_error, workers_error=workers_error)
    in_flight: dict[str, int] = {}
    scheduled: dict[str, int] = {}
    consumers: dict[str, list[str]] = {}
    if workers:
        shown.workers_asked_at = workers["asked_at"]
        for name, queues in sorted((workers.get("active_queues") or {}).items()):
            active = (workers.get("active") or {}).get(name) or []
            reserved = (workers.get("reserved") or {}).get(name) or []
            held = (workers.get("scheduled") or {}).get(name) or []
            for task in [*active, *reserved]:
                in_flight[_routing_key(task)] = in_flight.get(_routing_key(task), 0) + 1
            for task in held:
                scheduled[_routing_key(task)] = scheduled.get(_routing_key(task), 0) + 1
            queue_names = [str(queue.get("name")) for queue in queues or () if isinstance(queue, dict)]
            for queue in queue_names:
                consumers.setdefault(queue, []).append(name)
            _seen.setdefault(broker, {})[name] = workers["asked_at"]
            shown.workers.append({"name": name, "queues": queue_names, "active": len(active),
                                  "reserved": len(reserved), "scheduled": len(held),
                                  "last_answer": workers["asked_at"], "answering": True})
    # A worker that answered before but not this time is shown, silent, for a while: it may be busy or gone.
    answered = {worker["name"] for worker in shown.workers}
    for name, last in sorted(_seen.get(broker, {}).items()):
        if name not in answered and time.time() - last < SILENT_SHOWN_SECONDS:
            shown.workers.append({"name": name, "queues": [], "active": None, "reserved": None, "scheduled": None,
                                  "last_answer": last, "answering": False})
    for name in names:
        depth, note = (depths or {}).get(name, (None, ""))
        shown.queues.append({"name": name, "depth": depth, "note": note or ("" if depths else "unknown"),
                             "in_flight": in_flight.get(name, 0) if workers else None,
                             "scheduled": scheduled.get(name, 0) if workers else None,
                             "consumers": consumers.get(name, [])})
    return shown


def forget() -> None:
    """Drop every cached answer (tests; a changed broker)."""
    with _lock:
        _cache.clear()
        _seen.clear()
