"""The transaction agent: decode, score against the account's table state, publish warnings and partials."""

from __future__ import annotations

import logging
import time
import zlib
from collections import OrderedDict
from typing import Any

from agents.sink import Sink
from app.errors import EventError
from app.faust_app import TRANSACTIONS, Runtime, dumps, restricted_loads
from app.schemas import Transaction, decode_event
from models.aggregates import FlowAccumulator
from models.detector import SurpriseDetector
from models.features import AccountState
from models.scoring import TransactionScorer

log = logging.getLogger("riskwatch.agents.transactions")


class PartitionModels:
    """One detector per input partition, checkpointed to the models table so it moves with the partition."""

    def __init__(self, table: Any, every: int, prefix: str = "txn") -> None:
        self.table = table
        self.every = every
        self.prefix = prefix
        self.detectors: dict[int, SurpriseDetector] = {}
        self.pending: dict[int, int] = {}

    def _key(self, partition: int) -> bytes:
        return f"{self.prefix}:p{partition}".encode()

    def get(self, partition: int) -> SurpriseDetector:
        """The partition's detector, restored from its last checkpoint the first time it is needed."""
        det = self.detectors.get(partition)
        if det is None:
            blob = self.table.get(self._key(partition))
            det = restricted_loads(zlib.decompress(blob)) if blob else SurpriseDetector()
            self.detectors[partition] = det
        return det

    def learned(self, partition: int) -> None:
        """Count one learned event; checkpoint every `every` events (call inside stream iteration)."""
        n = self.pending.get(partition, 0) + 1
        if n >= self.every:
            self.table[self._key(partition)] = zlib.compress(dumps(self.detectors[partition]), 1)
            n = 0
        self.pending[partition] = n

    def forget(self, partitions: set[int]) -> None:
        """Drop cached detectors of partitions this worker no longer owns (reloaded if they come back)."""
        for p in partitions:
            self.detectors.pop(p, None)
            self.pending.pop(p, None)


class IdleEviction:
    """Remembers when each account was last seen (in event time) and evicts those idle past the TTL."""

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.seen: OrderedDict[bytes, float] = OrderedDict()
        self.now = 0.0

    def touch(self, key: bytes, ts: float) -> None:
        """Mark a key active at event time ts."""
        self.seen[key] = ts
        self.seen.move_to_end(key)
        if ts > self.now:
            self.now = ts

    def stale(self, budget: int = 10_000) -> list[bytes]:
        """Keys idle longer than the TTL, oldest first, at most `budget` of them."""
        out: list[bytes] = []
        while self.seen and len(out) < budget:
            key, ts = next(iter(self.seen.items()))
            if self.now - ts <= self.ttl:
                break
            self.seen.popitem(last=False)
            out.append(key)
        return out


def attach(rt: Runtime, sink: Sink, scorer: TransactionScorer) -> Any:
    """Register the transaction agent on the app and return it."""
    s = rt.settings
    m = rt.metrics
    topic = rt.topics[TRANSACTIONS]
    topic_name = topic.get_topic_name()
    models = PartitionModels(rt.models, s.model_checkpoint_every)
    eviction = IdleEviction(s.state_ttl_seconds)
    flows: dict[int, FlowAccumulator] = {}
    stage_decode = m.processing.labels("decode")
    stage_score = m.processing.labels("score")
    stage_publish = m.processing.labels("publish")
    consumed = m.events_consumed.labels(topic_name)
    scored = m.events_scored.labels(topic_name)
    score_hist = m.scores.labels("surprise")
    lag = m.event_time_lag.labels(topic_name)

    @rt.app.agent(topic, name="score-transactions", concurrency=1)
    async def score_transactions(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            consumed.inc()
            t0 = time.perf_counter()
            try:
                txn = decode_event(event.value, Transaction)
            except EventError as exc:
                await sink.dead_letter(event.value, topic_name, msg.partition, msg.offset, exc.reason, exc.field)
                continue
            t1 = time.perf_counter()
            stage_decode.observe(t1 - t0)
            try:
                key = txn.account_id.encode()
                blob = rt.accounts.get(key)
                state = restricted_loads(blob) if blob else AccountState()
                scorer.detector = models.get(msg.partition)
                out = scorer.process(txn, state)
                if out.duplicate:
                    m.duplicates.labels(topic_name).inc()
                    continue
                rt.accounts[key] = dumps(state)
                models.learned(msg.partition)
            except Exception as exc:
                log.exception("scoring failed", extra={"topic": topic_name, "partition": msg.partition,
                                                       "offset": msg.offset, "event_id": txn.event_id})
                await sink.dead_letter(event.value, topic_name, msg.partition, msg.offset,
                                       f"scoring failed: {type(exc).__name__}: {exc}", None, txn.event_id)
                continue
            ts = txn.ts.timestamp()
            eviction.touch(key, ts)
            t2 = time.perf_counter()
            stage_score.observe(t2 - t1)
            scored.inc()
            score_hist.observe(out.score)
            lag.set(time.time() - ts)
            if out.late:
                m.late_events.labels(topic_name).inc()
            for fd in out.findings:
                m.rule_hits.labels(fd.detector).inc()
            for cat in out.dropped:
                m.storm_dropped.labels(cat).inc()
            for alert in out.alerts:
                if alert.alert_id in out.new_ids:
                    m.warnings.labels(alert.category, alert.level).inc()
                else:
                    m.warning_updates.labels(alert.category).inc()
                await sink.alert(alert)
            acc = flows.get(msg.partition)
            if acc is None:
                acc = flows[msg.partition] = FlowAccumulator(f"p{msg.partition}")
            for partial in acc.add(ts, txn.txn_type, txn.direction, txn.amount, txn.event_id,
                                   account_kind=txn.account_kind):
                await sink.partial("flow", partial.model_dump_json().encode())
            stage_publish.observe(time.perf_counter() - t2)

    @rt.app.timer(interval=2.0)
    async def flush_and_evict() -> None:
        for acc in list(flows.values()):
            for partial in acc.flush():
                await sink.partial("flow", partial.model_dump_json().encode())
        stale = eviction.stale()
        for key in stale:
            rt.accounts.pop(key, None)
        if stale:
            m.evictions.labels("accounts").inc(len(stale))
        m.entities.labels("accounts").set(len(rt.accounts))

    def _revoked(sender: Any, revoked: set[Any], **_: Any) -> None:
        models.forget({tp.partition for tp in revoked if tp.topic == topic_name})

    rt.app.on_partitions_revoked.connect(_revoked)  # type: ignore[arg-type]
    return score_transactions


__all__ = ["IdleEviction", "PartitionModels", "attach"]
