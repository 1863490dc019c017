"""Run-time lists on every worker: follow risk.lists into the scorer's ListIndex, and export list metrics."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import Any

from aiohttp import web as aioweb
from pydantic import ValidationError

from agents.control import follow, keep_running
from agents.sink import Sink
from agents.web import reply as _json
from agents.web import text_or_none as _text
from app.faust_app import AUDIT, LISTS, Runtime
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





class ListAdmin:
    """The console's list routes (admins only: the console's middleware checks the role and the CSRF token).

    GET /api/admin/lists: the lists the catalogue defines, with this worker's entry counts.
    POST /api/admin/lists: {action: add|remove, list, kind, value, counterparty?, note?}, published to
    risk.lists and audited on risk.audit as the signed-in admin, through the same validation as
    `riskwatch lists` (app.list_changes).
    """

    def __init__(self, index: ListIndex, send: Callable[[bytes, bytes | None, bytes, bytes], Awaitable[None]],
                 pseudonymise_key: str | None = None) -> None:
        self.index = index
        self.send = send
        self.key = pseudonymise_key or ""

    def install(self, app: aioweb.Application) -> None:
        """Add the routes to the console's aiohttp application."""
        app.router.add_get("/api/admin/lists", self.show)
        app.router.add_post("/api/admin/lists", self.change)

    async def show(self, request: aioweb.Request) -> aioweb.Response:
        """The defined lists and their sizes, and the sizes of lists no catalogue defines yet."""
        sizes = self.index.sizes()
        defined = [{"name": n, "type": d.type, "level": None if d.type == "allow" else d.warn_level,
                    "category": None if d.type == "allow" else d.warn_category, "description": d.description,
                    "entries": sizes.get(n, 0)} for n, d in sorted(self.index.definitions.items())]
        undefined = {n: c for n, c in sorted(sizes.items()) if n not in self.index.definitions}
        return _json({"lists": defined, "undefined": undefined})

    async def change(self, request: aioweb.Request) -> aioweb.Response:
        """Add or remove one entry as the signed-in admin."""
        from agents.console import PRINCIPAL
        from agents.web import json_object
        from app.list_changes import audit_of, make_change
        from models.errors import RiskwatchError
        from models.lists import ALLOW_KINDS

        who: Any = request[PRINCIPAL]
        body = await json_object(request)
        if body is None:
            return _json({"error": "send a JSON object: action, list, kind, value (and counterparty for a pair)"}, 400)
        action = body.get("action")
        if action not in ("add", "remove"):
            return _json({"error": "action must be add or remove"}, 400)
        try:
            change = make_change(str(body.get("list", "")), str(body.get("kind", "")), str(body.get("value", "")),
                                 _text(body.get("counterparty")), _text(body.get("note")) if action == "add" else None,
                                 who.name, "console", self.key)
        except RiskwatchError as exc:
            return _json({"error": str(exc)}, 400)
        d = self.index.definitions.get(change.list)
        if d is None:
            return _json({"error": f"no list {change.list!r} is defined in the catalogue in force (rule lists)"}, 400)
        if d.type == "allow" and change.kind not in ALLOW_KINDS:
            return _json({"error": f"{change.list!r} is an allow list: accounts, counterparties or pairs only"}, 400)
        audit = audit_of([change], action, who.name, "console")
        await self.send(change.key, None if action == "remove" else change.model_dump_json().encode(),
                        audit.list.encode(), audit.model_dump_json().encode())
        log.info("console: %s %s %s %s on list %s", who.name, action, change.kind, change.value, change.list)
        return _json({"sent": change.model_dump(mode="json"), "audit_id": audit.audit_id}, 202)


def install_admin(rt: Runtime, index: ListIndex) -> ListAdmin:
    """Serve the admins' list routes on the worker's console, publishing through the worker's producer."""
    lists_topic, audit_topic = rt.topics[LISTS], rt.topics[AUDIT]
    names = lists_topic.get_topic_name(), audit_topic.get_topic_name()

    async def send(key: bytes, value: bytes | None, audit_key: bytes, audit: bytes) -> None:
        await lists_topic.send(key=key, value=value, partition=0)
        await audit_topic.send(key=audit_key, value=audit)
        for name in names:
            rt.metrics.events_published.labels(name).inc()

    admin = ListAdmin(index, send, rt.settings.pseudonymise_key.get_secret_value() or None)
    admin.install(rt.app.web.web_app)  # type: ignore[attr-defined]
    return admin


__all__ = ["ListAdmin", "ListFollower", "attach", "install_admin"]
