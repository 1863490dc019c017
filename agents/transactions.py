"""The transaction engine: read risk.transactions in batches, score against per-account tables, publish warnings.

It runs beside the Faust app (started and stopped with it) on its own aiokafka consumer group
(`<app id>-transactions`) and producer; its tables (accounts, model checkpoints, disclosure
totals) are app.changelog stores with Faust-compatible changelog topics.
"""

from __future__ import annotations

import asyncio
import contextlib
import copy
import enum
import gc
import logging
import random
import time
from collections.abc import Awaitable, Callable, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass, field
from itertools import islice
from typing import Any, ClassVar

import mode
from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, ConsumerRebalanceListener, TopicPartition
from aiokafka.errors import IllegalStateError, KafkaError

from agents.disclosure import Disclosure
from agents.sink import BufferedSink, Rekeying, Sink
from app.admin import aiokafka_config, ensure_changelogs
from app.changelog import ChangelogStore, gather_all, read_back
from app.faust_app import (
    DEADLETTER,
    TRANSACTIONS,
    Runtime,
    compression,
    dump_account,
    dump_detector,
    dump_shifts,
    load_account,
    load_detector,
    load_shifts,
)
from app.logs import Retries
from app.metrics import observe_many
from app.quarantine import Quarantine
from app.security import Ingest
from app.settings import Settings
from app.wire import decode_transaction
from models.aggregates import FlowAccumulator, FlowTotals, flow_buckets_json
from models.core import IdleEviction, TxnCore
from models.detector import SurpriseDetector
from models.errors import EventError
from models.features import AccountState, StateCodecError, last_ts_of, prune_shift_log, shift_step_of
from models.pipeline import partition_of
from models.platform_state import dump_accumulator, load_accumulator
from models.schemas import TransactionFields
from models.scoring import TransactionScorer

log = logging.getLogger("riskwatch.agents.transactions")
failed_log = logging.getLogger("riskwatch.deadletter.transactions")


class PartitionModels:
    """One detector per input partition, checkpointed to the models table so it moves with the partition."""

    def __init__(self, store: ChangelogStore, every: int, prefix: str = "txn",
                 quarantine: Quarantine | None = None) -> None:
        self.store = store
        self.every = every
        self.prefix = prefix
        self.quarantine = quarantine
        self.detectors: dict[int, SurpriseDetector] = {}
        self.pending: dict[int, int] = {}
        # Per partition: the stored shift versions (input offset, shifts as of it), oldest first, and
        # the offset the restored shifts are as of (None: not dated; steps are not taken again).
        self.versions: dict[int, list[tuple[int | None, Any]]] = {}
        self.through: dict[int, int | None] = {}

    def _key(self, partition: int) -> bytes:
        return f"{self.prefix}:p{partition}".encode()

    def _shifts_key(self, partition: int) -> bytes:
        return f"{self.prefix}:p{partition}:shifts".encode()

    def get(self, partition: int, first_offset: int = -1) -> SurpriseDetector:
        """The partition's detector, restored from its last checkpoint the first time it is needed.

        `first_offset` is the first record to be processed: the type shifts are taken as they were
        just before it (see _restore_shifts). A checkpoint that does not decode (or is of a format
        this release cannot read) is set aside and deleted from the table: the partition starts a
        fresh detector, with its warm-up.
        """
        det = self.detectors.get(partition)
        if det is None:
            key = self._key(partition)
            blob = self.store.get(partition, key)
            det = SurpriseDetector()
            if blob:
                try:
                    det = load_detector(blob)
                except Exception as exc:  # whatever the snapshot is, scoring goes on
                    if self.quarantine is None:
                        raise
                    self.quarantine.set_aside(self.store.name, self.store.topic, partition, key, blob, exc)
                    self.store.delete(partition, key)
            self._restore_shifts(partition, det, first_offset)
            self.detectors[partition] = det
        return det

    def _restore_shifts(self, partition: int, det: SurpriseDetector, first_offset: int) -> None:
        # The rules (amount spike, pass-through, dormancy) measure an amount against the account's
        # usual one through the type shifts, which every learned event moves by one step. For an
        # event redelivered after a crash or a move to be judged as it was the first time, its
        # shifts must be exactly those it met then: the shifts as of the offset just before the
        # redelivery starts (kept per write, `versions`), then the same steps in the same order:
        # re-scored events take theirs again, and events whose state already holds them take the
        # step their state remembers (AccountState.shift_log, applied by TransactionProcessor).
        self.versions[partition] = []
        self.through[partition] = None
        key = self._shifts_key(partition)
        blob = self.store.get(partition, key)
        if not blob:
            return
        try:
            versions = load_shifts(blob)
        except StateCodecError as exc:
            if self.quarantine is None:
                raise
            self.quarantine.set_aside(self.store.name, self.store.topic, partition, key, blob, exc)
            self.store.delete(partition, key)
            return
        dated = [(t, sh) for t, sh in versions if t is not None]
        if not dated:  # an earlier release's undated snapshot: the newest shifts, no steps taken again
            det.shifts = copy.deepcopy(versions[-1][1])
            return
        before = [v for v in dated if v[0] < first_offset]
        # Read from before every version (offsets rewound): the oldest one is the closest there is.
        through, shifts = before[-1] if before else dated[0]
        # A copy: the version is handed on in this owner's snapshots as it was read. Learning into the
        # version itself stored it with later shifts, and an owner dying before its first commit
        # left the next one judging events with shifts from their future.
        det.shifts = copy.deepcopy(shifts)
        self.through[partition] = through
        self.versions[partition] = [v for v in dated if v[0] <= through]

    def write_shifts(self, partition: int, through: int, committed: int) -> None:
        """Store the partition's shifts as of input offset `through`, with the versions a redelivery may still need.

        Versions from before the committed offset are dropped, but for the newest of them: a
        redelivery starts at the committed offset or later, and needs the version just before it.
        """
        det = self.detectors.get(partition)
        if det is None or det.shifts is None:
            return
        versions = self.versions.setdefault(partition, [])
        if versions and versions[-1][0] == through:
            return
        versions.append((through, copy.deepcopy(det.shifts)))
        old = [i for i, (t, _) in enumerate(versions) if t is not None and t < committed]
        if len(old) > 1:
            del versions[:old[-1]]
        del versions[:-SHIFT_VERSIONS]
        self.store.put(partition, self._shifts_key(partition), dump_shifts(versions))

    def learned(self, partition: int, n: int = 1) -> None:
        """Count learned events; checkpoint every `every` events (written with the batch's state)."""
        n += self.pending.get(partition, 0)
        det = self.detectors[partition]
        if n >= self.every:
            self.store.put(partition, self._key(partition), dump_detector(det))
            n = 0
        self.pending[partition] = n

    def forget(self, partitions: set[int]) -> None:
        """Drop cached detectors of partitions this worker no longer owns (reloaded if they come back)."""
        for p in partitions:
            self.detectors.pop(p, None)
            self.pending.pop(p, None)
            self.versions.pop(p, None)
            self.through.pop(p, None)


@dataclass(slots=True)
class _Batch:
    """What one batch gathers: per-event stage times and scores (observed in bulk after it), flow partials, counts."""

    # Partials carry cumulative bucket totals, so only the newest of each bucket needs sending.
    partials: dict[tuple[int, int], FlowTotals] = field(default_factory=dict)
    counted: list[tuple[TransactionFields, int, int, float]] = field(default_factory=list)  # for disclosure
    decode: list[float] = field(default_factory=list)
    score: list[float] = field(default_factory=list)
    publish: list[float] = field(default_factory=list)
    scores: list[float] = field(default_factory=list)
    newest: float = 0.0  # the newest event time scored


