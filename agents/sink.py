"""Where agents send results: warnings, dead letters and partials, each sent and counted in one place."""

from __future__ import annotations

import base64
import json
import logging
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

from app.faust_app import AGGREGATES, ALERTS, DEADLETTER, SCORES, Runtime
from models.findings import Raised
from models.pipeline import home_partition
from models.schemas import DEADLETTER_PAYLOAD_BYTES, Alert, DeadLetter, event_id_of

log = logging.getLogger("riskwatch.agents")
# Its own logger, summarised like the clients' (app.logs): a producer sending garbage at thousands a
# second would otherwise write as many lines; each record is on the dead-letter topic with its reason.
dead_log = logging.getLogger("riskwatch.deadletter")


def _short_reason(field: str | None, reason: str) -> str:
    # A bounded label set for the metric: the field name, or the kind of parse failure.
    if field:
        return field.split(".")[0][:32]
    return "invalid_json" if "JSON" in reason else "invalid_event"


class Sink:
    """Publishes agent output to Kafka and keeps the output metrics honest."""

    def __init__(self, rt: Runtime) -> None:
        self.rt = rt
        self.m = rt.metrics
        self.alert_listeners: list[object] = []

    async def alert(self, alert: Alert) -> None:
        """Publish one warning (new or updated; same alert_id) keyed by its entity."""
        await self._send(ALERTS, alert.entity_id.encode(), alert.model_dump_json().encode())
        self.m.event_to_warning.observe(max(time.time() - alert.event_ts.timestamp(), 0.0))
        for listener in self.alert_listeners:
            listener(alert)  # type: ignore[operator]

    async def raised(self, raised: list[Raised]) -> None:
        """Publish a monitor's raised warnings, counted by rule, and wait until Kafka has them (Faust agents).

        Delivered before the state that remembers them is written: a crash in between raises them
        again (the same alert_id), never loses them. It waits on the Faust app's producer, so the
        transaction engine (a BufferedSink, delivered with its batch) does not use it.
        """
        m = self.m
        for r in raised:
            m.rule_hits.labels(r.finding.detector).inc()
            if r.is_new:
                m.warnings.labels(r.finding.category, r.finding.level).inc()
            else:
                m.warning_updates.labels(r.finding.category).inc()
            await self.alert(r.to_alert())
        if raised:
            await self.rt.app.producer.flush()

    async def dead_letter(self, raw: bytes | None, source_topic: str, partition: int | None, offset: int | None,
                          reason: str, field: str | None = None, event_id: str | None = None) -> None:
        """Send an unprocessable input to the dead-letter topic with its origin and reason, and count it."""
        raw = raw or b""
        if event_id is None and len(raw) < DEADLETTER_PAYLOAD_BYTES:
            event_id = event_id_of(raw)
        truncated = len(raw) > DEADLETTER_PAYLOAD_BYTES
        body = raw[:DEADLETTER_PAYLOAD_BYTES]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = "base64:" + base64.b64encode(body).decode()
        dl = DeadLetter(payload=text, payload_size=len(raw), payload_truncated=truncated,
                        source_topic=source_topic, partition=partition, offset=offset, reason=reason,
                        field=field, event_id=event_id, received_at=datetime.now(UTC))
        await self._send(DEADLETTER, f"{source_topic}:{partition}:{offset}".encode(), dl.model_dump_json().encode())
        short = _short_reason(field, reason)
        self.m.deadletters.labels(source_topic, short).inc()
        # The kind in the template: the log summarises per template, so each kind's first is told in full.
        dead_log.warning(f"dead-lettered input ({short.replace('%', '%%')}) from %s[%s]@%s: %s", source_topic,
                         partition, offset, reason, extra={"topic": source_topic, "partition": partition,
                                                           "offset": offset, "event_id": event_id, "reason": reason})

    async def score(self, entity_id: str, event_id: str, score: float, detector: str) -> None:
        """Publish one event's calibrated score (when RISKWATCH_PUBLISH_SCORES is on), keyed by entity."""
        payload = f'{{"event_id":{json.dumps(event_id)},"entity_id":{json.dumps(entity_id)},' \
                  f'"score":{score!r},"detector":"{detector}"}}'
        await self._send(SCORES, entity_id.encode(), payload.encode())

    async def partial(self, key: str, payload: bytes) -> None:
        """Send a stage-one aggregate partial to the single-partition aggregates topic."""
        await self._send(AGGREGATES, key.encode(), payload, 0)

    async def _send(self, name: str, key: bytes, value: bytes, partition: int | None = None) -> None:
        topic = self.rt.topics[name]
        await topic.send(key=key, value=value, partition=partition)
        self.m.events_published.labels(topic.get_topic_name()).inc()


