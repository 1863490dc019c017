"""The market agent: score price ticks per instrument, warn on anomalies and crashes, emit stress partials."""

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
from models.rules import Catalogue

log = logging.getLogger("riskwatch.agents.market")


def attach(rt: Runtime, sink: Sink, catalogue: Catalogue) -> MarketScorer:
    """Register the market agent; return its scorer so rule changes reach it."""
    m = rt.metrics
    topic = rt.topics[MARKET]
    name = topic.get_topic_name()
    scorer = MarketScorer(catalogue)
    stress: dict[int, MarketAccumulator] = {}
    ingest = Ingest(rt.settings)

    @rt.app.agent(topic, name="score-market", concurrency=1)
    async def score_market(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            m.events_consumed.labels(name).inc()
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
                out, raised = scorer.process(tick, state)
                rt.instruments[key] = dumps(state)
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
            acc = stress.get(msg.partition)
            if acc is None:
                acc = stress[msg.partition] = MarketAccumulator(f"p{msg.partition}")
            for partial in acc.add(tick.ts.timestamp(), tick.instrument, out.stressed, tick.event_id, move=out.move,
                                   spacing=out.spacing):
                await sink.partial("market", partial.model_dump_json().encode())

    @rt.app.timer(interval=2.0)
    async def flush_stress() -> None:
        for acc in list(stress.values()):
            for partial in acc.flush():
                await sink.partial("market", partial.model_dump_json().encode())
        m.entities.labels("instruments").set(len(rt.instruments))

    return scorer


def _restore(rt: Runtime, partition: int, key: bytes, blob: bytes) -> InstrumentState:
    # Checked on recovery already (StateTable); a value that got past it is set aside here: a fresh state.
    try:
        return load_instrument(blob)
    except Exception as exc:  # noqa: BLE001 - whatever the blob is, the instrument's ticks are scored
        rt.quarantine.set_aside("instruments", rt.instruments.changelog_topic_name, partition, key, blob, exc)
        return InstrumentState()


__all__ = ["MarketScorer", "attach"]
