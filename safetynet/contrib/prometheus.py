"""Prometheus metrics for safetynet tasks; needs ``prometheus_client`` (the ``prometheus`` extra).

Metrics (``task`` is the task name, or ``(unregistered)`` for an unknown, undecodable or malformed
message whose name no registered task has: ``stats.counted_name``; no other per-task label)::

    safetynet_task_attempts_total{task, outcome}   attempts by how they ended: success, retry, snooze, dead
    safetynet_task_dead_total{task, reason}        tasks given up, by dead-letter reason
    safetynet_task_runtime_seconds{task}           histogram: how long an attempt ran in the worker
    safetynet_task_retry_delay_seconds{task}       histogram: the wait scheduled before the next attempt
    safetynet_dead_letters_evicted_total           dead-letter rows deleted by DEAD_LETTER_MAX_ROWS
    safetynet_dead_letters{task}                   dead letters waiting for a decision (status "dead"),
                                                   read from the database at scrape time
    safetynet_limit_deferrals_total{limit, reason} calls (task runs) a limit deferred: concurrency, rate, paused
    safetynet_limit_wait_seconds{limit}            histogram: the wait a deferral scheduled (until the task's turn)
    safetynet_limit_pauses_total{limit}            a 429 paused the limit (tighten_on_429)
    safetynet_limit_slots_in_use{limit}            concurrency slots held now, over every partition, and
    safetynet_limit_calls_in_window{limit}         calls in the rate's window now: read from the shared store
                                                   at scrape time

Where each number comes from:

- ``safetynet.signals.task_ended`` (once per task, wherever it ended): a ``success`` with its run
  time, or a ``dead`` by reason (a death in the worker child with its run time);
- ``safetynet.signals.task_retrying``: a ``retry`` or ``snooze``, the attempt's run time and the delay;
- ``safetynet.signals.dead_letters_evicted``: the evictions;
- the ``DeadLetterCollector``: one GROUP BY query per scrape.

Under Celery's prefork pool the counting happens in the child processes: start the worker
with ``PROMETHEUS_MULTIPROC_DIR`` set to an empty directory (before anything imports
``prometheus_client``) and every exposition here reads all processes' files through
``prometheus_client.multiprocess.MultiProcessCollector``.

Exposed by ``metrics_view`` (a Django view, counters plus the dead-letter gauge) and, when
``SAFETYNET_PROMETHEUS_WORKER_PORT`` (environment) or ``SAFETYNET["PROMETHEUS_WORKER_PORT"]``
asks for it, by an HTTP server in the worker's main process (counters only, so that the
database gauge is exposed once, by the web side). See docs/prometheus.md.
"""

from __future__ import annotations

import bisect
import logging
import math
import os
from typing import Any

from celery import signals as celery_signals
from django.http import HttpRequest, HttpResponse
from django.views.decorators.cache import never_cache
from django.views.decorators.http import require_safe
from prometheus_client import (
    REGISTRY,
    CollectorRegistry,
    Counter,
    Histogram,
    multiprocess,
)
from prometheus_client import values as prometheus_values
from prometheus_client.exposition import choose_encoder, start_http_server

from safetynet import conf, signals
from safetynet.contrib._prometheus_collectors import BreakerCollector, DeadLetterCollector, LimitCollector
from safetynet.exceptions import ConfigurationError
from safetynet.protocol.events import TaskEnded
from safetynet.stats import counted_name

__all__ = [
    "ATTEMPTS",
    "BREAKER_CHANGES",
    "BREAKER_REFUSED",
    "DEAD",
    "DEAD_LETTERS_EVICTED",
    "PORT_ENVIRONMENT_VARIABLE",
    "RETRY_DELAY",
    "RETRY_DELAY_BUCKETS",
    "RUNTIME",
    "RUNTIME_BUCKETS",
    "BreakerCollector",
    "DeadLetterCollector",
    "LIMIT_DEFERRALS",
    "LIMIT_PAUSES",
    "LIMIT_WAIT",
    "LIMIT_WAIT_BUCKETS",
    "LimitCollector",
    "collector_registry",
    "flush",
    "install",
    "metrics_view",
    "multiprocess_dir",
    "on_breaker_changed",
    "on_breaker_refused",
    "on_dead_letters_evicted",
    "on_limit_deferred",
    "on_limit_paused",
    "on_task_ended",
    "on_task_retrying",
    "on_worker_ready",
    "start_worker_http_server",
    "uninstall",
    "worker_http_address",
]

logger = logging.getLogger("safetynet")

#: Environment variable that starts the worker's metrics server on this port (overrides the setting).
PORT_ENVIRONMENT_VARIABLE = "SAFETYNET_PROMETHEUS_WORKER_PORT"

RUNTIME_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0,
                   600.0, 1800.0, float("inf"))
