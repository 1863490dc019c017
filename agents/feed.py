"""What the console shows: the newest warnings with their plans, status, assignee, notes and audit trails.

Every worker follows the whole of risk.alerts (and, for plans and their progress, risk.contingency
and risk.audit) with a group-less consumer starting a few hundred messages back, so any worker's
console shows every warning, not only those of the partitions it happens to own, and no extra
service is needed. The feed is bounded: the newest KEEP warnings, TRAIL audit records each.
"""

from __future__ import annotations

import json
import logging
import time
from collections import OrderedDict
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

from aiokafka import AIOKafkaConsumer

from agents.control import client_kwargs
from app.faust_app import ALERTS, AUDIT, CONTINGENCY, Runtime
from models.errors import RiskwatchError
from models.schemas import LEVELS

log = logging.getLogger("riskwatch.agents.feed")

BACKLOG = 500  # messages read back per partition when the follower starts
KEEP = 500  # distinct warnings (latest version each) held in memory and served
ACTIVE = ("open", "acknowledged", "escalated")  # statuses that count as open on the page
TRAIL = 50  # audit records kept per warning for its case view
HISTORY_SECONDS = 30 * 86400  # the entity's other warnings shown in a case view
STATUS_ACTIONS = frozenset({"raise", "plan", "ack", "resolve", "reopen", "escalate", "expire"})
PlanLookup = Callable[[dict[str, Any]], tuple[str | None, str | None]]
# What the feed knows about a warning beyond its message, kept across its updates.
CARRIED = ("plan", "owner", "plan_source", "escalated_to", "status", "status_by", "assignee", "notes", "last_note")


