"""Replay from Kafka: re-read the input topics over a time range and publish warnings to an isolated namespace."""

from __future__ import annotations

import logging
import re
import time
import uuid
from datetime import UTC, datetime
from typing import Any

from kafka import TopicPartition
from kafka.admin import NewTopic
from kafka.errors import KafkaError, TopicAlreadyExistsError

from app.admin import admin, consumer, producer
from app.faust_app import ALERTS, MARKET, TRANSACTIONS
from app.replay import Collector, DeadLetters, Loaded, ReplayError
from app.settings import Settings
from models.errors import EventError
from models.schemas import Alert

log = logging.getLogger("riskwatch.replay.kafka")
_RUN_ID = re.compile(r"^[A-Za-z0-9_-]{1,64}$")
INPUTS = (TRANSACTIONS, MARKET)


def new_run_id() -> str:
    """A run id that sorts by start time and does not collide: 20261127T093312Z-1a2b3c."""
    return f"{datetime.now(UTC):%Y%m%dT%H%M%SZ}-{uuid.uuid4().hex[:6]}"


def check_run_id(run_id: str) -> str:
    """Return the run id if it can be part of a topic and group name, else raise ReplayError."""
    if not _RUN_ID.match(run_id):
        raise ReplayError(f"run id {run_id!r} must be 1-64 letters, digits, '_' or '-'; pick another --run-id")
    return run_id


def replay_namespace(s: Settings, run_id: str) -> str:
    """Topic prefix of a replay's outputs: inside the live prefix (same ACLs), never a live topic."""
    return f"{s.topic_prefix}replay.{check_run_id(run_id)}."


def group_id(s: Settings, run_id: str) -> str:
    """A replay's consumer group (`<prefix><app id>-replay-<run-id>`): its own, so live offsets are never touched."""
    return f"{s.deployment_id}-replay-{check_run_id(run_id)}"


def _ms(when: datetime) -> int:
    return int(when.timestamp() * 1000)


def read_topics(
    s: Settings, since: datetime, until: datetime | None, run_id: str, dead: DeadLetters, *, idle_timeout: float = 60.0
) -> Loaded:
    """Read both input topics from the offsets for `since` up to the end offsets of now (or `until`).

    Offsets come from the broker's record timestamps (offsets_for_times); valid events come back in
    event-time order, ties kept in (topic, partition, offset) order.
    """
    if until is not None and until <= since:
        raise ReplayError(f"--until {until.isoformat()} is not after --since {since.isoformat()}; widen the range")
    try:
        c = consumer(
            s,
            group_id=group_id(s, run_id),
            enable_auto_commit=False,
            auto_offset_reset="earliest",
            client_id=group_id(s, run_id),
            isolation_level="read_committed",  # as the worker reads: no aborted or still-open transaction
        )
    except KafkaError as exc:
        raise ReplayError(
            f"cannot reach Kafka at {s.kafka_bootstrap} ({exc}); start it or set RISKWATCH_KAFKA_BOOTSTRAP"
        ) from None
    try:
        tps: list[TopicPartition] = []
        for name in INPUTS:
            topic = s.topic(name)
            parts = c.partitions_for_topic(topic)
            if not parts:
                raise ReplayError(
                    f"topic {topic} does not exist on {s.kafka_bootstrap}; check "
                    "RISKWATCH_TOPIC_PREFIX and RISKWATCH_KAFKA_BOOTSTRAP"
                )
            tps.extend(TopicPartition(topic, p) for p in sorted(parts))
        c.assign(tps)
        # The end is fixed now: events arriving during the replay belong to the live worker, not to us.
        stop = dict(c.end_offsets(tps))
        start_at = c.offsets_for_times({tp: _ms(since) for tp in tps})
        if until is not None:
            for tp, ot in c.offsets_for_times({tp: _ms(until) for tp in tps}).items():
                if ot is not None:
                    stop[tp] = min(stop[tp], ot.offset)
        start = {tp: (ot.offset if ot is not None else stop[tp]) for tp, ot in start_at.items()}
        for tp in tps:
            c.seek(tp, start[tp])
        log.info("replaying %d messages from %d partitions", sum(max(stop[tp] - start[tp], 0) for tp in tps), len(tps))
        loaded = _drain(c, tps, start, stop, s, dead, idle_timeout)
        loaded.partitions = sum(1 for tp in tps if tp.topic == s.topic(TRANSACTIONS))
        return loaded
    finally:
        c.close()


