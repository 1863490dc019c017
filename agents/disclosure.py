"""Disclosure summaries: hourly and daily money flows, custody movements, warnings and plans on risk.disclosure.

Stage 1 runs inside the transaction engine (agents/transactions.py calls `add_batch` with each
batch it decoded, so every message is consumed and decoded once): it adds transactions to the
cumulative totals of their partition and event-time hour, kept in one of the engine's tables
whose changelog lives in that same partition, written once per bucket and batch (one changelog
message per event cost as much as scoring). The totals carry the last offset applied, so a
redelivered transaction is not counted twice, even across a restart; a batch is committed only
after its totals are written.
Changed totals go to the single-partition risk.disclosure.partials topic every two seconds, next
to the alert snapshots the disposal agent sends whenever an alert changes. Stage 2 (`disclosure-book`,
one worker) keeps the latest partial of each kind in a table (replacing, never adding) and
publishes the summaries of the windows that changed every RISKWATCH_DISCLOSURE_PUBLISH_SECONDS,
keyed `<period>:<start>`.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable, MutableMapping
from typing import Any

from pydantic import ValidationError

from agents.sink import Sink
from app.changelog import ChangelogStore, PartitionView
from app.faust_app import DISCLOSURE, DISCLOSURE_PARTIALS, TRANSACTIONS, Runtime
from models.disclosure import (
    HOUR,
    AlertSnapshot,
    DisclosureBook,
    FlowTotals,
    count_flow,
    parse_partial,
    window_start,
)
from models.schemas import TransactionFields

log = logging.getLogger("riskwatch.agents.disclosure")
FLUSH_SECONDS = 2.0
FLOWS_TABLE = "disclosure-flows"


def check_flow(partition: int, key: bytes, value: bytes) -> None:
    """Refuse a stored stage-1 record that is not `t<partition>:<hour>` of its own partition with FlowTotals."""
    head, sep, hour = bytes(key).partition(b":")
    if not (sep and head[:1] == b"t" and head[1:].isdigit() and int(head[1:]) == partition
            and hour.removeprefix(b"-").isdigit()):
        raise ValueError(f"key is not t{partition}:<hour>")
    FlowTotals.model_validate_json(value)


def source_partition(key: bytes) -> int:
    """The partition named in a stage-1 key `t<partition>:<hour>`: its events' and its changelog's."""
    return int(bytes(key).split(b":", 1)[0][1:])


class Disclosure:
    """Both stages and their tables; `note_alert` is how the disposal agent reports alert changes."""

    def __init__(self, rt: Runtime, sink: Sink) -> None:
        s = rt.settings
        self.rt, self.sink, self.m = rt, sink, rt.metrics
        self.offset_minutes = s.disclosure_utc_offset_minutes
        self.retention = s.alert_retention_seconds + 86_400.0
        self.partials = rt.topics[DISCLOSURE_PARTIALS]
        self.partials_name = self.partials.get_topic_name()
        self.out = rt.topics[DISCLOSURE]
        self.txn_name = rt.topics[TRANSACTIONS].get_topic_name()
        # Stage 1's totals live with the transaction engine's tables (it reads them back on assignment
        # and writes them before it commits); `txn_owned` and `txn_generation` come from the engine.
        # Read back by the engine; a record that does not decode is set aside (app/quarantine.py).
        self.store = ChangelogStore(FLOWS_TABLE, s.changelog(FLOWS_TABLE), check=check_flow)
        self.flows: MutableMapping[bytes, bytes] = PartitionView(self.store, source_partition)
        self.txn_owned: Callable[[], set[int] | None] = lambda: None
        self.txn_generation: Callable[[], int] = lambda: 0
        # A changelog value that is not a partial is set aside on recovery (StateTable), not fatal.
        self.book_table = rt.app.Table("disclosure-book", default=None, key_type=bytes, value_type=bytes,
                                       partitions=1, options=rt.checked(parse_partial))
        self.cache: dict[bytes, FlowTotals] = {}
        self.dirty: set[bytes] = set()
        self.max_hour: dict[int, int] = {}
        self.book = DisclosureBook(s.disclosure_utc_offset_minutes, s.disclosure_grace_seconds,
                                   self.retention)
        self.windows: set[tuple[str, int]] = set()
        self.incomplete: set[tuple[str, int]] = set()
        self.flows_generation = self.book_generation = self.cache_generation = -1

    def _generation(self) -> int:
        # Counts rebalances: after each one, what this worker holds in memory may be stale.
        return int(self.rt.app.rebalancing_count)

    def _owned(self, topic: str) -> set[int] | None:
        if topic == self.txn_name:
            return self.txn_owned()
        app = self.rt.app
        if app.rebalancing or getattr(app, "in_recovery", False):
            return None
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == topic}

    # ---------------------------------------------------------------- stage 1
    def _resync_flows(self, owned: set[int]) -> None:
        # After a rebalance or restart: the table (recovered from its changelog) is the truth, and
        # every owned bucket is re-sent once, since stage 2 replaces rather than adds.
        self.cache.clear()
        self.dirty = {k for k in self.flows.keys() if source_partition(k) in owned}
        self.flows_generation = self.txn_generation()

    def add_batch(self, batch: list[tuple[TransactionFields, int, int, float]]) -> None:
        """Count (transaction, partition, offset, epoch time) items; each changed bucket is written to the table once.

        The transaction engine writes the changed totals to the changelog with the batch's other
        state before it commits the batch's offsets: a crash never commits an event whose count was lost.
        """
        if self.cache_generation != self.txn_generation():
            self.cache.clear()
            self.max_hour.clear()
            self.cache_generation = self.txn_generation()
        changed: set[bytes] = set()
        cache, max_hour, retention = self.cache, self.max_hour, self.retention
        off = self.offset_minutes * 60
        # Records come grouped by partition and mostly in time order: the bucket of the previous
        # record is usually this one's too, so its key and totals are looked up once per run.
        current: tuple[int, float] | None = None
        key = b""
        totals: FlowTotals | None = None
        for txn, partition, offset, ts in batch:
            k = (ts + off) // HOUR  # window_start()'s own arithmetic, so the same hour for every ts
            if current != (partition, k):
                hour = int(k) * HOUR - off
                newest = max_hour.get(partition, hour)
                if hour < newest - retention:
                    current = None
                    continue  # older than anything still summarised
                key = f"t{partition}:{hour}".encode()
                totals = cache.get(key)
                if totals is None:
                    blob = self.flows.get(key)
                    totals = (FlowTotals.model_validate_json(blob) if blob
                              else FlowTotals(source=f"t{partition}", hour=hour))
                    cache[key] = totals
                if hour > newest or partition not in max_hour:
                    # Forgets only hours before this one's retention: never `totals`.
                    max_hour[partition] = max(hour, newest)
                    self._forget_flows(partition)
                current = (partition, k)
            if count_flow(totals, ts, txn.txn_type, txn.direction, txn.amount, txn.currency,  # type: ignore[arg-type]
                          txn.account_kind, txn.counterparty_kind, offset):
                changed.add(key)
        for key in changed:
            totals = self.cache.get(key)
            if totals is not None:
                self.flows[key] = totals.model_dump_json().encode()
        self.dirty |= changed

    def _forget_flows(self, partition: int) -> None:
        horizon = self.max_hour[partition] - self.retention
        prefix = f"t{partition}:".encode()
        for key in [k for k in self.flows.keys() if k.startswith(prefix) and int(k[len(prefix):]) < horizon]:
            del self.flows[key]
            self.cache.pop(key, None)
            self.dirty.discard(key)

    async def flush_flows(self) -> None:
        """Send the totals changed since the last flush to stage 2."""
        owned = self._owned(self.txn_name)
        if owned is None:
            return
        if self.flows_generation != self.txn_generation():
            self._resync_flows(owned)
        # Taken before the first await: the transaction engine goes on marking buckets while this
        # sends, and a bucket it marks meanwhile must stay marked for the next flush.
        todo, self.dirty = sorted(self.dirty), set()
        for i, key in enumerate(todo):
            blob = self.flows.get(key)
            if blob is None or source_partition(key) not in owned:
                continue
            try:
                await self._partial(blob)
            except BaseException:
                self.dirty.update(todo[i:])
                raise

    async def note_alert(self, snap: AlertSnapshot) -> None:
        """Send an alert's latest snapshot (new warning, plan, resolution, overdue) to stage 2."""
        await self._partial(snap.model_dump_json().encode())

    async def _partial(self, blob: bytes) -> None:
        await self.partials.send(key=b"disclosure", value=blob, partition=0)
        self.m.events_published.labels(self.partials_name).inc()

    # ---------------------------------------------------------------- stage 2
    def _rebuild_book(self) -> None:
        s = self.rt.settings
        self.book = DisclosureBook(self.offset_minutes, s.disclosure_grace_seconds, self.retention)
        self.windows.clear()
        for blob in list(self.book_table.values()):
            if blob:
                self.windows.update(self.book.apply(parse_partial(blob)))
        self.book_generation = self._generation()

    async def take(self, raw: bytes, partition: int, offset: int) -> None:
        """Stage 2: keep one partial (inside stream iteration)."""
        if self.book_generation != self._generation():
            self._rebuild_book()
        try:
            partial = parse_partial(raw)
        except ValidationError as exc:
            await self.sink.dead_letter(raw, self.partials_name, partition, offset,
                                        f"invalid disclosure partial: {exc.errors(include_url=False)[0]['msg']}",
                                        "partial")
            return
        key = (f"f:{partial.source}:{partial.hour}" if isinstance(partial, FlowTotals)
               else f"a:{partial.alert_id}").encode()
        changed = self.book.apply(partial)
        if changed:
            self.book_table[key] = raw
            self.windows.update(changed)
        horizon = self.book.watermark - self.retention
        if self.book.forget_before(horizon):
            for k in list(self.book_table.keys()):
                blob = self.book_table.get(k)
                if blob and _hour_of(blob, self.offset_minutes) < horizon:
                    del self.book_table[k]

    async def publish(self) -> None:
        """Publish the summaries of changed windows, and of windows that just became complete."""
        owned = self._owned(self.partials_name)
        if owned is None or 0 not in owned:
            return
        if self.book_generation != self._generation():
            self._rebuild_book()
        now = time.time()
        grace = self.book.grace_seconds
        for w in [w for w in self.incomplete if self.book.watermark >= _end(w) + grace]:
            self.windows.add(w)
        todo, self.windows = sorted(self.windows), set()
        for period, start in todo:
            summary = self.book.summary(period, start, now)
            await self.out.send(key=summary.summary_id.encode(), value=summary.model_dump_json().encode())
            self.m.events_published.labels(self.out.get_topic_name()).inc()
            if summary.complete:
                self.incomplete.discard((period, start))
            else:
                self.incomplete.add((period, start))


def _end(window: tuple[str, int]) -> int:
    return window[1] + (HOUR if window[0] == "hour" else 86_400)


def _hour_of(blob: bytes, offset_minutes: int) -> float:
    p = parse_partial(blob)
    return p.hour if isinstance(p, FlowTotals) else window_start(p.created_at, HOUR, offset_minutes)


def attach(rt: Runtime, sink: Sink) -> Disclosure:
    """Register stage 2 and the timers; return the Disclosure for the transaction and disposal agents.

    Stage 1 has no agent of its own: the transaction engine passes each batch to `add_batch`.
    """
    d = Disclosure(rt, sink)

    @rt.app.agent(d.partials, name="disclosure-book", concurrency=1)
    async def keep_book(stream: Any) -> None:
        async for event in stream.events():
            await d.take(event.value, event.message.partition, event.message.offset)

    @rt.app.timer(interval=FLUSH_SECONDS)
    async def flush_flows() -> None:
        await d.flush_flows()

    @rt.app.timer(interval=rt.settings.disclosure_publish_seconds)
    async def publish_summaries() -> None:
        await d.publish()

    return d


__all__ = ["FLOWS_TABLE", "Disclosure", "attach", "check_flow", "source_partition"]
