"""The transaction agent: decode, score against the account's table state, publish warnings and partials."""

from __future__ import annotations

import logging
import time
import zlib
from typing import Any

from faust import current_event

from agents.disclosure import Disclosure
from agents.sink import Sink
from app.errors import EventError
from app.faust_app import TRANSACTIONS, Runtime, dump_account, dumps, load_account, restricted_loads
from app.schemas import Transaction, decode_event
from app.security import Ingest
from models.aggregates import FlowAccumulator, FlowPartial
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
    """Remembers when each account was last seen (in event time), per partition, and evicts those idle past the TTL.

    A plain dict per partition kept in order of last touch (a touched key is re-inserted at the
    end): about half the memory per account of an OrderedDict, which mattered at millions of accounts.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.seen: dict[int, dict[bytes, float]] = {}
        self.now = 0.0

    def touch(self, key: bytes, ts: float, partition: int = 0) -> None:
        """Mark a key of `partition` active at event time ts."""
        seen = self.seen.get(partition)
        if seen is None:
            seen = self.seen[partition] = {}
        old = seen.pop(key, None)
        # A late event must not make an active account look idle: keep its newest time.
        seen[key] = ts if old is None or ts > old else old
        if ts > self.now:
            self.now = ts

    def stale(self, budget: int = 10_000) -> list[tuple[bytes, int]]:
        """(key, partition) of keys idle longer than the TTL, oldest first per partition, at most `budget`."""
        out: list[tuple[bytes, int]] = []
        horizon = self.now - self.ttl
        for partition, seen in self.seen.items():
            # One pass from the oldest, then the deletions: no rescans of the dict's freed slots.
            victims: list[bytes] = []
            for key, ts in seen.items():
                if ts >= horizon or len(out) + len(victims) >= budget:
                    break
                victims.append(key)
            for key in victims:
                del seen[key]
            out.extend((key, partition) for key in victims)
        return out

    def keep_only(self, partitions: set[int]) -> None:
        """Stop tracking partitions this worker no longer owns: their new owner evicts them."""
        for p in set(self.seen) - partitions:
            del self.seen[p]


def attach(rt: Runtime, sink: Sink, scorer: TransactionScorer, disclosure: Disclosure | None = None) -> Any:
    """Register the transaction agent on the app and return it.

    With `disclosure`, every decoded transaction is also counted for the disclosure summaries
    (stage 1, `Disclosure.add_batch`) in the same batch, so each message is consumed and decoded once.
    """
    s = rt.settings
    m = rt.metrics
    topic = rt.topics[TRANSACTIONS]
    topic_name = topic.get_topic_name()
    models = PartitionModels(rt.models, s.model_checkpoint_every)
    eviction = IdleEviction(s.state_ttl_seconds)
    ingest = Ingest(s)
    pinned: list[int] = []  # the partition a write belongs to, set around every table write we make

    def partition_for_key(key: Any) -> int | None:
        # Pin changelog writes to the partition the account's events arrive on, not to a hash of
        # the table key: with pseudonymised keys the two differ, and state must move with its events.
        if pinned:
            return pinned[0]
        event = current_event()
        if event is not None and event.message.topic == topic_name:
            return int(event.message.partition)
        return None

    rt.accounts.partition_for_key = partition_for_key
    rt.models.partition_for_key = partition_for_key
    flows: dict[int, FlowAccumulator] = {}
    stage_decode = m.processing.labels("decode").observe
    stage_score = m.processing.labels("score").observe
    stage_publish = m.processing.labels("publish").observe
    consumed = m.events_consumed.labels(topic_name)
    scored = m.events_scored.labels(topic_name)
    duplicates = m.duplicates.labels(topic_name)
    late_events = m.late_events.labels(topic_name)
    score_hist = m.scores.labels("surprise").observe
    accounts_get = rt.accounts.get
    decode = decode_event
    ingest_txn = ingest.transaction
    perf = time.perf_counter

    @rt.app.agent(topic, name="score-transactions", concurrency=1)
    async def score_transactions(stream: Any) -> None:
        # Batches amortise Faust's per-message cost and write each account's state once per batch;
        # offsets are acknowledged only after the whole batch is done (at-least-once holds).
        async for batch in stream.take_events(s.batch_size, within=s.batch_within_seconds):
            await _batch(batch)

    async def _batch(batch: list[Any]) -> None:
        states: dict[bytes, tuple[int, AccountState]] = {}
        # Partials carry cumulative bucket totals, so only the newest of each bucket needs sending.
        partials: dict[tuple[str, int], FlowPartial] = {}
        counted: list[tuple[Transaction, int, int]] = []
        warned = False
        n_scored = 0
        newest = 0.0
        consumed.inc(len(batch))
        for event in batch:
            msg = event.message
            t0 = perf()
            try:
                txn = decode(event.value, Transaction)
                if disclosure is not None:
                    # Disclosure counts every transaction that decodes, as its own reader did.
                    counted.append((txn, msg.partition, msg.offset))
                txn = ingest_txn(txn)
            except EventError as exc:
                await sink.dead_letter(event.value, topic_name, msg.partition, msg.offset, exc.reason,
                                       exc.field)
                continue
            t1 = perf()
            stage_decode(t1 - t0)
            key = txn.account_id.encode()
            try:
                entry = states.get(key)
                if entry is None:
                    blob = accounts_get(key)
                    entry = states[key] = (msg.partition, load_account(blob) if blob else AccountState())
                state = entry[1]
                scorer.detector = models.get(msg.partition)
                out = scorer.process(txn, state)
                if out.duplicate:
                    duplicates.inc()
                    continue
                pinned[:] = [msg.partition]
                models.learned(msg.partition)
                pinned.clear()
            except Exception as exc:
                pinned.clear()
                # The account's state may be half-updated: drop this batch's changes to it.
                states.pop(key, None)
                log.exception("scoring failed", extra={"topic": topic_name, "partition": msg.partition,
                                                       "offset": msg.offset, "event_id": txn.event_id})
                await sink.dead_letter(event.value, topic_name, msg.partition, msg.offset,
                                       f"scoring failed: {type(exc).__name__}: {exc}", None, txn.event_id)
                continue
            ts = txn.ts.timestamp()
            eviction.touch(key, ts, msg.partition)
            t2 = perf()
            stage_score(t2 - t1)
            n_scored += 1
            score_hist(out.score)
            if s.publish_scores:
                await sink.score(txn.account_id, txn.event_id, out.score, "surprise")
            if ts > newest:
                newest = ts
            if out.late:
                late_events.inc()
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
                warned = True
            acc = flows.get(msg.partition)
            if acc is None:
                acc = flows[msg.partition] = FlowAccumulator(f"p{msg.partition}")
            for partial in acc.add(ts, txn.txn_type, txn.direction, txn.amount, txn.event_id,
                                   account_kind=txn.account_kind, offset=msg.offset):
                partials[(partial.source, partial.bucket)] = partial
            stage_publish(perf() - t2)
        if n_scored:
            scored.inc(n_scored)
            m.saw_event_time(topic_name, newest)
        for partial in partials.values():
            await sink.partial("flow", partial.model_dump_json().encode())
        if counted and disclosure is not None:
            # Written to its table before the batch is acknowledged, once per bucket.
            disclosure.add_batch(counted)
        if warned:
            # Warnings reach Kafka before the state that remembers them: a crash in between
            # redelivers the events, which then raise the same warnings again instead of none.
            await rt.app.producer.flush()
        for key, (partition, state) in states.items():
            pinned[:] = [partition]
            rt.accounts[key] = dump_account(state)
        pinned.clear()

    @rt.app.timer(interval=2.0)
    async def flush_and_evict() -> None:
        for acc in list(flows.values()):
            for partial in acc.flush():
                await sink.partial("flow", partial.model_dump_json().encode())
        stale = eviction.stale()
        for key, partition in stale:
            pinned[:] = [partition]
            rt.accounts.pop(key, None)
        pinned.clear()
        if stale:
            m.evictions.labels("accounts").inc(len(stale))
        m.entities.labels("accounts").set(len(rt.accounts))

    def _revoked(sender: Any, revoked: set[Any], **_: Any) -> None:
        models.forget({tp.partition for tp in revoked if tp.topic == topic_name})

    def _assigned(sender: Any, assigned: set[Any], **_: Any) -> None:
        eviction.keep_only({tp.partition for tp in assigned if tp.topic == topic_name})

    rt.app.on_partitions_revoked.connect(_revoked)  # type: ignore[arg-type]
    rt.app.on_partitions_assigned.connect(_assigned)  # type: ignore[arg-type]
    return score_transactions


__all__ = ["IdleEviction", "PartitionModels", "attach"]