class Rekeying:
    """Input records not keyed by their entity: where each belongs, counted, and told once per worker.

    On a topic named in RISKWATCH_TOPIC_NAMES (`send_on` False) nothing is sent on: that topic is the
    platform's own, and its other readers would see such records twice. They are scored where they are.
    """

    def __init__(self, rt: Runtime, topic: str, field: str, send_on: bool = True) -> None:
        self.topic, self.field, self.send_on = topic, field, send_on
        self.counter = (rt.metrics.rekeyed if send_on else rt.metrics.unkeyed_in_place).labels(topic)
        self.told = False

    def home(self, rec: Any, entity: bytes, partitions: int) -> int | None:
        """The partition to send `rec` (key, partition, offset) on to, counted; None if it is scored where it is."""
        home = home_partition(rec.key, entity, rec.partition, partitions)
        if home is None:
            return None
        self.counter.inc()
        if not self.send_on:
            if not self.told:
                self.told = True
                log.warning("%s partition %d offset %d: a record keyed %s, not by its %s; scored where it is, as "
                            "every such record will be (counted in riskwatch_unkeyed_in_place_total, told once): "
                            "riskwatch does not write to a topic RISKWATCH_TOPIC_NAMES names, and until the "
                            "producer keys its records by %s, each %s's state is split over partitions and "
                            "bursts across them go unseen", self.topic, rec.partition, rec.offset,
                            "with no key" if rec.key is None else "by something else", self.field, self.field,
                            self.field.split("_")[0])
            return None
        if not self.told:
            self.told = True
            log.warning("%s partition %d offset %d: a record keyed %s, not by its %s; sent on, keyed by %s, to "
                        "partition %d, where that state lives, and so will every such record be (counted in "
                        "riskwatch_rekeyed_total, told once). Key the producer's records by %s to spare the "
                        "extra hop", self.topic, rec.partition, rec.offset,
                        "with no key" if rec.key is None else "by something else", self.field, self.field, home,
                        self.field)
        return home


class BufferedSink(Sink):
    """A Sink that collects messages for the transaction engine to send with its own producer, batch by batch."""

    def __init__(self, rt: Runtime) -> None:
        super().__init__(rt)
        self.out: list[tuple[str, bytes, bytes, int | None]] = []
        self.names = {name: rt.settings.topic(name) for name in (ALERTS, DEADLETTER, SCORES, AGGREGATES)}

    async def _send(self, name: str, key: bytes, value: bytes, partition: int | None = None) -> None:
        self.out.append((self.names[name], key, value, partition))

    def forward(self, topic: str, key: bytes, value: bytes, partition: int) -> None:
        """Send an input record on, unchanged, to the partition of its entity's key (a mis-keyed input)."""
        self.out.append((topic, key, value, partition))

    def take(self) -> list[tuple[str, bytes, bytes, int | None]]:
        """The messages collected since the last call: (topic, key, value, partition), counted as published."""
        out, self.out = self.out, []
        if out:
            # Counted per topic and batch: a labels() lookup per message cost about 2% of the worker.
            published = self.m.events_published
            for topic, n in Counter(m[0] for m in out).items():
                published.labels(topic).inc(n)
        return out

    def discard(self) -> None:
        """Drop the messages collected so far, unsent and uncounted (their events are about to be read again)."""
        self.out = []


__all__ = ["BufferedSink", "Rekeying", "Sink"]
