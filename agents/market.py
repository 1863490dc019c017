"""The market agent: score price ticks per instrument, warn on anomalies and crashes, emit stress partials.

Crash safety: an instrument's state remembers the input offset of its last tick, so a tick
redelivered after a crash is recognised and skipped; its warnings are delivered before the state
that remembers them is written. Each partition's stage-one stress accumulator is kept in the
`market-stress` table (written when it changes, a few times per instrument and bucket) and read
back when the partition's next tick is not the one after the last seen (a start, a crash, a move).
"""

from __future__ import annotations

import logging
import time
from typing import Any

from agents.sink import Sink
from app.errors import EventError
from app.faust_app import MARKET, Runtime, dumps, load_instrument
from app.schemas import MarketTick, decode_event
from app.security import Ingest
from models.aggregates import MarketAccumulator
from models.market import InstrumentState
from models.pipeline import MarketScorer
from models.platform_state import dump_accumulator, load_accumulator
from models.rules import Catalogue

STRESS_TABLE = "market-stress"

log = logging.getLogger("riskwatch.agents.market")


def attach(rt: Runtime, sink: Sink, catalogue: Catalogue) -> MarketScorer:
    """Register the market agent; return its scorer so rule changes reach it."""
    m = rt.metrics
    topic = rt.topics[MARKET]
    name = topic.get_topic_name()
    scorer = MarketScorer(catalogue)
    stress: dict[int, MarketAccumulator] = {}
    seen: dict[int, int] = {}  # partition -> offset of the last tick handled here
    ingest = Ingest(rt.settings)
    # Written from the agent only, so each value goes to its own partition's changelog (key p<n>).
    table = rt.app.Table(STRESS_TABLE, default=None, key_type=bytes, value_type=bytes,
                         partitions=rt.settings.topic_partitions, options=rt.checked(load_accumulator))

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
                acc = stress[msg.partition] = _stress_of(rt, table, msg.partition)
            before = acc.changes
            for partial in acc.add(tick.ts.timestamp(), tick.instrument, out.stressed, tick.event_id, move=out.move,
                                   spacing=out.spacing, offset=msg.offset):
                await sink.partial("market", partial.model_dump_json().encode())
            if acc.changes != before:
                # Written when a bucket changed (a tick that adds nothing leaves them as they were).
                table[_stress_key(msg.partition)] = dump_accumulator(acc)
            # Last: a stored state marks the tick applied, so what it caused is written before it.
            rt.instruments[key] = dumps(state)

    @rt.app.timer(interval=2.0)
    async def flush_stress() -> None:
        for acc in list(stress.values()):
            for partial in acc.flush():
                await sink.partial("market", partial.model_dump_json().encode())
        m.entities.labels("instruments").set(len(rt.instruments))

    return scorer


def _stress_key(partition: int) -> bytes:
    return f"p{partition}".encode()


def _stress_of(rt: Runtime, table: Any, partition: int) -> MarketAccumulator:
    """The partition's stress accumulator as its table holds it; a fresh one if none, or if it does not decode."""
    key = _stress_key(partition)
    blob = table.get(key)
    if blob:
        try:
            acc = load_accumulator(blob)
            if isinstance(acc, MarketAccumulator):
                return acc
            raise ValueError(f"a {type(acc).__name__} under a market key")
        except Exception as exc:  # noqa: BLE001 - whatever the value is, the partition's ticks go on
            rt.quarantine.set_aside(STRESS_TABLE, table.changelog_topic.get_topic_name(), partition, key, blob, exc)
    return MarketAccumulator(f"p{partition}")


def _restore(rt: Runtime, partition: int, key: bytes, blob: bytes) -> InstrumentState:
    # Checked on recovery already (StateTable); a value that got past it is set aside here: a fresh state.
    try:
        return load_instrument(blob)
    except Exception as exc:  # noqa: BLE001 - whatever the blob is, the instrument's ticks are scored
        rt.quarantine.set_aside("instruments", rt.instruments.changelog_topic_name, partition, key, blob, exc)
        return InstrumentState()


__all__ = ["MarketScorer", "attach"]