class AccountTable:
    """The worker's StateStore (models.core): decoded account states over the accounts changelog table.

    States handed out stay decoded in `live` until `flush` encodes them into the table's pending
    writes (the engine flushes before each commit), so an account busy in many batches is decoded and
    encoded once per commit interval, not once per batch.
    """

    def __init__(self, table: ChangelogStore, restore: Callable[[int, bytes, bytes], AccountState],
                 committed: Mapping[int, int]) -> None:
        self.table = table
        self.restore = restore  # decodes a stored value; one that does not decode is set aside
        self.committed = committed  # partition -> first offset not committed: how far back shift logs go
        # Decoded account states changed since the last flush (at most about MAX_LIVE of them).
        self.live: dict[tuple[int, bytes], AccountState] = {}
        # Decoded states already written, kept for their next event, least recently used first: an
        # active account is decoded once, not once per write interval (decoding was ~10% of the
        # work). They equal their stored blobs; a bounded, fixed cost (WARM_MAX states, ~7 MB).
        self.warm: dict[tuple[int, bytes], AccountState] = {}

    def get(self, partition: int, key: bytes) -> AccountState | None:
        """The account's live state (decoded from the table at first use), or None when the table has none."""
        sk = (partition, key)
        state = self.live.get(sk)
        if state is None:
            state = self.warm.pop(sk, None)
            if state is None:
                blob = self.table.get(partition, key)
                if not blob:
                    return None
                state = self.restore(partition, key, blob)
            self.live[sk] = state
        return state

    def put(self, partition: int, key: bytes, state: AccountState) -> None:
        """Make `state` the account's live state (encoded at the next flush)."""
        self.live[(partition, key)] = state

    def delete(self, partition: int, key: bytes) -> None:
        """Delete the account from the table and from memory."""
        self.table.delete(partition, key)
        self.live.pop((partition, key), None)
        self.warm.pop((partition, key), None)

    def iterate(self, partition: int) -> Iterator[tuple[bytes, AccountState]]:
        """Every (key, state) of a partition, decoded (not for the hot path); reading marks nothing changed.

        A stored value that does not decode is left out here, not set aside: `get` does that, once,
        when the account's next event reads it (set aside at every iteration it would be
        dead-lettered again and again).
        """
        stored = dict(self.table.items(partition))
        for (p, key), state in list(self.live.items()):
            if p == partition and key not in stored:
                yield key, state  # new since the last flush
        for key, blob in stored.items():
            sk = (partition, key)
            held = self.live.get(sk) or self.warm.get(sk)
            if held is None:
                try:
                    held = load_account(blob)
                except Exception:  # noqa: BLE001 - left for get() to set aside (see above)
                    continue
            yield key, held

    def rollback(self, partition: int, key: bytes) -> None:
        """Drop the account's changes since the last flush: its next event reads the stored state again."""
        self.live.pop((partition, key), None)

    def flush(self) -> None:
        """Encode the live states into the table's pending writes; keep the written ones warm."""
        put, committed = self.table.put, self.committed
        live, warm = self.live, self.warm
        for sk, state in live.items():
            if state.shift_log:
                prune_shift_log(state, committed.get(sk[0], -1))
            put(sk[0], sk[1], dump_account(state))
            if state.n > 1:
                # An account seen once (a one-off payer, a card tester's throwaway) is admitted at
                # its second event: a flood of them must not push the active accounts out.
                warm[sk] = state
        self.live = {}
        excess = len(warm) - WARM_MAX
        if excess > 0:
            for sk in list(islice(warm, excess)):
                del warm[sk]

    def keep(self, owned: Callable[[int], bool]) -> None:
        """Drop what is cached of the partitions `owned` rejects."""
        self.live = {k: v for k, v in self.live.items() if owned(k[0])}
        self.warm = {k: v for k, v in self.warm.items() if owned(k[0])}


