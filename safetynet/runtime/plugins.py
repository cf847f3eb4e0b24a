"""The plug-ins that take part in a task's path, in order.

The order is the guards' order before the body (the first one outermost around it) and the order
the other hooks are called in:

1. ``SecondCopy``: a relayed message's second copy is dropped before anything else runs;
2. ``Progress``: the user who started the task sees it running, retrying, done or failed;
3. ``DjangoTasks``: a ``django.tasks`` task's result record (each attempt's end, its retry, its death) and its
   own ``backoff()`` (before the budget, which may only lengthen the wait it chose);
4. ``BreakerGuard``: no run while the upstream's breaker is open (a deferral, no attempt used);
5. ``LimitGuard``: no run until every limit the task names admits it (a deferral until its turn, no attempt
   used); after the breaker, so a task whose upstream is down takes no slot and no place in the rate, and
   before the budget, so a deferred first attempt earns the budget once, when it runs;
6. ``BudgetGuard``: first attempts earn retries; a retry past the budget waits longer;
7. ``Idempotency``: the key is claimed (a duplicate gets the stored result or waits);
8. ``Tracking``: an idempotent task's message is kept until a run takes it (sent again if lost).

To add a feature: write a ``safetynet.protocol.attempt.Plugin`` subclass in its own package,
declare the task options it reads, override the hooks it needs, and put it here.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from safetynet import conf
from safetynet.breakers.plugin import BreakerGuard, BudgetGuard
from safetynet.idempotency.plugin import Idempotency
from safetynet.limits.plugin import LimitGuard
from safetynet.progress.plugin import Progress
from safetynet.protocol.attempt import Plugin
from safetynet.schedule.plugin import SecondCopy, Tracking
from safetynet.taskrecords.plugin import DjangoTasks

__all__ = ["HOOKS", "PLUGINS", "Pipeline", "pipeline_of"]

PLUGINS: tuple[Plugin, ...] = (SecondCopy(), Progress(), DjangoTasks(), BreakerGuard(), LimitGuard(), BudgetGuard(),
                               Idempotency(), Tracking())


def _overrides(plugin: Plugin, hook: str) -> bool:
    return getattr(type(plugin), hook) is not getattr(Plugin, hook)


#: The hooks of a run and of a send, as ``Plugin`` names them.
HOOKS = ("before_send", "around_publish", "before_run", "around_body", "after_success", "adjust", "on_retry",
         "on_retry_not_sent", "on_give_up", "after_run")


@dataclass(frozen=True)
class Pipeline:
    """The plug-ins taking part in one task's path, and for each hook the ones that implement it."""

    plugins: tuple[Plugin, ...]
    version: int
    by_hook: dict[str, tuple[Plugin, ...]]
    #: The ``before_run`` guards called whatever the message's headers, and those called only when one of
    #: their ``run_headers`` is there.
    guards: tuple[Plugin, ...]
    header_guards: tuple[Plugin, ...]
    #: ``hooks(name)`` of the hooks every run reads, as attributes.
    around_body: tuple[Plugin, ...] = ()
    after_success: tuple[Plugin, ...] = ()
    after_run: tuple[Plugin, ...] = ()

    @classmethod
    def of(cls, task: Any) -> Pipeline:
        """The pipeline of ``task`` under the current settings."""
        plugins = tuple(plugin for plugin in PLUGINS if plugin.takes_part(task))
        by_hook = {hook: tuple(plugin for plugin in plugins if _overrides(plugin, hook)) for hook in HOOKS}
        return cls(plugins, conf.version(), by_hook,
                   tuple(plugin for plugin in by_hook["before_run"] if plugin.run_headers is None),
                   tuple(plugin for plugin in by_hook["before_run"] if plugin.run_headers is not None),
                   by_hook["around_body"], by_hook["after_success"], by_hook["after_run"])

    def hooks(self, name: str) -> tuple[Plugin, ...]:
        """The plug-ins that implement hook ``name``, in order."""
        return self.by_hook[name]

    @property
    def send_options(self) -> frozenset[str]:
        """The ``apply_async`` options its plug-ins read."""
        return frozenset().union(*(plugin.send_options for plugin in self.plugins))


def pipeline_of(task: Any) -> Pipeline:
    """``task``'s pipeline, made once per task and settings."""
    pipeline = task.__dict__.get("_safetynet_pipeline")
    if pipeline is None or pipeline.version != conf.version():
        pipeline = task.__dict__["_safetynet_pipeline"] = Pipeline.of(task)
    return pipeline  # type: ignore[no-any-return]
