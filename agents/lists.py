"""Run-time lists on every worker: follow risk.lists into the scorer's ListIndex, and export list metrics."""

from __future__ import annotations

import asyncio
import logging
import time

from pydantic import ValidationError

from agents.control import follow, keep_running
from agents.sink import Sink
from app.faust_app import LISTS, Runtime
from models.lists import ListChange, ListIndex, decode

log = logging.getLogger("riskwatch.agents.lists")
METRICS_SECONDS = 1.0  # how often hit counts and list sizes reach Prometheus (the hot path only counts in a dict)


class ListFollower:
    """Keeps this worker's ListIndex equal to the compacted risk.lists topic (every worker reads all of it)."""

    def __init__(self, rt: Runtime, sink: Sink, index: ListIndex) -> None:
        self.rt = rt
        self.sink = sink
        self.index = index
        self.ready = asyncio.Event()
        self._started = time.monotonic()
        self._hits_seen: dict[str, int] = {}
        self._suppressed_seen = 0
        self._sized: set[str] = set()

    async def handle(self, key: bytes | None, value: bytes | None, partition: int, offset: int) -> None:
        """Apply one record; set aside (dead-letter, count) one that is malformed or does not fit."""
        m = self.rt.metrics
        try:
            change = decode(key, value)
        except (ValueError, ValidationError) as exc:
            m.list_rejected.labels("invalid").inc()
            await self.sink.dead_letter(value if value is not None else key, self.rt.settings.topic(LISTS),
                                        partition, offset, f"invalid list record: {_first_error(exc)}", "lists")
            return
        if not isinstance(change, ListChange):
            if self.index.remove(*change):
                m.list_changes.labels("remove").inc()
            return
        if self.index.apply(change):
            m.list_changes.labels("add").inc()
            return
        m.list_rejected.labels("full").inc()
        await self.sink.dead_letter(value, self.rt.settings.topic(LISTS), partition, offset,
                                    f"list index full ({self.index.max_entries:,} entries, lists.params.max_entries)"
                                    f": entry not applied; remove entries or raise the limit", "lists")

    def caught_up(self) -> None:
        """Called once the entries present at start are applied."""
        self.ready.set()
        sizes = self.index.sizes()
        log.info("run-time lists loaded: %d entries in %d lists in %.1f s", sum(sizes.values()), len(sizes),
                 time.monotonic() - self._started)

    def export_metrics(self) -> None:
        """Move hit and suppression counts and list sizes to Prometheus."""
        m = self.rt.metrics
        for name, n in list(self.index.hits.items()):
            delta = n - self._hits_seen.get(name, 0)
            if delta:
                m.list_hits.labels(name).inc(delta)
                self._hits_seen[name] = n
        s = self.index.suppressed
        if s > self._suppressed_seen:
            m.list_suppressed.inc(s - self._suppressed_seen)
            self._suppressed_seen = s
        sizes = self.index.sizes()
        for name in self._sized - set(sizes):
            m.list_entries.labels(name).set(0)
        for name, n in sizes.items():
            m.list_entries.labels(name).set(n)
        self._sized = set(sizes)

    async def run(self) -> None:
        """Follow risk.lists for the life of the worker."""
        await follow(self.rt, LISTS, lambda msg: self.handle(msg.key, msg.value, msg.partition, msg.offset),
                     "lists", self.caught_up)


def _first_error(exc: Exception) -> str:
    if isinstance(exc, ValidationError):
        err = exc.errors(include_url=False)[0]
        where = ".".join(str(p) for p in err["loc"]) or "record"
        return f"{where}: {err['msg']}"
    return str(exc)


def attach(rt: Runtime, follower: ListFollower) -> None:
    """Run the list follower and its metrics export as tasks of the app."""

    keep_running(rt, "lists", follower.run)

    @rt.app.timer(METRICS_SECONDS)
    async def list_metrics() -> None:
        follower.export_metrics()


__all__ = ["ListFollower", "attach"]

