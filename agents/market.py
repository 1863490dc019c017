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
from typing import Any

from agents.sink import Sink
from app.faust_app import MARKET, Runtime, dumps, load_instrument
from app.security import Ingest
from models.aggregates import MarketAccumulator, bucket_of
from models.errors import EventError
from models.market import InstrumentState
from models.pipeline import MarketScorer
from models.platform_state import check_stress_value, dump_stress_entry, dump_stress_head, load_stress
from models.rules import Catalogue
from models.schemas import MarketTick, decode_event

STRESS_TABLE = "market-stress"

log = logging.getLogger("riskwatch.agents.market")


def attach(rt: Runtime, sink: Sink, catalogue: Catalogue) -> MarketScorer:
    """Register the market agent; return its scorer so rule changes reach it."""
    m = rt.metrics
    topic = rt.topics[MARKET]
    name = topic.get_topic_name()
    scorer = MarketScorer(catalogue)
    stress: dict[int, MarketAccumulator] = {}
    # partition -> bucket -> instrument -> its event ids in the bucket's sample (what its entry stores)
    sampled: dict[int, dict[int, dict[str, list[str]]]] = {}
    seen: dict[int, int] = {}  # partition -> offset of the last tick handled here
    ingest = Ingest(rt.settings)
    # Written from the agent only, so each value goes to its own partition's changelog (key p<n>).
    table = rt.app.Table(STRESS_TABLE, default=None, key_type=bytes, value_type=bytes,
                         partitions=rt.settings.topic_partitions, options=rt.checked(check_stress_value))

    @rt.app.agent(topic, name="score-market", concurrency=1)
    async def score_market(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            m.events_consumed.labels(name).inc()
            if seen.get(msg.partition, -2) != msg.offset - 1:
                # Not the next tick: this process may have missed ticks another worker applied.
                stress.pop(msg.partition, None)
            seen[msg.partition] = msg.offset
            try:
                tick = ingest.tick(decode_event(event.value, MarketTick))
            except EventError as exc:
                await sink.dead_letter(event.value, name, msg.partition, msg.offset, exc.reason, exc.field)
                continue
            t0 = time.perf_counter()
            key = tick.instrument.encode()
            try:
                blob = rt.instruments.get(key)
                state = _restore(rt, msg.partition, key, blob) if blob else InstrumentState()
                if msg.offset <= state.offset:
                    m.duplicates.labels(name).inc()
                    m.redelivered.labels(name).inc()
                    continue
                out, raised = scorer.process(tick, state)
                state.offset = msg.offset
            except Exception as exc:
                log.exception("market scoring failed", extra={"topic": name, "partition": msg.partition,
                                                              "offset": msg.offset, "event_id": tick.event_id})
                await sink.dead_letter(event.value, name, msg.partition, msg.offset,
                                       f"scoring failed: {type(exc).__name__}: {exc}", None, tick.event_id)
                continue
            if rt.quarantine.outbox:
                await rt.quarantine.flush()
            m.processing.labels("score_market").observe(time.perf_counter() - t0)
            m.events_scored.labels(name).inc()
            m.scores.labels("market").observe(out.score)
            if rt.settings.publish_scores:
                await sink.score(tick.instrument, tick.event_id, out.score, "market")
            m.saw_event_time(name, tick.ts.timestamp())
            for r in raised:
                m.rule_hits.labels(r.finding.detector).inc()
                if r.is_new:
                    m.warnings.labels(r.finding.category, r.finding.level).inc()
                else:
                    m.warning_updates.labels(r.finding.category).inc()
                await sink.alert(r.to_alert())
            if raised:
                # Delivered before the state that remembers them: a crash in between raises them again.
                await rt.app.producer.flush()
            acc = stress.get(msg.partition)
            if acc is None:
                acc, sampled[msg.partition] = _stress_of(rt, table, msg.partition)
                stress[msg.partition] = acc
            before = acc.changes
            ts = tick.ts.timestamp()
            for partial in acc.add(ts, tick.instrument, out.stressed, tick.event_id, move=out.move,
                                   spacing=out.spacing, offset=msg.offset):
                await sink.partial("market", partial.model_dump_json().encode())
            if acc.changes != before:
                # Written when a bucket changed (a tick that adds nothing leaves them as they were), as
                # this instrument's entry of the bucket: a few dozen bytes, whatever the instruments.
                _write_stress(table, msg.partition, acc, sampled[msg.partition], bucket_of(ts, acc.bucket_seconds),
                              tick.instrument, tick.event_id)
            # Last: a stored state marks the tick applied, so what it caused is written before it.
            rt.instruments[key] = dumps(state)

    @rt.app.timer(interval=2.0)
    async def flush_stress() -> None:
        for acc in list(stress.values()):
            for partial in acc.flush():
                await sink.partial("market", partial.model_dump_json().encode())
        m.entities.labels("instruments").set(len(rt.instruments))

    return scorer


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


def _restore(rt: Runtime, partition: int, key: bytes, blob: bytes) -> InstrumentState:
    # Checked on recovery already (StateTable); a value that got past it is set aside here: a fresh state.
    try:
        return load_instrument(blob)
    except Exception as exc:  # noqa: BLE001 - whatever the blob is, the instrument's ticks are scored
        rt.quarantine.set_aside("instruments", rt.instruments.changelog_topic_name, partition, key, blob, exc)
        return InstrumentState()


__all__ = ["MarketScorer", "attach"]
