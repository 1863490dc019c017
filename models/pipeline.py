"""The whole scoring path in one process: the worker's scorers over plain dicts, in event-time order."""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Annotated, Any

from pydantic import Field, TypeAdapter

from app.schemas import Alert, MarketTick, Transaction
from models.aggregates import (
    FlowAccumulator,
    FlowPartial,
    LiquidityMonitor,
    LiquidityParams,
    MarketAccumulator,
    MarketPartial,
    MarketStressMonitor,
    MarketStressParams,
)
from models.detector import SurpriseDetector
from models.features import AccountState
from models.findings import Finding, Raised, track
from models.market import InstrumentState, MarketOutcome, MarketParams, score_tick
from models.rules import Catalogue
from models.scoring import TransactionScorer, evict_idle

PARTIAL: TypeAdapter[FlowPartial | MarketPartial] = TypeAdapter(
    Annotated[FlowPartial | MarketPartial, Field(discriminator="kind")])


def partition_for(key: str, partitions: int) -> int:
    """The Kafka partition the default (murmur2) partitioner gives a key, as producers key our topics."""
    from kafka.partitioner.default import murmur2

    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


class MarketScorer:
    """Applies the catalogue to per-instrument scoring; shared by the agent and the replay."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.set_catalogue(catalogue)

    def set_catalogue(self, catalogue: Catalogue) -> None:
        """Take a new catalogue into force."""
        self.catalogue = catalogue
        self.params = catalogue.params("market_crash", MarketParams)

    def process(self, tick: MarketTick, state: InstrumentState) -> tuple[MarketOutcome, list[Any]]:
        """Score one tick; return the outcome and the deduplicated raised alerts."""
        ts = tick.ts.timestamp()
        out = score_tick(state, ts, tick.price, tick.event_id, tick.instrument, self.params)
        kept: list[Finding] = []
        for f in out.findings:
            rule = self.catalogue.rule(f.category)
            if rule is not None:
                kept.append(f)
        out.findings = kept
        return out, track(state.alerts, kept, ts, tick.event_id)


class PlatformMonitors:
    """Both stage-two monitors under the catalogue in force; shared by the agent and the replay."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.liquidity = LiquidityMonitor(catalogue.params("liquidity_run", LiquidityParams))
        self.stress = MarketStressMonitor(catalogue.params("market_stress", MarketStressParams))
        self.catalogue = catalogue

    def set_catalogue(self, catalogue: Catalogue) -> None:
        """Apply new parameters; the monitors keep the history they gathered."""
        self.catalogue = catalogue
        self.liquidity.params = catalogue.params("liquidity_run", LiquidityParams)
        self.stress.params = catalogue.params("market_stress", MarketStressParams)

    def update(self, partial: FlowPartial | MarketPartial) -> list[Raised]:
        """Feed one partial to its monitor; return alerts whose rules are enabled."""
        if isinstance(partial, FlowPartial):
            raised = self.liquidity.update(partial)
        else:
            raised = self.stress.update(partial)
        return [r for r in raised if self.catalogue.rule(r.finding.category) is not None]


@dataclass(slots=True)
class Scored:
    """One event's result: its calibrated score and the warnings (new or updated) it caused."""

    event_id: str
    kind: str
    score: float
    alerts: list[Alert] = field(default_factory=list)
    new_ids: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    duplicate: bool = False


class Pipeline:
    """The worker's scoring in one process, for replay, evaluation and benchmarks.

    Detectors are kept per emulated Kafka partition, as the worker keeps them, so a replay of the
    events a worker consumed in the same order gives the same scores.
    """

    def __init__(self, catalogue: Catalogue, *, partitions: int = 4, storm_cap: int = 200,
                 ttl: float = 30 * 86400.0) -> None:
        self.catalogue = catalogue
        self.partitions = partitions
        self.ttl = ttl
        self.txn = TransactionScorer(catalogue, storm_cap=storm_cap)
        self.market = MarketScorer(catalogue)
        self.monitors = PlatformMonitors(catalogue)
        self.detectors: dict[int, SurpriseDetector] = {}
        self.accounts: dict[str, AccountState] = {}
        self.instruments: dict[str, InstrumentState] = {}
        self.flows = FlowAccumulator("replay")
        self.stress = MarketAccumulator("replay")
        self._partition_of: dict[str, int] = {}
        self._n = 0
        self.evicted = 0

    def set_catalogue(self, catalogue: Catalogue) -> None:
        """Apply a new catalogue to every scorer."""
        self.catalogue = catalogue
        self.txn.set_catalogue(catalogue)
        self.market.set_catalogue(catalogue)
        self.monitors.set_catalogue(catalogue)

    def _detector(self, key: str) -> SurpriseDetector:
        p = self._partition_of.get(key)
        if p is None:
            p = self._partition_of[key] = partition_for(key, self.partitions)
        det = self.detectors.get(p)
        if det is None:
            det = self.detectors[p] = SurpriseDetector()
        return det

    def _platform(self, partials: Iterable[FlowPartial | MarketPartial], out: Scored) -> None:
        for partial in partials:
            for r in self.monitors.update(partial):
                _add(out, r)

    def process(self, event: Transaction | MarketTick) -> Scored:
        """Score one event and run its partials through the platform monitors."""
        self._n += 1
        ts = event.ts.timestamp()
        if isinstance(event, Transaction):
            state = self.accounts.get(event.account_id)
            if state is None:
                state = self.accounts[event.account_id] = AccountState()
            self.txn.detector = self._detector(event.account_id)
            o = self.txn.process(event, state, ts)
            res = Scored(event.event_id, "transaction", o.score, o.alerts, o.new_ids, o.dropped, o.duplicate)
            if not o.duplicate:
                self._platform(self.flows.add(ts, event.txn_type, event.direction, event.amount, event.event_id,
                                              account_kind=event.account_kind), res)
        else:
            istate = self.instruments.get(event.instrument)
            if istate is None:
                istate = self.instruments[event.instrument] = InstrumentState()
            mo, raised = self.market.process(event, istate)
            res = Scored(event.event_id, "market", mo.score)
            for r in raised:
                _add(res, r)
            self._platform(self.stress.add(ts, event.instrument, mo.stressed, event.event_id), res)
        if self._n % 50_000 == 0:
            self.evicted += evict_idle(self.accounts, ts, self.ttl)
        return res

    def finish(self) -> list[Alert]:
        """Close the open aggregate buckets and return any warnings that closing raised."""
        out = Scored("", "flush", 0.0)
        self._platform([*self.flows.flush(), *self.stress.flush()], out)
        for r in [*self.monitors.liquidity.drain(), *self.monitors.stress.drain()]:
            if self.catalogue.rule(r.finding.category) is not None:
                _add(out, r)
        return out.alerts

    def run(self, events: Iterable[Transaction | MarketTick]) -> Iterator[Scored]:
        """Process events in the order given (sort by event time first for a faithful replay)."""
        for e in events:
            yield self.process(e)


def _add(out: Scored, r: Raised) -> None:
    out.alerts.append(r.to_alert())
    if r.is_new:
        out.new_ids.append(r.alert_id)


__all__ = ["PARTIAL", "MarketScorer", "Pipeline", "PlatformMonitors", "Scored", "partition_for"]