def _drain(
    c: Any,
    tps: list[TopicPartition],
    start: dict[TopicPartition, int],
    stop: dict[TopicPartition, int],
    s: Settings,
    dead: DeadLetters,
    idle_timeout: float,
) -> Loaded:
    order = {tp: i for i, tp in enumerate(tps)}
    got: dict[TopicPartition, list[tuple[int, bytes]]] = {tp: [] for tp in tps}
    pending = {tp for tp in tps if start[tp] < stop[tp]}
    for tp in set(tps) - pending:
        c.pause(tp)
    last_progress = time.monotonic()
    while pending:
        batch = c.poll(timeout_ms=500, max_records=5000)
        for tp, recs in batch.items():
            for r in recs:
                if r.offset < stop[tp]:
                    got[tp].append((r.offset, r.value))
        for tp in list(pending):
            if c.position(tp) >= stop[tp]:
                pending.discard(tp)
                c.pause(tp)
        if batch:
            last_progress = time.monotonic()
        elif time.monotonic() - last_progress > idle_timeout:
            raise ReplayError(
                f"no progress for {idle_timeout:.0f} s reading {sorted(map(str, pending))} from "
                f"{s.kafka_bootstrap}; check the broker"
            )
    if any(stop[tp] > start[tp] for tp in tps):
        c.commit({tp: _offset_meta(stop[tp]) for tp in tps if stop[tp] > start[tp]})
    col = Collector(dead, f"kafka:{s.kafka_bootstrap}")
    for tp in sorted(tps, key=order.__getitem__):
        for offset, value in got.pop(tp):
            where = {"topic": tp.topic, "partition": tp.partition, "offset": offset}
            if value is None:
                dead.add(where, EventError("message has no value (a tombstone)", None), b"")
                col.loaded.records += 1
                continue
            col.add(where, value)
    return col.done()


def _offset_meta(offset: int) -> Any:
    from kafka.structs import OffsetAndMetadata

    return OffsetAndMetadata(offset, "", -1)


class AlertPublisher:
    """Publishes a replay's warnings to `<prefix>replay.<run-id>.risk.alerts`, keyed like the worker's."""

    def __init__(self, s: Settings, run_id: str) -> None:
        self.topic = f"{replay_namespace(s, run_id)}{ALERTS}"
        if self.topic == s.topic(ALERTS):
            raise ReplayError("the replay namespace equals the live one; this is a bug, nothing was published")
        client = admin(s)
        try:
            client.create_topics([NewTopic(self.topic, s.topic_partitions, s.topic_replication)], timeout_ms=30_000)
        except TopicAlreadyExistsError:
            pass  # a rerun under the same --run-id appends; the alert ids say which warnings repeat
        finally:
            client.close()
        self._p = producer(s, linger_ms=20)
        self.sent = 0

    def send(self, alert: Alert) -> None:
        """Queue one warning version."""
        self._p.send(self.topic, key=alert.entity_id.encode(), value=alert.model_dump_json().encode())
        self.sent += 1

    def close(self, timeout: float = 60.0) -> None:
        """Wait until the broker has every warning, then close."""
        try:
            self._p.flush(timeout)
        finally:
            self._p.close()


__all__ = ["INPUTS", "AlertPublisher", "check_run_id", "group_id", "new_run_id", "read_topics", "replay_namespace"]
