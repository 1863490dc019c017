"""Pages: the Alertmanager alerts an alert wants, and what Alertmanager has already been told.

Pure bookkeeping over a lifecycle record (models.lifecycle.Lifecycle): `sync_pages` decides which
pages should fire given the alert's status and level, keeps pages that must still be ended in
Alertmanager, and drops the rest; agents/pager.py delivers them and marks them sent.
"""

from __future__ import annotations

from typing import TYPE_CHECKING, Literal

from pydantic import BaseModel

from models.plans import level_at_least

if TYPE_CHECKING:
    from models.lifecycle import Lifecycle


class Page(BaseModel):
    """One Alertmanager alert riskwatch keeps for an alert: its labels and what Alertmanager has seen."""

    stage: Literal["plan", "escalation"]
    labels: dict[str, str]
    starts_at: float
    active: bool = True
    sent: bool = False
    end_sent: bool = False


def page_labels(s: Lifecycle, stage: str) -> dict[str, str]:
    """Alertmanager labels of a page: what routes, groups and inhibits it (deploy/alertmanager)."""
    escalation = stage == "escalation" and s.plan is not None
    labels = {
        "alertname": "RiskwatchWarning",
        "alert_id": s.alert_id,
        "category": s.category,
        "level": (s.escalation_level or s.level) if escalation else s.level,
        "entity_type": s.entity_type,
        "entity_id": s.entity_id,
        "plan": s.plan.plan_id if s.plan else "",
        "team": (s.plan.escalation_team if escalation else s.plan.owner_team) if s.plan else "",
        "stage": stage,
    }
    if s.txn_type:
        # Only when known: a record from before it was kept keeps the labels its pages were sent with.
        labels["txn_type"] = s.txn_type
    return labels


def sync_pages(s: Lifecycle, min_level: str | None, now: float) -> bool:
    """Bring the state's pages in line with its status; True when something changed.

    Pages are wanted while the alert is active at `min_level` or above (None: paging is off):
    one for the plan and, once escalated, one for the escalation team. A page whose labels no
    longer fit (the level rose, the alert closed) is kept, inactive, until its end is delivered.
    """
    wanted: list[tuple[str, dict[str, str]]] = []
    if min_level is not None and s.active and level_at_least(s.level, min_level):
        wanted.append(("plan", page_labels(s, "plan")))
        if s.escalated:
            wanted.append(("escalation", page_labels(s, "escalation")))
    changed = False
    for p in s.pages:
        if p.active and all(p.labels != labels for _, labels in wanted):
            p.active = False
            changed = True
    for stage, labels in wanted:
        if all(p.labels != labels or not p.active for p in s.pages):
            s.pages.append(Page(stage=stage, labels=labels, starts_at=now))  # type: ignore[arg-type]
            changed = True
    kept = [p for p in s.pages if p.active or (p.sent and not p.end_sent)]
    if len(kept) != len(s.pages):
        s.pages = kept
        changed = True
    return changed


def pending_pages(s: Lifecycle) -> bool:
    """True while a page must still reach Alertmanager (a new one, or the end of a sent one)."""
    return any((p.active and not p.sent) or (not p.active and p.sent and not p.end_sent) for p in s.pages)


__all__ = ["Page", "page_labels", "pending_pages", "sync_pages"]