class TransactionProcessor:
    """Scores batches of transaction records against the engine's tables: the work, without Kafka.

    Records are anything with `partition`, `offset` and `value` (aiokafka's ConsumerRecord). Output
    messages collect in `sink` and table changes in the stores' `pending`; the engine sends both.
    """

    def __init__(self, rt: Runtime, sink: BufferedSink, scorer: TransactionScorer,
                 disclosure: Disclosure | None = None) -> None:
        s = rt.settings
        self.rt, self.sink, self.scorer, self.disclosure = rt, sink, scorer, disclosure
        self.settings = s
        self.topic_name = s.topic(TRANSACTIONS)
        self.accounts = ChangelogStore(ACCOUNTS_TABLE, s.changelog(ACCOUNTS_TABLE))
        self.models_store = ChangelogStore(MODELS_TABLE, s.changelog(MODELS_TABLE))
        # Stored values that do not decode are set aside (dead-lettered with this engine's outputs).
        self.quarantine = Quarantine(rt.metrics, self._dead_letter)
        self.models = PartitionModels(self.models_store, s.model_checkpoint_every, quarantine=self.quarantine)
        self.stores = [self.accounts, self.models_store]
        if disclosure is not None:
            self.stores.append(disclosure.store)
        for store in self.stores:
            store.quarantine = self.quarantine
        self.eviction = IdleEviction(s.state_ttl_seconds)
        self.ingest = Ingest(s)
        self.flows: dict[int, FlowAccumulator] = {}
        self.flows_written: dict[int, int] = {}  # partition -> last offset of its flows in the models table
        # partition -> offset of the last record processed, and of the first one not committed yet
        # (what the type-shift versions are dated by, and how far back the accounts' shift logs go).
        self.read_through: dict[int, int] = {}
        self.committed: dict[int, int] = {}
        # The storm cap's admissions per partition, stored beside its detector and counted again on restore.
        if scorer.storm.by_source is None:
            scorer.storm.by_source = {}
        self.storm_loaded: set[int] = set()
        self.states = AccountTable(self.accounts, self._restore_account, self.committed)
        # The step replay runs too (models.core): state, redelivery, scoring, eviction, flow totals.
        self.core = TxnCore(scorer, self.states, self.eviction, self._flows_of)
        m = self.m = rt.metrics
        self._decode_seconds = m.processing.labels("decode")
        self._score_seconds = m.processing.labels("score")
        self._publish_seconds = m.processing.labels("publish")
        self._consumed = m.events_consumed.labels(self.topic_name)
        self._scored = m.events_scored.labels(self.topic_name)
        self._duplicates = m.duplicates.labels(self.topic_name)
        self._redelivered = m.redelivered.labels(self.topic_name)
        self._late = m.late_events.labels(self.topic_name)
        self._score_hist = m.scores.labels("surprise")
        # The input topic's partition count, set by the engine at each assignment; below 2 (as for a
        # processor driven without Kafka) no record is checked for its key.
        self.input_partitions = 0
        self.rekeying = Rekeying(rt, self.topic_name, "account_id", TRANSACTIONS not in rt.settings.topic_names)

    @property
    def live(self) -> dict[tuple[int, bytes], AccountState]:
        """Decoded account states changed since the last write_state()."""
        return self.states.live

    @property
    def warm(self) -> dict[tuple[int, bytes], AccountState]:
        """Decoded account states already written, kept for their next event."""
        return self.states.warm

    async def process(self, records: Sequence[Any]) -> None:
        """Decode, score and learn every record; dead-letter what cannot be; stage the outputs.

        Account states stay decoded (AccountTable) until `write_state`, before each commit.
        """
        sink, topic_name = self.sink, self.topic_name
        decode, ingest_txn, step = decode_transaction, self.ingest.transaction, self.core.step
        perf = time.perf_counter
        publish_scores = self.settings.publish_scores
        times = _Batch()
        partials, counted = times.partials, times.counted
        self._consumed.inc(len(records))
        # Records come grouped by partition: switch detectors only between groups (-1: none yet).
        current, learned, offset = -1, 0, -1
        for rec in records:
            partition = rec.partition
            if partition != current:
                current, learned = self._switch(current, offset, learned, partition, rec.offset)
            offset = rec.offset
            t0 = perf()
            try:
                txn, ts = decode(rec.value or b"")
                if self.input_partitions > 1 and rec.key != (own := txn.account_id.encode()) and self._rekey(rec, own):
                    continue  # not keyed by its account: sent on to the account's partition
                if self.disclosure is not None:
                    # Disclosure counts every transaction that decodes, as its own reader did.
                    counted.append((txn, partition, offset, ts))
                txn = ingest_txn(txn, ts)
            except EventError as exc:
                await sink.dead_letter(rec.value, topic_name, partition, offset, exc.reason, exc.field)
                continue
            t1 = perf()
            times.decode.append(t1 - t0)
            try:
                out, closed = step(txn, ts, partition, offset)
            except Exception as exc:  # noqa: BLE001 - logged with its traceback and dead-lettered by _failed
                await self._failed(rec, txn, exc)
                continue
            for totals in closed:
                partials[(partition, totals[0])] = totals
            if out is None or out.duplicate:  # redelivered (by offset) or an event id seen: not scored again
                self._not_scored(out is None, txn, partition, offset)
                continue
            learned += 1
            t2 = perf()
            times.score.append(t2 - t1)
            times.scores.append(out.score)
            if publish_scores:
                await sink.score(txn.account_id, txn.event_id, out.score, "surprise")
            if ts > times.newest:
                times.newest = ts
            if out.late:
                self._late.inc()
            if out.findings or out.dropped or out.alerts:
                await self._outcome(out)
            times.publish.append(perf() - t2)
        self._leave(current, offset, learned)
        await self._close(times)

    def _rekey(self, rec: Any, account: bytes) -> bool:
        """Send a record not keyed by its account on to the account's partition, keyed by it; False if it is there.

        An account's state lives in one partition; a producer that sets no key (or keys by something
        else) scatters its transactions, and every partition would judge the account on a share of
        its history: a card test split four ways is four short bursts. Sent on, the record is scored
        where the account's other records are, a hop later (slightly late: lateness is allowed for).
        """
        home = self.rekeying.home(rec, account, self.input_partitions)
        if home is None:
            return False
        self.sink.forward(self.topic_name, account, rec.value, home)
        return True

    def _switch(self, current: int, offset: int, learned: int, partition: int, first: int) -> tuple[int, int]:
        """Leave the current partition's group of records (-1: none) and enter the next; (its number, 0 learned)."""
        self._leave(current, offset, learned)
        self._enter(partition, first)
        return partition, 0

    def _enter(self, partition: int, offset: int) -> None:
        """Switch the scorer to a partition's detector and storm share before its first record of a batch."""
        if partition not in self.committed:
            self.committed[partition] = offset  # where reading began: the committed offset
        self.scorer.detector = self.models.get(partition, offset)
        self.scorer.storm.source = partition
        if partition not in self.storm_loaded:
            self._load_storm({partition} | self.models_store.partitions())

    def _leave(self, partition: int, offset: int, learned: int) -> None:
        """Record how far a partition's records of this batch went (after its last one; -1: none yet)."""
        if partition < 0:
            return
        if learned:
            self.models.learned(partition, learned)
        self.read_through[partition] = offset
        if self.models.through.get(partition) is not None:
            self.models.through[partition] = offset  # its steps are in the shifts now: never taken again

    def _not_scored(self, redelivered: bool, txn: TransactionFields, partition: int, offset: int) -> None:
        """Count a duplicate; retake a redelivered record's type-shift step if the shifts were read back from before it.

        A redelivered record's account state already applied it, however many events the account
        saw since (the event-id memory keeps only 16), so it is not scored again.
        """
        self._duplicates.inc()
        if not redelivered:
            return
        self._redelivered.inc()
        through = self.models.through.get(partition)
        if through is not None and offset > through:
            state = self.states.get(partition, txn.account_id.encode())
            sign = None if state is None else shift_step_of(state, offset)
            if sign is not None:
                self.scorer.detector.learn_shift(txn.txn_type, txn.direction == "debit", sign)

    async def _failed(self, rec: Any, txn: TransactionFields, exc: Exception) -> None:
        """A record whose scoring raised: its account's half-made changes dropped, the record dead-lettered."""
        self.states.rollback(rec.partition, txn.account_id.encode())
        # Summarised (app.logs): a fault that hits every record is one traceback, then a count, per kind.
        failed_log.exception(f"scoring failed ({type(exc).__name__})",
                             extra={"topic": self.topic_name, "partition": rec.partition, "offset": rec.offset,
                                    "event_id": txn.event_id})
        await self.sink.dead_letter(rec.value, self.topic_name, rec.partition, rec.offset,
                                    f"scoring failed: {type(exc).__name__}: {exc}", None, txn.event_id)

    async def _close(self, times: _Batch) -> None:
        """After a batch: its metrics observed, its flow partials sent, its transactions counted for disclosure."""
        self._observe(times)
        if times.partials:
            await self._send_partials(times.partials)
        if times.counted and self.disclosure is not None:
            self.disclosure.add_batch(times.counted)

    def _observe(self, times: _Batch) -> None:
        """Observe a batch's stage times and scores in bulk (one observe() each cost a microsecond)."""
        observe_many(self._decode_seconds, times.decode)
        observe_many(self._score_seconds, times.score)
        observe_many(self._publish_seconds, times.publish)
        if times.scores:
            self._scored.inc(len(times.scores))
            self.m.saw_event_time(self.topic_name, times.newest)
            observe_many(self._score_hist, times.scores)

    def _load_storm(self, partitions: set[int]) -> None:
        """Count the stored storm-cap admissions of every partition read back here (set aside if they do not decode).

        All at once, before the first new warning: loaded one partition at a time as each one's
        events came, the first partitions admitted against a count that lacked the others' shares.
        """
        for partition in sorted(partitions - self.storm_loaded):
            self.storm_loaded.add(partition)
            key = _storm_key(partition)
            blob = self.models_store.get(partition, key)
            if blob:
                try:
                    self.scorer.storm.load(partition, blob)
                except Exception as exc:  # noqa: BLE001 - whatever the value is, the partition is scored
                    self.quarantine.set_aside(MODELS_TABLE, self.models_store.topic, partition, key, blob, exc)
                    self.models_store.delete(partition, key)

    def _flows_of(self, partition: int) -> FlowAccumulator:
        """The partition's flow buckets, read from the models table at first use (fresh if none or unreadable)."""
        acc = self.flows.get(partition)
        if acc is not None:
            return acc
        key = _flows_key(partition)
        blob = self.models_store.get(partition, key)
        acc = None
        if blob:
            try:
                acc = load_accumulator(blob)
            except Exception as exc:  # noqa: BLE001 - whatever the value is, the partition's flows go on
                self.quarantine.set_aside(MODELS_TABLE, self.models_store.topic, partition, key, blob, exc)
                self.models_store.delete(partition, key)
        if acc is None:
            acc = FlowAccumulator(f"p{partition}")
        self.flows[partition] = acc
        self.flows_written[partition] = acc.last_offset
        return acc

    def _restore_account(self, partition: int, key: bytes, blob: bytes) -> AccountState:
        """Decode a stored account state; one that does not decode is set aside and the account starts again."""
        try:
            return load_account(blob)
        except Exception as exc:  # noqa: BLE001 - whatever the blob is, the account's events are scored
            self.quarantine.set_aside(ACCOUNTS_TABLE, self.accounts.topic, partition, key, blob, exc)
            return AccountState()

    async def _dead_letter(self, key: bytes, value: bytes) -> None:
        # Through the sink, so the engine delivers it with the batch, before the state that replaces the value.
        await self.sink._send(DEADLETTER, key, value)

    async def _send_partials(self, partials: dict[tuple[int, int], FlowTotals]) -> None:
        sink = self.sink
        if self.settings.flow_partials == "single":
            for (partition, _), totals in partials.items():
                await sink.partial("flow", self.flows[partition].partial(totals).model_dump_json().encode())
            return
        closed: dict[int, list[FlowTotals]] = {}
        for (partition, _), totals in partials.items():
            closed.setdefault(partition, []).append(totals)
        for partition, buckets in closed.items():
            acc = self.flows[partition]
            for payload in flow_buckets_json(acc.source, acc.bucket_seconds, buckets):
                await sink.partial("flow", payload)

    def write_state(self) -> None:
        """Encode the account states and flow buckets changed since the last call into their tables (pending writes)."""
        for partition, acc in self.flows.items():
            # Once per write and partition, when its flows moved: a few hundred bytes a second.
            if self.flows_written.get(partition) != acc.last_offset:
                self.models_store.put(partition, _flows_key(partition), dump_accumulator(acc))
                self.flows_written[partition] = acc.last_offset
        storm = self.scorer.storm
        for partition in list(storm.changed):  # only after a new warning: rare
            self.models_store.put(partition, _storm_key(partition), storm.dump(partition))
        committed = self.committed
        for partition, through in self.read_through.items():
            self.models.write_shifts(partition, through, committed.get(partition, -1))
        self.states.flush()

    async def _outcome(self, out: Any) -> None:
        m = self.m
        for fd in out.findings:
            m.rule_hits.labels(fd.detector).inc()
        for cat in out.dropped:
            m.storm_dropped.labels(cat).inc()
        for alert in out.alerts:
            if alert.alert_id in out.new_ids:
                m.warnings.labels(alert.category, alert.level).inc()
            else:
                m.warning_updates.labels(alert.category).inc()
            await self.sink.alert(alert)

    async def housekeeping(self) -> None:
        """Send the flow partials of buckets that closed with time, evict idle accounts, update the gauges."""
        for acc in list(self.flows.values()):
            for partial in acc.flush():
                await self.sink.partial("flow", partial.model_dump_json().encode())
        self.evict()
        self.m.entities.labels(ACCOUNTS_TABLE).set(len(self.accounts))
        self.budget_gauges()

    def budget_gauges(self) -> None:
        """Publish each category's budget and every owned partition's operating point (per 1,000 events)."""
        for category, budget in self.scorer.budgets.items():
            self.m.model_budget.labels(category).set(budget * 1000.0)
        for partition, det in self.models.detectors.items():
            for category, point in (det.points or {}).items():
                self.m.model_operating.labels(category, str(partition)).set(point[3] * 1000.0)

    def evict(self) -> int:
        """Delete the accounts idle past the TTL (at most 10,000 a call); the engine calls it after every batch.

        Once per housekeeping tick was not enough: at 7,000 new accounts a second the 10,000 a tick
        fell behind and the table grew without bound (the soak test's flood of one-off accounts).
        Finding nothing stale costs one look per partition.
        """
        stale = self.core.evict()
        if stale:
            self.m.evictions.labels(ACCOUNTS_TABLE).inc(len(stale))
        return len(stale)

    def track_restored(self, partitions: set[int]) -> int:
        """Let eviction see the accounts just read back, oldest first; returns how many.

        Eviction knows an account once it scores an event of it. Before this, an account read back
        after a restart or a move that never came back stayed in the table (and the worker's memory)
        for good: every rolling restart added the accounts idle at that moment for ever.
        """
        touch = self.eviction.touch
        n = 0
        for p in sorted(partitions):
            stamped = [(last_ts_of(blob), key) for key, blob in self.accounts.items(p)]
            # A state of an older encoding (a pickle) is dated as the newest here: kept a full TTL at most.
            newest = max((t for t, _ in stamped if t is not None), default=0.0)
            # Oldest first: IdleEviction.stale() stops at the first account still active.
            for ts, key in sorted((newest if t is None else t, k) for t, k in stamped):
                touch(key, ts, p)
            n += len(stamped)
        return n

    def assigned(self, partitions: set[int]) -> None:
        """Forget the in-memory helpers of partitions no longer owned (the engine drops their tables)."""
        gone = set(self.models.detectors) - partitions
        for p in gone:  # a partition that moved on reports from its new owner, not from here
            for category in self.models.detectors[p].points or {}:
                with contextlib.suppress(KeyError):
                    self.m.model_operating.remove(category, str(p))
        self.models.forget(gone)
        for p in gone | (set(self.read_through) - partitions):
            self.read_through.pop(p, None)
            self.committed.pop(p, None)
        self.eviction.keep_only(partitions)
        self.states.keep(partitions.__contains__)
        for p in set(self.flows) - partitions:
            del self.flows[p]
        for p in self.storm_loaded - partitions:
            self.scorer.storm.drop(p)
        self.storm_loaded &= partitions

    def reset(self, partitions: set[int]) -> None:
        """Forget what is cached of partitions whose tables are being read back from their changelogs."""
        self.models.forget(partitions)
        self.states.keep(lambda p: p not in partitions)
        for p in partitions:
            self.read_through.pop(p, None)
            self.committed.pop(p, None)
            self.eviction.seen.pop(p, None)
            self.flows.pop(p, None)  # read back with the tables, so they match the accounts again
            self.scorer.storm.drop(p)
            self.storm_loaded.discard(p)


