"""The whole scoring path in one process: the worker's scorers over plain dicts, in event-time order."""

from __future__ import annotations

import struct
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Annotated

import numpy as np
import numpy.typing as npt
from pydantic import Field, TypeAdapter

from models.aggregates import (
    FlowAccumulator,
    FlowBuckets,
    FlowPartial,
    FlowTotals,
    LiquidityMonitor,
    LiquidityParams,
    MarketAccumulator,
    MarketPartial,
    MarketStressMonitor,
    MarketStressParams,
)
from models.core import IdleEviction, MarketScorer, MemoryStore, TickCore, TxnCore
from models.detector import SurpriseDetector
from models.features import AccountState
from models.findings import Raised
from models.market import InstrumentState
from models.rules import Catalogue
from models.schemas import Alert, MarketTick, Transaction
from models.scoring import Feedback, TransactionScorer

PARTIAL: TypeAdapter[FlowPartial | FlowBuckets | MarketPartial] = TypeAdapter(
    Annotated[FlowPartial | FlowBuckets | MarketPartial, Field(discriminator="kind")])


_M = 0x5BD1E995
# Little-endian 32-bit words, as Java reads them; one compiled unpacker per word count of usual keys.
_WORDS = [struct.Struct(f"<{i}I").unpack_from for i in range(65)]
_MASK = 0xFFFFFFFF


def murmur2(data: bytes) -> int:
    """Kafka's murmur2 of `data` (as kafka-python's pure-Python one computes it), with word-at-a-time reads.

    Replay maps every distinct account to a partition once; with a million accounts kafka-python's
    byte-by-byte version cost about a second of the replay.
    """
    n = len(data)
    h = 0x9747B28C ^ n
    end, words = n & ~3, n >> 2
    for k in _WORDS[words](data) if words < 65 else struct.unpack_from(f"<{words}I", data):
        k = (k * _M) & _MASK
        k = ((k ^ (k >> 24)) * _M) & _MASK
        h = ((h * _M) & _MASK) ^ k
    extra = n & 3
    if extra:
        if extra == 3:
            h ^= data[end + 2] << 16
        if extra >= 2:
            h ^= data[end + 1] << 8
        h = ((h ^ data[end]) * _M) & _MASK
    h ^= h >> 13
    h = (h * _M) & _MASK
    return h ^ (h >> 15)


def partition_of(key: bytes, partitions: int) -> int:
    """The Kafka partition the default (murmur2) partitioner gives a key: riskwatch's one copy of that rule.

    Replay emulates the input partitions with it, and the worker routes its outputs and finds state
    partitions with it; tests check it against kafka-python's murmur2, aiokafka's partitioner and
    Kafka's Java console producer (tests/kafka/test_console_producer.py).
    """
    return (murmur2(key) & 0x7FFFFFFF) % partitions


def home_partition(key: bytes | None, entity: bytes, partition: int, partitions: int) -> int | None:
    """The partition a record not keyed by its entity belongs in (None: it is where it belongs).

    A record keyed by its entity (the raw id, or the id as a JSON string) stays where the producer's
    partitioner put it: every record of the entity is there, whatever hash that client uses. Any other
    key (none, a per-event id) scatters an entity's records over partitions and its state with them,
    so the record belongs in the partition of its entity's key, as Kafka's Java and Python clients
    place it.

    >>> home_partition(b"acct-1", b"acct-1", 3, 4) is None
    True
    >>> home_partition(b'"acct-1"', b"acct-1", 3, 4) is None
    True
    >>> home_partition(None, b"acct-1", 3, 4) == partition_of(b"acct-1", 4)
    True
    >>> home_partition(None, b"acct-1", partition_of(b"acct-1", 4), 4) is None
    True

    Keys framed by Confluent's JSON Schema serializer (models.schemas.unframe) are keys by the entity too:

    >>> home_partition(b'\\x00\\x00\\x00\\x00\\x07"acct-1"', b"acct-1", 3, 4) is None
    True
    """
    if key == entity or partitions < 2:
        return None
    if key is not None and len(key) == len(entity) + 2 and key[1:-1] == entity and key[:1] == key[-1:] == b'"':
        return None
    if key is not None and key[:1] == b"\x00" and len(key) > 5:
        return home_partition(key[5:], entity, partition, partitions)
    home = partition_of(entity, partitions)
    return None if home == partition else home


def partition_for(key: str, partitions: int) -> int:
    """partition_of() of a text key, as producers key our topics by account id."""
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