class AlertFeed:
    """The newest warnings, latest version per alert_id, with plan and status; sequence-numbered for polling."""

    def __init__(self, keep: int = KEEP, plan_of: PlanLookup | None = None) -> None:
        self.keep = keep
        self.plan_of = plan_of
        self.items: OrderedDict[str, dict[str, Any]] = OrderedDict()
        # Triggers and audit records can arrive before their warning (other topics, other partitions).
        self.early: OrderedDict[str, dict[str, Any]] = OrderedDict()
        self.seq = 0
        self.disposal_seen = False
        # Per warning, for its case view only (not in every poll): audit trail and plan triggers.
        self.trails: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()
        self.triggers: OrderedDict[str, list[dict[str, Any]]] = OrderedDict()

    def add(self, alert: dict[str, Any], published_at: float) -> None:
        """Take one warning message (new or an update of an earlier alert_id)."""
        alert_id = alert.get("alert_id")
        if not isinstance(alert_id, str) or alert.get("level") not in LEVELS:
            return
        previous = self.items.pop(alert_id, None)
        self.seq += 1
        entry = {**alert, "seq": self.seq, "published_at": published_at,
                 "versions": previous["versions"] + 1 if previous else 1,
                 "plan": None, "owner": None, "plan_source": None, "escalated_to": None,
                 "status": "open", "status_by": None, "assignee": None, "notes": 0, "last_note": None}
        if previous is not None:
            for key in CARRIED:
                entry[key] = previous[key]
        entry.update(self.early.pop(alert_id, {}))
        if entry["plan_source"] != "triggered" and self.plan_of is not None:
            try:
                entry["plan"], entry["owner"] = self.plan_of(alert)
                entry["plan_source"] = "catalogue" if entry["plan"] else None
            except Exception:  # a plan lookup problem must not hide the warning
                log.exception("plan lookup failed for %s", alert_id)
        self.items[alert_id] = entry
        while len(self.items) > self.keep:
            gone, _ = self.items.popitem(last=False)
            self.trails.pop(gone, None)
            self.triggers.pop(gone, None)

    def _change(self, alert_id: str, fields: dict[str, Any]) -> None:
        entry = self.items.get(alert_id)
        if entry is None:
            self.early.setdefault(alert_id, {}).update(fields)
            self.early.move_to_end(alert_id)
            while len(self.early) > 4 * self.keep:
                self.early.popitem(last=False)
            return
        self.seq += 1
        entry.update(fields, seq=self.seq)

    def _keep(self, book: OrderedDict[str, list[dict[str, Any]]], alert_id: str, record: dict[str, Any],
              limit: int) -> bool:
        """Keep a record for a case view; False when it is already kept (the follower read it again)."""
        kept = book.setdefault(alert_id, [])
        book.move_to_end(alert_id)
        while len(book) > 4 * self.keep:
            book.popitem(last=False)
        if record in kept:
            return False
        kept.append(record)
        del kept[:-limit]
        return True

    def on_trigger(self, trigger: dict[str, Any]) -> None:
        """Take a contingency trigger: the plan set in motion for a warning, or its escalation."""
        alert_id, team = trigger.get("alert_id"), trigger.get("owner_team")
        if not isinstance(alert_id, str):
            return
        self.disposal_seen = True
        self._keep(self.triggers, alert_id, {k: trigger.get(k) for k in (
            "kind", "plan_id", "title", "actions", "owner_team", "level", "opened_at", "ack_deadline",
            "resolve_deadline", "runbook")}, 8)
        if trigger.get("kind", "plan") == "escalation":
            self._change(alert_id, {"escalated_to": team})
        else:
            self._change(alert_id, {"plan": f"{trigger.get('title')} ({trigger.get('plan_id')})", "owner": team,
                                    "plan_source": "triggered"})

    def on_audit(self, record: dict[str, Any]) -> None:
        """Take an audit record: a warning acknowledged, assigned, noted, escalated, resolved, reopened or expired."""
        alert_id, status, action = record.get("alert_id"), record.get("to_status"), record.get("action")
        if not isinstance(alert_id, str):
            return
        kept = {k: record.get(k) for k in ("seq", "action", "outcome", "from_status", "to_status", "by", "via",
                                           "note", "verdict", "assignee", "reason", "ts", "recorded_at")}
        if record.get("kind") == "feedback":  # a verdict that moved a detector's operating point
            kept["reason"] = (f"verdict moved the factor of {record.get('key')} from {record.get('old_factor')} "
                              f"to {record.get('new_factor')}")
        if not self._keep(self.trails, alert_id, kept, TRAIL):
            return
        if not isinstance(status, str) or record.get("outcome") == "rejected":
            if alert_id in self.items:  # a refused act still shows in an open case view
                self._change(alert_id, {})
            return
        self.disposal_seen = True
        fields: dict[str, Any] = {}
        if action is None or action in STATUS_ACTIONS:
            fields.update(status=status, status_by=record.get("by"))
        if action == "assign":
            fields["assignee"] = record.get("assignee")
        if record.get("note"):
            fields["last_note"] = {"by": record.get("by"), "note": record.get("note"), "ts": record.get("ts")}
            fields["notes"] = sum(1 for r in self.trails.get(alert_id, ()) if r["note"] and r["outcome"] != "rejected")
        self._change(alert_id, fields)

    def case(self, alert_id: str, now: float | None = None) -> dict[str, Any] | None:
        """One warning's case: the warning, its plan triggers, audit trail and the entity's other recent warnings."""
        a = self.items.get(alert_id)
        if a is None:
            return None
        # Thirty days back from this warning (event time), so an old case shows what was known around it.
        since = (_epoch(a.get("created_at")) or (now if now is not None else time.time())) - HISTORY_SECONDS
        others = [{k: o.get(k) for k in ("alert_id", "created_at", "level", "category", "status", "score")}
                  for o in reversed(self.items.values())
                  if o["entity_id"] == a["entity_id"] and o["entity_type"] == a["entity_type"]
                  and o["alert_id"] != alert_id and _epoch(o.get("created_at")) >= since]
        return {"alert": a, "triggers": self.triggers.get(alert_id, []), "trail": self.trails.get(alert_id, []),
                "others": others}

    def since(self, seq: int = 0, level: str | None = None, category: str | None = None) -> list[dict[str, Any]]:
        """Warnings changed after `seq`, newest first, optionally only one level and category."""
        return [a for a in reversed(self.items.values()) if a["seq"] > seq
                and (level is None or a["level"] == level) and (category is None or a["category"] == category)]

    def counts(self) -> dict[str, int]:
        """Open warnings held (open, acknowledged or escalated), by their current level."""
        counts = dict.fromkeys(LEVELS, 0)
        for a in self.items.values():
            if a["status"] in ACTIVE:
                counts[a["level"]] += 1
        return counts

    def snapshot(self, seq: int = 0, level: str | None = None, category: str | None = None) -> dict[str, Any]:
        """The JSON the page polls: changed warnings, open counts per level, categories seen, the feed position."""
        return {"seq": self.seq, "alerts": self.since(seq, level, category), "counts": self.counts(),
                "categories": sorted({a["category"] for a in self.items.values()}),
                "plans_known": self.plan_of is not None or self.disposal_seen,
                "disposal_seen": self.disposal_seen, "keep": self.keep}