class _Rebalance(ConsumerRebalanceListener):  # type: ignore[misc]
    """Hands aiokafka's rebalance callbacks to the engine."""

    def __init__(self, engine: TransactionEngine) -> None:
        self.engine = engine

    async def on_partitions_revoked(self, revoked: Any) -> None:
        await self.engine.revoked()

    async def on_partitions_assigned(self, assigned: Any) -> None:
        await self.engine.assigned({tp.partition for tp in assigned if tp.topic == self.engine.topic})


class Phase(enum.Enum):
    """Where the transaction engine is in its life; Phases allows only the moves in Phases.MOVES."""

    IDLE = "idle"  # started, no partitions assigned yet
    RUNNING = "running"  # the owned partitions' tables are complete: batches are scored, written and committed
    REBALANCING = "rebalancing"  # partitions revoked: nothing is scored until the assignment's read-back ends
    BROKEN = "broken"  # a batch or write failed: the tables may be ahead of their changelogs, to be read back
    STOPPING = "stopping"  # stop asked while running: the batch in hand ends, then one last write and commit
    STOPPED = "stopped"  # nothing more is scored or written (stop asked in any other phase, or the last commit done)


class Phases:
    """The engine's phase, the only moves allowed between phases, and the riskwatch_engine_phase gauge.

    The phase replaces three flags whose combinations were implicit (ready, broken, stopping): each
    place that asks "may I score, write, commit?" now asks one question of one value.

    >>> p = Phases()
    >>> p.go(Phase.RUNNING), p.go(Phase.STOPPING), p.fail(), p.now
    (True, True, None, <Phase.STOPPED: 'stopped'>)
    >>> p.go(Phase.RUNNING)  # nothing leaves STOPPED
    False
    """

    MOVES: ClassVar[Mapping[Phase, frozenset[Phase]]] = {
        Phase.IDLE: frozenset({Phase.RUNNING, Phase.REBALANCING, Phase.BROKEN, Phase.STOPPED}),
        Phase.RUNNING: frozenset({Phase.REBALANCING, Phase.BROKEN, Phase.STOPPING}),
        Phase.REBALANCING: frozenset({Phase.RUNNING, Phase.BROKEN, Phase.STOPPED}),
        Phase.BROKEN: frozenset({Phase.RUNNING, Phase.STOPPED}),  # running again only after the read-back
        Phase.STOPPING: frozenset({Phase.STOPPED}),
        Phase.STOPPED: frozenset(),
    }

    def __init__(self, gauge: Any = None) -> None:
        self.now = Phase.IDLE
        self.gauge = gauge
        self._show()

    @property
    def serving(self) -> bool:
        """Batches may be scored and written: running, or stopping after the batch in hand."""
        return self.now is Phase.RUNNING or self.now is Phase.STOPPING

    def go(self, new: Phase) -> bool:
        """Move to `new` if MOVES allows it (staying put is allowed); False, logged, if not."""
        if new is self.now:
            return True
        if new not in self.MOVES[self.now]:
            log.error("transaction engine: no move from %s to %s; staying %s", self.now.value, new.value,
                      self.now.value)
            return False
        log.debug("transaction engine: %s -> %s", self.now.value, new.value)
        self.now = new
        self._show()
        return True

    def fail(self) -> None:
        """A batch, write or read-back failed: broken (read back, then run again), or stopped if stopping."""
        if self.now is Phase.STOPPING:
            self.go(Phase.STOPPED)
        elif self.now is not Phase.STOPPED:
            self.go(Phase.BROKEN)

    def _show(self) -> None:
        if self.gauge is not None:
            for phase in Phase:
                self.gauge.labels(phase.value).set(1.0 if phase is self.now else 0.0)


