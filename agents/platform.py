"""Stage two of the cross-partition aggregates: platform liquidity runs and market-wide stress.

The monitors' state lives in the `platform` table (models.platform_state): each stored partial
under its own key, written when stored and deleted when its bucket leaves the window, and one meta
value with the last input offset applied, written per input message after the warnings it raised
were delivered. So after a crash the monitors come back as they were, a redelivered partial is
recognised by its offset, and a warning is never remembered without having been sent.
"""

from __future__ import annotations

import logging
from typing import Any

from pydantic import ValidationError

from agents.sink import Sink
from app.faust_app import AGGREGATES, Runtime
from models.pipeline import PARTIAL, PlatformMonitors
from models.platform_state import META_KEY, check_value, dump_meta, load_meta, load_part, restore, take_changes
from models.rules import Catalogue

TABLE = "platform"

log = logging.getLogger("riskwatch.agents.platform")


def attach(rt: Runtime, sink: Sink, catalogue: Catalogue) -> PlatformMonitors:
    """Register the stage-two agent on the single-partition aggregates topic."""
    topic = rt.topics[AGGREGATES]
    name = topic.get_topic_name()
    monitors = PlatformMonitors(catalogue)
    # Stage one's sources are the partitions of the input topics ("p<n>"); partitions beyond these
    # (added to a topic later) take part from their first partial on.
    sources = [f"p{i}" for i in range(rt.settings.topic_partitions)]
    monitors.expect(sources, sources)
    by_name = {"liquidity": monitors.liquidity, "market_stress": monitors.stress}
    # A value that is not ours is set aside on recovery (StateTable), its key left absent.
    table = rt.app.Table(TABLE, default=None, key_type=bytes, value_type=bytes, partitions=1,
                         options=rt.checked(check_value))
    applied: list[int | None] = [None]  # offset of the last message applied in memory

    @rt.app.agent(topic, name="platform-aggregates", concurrency=1)
    async def aggregate(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            if applied[0] is None or msg.offset != applied[0] + 1:
                applied[0] = _reload(rt, table, monitors, sources)
            if applied[0] is not None and msg.offset <= applied[0]:
                continue  # redelivered: the table's state already holds it (and its warnings were sent)
            try:
                partial = PARTIAL.validate_json(event.value)
            except ValidationError as exc:
                await sink.dead_letter(event.value, name, msg.partition, msg.offset,
                                       f"invalid partial: {exc.errors(include_url=False)[0]['msg']}", "partial")
                partial = None
            await sink.raised(monitors.update(partial) if partial is not None else [])
            for key, value in take_changes(by_name):
                if value is None:
                    table.pop(key, None)
                else:
                    table[key] = value
            table[META_KEY] = dump_meta(by_name, msg.offset)
            applied[0] = msg.offset

    return monitors


def _reload(rt: Runtime, table: Any, monitors: PlatformMonitors, sources: list[str]) -> int | None:
    """The monitors as the table holds them (after a start, a crash or a move); its last offset."""
    by_name = {"liquidity": monitors.liquidity, "market_stress": monitors.stress}
    topic_name = table.changelog_topic.get_topic_name()
    meta = None
    parts = []
    for key, blob in list(table.items()):
        try:
            if bytes(key) == META_KEY:
                meta = load_meta(blob)
            else:
                parts.append(load_part(key, blob))
        except Exception as exc:  # noqa: BLE001 - whatever the value is, the monitors go on without it
            rt.quarantine.set_aside(TABLE, topic_name, 0, bytes(key), blob, exc)
            table.pop(key, None)
    if meta is None:
        take_changes(by_name)  # starts recording
        return None
    offset = restore(by_name, meta, parts)
    monitors.expect(sources, sources)
    take_changes(by_name)
    log.info("platform monitors restored: %d stored partials, last offset %d", len(parts), offset)
    return offset


__all__ = ["PlatformMonitors", "attach"]