RETRY_DELAY_BUCKETS = (0.5, 1.0, 2.0, 5.0, 10.0, 30.0, 60.0, 120.0, 300.0, 600.0, 1800.0, 3600.0, 21600.0,
                       86400.0, float("inf"))

class _Batches:
    """Successes reach the metrics in batches (``signals.consume(on_successes=...)``): a success costs the task
    one append, not two locked metric updates. This collector is registered first, so a scrape of this process
    hands the waiting successes over before the metrics are read."""

    def describe(self) -> list[Any]:
        return []

    def collect(self) -> list[Any]:
        signals.drain_successes()
        return []


def _add_observations(histogram: Any, runtime_sum: float, buckets: list[int]) -> None:
    """Add a batch of observations to a histogram child: its sum and its (non-cumulative) bucket counts, as
    ``observe`` would one at a time (prometheus_client keeps them as ``_sum`` and ``_buckets``)."""
    histogram._sum.inc(runtime_sum)
    for index, count in enumerate(buckets):
        if count:
            histogram._buckets[index].inc(count)


_BATCHES = _Batches()
REGISTRY.register(_BATCHES)  # first: a scrape of this process hands the waiting successes over before it reads

ATTEMPTS = Counter(
    "safetynet_task_attempts", "Attempts of safetynet tasks by how they ended (success, retry, snooze, dead).",
    ["task", "outcome"],
)
DEAD = Counter(
    "safetynet_task_dead", "Tasks given up (one dead letter each), by dead-letter reason.", ["task", "reason"],
)
RUNTIME = Histogram(
    "safetynet_task_runtime_seconds", "How long an attempt of a safetynet task ran in the worker, in seconds.",
    ["task"], buckets=RUNTIME_BUCKETS,
)
RETRY_DELAY = Histogram(
    "safetynet_task_retry_delay_seconds", "Seconds scheduled before the next attempt, for each retry or snooze.",
    ["task"], buckets=RETRY_DELAY_BUCKETS,
)
DEAD_LETTERS_EVICTED = Counter(
    "safetynet_dead_letters_evicted", "Dead-letter rows deleted because the store was over DEAD_LETTER_MAX_ROWS.",
)

BREAKER_CHANGES = Counter(
    "safetynet_breaker_changes", "Breaker state changes seen in this process, by breaker and new state.",
    ["breaker", "state"],
)
BREAKER_REFUSED = Counter(
    "safetynet_breaker_refused", "Calls (and task runs) a breaker refused, by breaker.", ["breaker"],
)

LIMIT_WAIT_BUCKETS = (0.01, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0, 300.0, 900.0, 3600.0,
                      float("inf"))
LIMIT_DEFERRALS = Counter(
    "safetynet_limit_deferrals", "Calls (and task runs) a limit deferred until their turn, by limit and reason.",
    ["limit", "reason"],
)
LIMIT_WAIT = Histogram(
    "safetynet_limit_wait_seconds", "Seconds a deferral by a limit scheduled before the task's turn.", ["limit"],
    buckets=LIMIT_WAIT_BUCKETS,
)
LIMIT_PAUSES = Counter(
    "safetynet_limit_pauses", "Times a 429 from the upstream paused a limit (tighten_on_429).", ["limit"],
)

# -- receivers: each is a label lookup and an increment or observe ---------------------

# The labelled children the happy path touches, per task name: a dict lookup, not labels() (~3 us each).
_HAPPY_PATH: dict[str, tuple[Any, Any]] = {}


def _happy_path(task_name: str) -> tuple[Any, Any]:
    children = _HAPPY_PATH.get(task_name)
    if children is None:  # a race here is harmless: labels() returns the same children
        children = _HAPPY_PATH[task_name] = (RUNTIME.labels(task_name), ATTEMPTS.labels(task_name, "success"))
    return children


def _on_successes(batch: list[tuple[str, float | None, float]]) -> None:
    """A batch of successes: counted, and their run times observed."""
    by_task: dict[str, tuple[list[int], list[float]]] = {}
    for task_name, runtime, _at in batch:
        tally = by_task.get(task_name)
        if tally is None:
            tally = by_task[task_name] = ([0], [])
        tally[0][0] += 1
        if runtime is not None:
            tally[1].append(runtime)
    for task_name, ((successes,), runtimes) in by_task.items():
        histogram, success = _happy_path(task_name)
        success.inc(successes)
        if not runtimes:
            continue
        if _batches_fit(histogram):
            buckets = [0] * len(RUNTIME_BUCKETS)
            for runtime in runtimes:
                buckets[bisect.bisect_left(RUNTIME_BUCKETS, runtime)] += 1
            _add_observations(histogram, math.fsum(runtimes), buckets)
        else:  # another prometheus_client: one at a time
            for runtime in runtimes:
                histogram.observe(runtime)