def partitions_for(keys: Sequence[str], partitions: int) -> list[int]:
    """partition_for() of many keys at once: murmur2 in numpy, for all keys of one byte length together."""
    data = [k.encode() for k in keys]
    lens = np.fromiter(map(len, data), dtype=np.int64, count=len(data))
    out = np.zeros(len(data), dtype=np.int64)
    short = np.flatnonzero(lens <= _BULK_WIDTH)
    for i in np.flatnonzero(lens > _BULK_WIDTH).tolist():  # rare: not worth a wide matrix
        out[i] = partition_for(keys[i], partitions)
    if short.size:
        # One row of bytes per key, zero-padded; each length's rows are hashed together.
        u8 = np.array([data[i] for i in short.tolist()], dtype=f"S{_BULK_WIDTH}").view(np.uint8)
        u8 = u8.reshape(short.size, _BULK_WIDTH)
        for n in np.unique(lens[short]).tolist():
            rows = np.flatnonzero(lens[short] == n)
            out[short[rows]] = (_murmur2_rows(u8[rows, :n], n) & 0x7FFFFFFF) % partitions
    return out.tolist()


_BULK_WIDTH = 32


def _murmur2_rows(raw: npt.NDArray[np.uint8], n: int) -> npt.NDArray[np.uint32]:
    # uint32 arithmetic wraps as Java's int arithmetic does; shifts by uint32 keep the dtype.
    m, r8, r13, r15, r16, r24 = (np.uint32(x) for x in (_M, 8, 13, 15, 16, 24))
    h = np.full(raw.shape[0], 0x9747B28C ^ n, dtype=np.uint32)
    end = n & ~3
    if end:
        words = np.ascontiguousarray(raw[:, :end]).view("<u4")
        for j in range(end >> 2):
            k = words[:, j] * m
            k = (k ^ (k >> r24)) * m
            h = (h * m) ^ k
    extra = n & 3
    if extra:
        if extra == 3:
            h ^= raw[:, end + 2].astype(np.uint32) << r16
        if extra >= 2:
            h ^= raw[:, end + 1].astype(np.uint32) << r8
        h = (h ^ raw[:, end].astype(np.uint32)) * m
    h ^= h >> r13
    h = h * m
    return h ^ (h >> r15)


