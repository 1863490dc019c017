"""Findings (what a detector concluded) and the dedup that turns a burst of them into one alert."""

from __future__ import annotations

import hashlib
from collections.abc import Iterable, Mapping
from dataclasses import dataclass, replace
from datetime import UTC, datetime

from models.schemas import LEVELS, Alert, Reason

# alerts memory: category -> (alert_id, last_ts, event_ids, highest level so far)
AlertMemory = dict[str, tuple[str, float, list[str], str]]

_RANK = {name: i for i, name in enumerate(LEVELS)}


@dataclass(slots=True)
class Finding:
    """One conclusion about one entity: a category and level, a score in [0, 1] and readable reasons."""

    category: str
    level: str
    score: float
    detector: str
    reasons: list[Reason]
    entity_type: str
    entity_id: str
    # A rule whose catalogue level is high or critical hit, whatever level this finding carries: the
    # model opens no second case for the event (a hit the rule lowered to medium is still its case).
    covers: bool = False


@dataclass(slots=True)
class Raised:
    """A finding after dedup: which alert it belongs to and whether that alert is new or escalated."""

    finding: Finding
    alert_id: str
    event_ids: list[str]
    is_new: bool
    escalated: bool
    event_ts: float

    def to_alert(self, created_at: float | None = None) -> Alert:
        """Build the contract Alert; created_at defaults to the event time so replays give equal alerts."""
        return to_alert(self.finding, self.alert_id, self.event_ids,
                        self.event_ts if created_at is None else created_at, self.event_ts)


def level_max(a: str, b: str) -> str:
    """Return the more severe of two levels."""
    return a if _RANK.get(a, -1) >= _RANK.get(b, -1) else b


def alert_id_for(entity_type: str, entity_id: str, category: str, event_id: str) -> str:
    """The id of an alert opened by `event_id`: a content hash, so a redelivered event reopens the same id."""
    key = f"{entity_type}|{entity_id}|{category}|{event_id}"
    return hashlib.sha256(key.encode()).hexdigest()[:24]


def open_or_update(alerts: AlertMemory, finding: Finding, ts: float, event_id: str,
                   cooldown: float = 1800.0, max_ids: int = 50,
                   more_ids: Iterable[str] = (),
                   cooldowns: Mapping[str, float] | None = None) -> tuple[str, list[str], bool]:
    """Attach a finding to the open alert of its category, or open a new one.

    Returns (alert_id, event_ids, is_new). An alert stays open while its findings keep coming
    less than `cooldown` seconds apart; `more_ids` are extra evidence ids appended after
    `event_id`. `cooldowns` overrides the cooldown per category (a day-long pattern such as
    structuring stays one alert across hours). The returned list is a copy, safe to put in an
    outbound message.

    >>> mem: AlertMemory = {}
    >>> f = Finding("market_crash", "high", 0.9, "d", [], "instrument", "X")
    >>> a, ids, new = open_or_update(mem, f, 100.0, "e1")
    >>> b, ids, again = open_or_update(mem, f, 160.0, "e2")
    >>> (a == b, ids, new, again)
    (True, ['e1', 'e2'], True, False)
    """
    # Forget bursts that went quiet, so the memory stays as small as the set of live alerts.
    cds = cooldowns or {}
    for cat in [c for c, entry in alerts.items() if ts - entry[1] >= cds.get(c, cooldown)]:
        del alerts[cat]
    entry = alerts.get(finding.category)
    if entry is not None:
        alert_id, last_ts, ids, level = entry
        is_new = False
        # A late event must not move the burst's clock backwards and shorten its life.
        last_ts = max(last_ts, ts)
        level = level_max(level, finding.level)
    else:
        alert_id = alert_id_for(finding.entity_type, finding.entity_id, finding.category, event_id)
        ids, last_ts, level, is_new = [], ts, finding.level, True
    for eid in (event_id, *more_ids):
        # A redelivered event is the same evidence, not more of it.
        if len(ids) < max_ids and eid not in ids:
            ids.append(eid)
    alerts[finding.category] = (alert_id, last_ts, ids, level)
    return alert_id, list(ids), is_new


def track(alerts: AlertMemory, findings: Iterable[Finding], ts: float, event_id: str,
          cooldown: float = 1800.0, max_ids: int = 50, more_ids: Iterable[str] = ()) -> list[Raised]:
    """Run open_or_update on each finding and report which alerts opened or rose in level.

    An update carries the level the alert reached, as the contract promises (an update never lowers
    it): a run that eases from critical to high for a minute is still a critical run.
    """
    extra = tuple(more_ids)
    out: list[Raised] = []
    for f in findings:
        before = alerts.get(f.category)
        alert_id, ids, is_new = open_or_update(alerts, f, ts, event_id, cooldown, max_ids, extra)
        escalated = before is not None and not is_new and _RANK.get(f.level, -1) > _RANK.get(before[3], -1)
        reached = alerts[f.category][3]
        if reached != f.level:
            f = replace(f, level=reached)
        out.append(Raised(f, alert_id, ids, is_new, escalated, ts))
    return out


def utc(ts: float) -> datetime:
    """Epoch seconds as an aware UTC datetime."""
    return datetime.fromtimestamp(ts, tz=UTC)


def to_alert(finding: Finding, alert_id: str, event_ids: list[str], created_at: float, event_ts: float,
             txn_type: str | None = None) -> Alert:
    """Build the contract Alert for a finding; both times are epoch seconds taken from event time."""
    return Alert(
        alert_id=alert_id,
        created_at=utc(created_at),
        event_ts=utc(event_ts),
        entity_type=finding.entity_type,  # type: ignore[arg-type]  # pydantic checks the Literal
        entity_id=finding.entity_id,
        category=finding.category,
        level=finding.level,  # type: ignore[arg-type]
        score=min(max(finding.score, 0.0), 1.0),
        reasons=list(finding.reasons),
        event_ids=list(event_ids),
        detector=finding.detector,
        txn_type=txn_type,  # type: ignore[arg-type]  # pydantic checks the Literal
    )


def span_text(seconds: float) -> str:
    """A duration as a reason reads it: '40 minutes', '6 hours', '3.0 days'."""
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    if seconds < 0.9 * 86_400:
        return f"{seconds / 3600:.0f} hours"
    return f"{seconds / 86_400:.1f} days"


__all__ = [
    "AlertMemory",
    "Finding",
    "Raised",
    "alert_id_for",
    "level_max",
    "open_or_update",
    "span_text",
    "to_alert",
    "track",
    "utc",
]
