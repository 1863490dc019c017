"""Paging through Alertmanager: warnings at or above RISKWATCH_PAGE_MIN_LEVEL go to its v2 API.

The lifecycle state of each alert says which pages it wants (models.pages.sync_pages); this
module only delivers them. A firing page is POSTed with `endsAt` four refresh intervals ahead and
re-sent every RISKWATCH_PAGE_REFRESH_SECONDS while the alert is active, the way Prometheus keeps
its alerts alive; a resolved alert's page is POSTed once more with `endsAt` = now. Alertmanager
identifies an alert by its labels, so re-sending after a restart updates the same alert and no
second notification goes out. Delivery is recorded in the lifecycle table (under the disposal
lock, after Alertmanager accepted it); when Alertmanager is down the push is retried with
exponential backoff and nothing is dropped: a page stays pending in the table until it is accepted.
"""

from __future__ import annotations

import asyncio
import logging
import random
import time
from datetime import UTC, datetime
from typing import Any

import aiohttp

from agents.disposal import Disposal
from app.faust_app import Runtime
from app.logs import Retries
from models.lifecycle import Lifecycle
from models.pages import Page

log = logging.getLogger("riskwatch.agents.pager")

BATCH = 200  # alerts per POST: Alertmanager takes lists; this keeps one request well under a megabyte
MAX_BACKOFF = 60.0


def _iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat().replace("+00:00", "Z")


def am_alert(state: Lifecycle, page: Page, now: float, ttl: float) -> dict[str, Any]:
    """The Alertmanager v2 alert for one page: labels, annotations and its time span."""
    plan = state.plan
    escalation = page.stage == "escalation"
    title = plan.title if plan else f"{state.category} warning"
    who = f"{state.entity_type} {state.entity_id}"
    summary = (f"Escalation (not acknowledged in time): {title} on {who}" if escalation
               else f"{title} on {who}")
    annotations = {
        "summary": summary[:500],
        "reasons": state.summary[:2000] or state.category,
        "runbook": plan.runbook if plan else "",
        "alert_id": state.alert_id,
        "status": state.status,
    }
    if state.ack_deadline is not None:
        annotations["ack_deadline"] = _iso(state.ack_deadline)
    return {
        "labels": dict(page.labels),
        "annotations": annotations,
        "startsAt": _iso(page.starts_at),
        "endsAt": _iso(now + ttl if page.active else now),
    }


class Pager:
    """Pushes pending pages, and refreshes firing ones, for the alerts this worker owns."""

    def __init__(self, rt: Runtime, disposal: Disposal) -> None:
        s = rt.settings
        self.disposal = disposal
        self.m = rt.metrics
        self.url = s.alertmanager_url.rstrip("/") + "/api/v2/alerts"
        self.refresh = s.page_refresh_seconds
        self.ttl = 4 * s.page_refresh_seconds
        self.failures = 0
        self.not_before = 0.0
        self.last_refresh = 0.0

    async def step(self, session: aiohttp.ClientSession, now: float) -> None:
        """One round: deliver what is pending (and, when due, refresh everything firing)."""
        if now < self.not_before:
            return
        owned = self.disposal.owned()
        if owned is None:
            return
        refresh = now - self.last_refresh >= self.refresh
        work: list[tuple[bytes, Lifecycle, Page]] = []
        for key, state in self.disposal.owned_states(owned):
            for page in state.pages:
                pending = (page.active and not page.sent) or (not page.active and page.sent and not page.end_sent)
                if pending or (refresh and page.active):
                    work.append((key, state, page))
        if refresh:
            self.last_refresh = now
        for i in range(0, len(work), BATCH):
            chunk = work[i:i + BATCH]
            if not await self._post(session, [am_alert(st, p, now, self.ttl) for _, st, p in chunk]):
                return
            await self._delivered(chunk)

    async def _post(self, session: aiohttp.ClientSession, body: list[dict[str, Any]]) -> bool:
        try:
            async with session.post(self.url, json=body, timeout=aiohttp.ClientTimeout(total=10)) as resp:
                if resp.status < 300:
                    self.failures, self.not_before = 0, 0.0
                    return True
                text = (await resp.text())[:300]
                if 400 <= resp.status < 500:
                    # Alertmanager refused the content: retrying the same body cannot help.
                    self.m.pages.labels("failed").inc(len(body))
                    log.error("Alertmanager refused %d page(s) with HTTP %s: %s", len(body), resp.status, text)
                    return False
                reason = f"HTTP {resp.status}: {text}"
        except (TimeoutError, aiohttp.ClientError, OSError) as exc:
            reason = f"{type(exc).__name__}: {exc}"
        self.failures += 1
        delay = min(MAX_BACKOFF, 0.5 * 2 ** (self.failures - 1)) * random.uniform(0.8, 1.2)
        self.not_before = time.time() + delay
        self.m.pages.labels("retry").inc(len(body))
        log.warning("cannot reach Alertmanager at %s (%s); %d page(s) kept, retrying in %.1fs", self.url, reason,
                    len(body), delay)
        return False

    async def _delivered(self, chunk: list[tuple[bytes, Lifecycle, Page]]) -> None:
        d = self.disposal
        async with d.lock:
            owned = d.owned()
            if owned is None:
                return  # a rebalance began: the next owner re-sends, and Alertmanager takes it as the same alert
            for key, _, sent_page in chunk:
                current = d.get(key) if d.partition(key) in owned else None
                if current is None:
                    continue
                state = current.model_copy(deep=True)
                changed = False
                for page in state.pages:
                    if page.labels != sent_page.labels:
                        continue
                    if sent_page.active and not page.sent:
                        # Even if the page went inactive meanwhile: Alertmanager has it, so its end must follow.
                        page.sent = changed = True
                        self.m.pages.labels("sent").inc()
                        log.info("paged %s (%s, team %s)", state.alert_id, page.labels["level"],
                                 page.labels["team"])
                    elif not sent_page.active and not page.active and not page.end_sent:
                        page.end_sent = changed = True
                        self.m.pages.labels("resolved").inc()
                if changed:
                    d.put(key, state)


def attach(rt: Runtime, disposal: Disposal) -> Pager | None:
    """Run the pager as a task of the app when RISKWATCH_ALERTMANAGER_URL is set."""
    if not rt.settings.alertmanager_url:
        return None
    pager = Pager(rt, disposal)
    interval = min(rt.settings.escalation_check_seconds, rt.settings.page_refresh_seconds)

    @rt.app.task
    async def page() -> None:
        retries = Retries(log, "paging round")
        async with aiohttp.ClientSession() as session:
            while True:
                try:
                    await asyncio.wait_for(disposal.pages_waiting.wait(), timeout=interval)
                except TimeoutError:
                    pass
                disposal.pages_waiting.clear()
                try:
                    await pager.step(session, time.time())
                    retries.ok()
                except asyncio.CancelledError:
                    raise
                except Exception as exc:  # noqa: BLE001 - any failure is told (Retries) and retried
                    retries.failed(exc, "trying again")

    return pager


__all__ = ["Pager", "am_alert", "attach"]