def _batches_fit(histogram: Any) -> bool:
    """True if this prometheus_client keeps a histogram child as ``_sum`` and ``_buckets`` over our buckets."""
    global _BATCHED
    if _BATCHED is None:
        _BATCHED = (hasattr(getattr(histogram, "_sum", None), "inc")
                    and len(getattr(histogram, "_buckets", ())) == len(RUNTIME_BUCKETS)
                    and tuple(getattr(histogram, "_upper_bounds", ())) == RUNTIME_BUCKETS)
    return _BATCHED


#: Whether batches are added to a histogram child whole (decided on the first, from the child it made).
_BATCHED: bool | None = None


def on_task_ended(event: TaskEnded) -> None:
    """The terminal event: count a success (and observe its run time), or a task given up, by reason."""
    name = counted_name(event.task_name, event.reason)  # a name from a malformed message is not a label
    if event.runtime is not None:
        _happy_path(name)[0].observe(event.runtime)
    if not event.dead:
        _happy_path(name)[1].inc()
        return
    ATTEMPTS.labels(name, "dead").inc()
    DEAD.labels(name, str(event.reason or "unknown")).inc()


def on_task_retrying(sender: Any = None, delay: float | None = None, entry: dict[str, Any] | None = None,
                     **_: Any) -> None:
    """``task_retrying``: count a retry (or a snooze), observe the attempt's run time (a retry's) and the delay."""
    outcome = "snooze" if entry is not None and entry.get("action") == "snooze" else "retry"
    ATTEMPTS.labels(sender.name, outcome).inc()
    duration = (entry or {}).get("duration")
    if outcome == "retry" and isinstance(duration, (int, float)):  # a snooze did not run the body: no run time
        _happy_path(sender.name)[0].observe(duration)
    if delay is not None:
        RETRY_DELAY.labels(sender.name).observe(delay)


def on_dead_letters_evicted(sender: Any = None, count: int = 0, **_: Any) -> None:
    """``dead_letters_evicted``: count the rows the store's cap deleted."""
    if count:
        DEAD_LETTERS_EVICTED.inc(count)


def on_breaker_changed(sender: Any = None, name: str = "", state: str = "", **_: Any) -> None:
    """``breaker_changed``: count the change (the state itself is read from the shared store at scrape time)."""
    BREAKER_CHANGES.labels(name, state).inc()


def on_breaker_refused(sender: Any = None, name: str = "", **_: Any) -> None:
    """``breaker_refused``: count the refused call."""
    BREAKER_REFUSED.labels(name).inc()


def on_limit_deferred(sender: Any = None, name: str = "", reason: str = "", wait: float | None = None,
                      **_: Any) -> None:
    """``limit_deferred``: count the deferral and observe its wait (partitions are not labels: unbounded)."""
    LIMIT_DEFERRALS.labels(name, reason).inc()
    if wait is not None:
        LIMIT_WAIT.labels(name).observe(wait)


def on_limit_paused(sender: Any = None, name: str = "", by_hand: bool = False, **_: Any) -> None:
    """``limit_paused``: count a pause a 429 asked for (not one by hand: the counter says how the upstream
    answers)."""
    if not by_hand:
        LIMIT_PAUSES.labels(name).inc()


# -- exposition ------------------------------------------------------------------------

def multiprocess_dir() -> str | None:
    """The ``PROMETHEUS_MULTIPROC_DIR`` of this process, or None (single-process mode)."""
    return os.environ.get("PROMETHEUS_MULTIPROC_DIR") or os.environ.get("prometheus_multiproc_dir") or None


def collector_registry(*, dead_letters: bool = True) -> CollectorRegistry:
    """What to expose: every process's metrics (multiprocess mode) or this one's, and the gauge."""
    registry = CollectorRegistry(auto_describe=False)
    path = multiprocess_dir()
    if path:
        registry.register(_BATCHES)  # this process's successes go to its files before they are read
        multiprocess.MultiProcessCollector(registry, path=path)
    else:
        registry.register(REGISTRY)  # the default registry: the project's own metrics are exposed too
    if dead_letters:
        registry.register(DeadLetterCollector())
        registry.register(BreakerCollector())
        registry.register(LimitCollector())
    return registry


@never_cache
@require_safe
def metrics_view(request: HttpRequest) -> HttpResponse:
    """The Prometheus exposition: task metrics and the dead-letter gauge. No authentication: route it privately."""
    encoder, content_type = choose_encoder(request.headers.get("Accept", ""))
    return HttpResponse(encoder(collector_registry()), content_type=content_type)


# -- the worker's own HTTP port ----------------------------------------------------------

