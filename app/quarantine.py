"""Stored values that fail to decode are set aside, never fatal: a dead letter each, a count, one log line.

Every path that reads state back (the transaction engine's account states, detector snapshots and
disclosure totals; the Faust tables' lifecycle records, disclosure book and instrument states)
hands a value it cannot read to `Quarantine.set_aside` and goes on with a fallback of its own: a
fresh state, or the key left absent. Before, one such value stopped all transaction scoring (the
engine read the same 3,000 records 10,137 times, scoring none) or made the worker exit at start
(issue 17).

Each value set aside is counted in `riskwatch_state_quarantined_total{table}` and sent to
risk.deadletter with the raw bytes, keyed `<table>:<partition>:<key>`, with a reason naming the
table, partition, key and decode error. The same value read again (a read-back after a failed
write) is sent again, since the first may not have been delivered, but neither counted nor logged
again. Log lines are written when the queue is flushed: one per table and partition, with a count.
"""

from __future__ import annotations

import base64
import logging
import zlib
from collections.abc import Awaitable, Callable
from datetime import UTC, datetime
from typing import Any

from app.metrics import Metrics
from models.schemas import DEADLETTER_PAYLOAD_BYTES, DeadLetter

log = logging.getLogger("riskwatch.quarantine")

Send = Callable[[bytes, bytes], Awaitable[Any]]
SEEN_MAX = 10_000  # values remembered as already counted; beyond it a repeat is counted again, nothing worse


def key_text(key: bytes) -> str:
    """A stored key as text for reasons and dead-letter keys (bytes that are not UTF-8 escaped)."""
    return bytes(key).decode("utf-8", "backslashreplace")


def why(error: BaseException | str) -> str:
    """The decode error in one line: its type and message."""
    if isinstance(error, str):
        return error
    text = " ".join(str(error).split())
    return f"{type(error).__name__}: {text}"[:500]


class Quarantine:
    """Sets aside undecodable stored values: counts and queues them at once, sends and logs them on `flush`.

    `set_aside` is synchronous, so that code which restores state without awaiting (Faust's
    changelog recovery, the engine's scoring loop) can call it; the queue is sent by whoever
    owns the output: the transaction engine with its batch, the Faust app from a timer.
    """

    def __init__(self, metrics: Metrics, send: Send | None = None) -> None:
        self.counter = metrics.state_quarantined
        self.send = send
        self.outbox: list[tuple[bytes, bytes]] = []
        self.seen: dict[tuple[str, int, bytes, int], None] = {}
        self.news: dict[tuple[str, int], tuple[int, str]] = {}  # (table, partition) -> (count, first reason)

    def set_aside(self, table: str, topic: str, partition: int, key: bytes, raw: bytes,
                  error: BaseException | str, offset: int | None = None) -> str:
        """Count, queue and remember one value that did not decode; return the dead letter's reason."""
        key = bytes(key)
        raw = bytes(raw)
        reason = f"stored value of table {table}, partition {partition}, key {key_text(key)!r} set aside: {why(error)}"
        mark = (table, partition, key, zlib.crc32(raw))
        if mark not in self.seen:
            if len(self.seen) >= SEEN_MAX:
                self.seen.pop(next(iter(self.seen)))
            self.seen[mark] = None
            self.counter.labels(table).inc()
            count, first = self.news.get((table, partition), (0, reason))
            self.news[(table, partition)] = (count + 1, first)
        truncated = len(raw) > DEADLETTER_PAYLOAD_BYTES
        body = raw[:DEADLETTER_PAYLOAD_BYTES]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:
            text = "base64:" + base64.b64encode(body).decode()
        letter = DeadLetter(payload=text, payload_size=len(raw), payload_truncated=truncated, source_topic=topic,
                            partition=partition, offset=offset, reason=reason, field=None,
                            received_at=datetime.now(UTC))
        self.outbox.append((f"{table}:{partition}:{key_text(key)}".encode(), letter.model_dump_json().encode()))
        return reason

    async def flush(self) -> int:
        """Log what was newly set aside (a line per table and partition) and send the queued dead letters."""
        news, self.news = self.news, {}
        for (table, partition), (count, first) in sorted(news.items()):
            log.warning("table %s partition %d: %d stored value(s) did not decode and were set aside (first: %s); "
                        "the worker goes on without them (fresh state, or the key absent); see risk.deadletter",
                        table, partition, count, first,
                        extra={"table": table, "partition": partition, "count": count})
        if self.send is None or not self.outbox:
            return 0
        out, self.outbox = self.outbox, []
        for i, (key, value) in enumerate(out):
            try:
                await self.send(key, value)
            except BaseException:
                self.outbox[:0] = out[i:]  # kept for the next flush
                raise
        return len(out)


__all__ = ["Quarantine", "Send", "key_text", "why"]