class PlatformMonitors:
    """Both stage-two monitors under the catalogue in force; shared by the agent and the replay."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.liquidity = LiquidityMonitor(catalogue.params("liquidity_run", LiquidityParams))
        self.stress = MarketStressMonitor(catalogue.params("market_stress", MarketStressParams))
        self.catalogue = catalogue

    def expect(self, flow_sources: Iterable[str], market_sources: Iterable[str]) -> None:
        """Name the stage-one sources (partitions) each monitor waits for before judging a bucket."""
        self.liquidity.expect(flow_sources)
        self.stress.expect(market_sources)

    def set_catalogue(self, catalogue: Catalogue) -> None:
        """Apply new parameters; the monitors keep the history they gathered."""
        self.catalogue = catalogue
        self.liquidity.params = catalogue.params("liquidity_run", LiquidityParams)
        self.stress.params = catalogue.params("market_stress", MarketStressParams)

    def update(self, partial: FlowPartial | FlowBuckets | MarketPartial) -> list[Raised]:
        """Feed one partial (or one message of flow buckets) to its monitor; return alerts whose rules are enabled."""
        if isinstance(partial, FlowPartial):
            raised = self.liquidity.update(partial)
        elif isinstance(partial, FlowBuckets):
            raised = []
            add, source = self.liquidity.add_totals, partial.source
            for bucket in partial.buckets:  # (b, outflow, inflow, n, ids[, largest]): see FlowBuckets
                raised.extend(add(source, *bucket))
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
        # One flow source for all emulated partitions: stage 2 sums the worker's partitions' totals
        # bucket by bucket, so one accumulator of them all gives it the same sums.
        self.flows = FlowAccumulator("replay")
        self.stress = MarketAccumulator("replay")
        # Key -> (its partition, that partition's detector), so each event costs one lookup (murmur2 once per key).
        self._detector_of: dict[str, tuple[int, SurpriseDetector]] = {}
        self._n = 0
        self.evicted = 0
        self.core = TxnCore(self.txn, MemoryStore[AccountState](), IdleEviction(ttl), self._flows_of)
        self.ticks = TickCore(self.market, MemoryStore[InstrumentState](), self._stress_of)

    @property
    def accounts(self) -> MemoryStore[AccountState]:
        """Account states by account id (the transaction step's store)."""
        return self.core.store  # type: ignore[return-value]  # a MemoryStore: built so above

    @accounts.setter
    def accounts(self, store: MemoryStore[AccountState]) -> None:
        self.core.store = store

    @property
    def instruments(self) -> MemoryStore[InstrumentState]:
        """Instrument states by instrument (the tick step's store)."""
        return self.ticks.store  # type: ignore[return-value]  # a MemoryStore: built so above

    @instruments.setter
    def instruments(self, store: MemoryStore[InstrumentState]) -> None:
        self.ticks.store = store

    def set_catalogue(self, catalogue: Catalogue) -> None:
        """Apply a new catalogue to every scorer."""
        self.catalogue = catalogue
        self.txn.set_catalogue(catalogue)
        self.market.set_catalogue(catalogue)
        self.monitors.set_catalogue(catalogue)

    def set_feedback(self, feedback: Feedback | None) -> None:
        """Let analysts' verdicts move the transaction scorer's operating points (models.feedback)."""
        self.txn.set_feedback(feedback)

    def prime(self, keys: Iterable[str]) -> None:
        """Map many account keys to their partitions' detectors at once (murmur2 in bulk), in first-seen order."""
        known = self._detector_of
        new = list(dict.fromkeys(keys if not known else (k for k in keys if k not in known)))
        parts = partitions_for(new, self.partitions)
        detectors = self.detectors
        for p in dict.fromkeys(parts):  # partitions in first-seen order, as one key at a time would add them
            if p not in detectors:
                detectors[p] = SurpriseDetector()
        # One pass in C: with a million accounts a Python loop over them was a visible share of a replay.
        known.update(zip(new, zip(parts, map(detectors.__getitem__, parts), strict=True), strict=True))

    def _detector(self, key: str) -> tuple[int, SurpriseDetector]:
        found = self._detector_of.get(key)
        if found is None:
            p = partition_for(key, self.partitions)
            det = self.detectors.get(p)
            if det is None:
                det = self.detectors[p] = SurpriseDetector()
            found = self._detector_of[key] = (p, det)
        return found

    def _flows_of(self, partition: int) -> FlowAccumulator:
        return self.flows

    def _stress_of(self, partition: int) -> MarketAccumulator:
        return self.stress  # one stress source too, for the same reason as the flows

    def _platform(self, partials: Iterable[FlowPartial | MarketPartial], out: Scored) -> None:
        for partial in partials:
            for r in self.monitors.update(partial):
                _add(out, r)

    def _flows(self, closed: list[FlowTotals], out: Scored) -> None:
        # What _platform() does with FlowPartials, from the plain totals: no partial is built and
        # validated for every bucket, which was a fixed cost per minute of event time.
        liquidity, rule = self.monitors.liquidity, self.monitors.catalogue.rule
        source = self.flows.source
        for totals in closed:
            for r in liquidity.add_totals(source, *totals):
                if rule(r.finding.category) is not None:
                    _add(out, r)

    def process(self, event: Transaction | MarketTick, ts: float | None = None) -> Scored:
        """Score one event and run its partials through the platform monitors.

        `ts` is the event's epoch seconds when the caller already has them (replay sorts by them).
        """
        self._n += 1
        if ts is None:
            ts = event.ts.timestamp()
        if isinstance(event, Transaction):
            found = self._detector_of.get(event.account_id)
            partition, self.txn.detector = found if found is not None else self._detector(event.account_id)
            o, closed = self.core.step(event, ts, partition)
            assert o is not None  # no offsets here, so nothing is redelivered
            res = Scored(event.event_id, "transaction", o.score, o.alerts, o.new_ids, o.dropped, o.duplicate)
            if closed:  # most events close no bucket
                self._flows(closed, res)
        else:
            # Partition 0: replay keeps instruments in one dict and stress in one source (see _stress_of).
            stepped = self.ticks.step(event, ts, 0)
            assert stepped is not None  # no offsets here, so nothing is redelivered
            istate, mo, raised, partials = stepped
            self.ticks.store.put(0, event.instrument.encode(), istate)
            res = Scored(event.event_id, "market", mo.score)
            for r in raised:
                _add(res, r)
            self._platform(partials, res)
        if self._n % 50_000 == 0:
            self.evicted += self._evict()
        return res

    def _evict(self) -> int:
        return len(self.core.evict(budget=len(self.accounts)))

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


__all__ = ["PARTIAL", "IdleEviction", "MarketScorer", "Pipeline", "PlatformMonitors", "Scored", "home_partition",
           "partition_for", "partition_of"]