def worker_http_address() -> tuple[str, int] | None:
    """Where the worker serves its metrics: the environment variable, else the settings; None: nowhere."""
    raw = os.environ.get(PORT_ENVIRONMENT_VARIABLE, "").strip()
    settings = conf.get()
    address = getattr(settings, "prometheus_worker_address", None) or "0.0.0.0"
    if raw:
        try:
            port = int(raw)
        except ValueError:
            raise ConfigurationError(f"{PORT_ENVIRONMENT_VARIABLE} must be a port number, got {raw!r}") from None
    else:
        port = getattr(settings, "prometheus_worker_port", None)
        if port is None:
            return None
    if isinstance(port, bool) or not isinstance(port, int) or not 0 <= port <= 65535:
        raise ConfigurationError(f"the Prometheus worker port must be a number from 0 to 65535, got {port!r}")
    return address, port


def start_worker_http_server(port: int, address: str = "0.0.0.0") -> Any:
    """Serve ``/metrics`` from this process (all processes' metrics in multiprocess mode); return the server."""
    server, _thread = start_http_server(port, addr=address, registry=collector_registry(dead_letters=False))
    return server


_worker_server: Any = None


def on_worker_ready(sender: Any = None, **_: Any) -> None:
    """Celery ``worker_ready`` (the worker's main process): start the metrics server when asked."""
    global _worker_server
    try:
        where = worker_http_address()
    except ConfigurationError as error:
        logger.error("safetynet: Prometheus worker server not started: %s", error)
        return
    if where is None or _worker_server is not None:
        return
    address, port = where
    pool = type(getattr(sender, "pool", None)).__module__
    if multiprocess_dir() is None and "prefork" in pool:
        logger.warning(
            "safetynet: the Prometheus worker server runs without PROMETHEUS_MULTIPROC_DIR under the prefork pool: "
            "it sees only the main process, not the tasks its children run. Start the worker with "
            "PROMETHEUS_MULTIPROC_DIR set to an empty directory."
        )
    try:
        _worker_server = start_worker_http_server(port, address)
    except OSError as error:
        logger.error("safetynet: Prometheus worker server not started on %s:%s: %r", address, port, error)
        return
    logger.info("safetynet: Prometheus metrics served on http://%s:%s/metrics", address, _worker_server.server_port,
                extra={"prometheus_port": _worker_server.server_port})


# -- wiring ------------------------------------------------------------------------------

def flush(**_: Any) -> None:
    """Add the successes waiting for their batch to the metrics now (done every second, before a scrape of this
    process, and when a worker process stops)."""
    try:
        signals.drain_successes()
    except Exception as error:  # a metric that cannot be written must not stop a worker from stopping
        logger.warning("safetynet: Prometheus counts not flushed: %r", error)


_CELERY_RECEIVERS = (
    (celery_signals.worker_ready, on_worker_ready),
    (celery_signals.worker_process_shutdown, flush),
    (celery_signals.worker_shutdown, flush),
)
_SAFETYNET_RECEIVERS = (
    (signals.task_retrying, on_task_retrying),
    (signals.dead_letters_evicted, on_dead_letters_evicted),
    (signals.breaker_changed, on_breaker_changed),
    (signals.breaker_refused, on_breaker_refused),
    (signals.limit_deferred, on_limit_deferred),
    (signals.limit_paused, on_limit_paused),
)


def _uid(receiver: Any) -> str:
    return f"safetynet.contrib.prometheus.{receiver.__name__}"


def install() -> None:
    """Connect the metric receivers (idempotent); the AppConfig calls it when prometheus_client is installed."""
    path = multiprocess_dir()
    if path and not os.path.isdir(path):
        logger.error("safetynet: PROMETHEUS_MULTIPROC_DIR=%s is not a directory: metrics will fail to record", path)
    elif path and not getattr(prometheus_values.ValueClass, "_multiprocess", False):
        logger.warning(
            "safetynet: PROMETHEUS_MULTIPROC_DIR was set after prometheus_client was imported: this process "
            "counts in memory and other processes will not see its metrics. Set it before the process starts."
        )
    for signal, receiver in _CELERY_RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=_uid(receiver))
    for signal, receiver in _SAFETYNET_RECEIVERS:
        signal.connect(receiver, weak=False, dispatch_uid=_uid(receiver))
    signals.consume(_uid(on_task_ended), on_task_ended, on_successes=_on_successes)


def uninstall() -> None:
    """Disconnect the metric receivers (the metrics keep their values, the counts not yet added included)."""
    flush()
    for signal, receiver in _CELERY_RECEIVERS:
        signal.disconnect(receiver, dispatch_uid=_uid(receiver))
    for signal, receiver in _SAFETYNET_RECEIVERS:
        signal.disconnect(receiver, dispatch_uid=_uid(receiver))
    signals.stop_consuming(_uid(on_task_ended))
