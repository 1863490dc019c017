"""The events behind a warning, read back from Kafka when a person opens its case, not indexed in advance.

A warning names its events by id (`event_ids`) and its entity, which is the input's key: the
events sit in one partition of risk.transactions (accounts) or risk.market (instruments), just
before the warning was published. So a case view reads that one partition backwards from the
warning's publication time, in chunks, keeps the records with the entity's key and stops when
every id is found or after `max_scan` records. Nothing is read until someone opens a case:
an index fed by every transaction would have cost each worker a second full read of the input
(about 10% of a core at 10,000 events/s) to serve a page people open a few times an hour.
Results are cached per (alert, number of events).
"""

from __future__ import annotations

import asyncio
import json
import logging
import time
from collections import OrderedDict
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.control import client_kwargs
from app.faust_app import MARKET, TRANSACTIONS
from app.settings import Settings
from models.pipeline import partition_of

log = logging.getLogger("riskwatch.agents.case")

CHUNK = 2_000  # records read per step backwards
MAX_SCAN = 60_000  # records read at most per case (~70,000/s here: under a second); older ones reported missing
MAX_EVENTS = 200  # events listed per case (a long burst keeps growing)
TXN_FIELDS = ("event_id", "ts", "amount", "currency", "direction", "txn_type", "counterparty_id",
              "counterparty_kind", "device_id", "channel", "ip")
TICK_FIELDS = ("event_id", "ts", "price", "volume")


class EventLookup:
    """Reads the events of a warning back from its entity's input partition, on demand, bounded and cached."""

    def __init__(self, settings: Settings, chunk: int = CHUNK, max_scan: int = MAX_SCAN, cache: int = 128) -> None:
        self.settings = settings
        self.chunk, self.max_scan = chunk, max_scan
        self.cache: OrderedDict[tuple[str, int], dict[str, Any]] = OrderedDict()
        self.cache_size = cache
        self.lock = asyncio.Lock()  # one lookup at a time: each opens a consumer

    async def events(self, alert: dict[str, Any]) -> dict[str, Any]:
        """{"events": [...], "wanted": n, "scanned": records read, "note": why some are missing or None}."""
        ids = [str(i) for i in alert.get("event_ids") or []][-MAX_EVENTS:]
        key = (str(alert.get("alert_id")), len(alert.get("event_ids") or []))
        hit = self.cache.get(key)
        if hit is not None:
            return hit
        kind = alert.get("entity_type")
        topic = {"account": TRANSACTIONS, "instrument": MARKET}.get(str(kind))
        if topic is None:
            return {"events": [], "wanted": len(ids), "scanned": 0,
                    "note": f"a {kind}-wide warning: its events are many entities', not listed here"}
        if self.settings.pseudonymise_key.get_secret_value():
            return {"events": [], "wanted": len(ids), "scanned": 0,
                    "note": "identifiers are pseudonymised at ingest (RISKWATCH_PSEUDONYMISE_KEY): the input "
                            "holds the real ones, so its events are not looked up from here"}
        async with self.lock:
            found, scanned, seconds = await self._scan(self.settings.topic(topic), str(alert.get("entity_id")),
                                                       set(ids), float(alert.get("published_at") or time.time()))
        fields = TXN_FIELDS if topic == TRANSACTIONS else TICK_FIELDS
        events = [{f: found[i].get(f) for f in fields} for i in ids if i in found]
        note = None
        if len(events) < len(ids):
            note = (f"{len(ids) - len(events)} of {len(ids)} events not found in the {scanned:,} records before the "
                    "warning in its partition (older, or past the topic's retention)")
        result = {"events": events, "wanted": len(ids), "scanned": scanned, "note": note,
                  "seconds": round(seconds, 3)}
        self.cache[key] = result
        while len(self.cache) > self.cache_size:
            self.cache.popitem(last=False)
        return result

    async def _scan(self, topic: str, entity: str, wanted: set[str], before: float
                    ) -> tuple[dict[str, dict[str, Any]], int, float]:
        started = time.monotonic()
        key = entity.encode()
        # Input topics have RISKWATCH_TOPIC_PARTITIONS partitions, keyed by Kafka's default partitioner.
        tp = TopicPartition(topic, partition_of(key, self.settings.topic_partitions))
        consumer = AIOKafkaConsumer(**client_kwargs(self.settings), group_id=None, enable_auto_commit=False,
                                    fetch_max_wait_ms=50)
        found: dict[str, dict[str, Any]] = {}
        scanned = 0
        await consumer.start()
        try:
            consumer.assign([tp])
            first = (await consumer.beginning_offsets([tp]))[tp]
            at = (await consumer.offsets_for_times({tp: int(before * 1000) + 1000}))[tp]
            upper = at.offset if at is not None else (await consumer.end_offsets([tp]))[tp]
            while upper > first and scanned < self.max_scan and len(found) < len(wanted):
                lower = max(first, upper - self.chunk)
                consumer.seek(tp, lower)
                position, idle = lower, 0
                while position < upper and idle < 3:
                    batch = await consumer.getmany(tp, timeout_ms=1000, max_records=self.chunk)
                    records = batch.get(tp, [])
                    idle = 0 if records else idle + 1
                    for r in records:
                        position = r.offset + 1
                        if r.offset >= upper:
                            break
                        scanned += 1
                        if r.key != key or not r.value:
                            continue
                        try:
                            event = json.loads(r.value)
                        except ValueError:
                            continue
                        if isinstance(event, dict) and event.get("event_id") in wanted:
                            found.setdefault(event["event_id"], event)
                upper = lower
        finally:
            await consumer.stop()
        return found, scanned, time.monotonic() - started


__all__ = ["EventLookup"]