def plan_lookup(plans_file: Path) -> PlanLookup | None:
    """Plan title and owner team per warning from the plan catalogue, or None when there is none to read."""
    try:
        from models.plans import load_plans
    except ImportError:  # the disposal part is optional: the page then shows category and level only
        return None
    if not plans_file.exists():
        return None
    try:
        catalogue = load_plans(plans_file)
    except RiskwatchError as exc:
        log.warning("warnings page shows no plans: %s", exc)
        return None

    def lookup(alert: dict[str, Any]) -> tuple[str | None, str | None]:
        plan = catalogue.select(str(alert.get("category")), str(alert.get("level")))
        return (f"{plan.title} ({plan.plan_id})", plan.owner_team) if plan is not None else (None, None)

    return lookup


class AlertFollower:
    """Reads risk.alerts, risk.contingency and risk.audit without a consumer group into an AlertFeed."""

    def __init__(self, rt: Runtime, feed: AlertFeed) -> None:
        self.settings = rt.settings
        self.feed = feed
        self.handlers: dict[str, Callable[[dict[str, Any], float], None]] = {
            rt.settings.topic(ALERTS): feed.add,
            rt.settings.topic(CONTINGENCY): lambda trigger, _: feed.on_trigger(trigger),
            rt.settings.topic(AUDIT): lambda record, _: feed.on_audit(record),
        }

    async def run(self) -> None:
        """Follow the topics for the life of the worker, starting BACKLOG messages back in every partition."""
        # Subscribed without a group: start() waits for the topics' metadata and assigns every partition.
        consumer = AIOKafkaConsumer(*self.handlers, **client_kwargs(self.settings), enable_auto_commit=False,
                                    group_id=None, auto_offset_reset="earliest", fetch_max_wait_ms=100)
        await consumer.start()
        try:
            tps = sorted(consumer.assignment())
            begin = await consumer.beginning_offsets(tps)
            end = await consumer.end_offsets(tps)
            for tp in tps:
                consumer.seek(tp, max(begin[tp], end[tp] - BACKLOG))
            while True:
                batch = await consumer.getmany(timeout_ms=200)
                # Within a batch, publication time restores the order across partitions and topics.
                for r in sorted((r for msgs in batch.values() for r in msgs), key=lambda r: r.timestamp):
                    try:
                        value = json.loads(r.value) if r.value else None
                    except ValueError:
                        continue
                    if isinstance(value, dict):
                        self.handlers[r.topic](value, r.timestamp / 1000.0)
        finally:
            await consumer.stop()


def _epoch(value: Any) -> float:
    try:
        return datetime.fromisoformat(str(value).replace("Z", "+00:00")).timestamp()
    except ValueError:
        return 0.0


__all__ = ["KEEP", "AlertFeed", "AlertFollower", "plan_lookup"]
