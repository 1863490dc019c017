"""Stage two of the cross-partition aggregates: platform liquidity runs and market-wide stress."""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from agents.sink import Sink
from app.faust_app import AGGREGATES, Runtime
from models.pipeline import PARTIAL, PlatformMonitors
from models.rules import Catalogue

log = logging.getLogger("riskwatch.agents.platform")


def attach(rt: Runtime, sink: Sink, catalogue: Catalogue) -> PlatformMonitors:
    """Register the stage-two agent on the single-partition aggregates topic."""
    m = rt.metrics
    topic = rt.topics[AGGREGATES]
    name = topic.get_topic_name()
    monitors = PlatformMonitors(catalogue)
    # Stage one's sources are the partitions of the input topics ("p<n>"); partitions beyond these
    # (added to a topic later) take part from their first partial on.
    sources = [f"p{i}" for i in range(rt.settings.topic_partitions)]
    monitors.expect(sources, sources)

    @rt.app.agent(topic, name="platform-aggregates", concurrency=1)
    async def aggregate(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                partial = PARTIAL.validate_json(event.value)
            except ValidationError as exc:
                await sink.dead_letter(event.value, name, msg.partition, msg.offset,
                                       f"invalid partial: {exc.errors(include_url=False)[0]['msg']}", "partial")
                continue
            for r in monitors.update(partial):
                m.rule_hits.labels(r.finding.detector).inc()
                if r.is_new:
                    m.warnings.labels(r.finding.category, r.finding.level).inc()
                else:
                    m.warning_updates.labels(r.finding.category).inc()
                await sink.alert(r.to_alert())

    return monitors


__all__ = ["PlatformMonitors", "attach"]
