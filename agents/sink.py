"""Where agents send results: warnings, dead letters and partials, each sent and counted in one place."""

from __future__ import annotations

import base64
import json
import logging
import time
from datetime import UTC, datetime

from app.faust_app import AGGREGATES, ALERTS, DEADLETTER, SCORES, Runtime
from app.schemas import DEADLETTER_PAYLOAD_BYTES, Alert, DeadLetter, event_id_of

log = logging.getLogger("riskwatch.agents")


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
        topic = self.rt.topics[ALERTS]
        await topic.send(key=alert.entity_id.encode(), value=alert.model_dump_json().encode())
        self.m.events_published.labels(topic.get_topic_name()).inc()
        self.m.event_to_warning.observe(max(time.time() - alert.event_ts.timestamp(), 0.0))
        for listener in self.alert_listeners:
            listener(alert)  # type: ignore[operator]

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
        topic = self.rt.topics[DEADLETTER]
        await topic.send(key=f"{source_topic}:{partition}:{offset}".encode(), value=dl.model_dump_json().encode())
        self.m.deadletters.labels(source_topic, _short_reason(field, reason)).inc()
        self.m.events_published.labels(topic.get_topic_name()).inc()
        log.warning("dead-lettered input from %s[%s]@%s: %s", source_topic, partition, offset, reason,
                    extra={"topic": source_topic, "partition": partition, "offset": offset,
                           "event_id": event_id, "reason": reason})

    async def score(self, entity_id: str, event_id: str, score: float, detector: str) -> None:
        """Publish one event's calibrated score (when RISKWATCH_PUBLISH_SCORES is on), keyed by entity."""
        topic = self.rt.topics[SCORES]
        payload = f'{{"event_id":{json.dumps(event_id)},"entity_id":{json.dumps(entity_id)},' \
                  f'"score":{score!r},"detector":"{detector}"}}'
        await topic.send(key=entity_id.encode(), value=payload.encode())
        self.m.events_published.labels(topic.get_topic_name()).inc()

    async def partial(self, key: str, payload: bytes) -> None:
        """Send a stage-one aggregate partial to the single-partition aggregates topic."""
        topic = self.rt.topics[AGGREGATES]
        await topic.send(key=key.encode(), value=payload, partition=0)
        self.m.events_published.labels(topic.get_topic_name()).inc()


__all__ = ["Sink"]