Changes = list[tuple[str, dict[tuple[int, bytes], bytes | None]]]  # (changelog topic, (partition, key) -> value)


class Checkpoint:
    """One commit of the transaction engine, its order in one place: warnings flushed, state written, offsets committed.

    `take` snapshots, under the engine's lock, what the batches since the last checkpoint left:
    the delivery futures of their warnings, dead letters and partials (already sent, at once: their
    latency is the product), every table's changes (account states encoded now) and the offsets
    read. `commit` then runs behind the loop, after the previous checkpoint's commit:

    1. flush: every output of those batches acknowledged by Kafka;
    2. write: the tables' changes sent to their changelogs and acknowledged;
    3. commit: the offsets committed.

    Each step starts only when the one before succeeded; a failure raises and commits nothing. So
    a crash at any point leaves the committed offsets at or before state that was delivered with
    every warning it remembers: the redelivered events are re-scored or recognised by offset, never
    lost, and a warning is never remembered by state without having been sent.
    """

    def __init__(self, outputs: list[asyncio.Future[Any]], changes: Changes,
                 offsets: dict[TopicPartition, int]) -> None:
        self.outputs, self.changes, self.offsets = outputs, changes, offsets

    @classmethod
    def take(cls, outputs: list[asyncio.Future[Any]], processor: TransactionProcessor,
             stores: Sequence[ChangelogStore], read: dict[TopicPartition, int]) -> Checkpoint:
        """Snapshot the outputs in flight, the tables' changes and the offsets read (under the engine's lock)."""
        processor.write_state()
        return cls(outputs, [(store.topic, store.take_pending()) for store in stores], dict(read))

    async def commit(self, producer: AIOKafkaProducer,
                     commit_offsets: Callable[[dict[TopicPartition, int]], Awaitable[None]],
                     written: Callable[[float], None] | None = None) -> None:
        """Run the three steps in order; `written` gets the seconds steps 1 and 2 took."""
        t0 = time.perf_counter()
        # Step 1: flush. The outputs first: state must never remember a warning Kafka has not got.
        await gather_all(self.outputs)
        # Step 2: write the state, in each partition's changelog order (one record batch per partition).
        await gather_all(await send_batched(producer, ((topic, partition, key, value) for topic, changes in self.changes
                                                       for (partition, key), value in changes.items())))
        if written is not None:
            written(time.perf_counter() - t0)
        # Step 3: commit the offsets, only now that the state that covers them is stored.
        await commit_offsets(self.offsets)


