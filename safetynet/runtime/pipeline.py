"""The path of one run, top to bottom::

    guards   plugin.before_run(attempt)          a second copy? the breaker open? budget earned
    body     plugin.around_body(attempt, call)   the claim (a stored result, a deferral, a crash loop),
                                                 the transaction, then the user's function
    success  plugin.after_success, then the terminal event (``signals.announce_success``)
    failure  outcome.after_failure: core.decide, then act (publish the retry, or give up)
    always   plugin.after_run(attempt, error)

The end-of-run hooks (``after_success``, ``after_run``) are called only for the plug-ins that noted
something of the run (``attempt.notes[plugin.name]``): a run nobody noted ends with no call at all.

``run`` is what a safetynet task's ``run`` calls around the user's function. The ``Attempt`` it
creates is the only per-run state; it is found again (``current``) by ``self.retry()`` and
``self.progress()`` through a context variable, not on Celery's request.
"""

from __future__ import annotations

import functools
import logging
import time
from collections.abc import Callable
from contextvars import ContextVar
from typing import Any

from safetynet import conf, signals
from safetynet.protocol.attempt import Attempt, Plugin
from safetynet.runtime import clock, outcome
from safetynet.runtime.plugins import Pipeline, pipeline_of

__all__ = ["current", "run"]

logger = logging.getLogger("safetynet")

_active: ContextVar[Attempt | None] = ContextVar("safetynet_attempt", default=None)


def current(task: Any) -> Attempt | None:
    """The run of ``task`` under way in this thread (or green thread), if any (also seen from a call of the task
    inside its own run, which Celery gives a copy of the request)."""
    attempt = _active.get()
    if attempt is None or not attempt.active:
        return None
    request = task.request
    if attempt.request is request or (attempt.request.id == request.id and attempt.task.name == task.name
                                      and not request.called_directly):
        return attempt
    return None


def run(task: Any, function: Callable[..., Any], call_args: tuple[Any, ...], args: tuple[Any, ...],
        kwargs: dict[str, Any]) -> Any:
    """Run ``function(*call_args, **kwargs)`` (the user's function; ``call_args`` are ``args``, after ``self`` for
    a bound task) as one attempt of ``task``."""
    request = task.request
    if request.called_directly:
        return function(*call_args, **kwargs)
    outer = _active.get()
    if outer is not None and outer.active and outer.request.id == request.id and outer.task.name == task.name:
        return _reentrant(outer, functools.partial(function, *call_args, **kwargs))
    pipeline: Pipeline | None = task.__dict__.get("_safetynet_pipeline")
    if pipeline is None or pipeline.version != conf.version():
        pipeline = pipeline_of(task)
    # args and kwargs are the wrapper's own (made for this call): not copied again.
    attempt = Attempt(task, request, args, kwargs, clock.now(), time.perf_counter(), pipeline.plugins)
    token = _active.set(attempt)
    error: BaseException | None = None
    try:
        for plugin in pipeline.guards:
            plugin.before_run(attempt)
        headers = request.headers
        if headers:
            for plugin in pipeline.header_guards:
                if not plugin.run_headers.isdisjoint(headers):  # type: ignore[union-attr]
                    plugin.before_run(attempt)
        around = pipeline.around_body
        if around:
            result = _through(around, attempt, functools.partial(function, *call_args, **kwargs))
        else:
            attempt.ran = True
            result = function(*call_args, **kwargs)
        if attempt.notes:  # the plug-ins that noted something of this run hear how it ended
            for plugin in pipeline.after_success:
                if plugin.name in attempt.notes:
                    plugin.after_success(attempt, result)
        signals.announce_success(attempt, result, time.perf_counter() - attempt.started_perf)
        return result
    except Exception as exc:
        error = exc
        outcome.after_failure(attempt, exc)
        raise
    except BaseException as exc:
        error = exc
        raise
    finally:
        attempt.active = False
        if attempt.notes:
            for plugin in pipeline.after_run:
                if plugin.name not in attempt.notes:
                    continue
                try:
                    plugin.after_run(attempt, error)
                except Exception:  # a plug-in's clean-up must not hide the run's outcome
                    logger.exception("safetynet: %s: after_run of %s[%s] failed", plugin.name, task.name, request.id)
        _active.reset(token)


def _through(plugins: tuple[Plugin, ...], attempt: Attempt, body: Callable[[], Any]) -> Any:
    def innermost() -> Any:
        attempt.ran = True
        return body()

    call: Callable[[], Any] = innermost
    for plugin in reversed(plugins):
        call = functools.partial(plugin.around_body, attempt, call)
    return call()


def _reentrant(outer: Attempt, body: Callable[[], Any]) -> Any:
    """The task called itself synchronously inside its own run: the inner call is a plain call."""
    if "reentrant" not in outer.notes:
        outer.notes["reentrant"] = True
        task, request = outer.task, outer.request
        logger.warning(
            "%s[%s] called itself synchronously inside its own run (task(...) or self.run(...)): the inner call runs "
            "as a plain function and the outer run alone decides what a failure does. To try again, raise "
            "self.retry(exc=exc) instead.", task.name, request.id,
            extra={"task_name": task.name, "task_id": request.id, "action": "reentrant"},
        )
    return body()
