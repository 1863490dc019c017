"""Watcher health: consumer lag per partition, top entities, and metric labels created at start."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter, OrderedDict
from collections.abc import Callable, Iterable, Mapping
from typing import Any

from agents.sink import Sink
from app.faust_app import AGGREGATES, ALERTS, DEADLETTER, MARKET, TRANSACTIONS, Runtime
from models.rules import Catalogue
from models.schemas import LEVELS, Alert

log = logging.getLogger("riskwatch.agents.health")

LAG_INTERVAL = 2.0
STAGES = ("decode", "score", "publish", "score_market")
DETECTORS = ("surprise", "market")
TABLES = ("accounts", "instruments")


def lag_per_partition(assigned: Iterable[Any], end: Mapping[Any, int], committed: Mapping[Any, int | None],
                      earliest: Mapping[Any, int]) -> dict[tuple[str, int], int]:
    """Messages behind per (topic, partition): end offset minus committed, or minus earliest if never committed."""
    out: dict[tuple[str, int], int] = {}
    for tp in assigned:
        if tp not in end:
            continue
        done = committed.get(tp)
        if done is None:
            # The group never committed here: with auto_offset_reset=earliest everything retained is unread.
            done = earliest.get(tp, 0)
        out[(tp.topic, tp.partition)] = max(end[tp] - done, 0)
    return out


class TopEntities:
    """Distinct warnings per entity over the last hour, exported for the entities with the most.

    Fed with every warning this worker publishes (new or updated); entities live in the partition of
    their key, so the workers' top lists do not overlap and Grafana's topk over all of them is right.
    """

    def __init__(self, gauge: Any, top: int = 10, window: float = 3600.0, limit: int = 200_000,
                 clock: Callable[[], float] = time.time) -> None:
        self.gauge = gauge
        self.top = top
        self.window = window
        self.limit = limit
        self.clock = clock
        self.first_seen: OrderedDict[str, tuple[float, str, str]] = OrderedDict()
        self.shown: set[tuple[str, str]] = set()

    def on_alert(self, alert: Alert) -> None:
        """Remember a warning the first time its alert_id is published."""
        if alert.alert_id not in self.first_seen:
            self.first_seen[alert.alert_id] = (self.clock(), alert.entity_type, alert.entity_id)
            if len(self.first_seen) > self.limit:
                self.first_seen.popitem(last=False)

    def refresh(self) -> dict[tuple[str, str], int]:
        """Forget warnings older than the window and export the top entities (others' series are removed)."""
        horizon = self.clock() - self.window
        while self.first_seen and next(iter(self.first_seen.values()))[0] < horizon:
            self.first_seen.popitem(last=False)
        counts = Counter((etype, eid) for _, etype, eid in self.first_seen.values())
        top = dict(counts.most_common(self.top))
        for key in self.shown - top.keys():
            self.gauge.remove(*key)
        for key, n in top.items():
            self.gauge.labels(*key).set(n)
        self.shown = set(top)
        return top


class LagProbe:
    """Measures this worker's consumer lag on the partitions assigned to it and keeps the gauge in step."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.gauge = rt.metrics.consumer_lag
        self.shown: set[tuple[str, int]] = set()
        self.earliest: dict[Any, int] = {}

    def _assigned(self, consumer: Any) -> list[Any]:
        # Faust's own topics (table changelogs, the assignor's leader topic) start with its app id
        # (Settings.deployment_id) and are not read by the agents; repartition topics are, so they stay.
        own = f"{self.rt.settings.deployment_id}-"
        return sorted((tp for tp in consumer.assignment()
                       if not tp.topic.startswith(own) or tp.topic.endswith("-repartition")),
                      key=lambda tp: (tp.topic, tp.partition))

    async def measure(self) -> dict[tuple[str, int], int]:
        """Compute lag from the end offsets seen in the latest fetches and update the gauge."""
        consumer = self.rt.app.consumer
        tps = self._assigned(consumer)
        # The fetcher's cached high watermark: asking the broker through Faust's consumer thread takes seconds.
        end = {tp: hw for tp in tps if (hw := consumer.highwater(tp)) is not None}
        # Faust keeps the offsets it committed (and those found at assignment) here; no public accessor.
        committed = getattr(consumer, "_committed_offset", {})
        unseen = [tp for tp in end if committed.get(tp) is None and tp not in self.earliest]
        if unseen:
            self.earliest.update(await consumer.earliest_offsets(*unseen))
        lag = lag_per_partition(tps, end, committed, self.earliest)
        engine = self.rt.extras.get("transactions")
        if engine is not None:  # risk.transactions is read by the transaction engine, not Faust's consumer
            lag.update(await engine.lag())
        for topic, partition in self.shown - lag.keys():
            self.gauge.remove(topic, str(partition))
        # After a rebalance took all of a topic's partitions elsewhere, this worker's newest event time there
        # would only age: the worker that reads the topic now reports it.
        m = self.rt.metrics
        for topic in m.event_time_topics() - {tp.topic for tp in tps} - {t for t, _ in lag}:
            m.forget_event_time(topic)
        for (topic, partition), value in lag.items():
            self.gauge.labels(topic, str(partition)).set(value)
        self.shown = set(lag)
        return lag


def prime_metrics(rt: Runtime, catalogue: Catalogue) -> None:
    """Create every label combination known at start (topics, categories, levels, stages, detectors, tables)."""
    s = rt.settings
    rt.metrics.prime(
        inputs=[s.topic(t) for t in (TRANSACTIONS, MARKET)],
        outputs=[s.topic(t) for t in (ALERTS, DEADLETTER, AGGREGATES)],
        categories=sorted({r.category for r in catalogue.rules.values()}),
        levels=LEVELS, stages=STAGES, detectors=DETECTORS, tables=TABLES)


def attach(rt: Runtime, catalogue: Catalogue, sink: Sink | None = None) -> LagProbe:
    """Prime the metrics; every LAG_INTERVAL seconds measure consumer lag and refresh the top entities."""
    prime_metrics(rt, catalogue)
    probe = LagProbe(rt)
    top = TopEntities(rt.metrics.top_entities)
    if sink is not None:
        sink.alert_listeners.append(top.on_alert)

    @rt.app.timer(interval=LAG_INTERVAL)
    async def measure_consumer_lag() -> None:
        top.refresh()
        try:
            await probe.measure()
        except asyncio.CancelledError:
            raise
        except Exception as exc:  # noqa: BLE001 - during a rebalance the consumer may not answer; try next tick
            log.debug("consumer lag not measured this round: %s", exc)

    return probe


__all__ = ["LagProbe", "TopEntities", "attach", "lag_per_partition", "prime_metrics"]
