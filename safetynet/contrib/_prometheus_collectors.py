"""The gauges ``safetynet.contrib.prometheus`` reads at scrape time: breakers' and limits' state from the shared
store, and the dead letters waiting, from the database. Each leaves its metric out of a scrape (with a warning)
when its store does not answer."""

from __future__ import annotations

import logging
from collections.abc import Iterator

from prometheus_client.core import GaugeMetricFamily

from safetynet import breakers, conf, limits
from safetynet.stats import counted_name

__all__ = ["BreakerCollector", "DeadLetterCollector", "LimitCollector"]

logger = logging.getLogger("safetynet")


class LimitCollector:
    """``safetynet_limit_slots_in_use{limit}`` and ``safetynet_limit_calls_in_window{limit}``, read from the shared
    store at scrape time."""

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily("safetynet_limit_slots_in_use", "Concurrency slots held now.", labels=["limit"])
        yield GaugeMetricFamily("safetynet_limit_calls_in_window", "Calls in the rate's window now.",
                                labels=["limit"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        slots = GaugeMetricFamily("safetynet_limit_slots_in_use",
                                  "Concurrency slots held now, over every partition of the limit.", labels=["limit"])
        calls = GaugeMetricFamily("safetynet_limit_calls_in_window",
                                  "Calls started in the rate's window now, over every partition.", labels=["limit"])
        for name, config in sorted(conf.get().limits.items()):
            try:
                state = limits.state_of(name)
            except Exception as error:  # the store is away: this limit is left out of the scrape
                logger.warning("safetynet: limit %r left out of the scrape: %r", name, error)
                continue
            if config.concurrency is not None:
                slots.add_metric([name], state["in_use"])
            if config.rate is not None:
                calls.add_metric([name], state["calls"])
        yield slots
        yield calls


class BreakerCollector:
    """``safetynet_breaker_state{breaker,state}``: 1 for each breaker's current state, read from the shared store."""

    name = "safetynet_breaker_state"
    documentation = "The state every worker sees for each declared breaker (1 for the current state)."

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=["breaker", "state"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        family = GaugeMetricFamily(self.name, self.documentation, labels=["breaker", "state"])
        for name in sorted(conf.get().breakers):
            try:
                current = breakers.state_of(name)["state"]
            except Exception as error:  # the store is away: this breaker is left out of the scrape
                logger.warning("safetynet: breaker %r left out of the scrape: %r", name, error)
                continue
            for state in (breakers.CLOSED, breakers.HALF_OPEN, breakers.OPEN):
                family.add_metric([name, state], 1.0 if state == current else 0.0)
        yield family


# -- the dead-letter gauge, read at scrape time -----------------------------------------

class DeadLetterCollector:
    """``safetynet_dead_letters{task}``: dead letters with status "dead", one GROUP BY per scrape."""

    name = "safetynet_dead_letters"
    documentation = "Dead letters waiting for a decision (status dead), by task, read from the database."

    def describe(self) -> Iterator[GaugeMetricFamily]:
        yield GaugeMetricFamily(self.name, self.documentation, labels=["task"])

    def collect(self) -> Iterator[GaugeMetricFamily]:
        from django.db import DatabaseError
        from django.db.models import Count

        from safetynet.models import DeadLetter

        family = GaugeMetricFamily(self.name, self.documentation, labels=["task"])
        try:
            # order_by(): no ORDER BY. By reason too: the name of an unknown or malformed message is not a label
            rows = list(DeadLetter.objects.dead().order_by().values("task_name", "reason").annotate(count=Count("id")))
        except DatabaseError as error:  # the counters are still worth a scrape; the gauge goes absent
            logger.warning("safetynet: dead-letter gauge left out of the scrape: %r", error)
            return
        counts: dict[str, int] = {}
        for row in rows:  # the names of unknown, undecodable and malformed messages: one label
            name = counted_name(row["task_name"], row["reason"])
            counts[name] = counts.get(name, 0) + row["count"]
        for name, count in sorted(counts.items()):
            family.add_metric([name], count)
        yield family