class TransactionEngine:
    """Reads risk.transactions in batches with aiokafka, scores them, then sends outputs, then state, then commits.

    Faust's per-message machinery (conductor, stream, per-message acks and futures, one producer
    send per table write) cost about 30 times the scoring; this path pays per batch instead.
    At-least-once: a batch's warnings and dead letters are delivered before the state that
    remembers the batch, and its offsets are committed only after both, so a crash redelivers
    events whose state may already hold them (the scorer then skips them as duplicates) and never
    loses one. Any failed write reads the owned partitions' tables back from their changelogs and
    resumes from the committed offsets.
    """

    def __init__(self, rt: Runtime, processor: TransactionProcessor) -> None:
        s = rt.settings
        self.rt, self.settings, self.processor = rt, s, processor
        self.sink = processor.sink
        self.topic = s.topic(TRANSACTIONS)
        self.stores = processor.stores
        self.lock = asyncio.Lock()
        self.owned: set[int] = set()
        self.phases = Phases(rt.metrics.engine_phase)
        # Bumped by every assignment and rewind: a batch fetched before one is given back, not scored.
        self.generation = 0
        self.read: dict[TopicPartition, int] = {}  # next offset after the last record processed
        self.done: dict[TopicPartition, int] = {}  # ... and after the last one whose state was delivered
        self.snapshotted: dict[TopicPartition, int] = {}  # `read` as of the last snapshot
        self.outstanding: list[asyncio.Future[Any]] = []
        self.repositioned: set[TopicPartition] = set()  # partitions the last assignment sought on purpose
        self.committed: dict[TopicPartition, int] = {}
        self.legacy_offsets: dict[int, int] = {}
        self.consumer: AIOKafkaConsumer | None = None
        self.producer: AIOKafkaProducer | None = None  # warnings, dead letters, partials, scores
        self.state_producer: AIOKafkaProducer | None = None  # table changelogs
        self.restorer: AIOKafkaConsumer | None = None
        self.task: asyncio.Task[None] | None = None
        self.stopped: asyncio.Future[None] | None = None  # the stop in progress or done (stop() runs once)
        self.reported = False  # uncommitted offsets logged
        self.last_chores = self.last_flush = 0.0
        self.writing: asyncio.Task[None] | None = None

    # ------------------------------------------------------------------ life cycle
    async def start(self) -> None:
        """Create the changelog topics if missing, connect, join the group and start the loop."""
        s = self.settings
        created = await asyncio.to_thread(ensure_changelogs, s, tuple(st.name for st in self.stores))
        if created:
            log.info("created changelog topics: %s", ", ".join(created))
        self.legacy_offsets = await asyncio.to_thread(_legacy_offsets, s)
        cfg = aiokafka_config(s)
        codec = compression(s)
        # Two producers: aiokafka keeps one request in flight per broker and producer, and warnings
        # queued behind a large changelog request waited for it (the latency's p99, issue 8).
        self.producer = AIOKafkaProducer(**cfg, acks="all", linger_ms=5, compression_type=codec)
        self.state_producer = AIOKafkaProducer(**cfg, acks="all", linger_ms=0, max_batch_size=512 * 1024,
                                               compression_type=codec)
        self.restorer = AIOKafkaConsumer(**cfg, group_id=None, enable_auto_commit=False,
                                         auto_offset_reset="earliest")
        session_ms = int(s.kafka_session_timeout * 1000)
        self.consumer = AIOKafkaConsumer(
            **cfg, group_id=s.transactions_group, enable_auto_commit=False, auto_offset_reset="earliest",
            session_timeout_ms=session_ms, heartbeat_interval_ms=min(3000, session_ms // 3),
            max_poll_records=s.batch_size,
            # A transactional producer's aborted records never happened (a payment rolled back upstream),
            # and an open transaction's may still be: score only what its producer committed.
            isolation_level="read_committed",
            # Static membership: a worker restarted in place gets its partitions back at once (issue 17).
            group_instance_id=s.instance_id or None)
        await self.producer.start()
        await self.state_producer.start()
        await self.restorer.start()
        self.consumer.subscribe([self.topic], listener=_Rebalance(self))
        await self.consumer.start()
        self.task = asyncio.create_task(self._run(), name="transaction-engine")
        # Everything built so far (Faust's services, modules, models) lives as long as the worker: a
        # full collection scanned it for about 65 ms each time, a stall every warning waited behind.
        gc.freeze()

    async def stop(self, budget: float | None = None) -> None:
        """Stop consuming, flush and commit within `budget` seconds, say what was not committed, close the clients.

        The worker calls it on SIGTERM before Faust's own stop (app/worker.py); Faust's call later
        waits for the same stop. With the broker gone each step used to wait for it (the loop in a
        read-back, the commit for a coordinator, each client's close for its requests): the worker
        took 92 s to exit (issue 17). Now each step gets what is left of the budget (by default
        STOP_SHARE of RISKWATCH_SHUTDOWN_TIMEOUT), and offsets not committed are logged once: the
        next owner of the partition reads them again (redelivered events are recognised by their state).
        """
        if self.stopped is None:
            if budget is None:
                budget = self.settings.shutdown_timeout * STOP_SHARE
            self.stopped = asyncio.ensure_future(self._stop(budget))
        await asyncio.shield(self.stopped)

    async def _stop(self, budget: float) -> None:
        loop = asyncio.get_running_loop()
        deadline = loop.time() + budget

        def left(share: float = 1.0) -> float:
            return max(deadline - loop.time(), 0.0) * share

        # Step 1: stop consuming; the loop ends after the batch in hand (or is cancelled). Only a
        # running engine gets a last write: in any other phase its tables may not match the offsets.
        self.phases.go(Phase.STOPPING if self.phases.now is Phase.RUNNING else Phase.STOPPED)
        if self.task is not None:
            try:
                await asyncio.wait_for(asyncio.shield(self.task), timeout=left(0.3))
            except (TimeoutError, asyncio.CancelledError):
                self.task.cancel()
                await asyncio.wait([self.task], timeout=1.0)
            except Exception:  # noqa: BLE001 - already logged by the loop
                pass
        # Step 2: the last write (outputs, then state) and commit, if the tables match their changelogs.
        if self.consumer is not None:
            try:
                await asyncio.wait_for(self._final_commit(), timeout=left(0.6))
            except TimeoutError:
                log.warning("final commit of %s did not finish within the shutdown budget (%.1f s): is the broker "
                            "reachable?", self.topic, budget)
            except Exception as exc:  # noqa: BLE001 - the next owner starts from the last commit that worked
                log.warning("final commit of %s failed: %s", self.topic, exc)
        self.phases.go(Phase.STOPPED)
        # Step 3: say once what the next owner will read again.
        self.report_uncommitted()
        # Step 4: leave the group and close the clients, all at once, in what is left (at least 1 s).
        clients = [c for c in (self.consumer, self.producer, self.state_producer, self.restorer) if c is not None]
        closing = [asyncio.ensure_future(c.stop()) for c in clients]
        if closing:
            _, pending = await asyncio.wait(closing, timeout=max(left(), 1.0))
            for fut in pending:
                fut.cancel()
            if pending:
                log.warning("%d of %d Kafka clients of the transaction engine did not close within the shutdown "
                            "budget; left to the process exit", len(pending), len(closing))

    async def _final_commit(self) -> None:
        async with self.lock:
            if self.phases.now is Phase.STOPPING:
                await self._flush(wait=True)

    def uncommitted(self) -> dict[int, tuple[int | None, int]]:
        """Partitions read past their last commit: partition -> (offset committed in this run or None, next to read)."""
        out: dict[int, tuple[int | None, int]] = {}
        for tp, read in sorted(dict(self.read).items(), key=lambda kv: kv[0].partition):
            committed = self.committed.get(tp)
            if committed is None or committed < read:
                out[tp.partition] = (committed, read)
        return out

    def report_uncommitted(self) -> None:
        """Log, once, which offsets of risk.transactions were processed but not committed (they will be redelivered).

        Safe to call from the shutdown watchdog's thread: it only reads the offset maps.
        """
        if self.reported:
            return
        self.reported = True
        gaps = self.uncommitted()
        if not gaps:
            log.info("%s: every offset processed was committed", self.topic)
            return
        parts = [f"partition {p}: offsets {c} to {r - 1} not committed" if c is not None
                 else f"partition {p}: offsets up to {r - 1} not committed since the group's last commit"
                 for p, (c, r) in gaps.items()]
        log.warning("%s: %s; they will be redelivered to the partition's next owner", self.topic, "; ".join(parts))

    def owned_partitions(self) -> set[int] | None:
        """The partitions whose tables are complete here, or None during a rebalance or read-back."""
        return set(self.owned) if self.phases.serving else None

    # ------------------------------------------------------------------ rebalancing
    async def revoked(self) -> None:
        """Before a rebalance: finish the batch in hand and commit what was delivered."""
        phases = self.phases
        if phases.now is Phase.RUNNING:
            phases.go(Phase.REBALANCING)  # before the lock: the loop scores nothing more from here
        async with self.lock:
            if phases.now is Phase.BROKEN or phases.now is Phase.STOPPED:
                await self._abandon_writes()
                return  # the tables may be ahead of their changelogs: nothing safe to write or commit
            try:
                await self._flush(wait=True)
                self.writing = None
            except Exception as exc:  # noqa: BLE001 - the next owner redoes uncommitted events (deduplicated)
                log.warning("writing state and committing before the rebalance failed: %s", exc)
                phases.fail()
            if phases.now is Phase.STOPPING:
                phases.go(Phase.STOPPED)  # written and committed: the last write the stop would have done

    async def assigned(self, partitions: set[int]) -> None:
        """After a rebalance: drop the tables of partitions gone, read back those newly ours."""
        async with self.lock:
            if self.writing is not None:  # revoked() waited for it; a write must not span an assignment
                try:
                    await self._settle()
                except Exception:  # noqa: BLE001 - logged where it failed; read back below
                    self.phases.fail()
                self.writing = None
            gone, added = self.owned - partitions, partitions - self.owned
            for store in self.stores:
                store.drop(gone)
            self.processor.assigned(partitions)
            if self.consumer is not None:
                self.processor.input_partitions = len(self.consumer.partitions_for_topic(self.topic) or ())
            self.owned = set(partitions)
            self.done = {tp: o for tp, o in self.done.items() if tp.partition in partitions}
            self.read = {tp: o for tp, o in self.read.items() if tp.partition in partitions}
            self.committed = {tp: o for tp, o in self.committed.items() if tp.partition in partitions}
            self.generation += 1
            self.repositioned = set()
            try:
                await self._read_back(added)
                await self._adopt_legacy_offsets(added)
                # After a failed write (BROKEN) the loop reads every owned partition back before it goes on.
                if self.phases.now is Phase.IDLE or self.phases.now is Phase.REBALANCING:
                    self.phases.go(Phase.RUNNING)
            except Exception:
                log.exception("reading back the tables of partitions %s failed; retrying", sorted(added))
                self.phases.fail()
            # Again at the end: a fetch that completed while this ran (it awaits the broker) may hold
            # records from before the seeks above; the loop must give them back, not score them.
            self.generation += 1
            log.info("transaction partitions %s (added %s, gone %s)", sorted(partitions), sorted(added),
                     sorted(gone))

    async def _abandon_writes(self) -> None:
        # After a failure: let the writes in flight end (none commits past the failed one), ignore how.
        task, self.writing = self.writing, None
        if task is not None:
            try:
                await task
            except Exception:  # noqa: BLE001 - the failure that made us rewind, already logged
                pass

    async def _read_back(self, partitions: set[int]) -> None:
        if not partitions:
            return
        assert self.restorer is not None
        self.processor.reset(partitions)
        t0 = time.monotonic()
        n = await read_back(self.restorer, self.stores, partitions)
        tracked = self.processor.track_restored(partitions)
        log.info("read back %d changelog records of partitions %s in %.2f s (%d accounts)", n, sorted(partitions),
                 time.monotonic() - t0, tracked)

    async def _adopt_legacy_offsets(self, partitions: set[int]) -> None:
        # Before this engine, Faust's group (the app id) consumed risk.transactions. A partition this
        # group never committed starts where that group stopped, not at the earliest offset.
        assert self.consumer is not None
        for p in sorted(partitions):
            offset = self.legacy_offsets.get(p)
            tp = TopicPartition(self.topic, p)
            if offset is not None and await self.consumer.committed(tp) is None:
                log.info("partition %d starts at offset %d, where the Faust group stopped", p, offset)
                self.consumer.seek(tp, offset)
                self.repositioned.add(tp)

    async def _rewind(self) -> None:
        # Something in the last batch failed to reach Kafka: the tables may be ahead of their
        # changelogs, so they are read back and reading resumes from the committed offsets.
        assert self.consumer is not None
        async with self.lock:
            await self._abandon_writes()
            parts = set(self.owned)
            for store in self.stores:
                store.take_pending()
            self.sink.discard()
            self.outstanding = []
            await self._read_back(parts)
            for p in sorted(parts):
                tp = TopicPartition(self.topic, p)
                offset = await self.consumer.committed(tp)
                if offset is None:
                    offset = self.legacy_offsets.get(p)
                if offset is None:
                    await self.consumer.seek_to_beginning(tp)
                else:
                    self.consumer.seek(tp, offset)
                self.done.pop(tp, None)
                self.read.pop(tp, None)
            self.generation += 1
            if self.phases.now is Phase.BROKEN:  # not if a stop came meanwhile
                self.phases.go(Phase.RUNNING)

    # ------------------------------------------------------------------ the loop
    async def _run(self) -> None:
        assert self.consumer is not None
        s = self.settings
        poll_ms = max(1, int(s.batch_within_seconds * 1000))
        retries = Retries(log, "transaction batch")
        phases = self.phases
        while phases.now is not Phase.STOPPING and phases.now is not Phase.STOPPED:
            try:
                if phases.now is Phase.BROKEN:
                    await self._rewind()
                generation = self.generation
                got = await self.consumer.getmany(timeout_ms=poll_ms, max_records=s.batch_size)
                async with self.lock:
                    if got and phases.serving and generation == self.generation:
                        await self._batch(got)
                    elif got:
                        self._unread(got)
                    await self._chores(idle=not got)
                retries.ok()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is told (Retries) and retried
                failures = retries.failed(exc, "reading state back and resuming from the committed offsets")
                phases.fail()
                await asyncio.sleep(min(0.5 * failures, 5.0))

    def _unread(self, got: dict[TopicPartition, list[Any]]) -> None:
        """Give back records fetched across a rebalance or rewind: the client's position is already past them.

        Dropping them without a seek skips them until the next rebalance (Faust's fetch loop lost
        records this way, app/faust_fixes.py). Each partition still assigned reads again from its
        first record given back.
        """
        assert self.consumer is not None
        assigned = self.consumer.assignment()
        for tp, recs in got.items():
            # A partition the assignment moved on purpose (the upgrade path) keeps that position:
            # its records in hand were fetched before the move.
            if recs and tp in assigned and tp not in self.repositioned:
                self.consumer.seek(tp, recs[0].offset)

    async def _batch(self, got: dict[TopicPartition, list[Any]]) -> None:
        foreign = {tp: recs for tp, recs in got.items() if tp.partition not in self.owned}
        if foreign:
            self._unread(foreign)
        records = [r for tp in sorted(got, key=lambda tp: tp.partition) for r in got[tp]
                   if tp.partition in self.owned]
        t0 = time.perf_counter()
        await self.processor.process(records)
        t1 = time.perf_counter()
        await self._send_outputs()
        m = self.rt.metrics
        m.batch_phase.labels("process").observe(t1 - t0)
        m.batch_size.observe(len(records))
        for tp, recs in got.items():
            if recs and tp.partition in self.owned:
                self.read[tp] = recs[-1].offset + 1

    async def _send_outputs(self) -> None:
        # Warnings go out at once (their latency is the product), but are waited for only at the
        # next flush, before the state that remembers them.
        producer = self.producer
        assert producer is not None
        if self.processor.quarantine.outbox or self.processor.quarantine.news:
            await self.processor.quarantine.flush()  # stored values set aside while reading back or scoring
        messages = self.sink.take()
        if not messages:
            return
        routed = []
        routes: dict[str, list[int]] = {}
        for topic, key, value, partition in messages:
            if partition is None:
                parts = routes.get(topic)
                if parts is None:
                    # Asked per batch, not cached for good: the client's metadata follows partitions added later.
                    parts = routes[topic] = sorted(await producer.partitions_for(topic))
                # The producer's own rule (murmur2 of the key), so a key lands where send() would put it.
                partition = parts[partition_of(key, len(parts))] if key is not None else random.choice(parts)
            routed.append((topic, partition, key, value))
        self.outstanding.extend(await send_batched(producer, routed))

    async def _flush(self, wait: bool = False) -> None:
        """Take a Checkpoint and commit it behind the loop, after the one before.

        The snapshot is taken here, under the lock; the commit runs as a task chained after the
        previous one, so the loop goes on scoring while Kafka acknowledges (a flush used to stall
        every event behind it for a few round trips). Chaining keeps each partition's changelog in
        write order.
        """
        outstanding, self.outstanding = self.outstanding, []
        checkpoint = Checkpoint.take(outstanding, self.processor, self.stores, self.read)
        self.snapshotted = checkpoint.offsets
        self.writing = asyncio.create_task(
            self._write(self.writing, checkpoint.outputs, checkpoint.changes, checkpoint.offsets),
            name="transaction-engine-write")
        if wait:
            await self._settle()

    async def _settle(self) -> None:
        """Wait for every write in flight; raise if one failed."""
        task = self.writing
        if task is not None:
            await task

    async def _write(self, previous: asyncio.Task[None] | None, outstanding: list[asyncio.Future[Any]],
                     pending: Changes, offsets: dict[TopicPartition, int]) -> None:
        # The checkpoint's parts, not the object: tests/kafka/test_changelog.py stands in for this method with
        # that signature to watch what each snapshot holds.
        if previous is not None:
            await previous  # a failed earlier write fails this one too: nothing after it may commit
        producer = self.state_producer
        assert producer is not None
        await Checkpoint(outstanding, pending, offsets).commit(
            producer, self._commit_through, self.rt.metrics.batch_phase.labels("write").observe)

    async def _commit_through(self, offsets: dict[TopicPartition, int]) -> None:
        # Delivered now: `done` is what a commit may cover (and lag() counts from when nothing is read since).
        self.done.update(offsets)
        await self._commit()

    async def _chores(self, idle: bool = False) -> None:
        if not self.phases.serving:
            return
        writing = self.writing
        if writing is not None and writing.done():
            self.writing = None
            writing.result()  # a failed write raises here: the loop reads back and resumes
        now = time.monotonic()
        if now - self.last_chores >= CHORES_SECONDS:
            self.last_chores = now
            await self.processor.housekeeping()
            await self._send_outputs()
        else:
            self.processor.evict()
        if now - self.last_flush >= COMMIT_SECONDS or len(self.processor.live) >= MAX_LIVE:
            if self.writing is not None and len(self.processor.live) < 2 * MAX_LIVE:
                return  # one write in flight at a time, unless changes pile up
            self.last_flush = now
            await self._flush()
        elif (idle and self.writing is None and self.read != self.snapshotted
              and now - self.last_flush >= IDLE_FLUSH_SECONDS):
            # Caught up (a poll came back empty): write and commit now rather than at the next
            # tick, so the end of a burst is committed promptly and not redelivered after a crash.
            self.last_flush = now
            await self._flush()

    async def _commit(self) -> None:
        todo = {tp: o for tp, o in self.done.items() if self.committed.get(tp) != o}
        if not todo or self.consumer is None:
            return
        await self.consumer.commit(todo)
        self.committed.update(todo)
        committed = self.processor.committed
        for tp, o in todo.items():
            if tp.topic == self.topic:
                committed[tp.partition] = o

    async def lag(self) -> dict[tuple[str, int], int]:
        """Messages behind per owned partition: the log end offset minus the next offset to process."""
        out: dict[tuple[str, int], int] = {}
        consumer = self.consumer
        if consumer is None or not self.phases.serving:
            return out
        tps = [TopicPartition(self.topic, p) for p in sorted(self.owned)]
        try:
            # Asked of the broker: the fetcher's cached high watermark lags behind a fast reader.
            end = await asyncio.wait_for(consumer.end_offsets(tps), timeout=2.0)
        except (TimeoutError, KafkaError):
            end = {tp: hw for tp in tps if (hw := consumer.highwater(tp)) is not None}
        for tp in tps:
            if tp not in end:
                continue
            done = self.read.get(tp, self.done.get(tp))
            if done is None:
                # Nothing read here yet: where reading starts (the committed offset, or the earliest).
                try:
                    done = await asyncio.wait_for(consumer.position(tp), timeout=1.0)
                except (TimeoutError, KafkaError, AssertionError, IllegalStateError):
                    continue
            else:
                # Past the last record read: a transaction's commit marker, or aborted records skipped.
                with contextlib.suppress(TimeoutError, KafkaError, AssertionError, IllegalStateError):
                    done = max(done, await asyncio.wait_for(consumer.position(tp), timeout=1.0))
            out[(self.topic, tp.partition)] = max(end[tp] - done, 0)
        return out


async def send_batched(producer: AIOKafkaProducer,
                       messages: Iterable[tuple[str, int, bytes | None, bytes | None]]) -> list[asyncio.Future[Any]]:
    """Send (topic, partition, key, value) messages as record batches filled here, in order; their delivery futures.

    One send() per message cost about three times as much CPU as filling the batches ourselves
    (the bench's two produce ceilings), and the worker sends thousands of partials and states a second.
    """
    batches: dict[tuple[str, int], Any] = {}
    futures: list[asyncio.Future[Any]] = []
    for topic, partition, key, value in messages:
        tp = (topic, partition)
        batch = batches.get(tp)
        if batch is None:
            batch = batches[tp] = producer.create_batch()
        if batch.append(key=key, value=value, timestamp=None) is None:
            # Full: send it and start another (an empty batch always takes one record, however large).
            futures.append(await producer.send_batch(batch, topic, partition=partition))
            batch = batches[tp] = producer.create_batch()
            batch.append(key=key, value=value, timestamp=None)
    for (topic, partition), batch in batches.items():
        if batch.record_count():
            futures.append(await producer.send_batch(batch, topic, partition=partition))
    return futures


CHORES_SECONDS = 2.0
COMMIT_SECONDS = 1.0
IDLE_FLUSH_SECONDS = 0.1  # at most ten early writes a second when traffic comes in short bursts
# Decoded account states held between two writes; more than this many changed accounts are written
# at once, so the worker's memory does not grow with a burst of new accounts (about 1.2 KB each).
MAX_LIVE = 2_000
# Type-shift versions kept per partition (one per write that moved them): commits run up to a few
# writes behind, and a redelivery needs the version just before the committed offset.
SHIFT_VERSIONS = 8
# Decoded states kept across writes (see TransactionProcessor.warm): about 7 MB at most.
WARM_MAX = 5_000
# Share of RISKWATCH_SHUTDOWN_TIMEOUT the engine's stop may take (the rest is Faust's own stop):
# 6 s of the default 10 s; with the broker up it takes well under one.
STOP_SHARE = 0.6


def _legacy_offsets(s: Settings) -> dict[int, int]:
    """Committed offsets of risk.transactions in Faust's group (`deployment_id`), from before the engine had its own."""
    from app.admin import admin

    try:
        client = admin(s, timeout=10.0)
    except Exception as exc:  # noqa: BLE001 - without them a fresh group starts at the earliest offset
        log.warning("could not read Faust's old offsets: %s", exc)
        return {}
    try:
        got = client.list_group_offsets(s.deployment_id).get(s.deployment_id, {})
    except Exception as exc:  # noqa: BLE001
        log.warning("could not read Faust's old offsets: %s", exc)
        return {}
    finally:
        client.close()
    topic = s.topic(TRANSACTIONS)
    return {tp.partition: om.offset for tp, om in got.items() if tp.topic == topic and om.offset >= 0}


def attach(rt: Runtime, sink: Sink, scorer: TransactionScorer,
           disclosure: Disclosure | None = None) -> TransactionEngine:
    """Create the transaction engine, started and stopped with the Faust app; return it.

    With `disclosure`, every decoded transaction is also counted for the disclosure summaries
    (stage 1, `Disclosure.add_batch`) in the same batch, so each message is consumed and decoded once.
    """
    out = BufferedSink(rt)
    out.alert_listeners = sink.alert_listeners  # the same listeners (top entities) see every warning
    processor = TransactionProcessor(rt, out, scorer, disclosure)
    engine = TransactionEngine(rt, processor)
    if disclosure is not None:
        disclosure.txn_owned = engine.owned_partitions
        disclosure.txn_generation = lambda: engine.generation

    @rt.app.service
    class TransactionService(mode.Service):
        """Runs the transaction engine for as long as the Faust worker runs."""

        async def on_start(self) -> None:
            await engine.start()

        async def on_stop(self) -> None:
            await engine.stop()

    rt.extras["transactions"] = engine
    return engine


ACCOUNTS_TABLE = "accounts"
MODELS_TABLE = "models"


def _storm_key(partition: int) -> bytes:
    """A partition's storm-cap admissions in the models table."""
    return f"storm:p{partition}".encode()


def _flows_key(partition: int) -> bytes:
    """A partition's flow buckets in the models table, beside its detector (`txn:p<n>`)."""
    return f"flows:p{partition}".encode()


__all__ = ["ACCOUNTS_TABLE", "MODELS_TABLE", "Checkpoint", "PartitionModels", "Phase", "Phases",
           "TransactionEngine", "TransactionProcessor", "attach"]
