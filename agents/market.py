"""The market agent: score price ticks per instrument, warn on anomalies and crashes, emit stress partials.

Crash safety: an instrument's state remembers the input offset of its last tick, so a tick
redelivered after a crash is recognised and skipped; its warnings are delivered before the state
that remembers them is written. Each partition's stage-one stress accumulator is kept in the
`market-stress` table (written when it changes, as the changed instrument's entry of its bucket) and read
back when the partition's next tick is not the one after the last seen (a start, a crash, a move).
"""

from __future__ import annotations

import logging
import time
from collections.abc import Iterator
from typing import Any

from agents.sink import Rekeying, Sink
from app.faust_app import MARKET, Runtime, dumps, load_instrument
from app.security import Ingest
from models.aggregates import MarketAccumulator, bucket_of
from models.core import MarketScorer, TickCore
from models.errors import EventError
from models.findings import Raised
from models.market import InstrumentState, MarketOutcome
from models.platform_state import check_stress_value, dump_stress_entry, dump_stress_head, load_stress
from models.rules import Catalogue
from models.schemas import MarketTick, decode_event

STRESS_TABLE = "market-stress"

log = logging.getLogger("riskwatch.agents.market")
failed_log = logging.getLogger("riskwatch.deadletter.market")


def attach(rt: Runtime, sink: Sink, catalogue: Catalogue) -> MarketScorer:
    """Register the market agent; return its scorer so rule changes reach it."""
    m = rt.metrics
    topic = rt.topics[MARKET]
    name = topic.get_topic_name()
    scorer = MarketScorer(catalogue)
    seen: dict[int, int] = {}  # partition -> offset of the last tick handled here
    ingest = Ingest(rt.settings)
    stress = _StressTables(rt)
    instruments = InstrumentTable(rt)
    # The step replay runs too (models.core): the instrument's state, redelivery, scoring, stress totals.
    core = TickCore(scorer, instruments, stress.of)
    rekeying = Rekeying(rt, name, "instrument", MARKET not in rt.settings.topic_names)
    partitions = rt.settings.topic_partitions

    @rt.app.agent(topic, name="score-market", concurrency=1)
    async def score_market(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            m.events_consumed.labels(name).inc()
            if seen.get(msg.partition, -2) != msg.offset - 1:
                # Not the next tick: this process may have missed ticks another worker applied.
                stress.forget(msg.partition)
            seen[msg.partition] = msg.offset
            try:
                tick = ingest.tick(decode_event(event.value, MarketTick))
            except EventError as exc:
                await sink.dead_letter(event.value, name, msg.partition, msg.offset, exc.reason, exc.field)
                continue
            instrument = tick.instrument.encode()
            if msg.key != instrument and rekeying.home(msg, instrument, partitions) is not None:
                # Not keyed by its instrument: sent on keyed by it, placed by the producer's partitioner
                # (the key's murmur2 over the topic's own partitions), where keyed ticks land.
                await sink._send(MARKET, instrument, event.value)
                continue
            t0 = time.perf_counter()
            ts = tick.ts.timestamp()
            try:
                stepped = core.step(tick, ts, msg.partition, msg.offset)
            except Exception as exc:  # noqa: BLE001 - logged with its traceback and dead-lettered by _failed
                await _failed(sink, name, event.value, msg, tick, exc)
                continue
            if stepped is None:
                m.duplicates.labels(name).inc()
                m.redelivered.labels(name).inc()
                continue
            state, out, raised, partials = stepped
            await _publish(rt, sink, name, tick, out, raised, t0)
            for partial in partials:
                await sink.partial("market", partial.model_dump_json().encode())
            stress.write(msg.partition, ts, tick)
            # Last: a stored state marks the tick applied, so what it caused is written before it.
            instruments.put(msg.partition, tick.instrument.encode(), state)

    @rt.app.timer(interval=2.0)
    async def flush_stress() -> None:
        for partial in stress.flush():
            await sink.partial("market", partial.model_dump_json().encode())
        m.entities.labels("instruments").set(len(rt.instruments))

    return scorer


class _StressTables:
    """Each partition's stage-one stress accumulator, kept in the `market-stress` table and read back from it."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.stress: dict[int, MarketAccumulator] = {}
        # partition -> bucket -> instrument -> its event ids in the bucket's sample (what its entry stores)
        self.sampled: dict[int, dict[int, dict[str, list[str]]]] = {}
        # Written from the agent only, so each value goes to its own partition's changelog (key p<n>).
        self.table = rt.app.Table(STRESS_TABLE, default=None, key_type=bytes, value_type=bytes,
                                  partitions=rt.settings.topic_partitions, options=rt.checked(check_stress_value))
        self.changes_before = 0  # the accumulator's change count before the current tick's step

    def of(self, partition: int) -> MarketAccumulator:
        """The partition's stress accumulator, read back from its table after a start, a crash or a move.

        TickCore.step asks for it just before adding the tick, so its change count is remembered
        here: write() then stores only what this tick changed.
        """
        acc = self.stress.get(partition)
        if acc is None:
            acc, self.sampled[partition] = _stress_of(self.rt, self.table, partition)
            self.stress[partition] = acc
        self.changes_before = acc.changes
        return acc

    def forget(self, partition: int) -> None:
        """Read the partition's accumulator back at its next tick (this process may have missed some)."""
        self.stress.pop(partition, None)

    def write(self, partition: int, ts: float, tick: MarketTick) -> None:
        """Store what the tick just added changed (nothing if it changed no bucket)."""
        acc = self.stress[partition]
        if acc.changes != self.changes_before:
            # Written when a bucket changed (a tick that adds nothing leaves them as they were), as
            # this instrument's entry of the bucket: a few dozen bytes, whatever the instruments.
            _write_stress(self.table, partition, acc, self.sampled[partition], bucket_of(ts, acc.bucket_seconds),
                          tick.instrument, tick.event_id)

    def flush(self) -> list[Any]:
        """The partials of buckets that closed with time, every partition's."""
        return [p for acc in list(self.stress.values()) for p in acc.flush()]


async def _failed(sink: Sink, name: str, value: bytes, msg: Any, tick: MarketTick, exc: Exception) -> None:
    """A tick whose scoring raised: logged with its traceback and dead-lettered; its state is left as it was."""
    # Summarised (app.logs): a fault that hits every tick is one traceback, then a count, per kind.
    failed_log.exception(f"market scoring failed ({type(exc).__name__})",
                         extra={"topic": name, "partition": msg.partition, "offset": msg.offset,
                                "event_id": tick.event_id})
    await sink.dead_letter(value, name, msg.partition, msg.offset,
                           f"scoring failed: {type(exc).__name__}: {exc}", None, tick.event_id)


async def _publish(rt: Runtime, sink: Sink, name: str, tick: MarketTick, out: MarketOutcome, raised: list[Raised],
                   t0: float) -> None:
    """A scored tick's metrics, score and warnings; the warnings delivered before anything remembers them."""
    m = rt.metrics
    if rt.quarantine.outbox:
        await rt.quarantine.flush()
    m.processing.labels("score_market").observe(time.perf_counter() - t0)
    m.events_scored.labels(name).inc()
    m.scores.labels("market").observe(out.score)
    if rt.settings.publish_scores:
        await sink.score(tick.instrument, tick.event_id, out.score, "market")
    m.saw_event_time(name, tick.ts.timestamp())
    await sink.raised(raised)


def _stress_key(partition: int, bucket: int | None = None, instrument: str = "") -> bytes:
    """`p<n>`: the head of partition n's stress buckets; `p<n>:<bucket>:<instrument>`: one instrument's entry."""
    return (f"p{partition}" if bucket is None else f"p{partition}:{bucket}:{instrument}").encode()


def _write_stress(table: Any, partition: int, acc: MarketAccumulator, sampled: dict[int, dict[str, list[str]]],
                  bucket: int, instrument: str, event_id: str) -> None:
    """Store what one tick changed: its instrument's entry of its bucket, the head when a bucket opened or closed.

    The head's last offset is then older than the entries: ticks after it are added again on a
    restore, which changes nothing (a bucket's sets and its sample take each tick once).
    """
    gone = [b for b in sampled if b not in acc.buckets]
    for b in gone:
        for name in sampled.pop(b):
            table.pop(_stress_key(partition, b, name), None)
    opened = bucket in acc.buckets and bucket not in sampled
    if bucket in acc.buckets:
        ids = sampled.setdefault(bucket, {}).setdefault(instrument, [])
        if event_id in acc.buckets[bucket][2] and event_id not in ids:
            ids.append(event_id)
        table[_stress_key(partition, bucket, instrument)] = dump_stress_entry(acc, bucket, instrument, ids)
    if gone or opened:
        table[_stress_key(partition)] = dump_stress_head(acc)


def _stress_of(rt: Runtime, table: Any, partition: int
               ) -> tuple[MarketAccumulator, dict[int, dict[str, list[str]]]]:
    """The partition's stress accumulator as its table holds it; a fresh one if none, or if it does not decode."""
    head_key = _stress_key(partition)
    prefix = head_key + b":"
    topic = table.changelog_topic.get_topic_name()
    head = table.get(head_key)
    if head:
        entries = []
        for key, blob in list(table.items()):
            if not bytes(key).startswith(prefix):
                continue
            try:  # each entry on its own: a bad one is set aside, the others still count
                b, _, name = bytes(key)[len(prefix):].decode().partition(":")
                load_stress(head, [(int(b), name, blob)])
                entries.append((int(b), name, blob))
            except Exception as exc:  # noqa: BLE001 - whatever the value is, the partition's ticks go on
                rt.quarantine.set_aside(STRESS_TABLE, topic, partition, bytes(key), blob, exc)
                table.pop(key, None)
        try:
            return load_stress(head, entries)
        except Exception as exc:  # noqa: BLE001 - whatever the head is, the partition's ticks go on
            rt.quarantine.set_aside(STRESS_TABLE, topic, partition, head_key, head, exc)
    return MarketAccumulator(f"p{partition}"), {}


class InstrumentTable:
    """The market agent's StateStore (models.core): instrument states in the Faust `instruments` table.

    Each put is written to the table at once (Faust sends the changelog record with the agent's
    output); there is nothing to flush.
    """

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt

    def get(self, partition: int, key: bytes) -> InstrumentState | None:
        """The instrument's state as stored, None if none; one that does not decode is set aside (None)."""
        blob = self.rt.instruments.get(key)
        if not blob:
            return None
        # Checked on recovery already (StateTable); a value that got past it is set aside here: a fresh state.
        try:
            return load_instrument(blob)
        except Exception as exc:  # noqa: BLE001 - whatever the blob is, the instrument's ticks are scored
            self.rt.quarantine.set_aside("instruments", self.rt.instruments.changelog_topic_name, partition, key,
                                         blob, exc)
            return None

    def put(self, partition: int, key: bytes, state: InstrumentState) -> None:
        """Store the instrument's state (this marks its tick applied)."""
        self.rt.instruments[key] = dumps(state)

    def delete(self, partition: int, key: bytes) -> None:
        """Forget the instrument."""
        self.rt.instruments.pop(key, None)

    def iterate(self, partition: int) -> Iterator[tuple[bytes, InstrumentState]]:
        """Every stored (key, state) (the table does not tell partitions apart here)."""
        for key in list(self.rt.instruments.keys()):
            state = self.get(partition, bytes(key))
            if state is not None:
                yield bytes(key), state

    def flush(self) -> None:
        """Nothing to write: each put is written at once."""

    def rollback(self, partition: int, key: bytes) -> None:
        """Nothing to drop: a state is only put once its tick is handled."""


__all__ = ["InstrumentTable", "MarketScorer", "attach"]
