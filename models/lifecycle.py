"""The life of one alert after it is raised: open, acknowledged, escalated, resolved or expired.

Pure functions over a `Lifecycle` record: `on_alert` (a warning, new or updated), `on_act` (an
acknowledgement event from risk.acks) and `tick` (the clock: escalation, overdue, expiry). Each
returns an `Outcome` with the new state, the contingency triggers to publish and the audit
records of every transition. Times are epoch seconds passed in by the caller, so the agent, the
tests and a replay drive the same machine. Nothing here knows Kafka.

>>> from models.plans import parse_plans
>>> plans = parse_plans("version: 1\\nplans: {p: {title: t, category: velocity, actions: [page_oncall],"
...                     " owner_team: fraud-ops, ack_within: 60, resolve_within: 600, runbook: r}}")
>>> out = on_alert(None, {"alert_id": "a1b2c3d4e5f60718293a4b5c", "category": "velocity", "level": "high",
...                       "entity_type": "account", "entity_id": "acct-1", "created_at": 0.0}, plans, now=1000.0)
>>> out.state.status, out.triggers[0].plan_id, out.state.ack_deadline
('open', 'p', 1060.0)
>>> [t.kind for t in tick(out.state, now=1061.0).triggers], tick(out.state, now=1061.0).state.status
(['escalation'], 'escalated')
"""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, ValidationError, field_validator, model_validator

from models.errors import EventError, RiskwatchError
from models.feedback import VerdictNote, note_for
from models.pages import Page, pending_pages
from models.plans import Plan, PlanCatalogue, Trigger, make_trigger, next_level
from models.schemas import Level, unframe

Status = Literal["open", "acknowledged", "resolved", "escalated", "expired"]
Action = Literal["ack", "assign", "note", "resolve", "reopen"]
Via = Literal["cli", "console"]
ACTIVE: frozenset[str] = frozenset({"open", "acknowledged", "escalated"})
Verdict = Literal["confirmed", "false_positive"]
SYSTEM = "riskwatch"
MAX_EARLY_ACTS = 20
MAX_NOTE_KEYS = 64  # notes remembered per alert to recognise a redelivered one
ORPHAN_TTL = 86_400.0  # an act for an alert that never arrives is given up after a day
_RANK = {"low": 0, "medium": 1, "high": 2, "critical": 3}


def _utc(ts: float) -> datetime:
    return datetime.fromtimestamp(ts, tz=UTC)


class AckEvent(BaseModel):
    """A person's act on an alert (topic risk.acks, key alert_id): acknowledge, assign, note, resolve or reopen it.

    `via` says how `by` is known: "console" for the signed-in user of the web console, "cli" for a
    name a script or the CLI's --by supplied (not authenticated; acts written before `via` existed
    read as "cli").
    """

    model_config = ConfigDict(extra="ignore", frozen=True, str_max_length=2000)

    alert_id: str = Field(pattern=r"^[0-9a-f]{16,64}$")
    action: Action
    by: str = Field(min_length=1, max_length=128)
    note: str | None = Field(None, max_length=1000)
    verdict: Verdict | None = None
    assignee: str | None = Field(None, min_length=1, max_length=128, description="person or team (assign only)")
    via: Via = "cli"
    ts: AwareDatetime

    @field_validator("ts")
    @classmethod
    def _sane_ts(cls, value: datetime) -> datetime:
        if not datetime(2000, 1, 1, tzinfo=UTC) <= value < datetime(2100, 1, 1, tzinfo=UTC):
            raise ValueError("timestamp must lie between 2000-01-01 and 2100-01-01")
        return value

    @model_validator(mode="after")
    def _fields_fit_the_action(self) -> AckEvent:
        if self.verdict is not None and self.action != "resolve":
            raise ValueError(f"verdict is only given with action 'resolve', not {self.action!r}")
        if (self.assignee is not None) != (self.action == "assign"):
            raise ValueError("assign needs an assignee (a person or team), and only assign takes one")
        if self.action == "note" and not (self.note or "").strip():
            raise ValueError("a note needs its text")
        return self


def make_act(alert_id: str, action: str, by: str, *, note: str | None = None, verdict: str | None = None,
             assignee: str | None = None, via: str = "cli", ts: datetime | None = None) -> AckEvent:
    """A validated act for risk.acks, as the CLI and the console both publish it; RiskwatchError says what is wrong."""
    try:
        return AckEvent(alert_id=alert_id.strip().lower(), action=action, by=by.strip(),  # type: ignore[arg-type]
                        note=note.strip() if note and note.strip() else None, verdict=verdict,  # type: ignore[arg-type]
                        assignee=assignee.strip() if assignee is not None else None, via=via,  # type: ignore[arg-type]
                        ts=ts or datetime.now(UTC))
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        field = ".".join(str(p) for p in err["loc"]) or "input"
        hint = " (alert ids are 16-64 lowercase hexadecimal characters, as printed by `riskwatch tail`)" \
            if field == "alert_id" else ""
        raise RiskwatchError(f"{field}: {str(err['msg']).removeprefix('Value error, ')}{hint}") from None


def decode_act(raw: bytes | str) -> AckEvent:
    """Parse and validate one risk.acks message; EventError names the field and the problem."""
    if len(raw) > 65_536:
        raise EventError(f"payload is {len(raw)} bytes; an acknowledgement is under 64 KiB", None)
    try:
        # A case tool on Confluent's stack may frame its JSON (the JSON Schema serializer's header).
        return AckEvent.model_validate_json(unframe(raw) if isinstance(raw, bytes) else raw)
    except ValidationError as exc:
        err = exc.errors(include_url=False)[0]
        if err["type"] == "json_invalid":
            raise EventError(f"not valid JSON: {err['msg']}", None) from None
        loc = ".".join(str(p) for p in err["loc"]) or None
        msg = str(err["msg"]).removeprefix("Value error, ")
        raise EventError(f"{loc or 'acknowledgement'}: {msg}", loc) from None
    except (ValueError, RecursionError) as exc:
        raise EventError(f"not valid JSON: {exc}", None) from None


class Lifecycle(BaseModel):
    """Everything riskwatch tracks about one alert after it is raised (the lifecycle table value)."""

    model_config = ConfigDict(extra="ignore")

    alert_id: str
    known: bool = Field(True, description="False while only acts for it arrived, not the warning itself")
    early: list[AckEvent] = Field(default_factory=list)
    entity_type: str = ""
    entity_id: str = ""
    category: str = ""
    level: Level = "low"
    detector: str = ""
    txn_type: str = Field("", description="an account warning's transaction type when raised; empty for others and "
                                          "in records written before it was kept")
    codes: list[str] = Field(default_factory=list, description="reason codes when raised, lead first; empty in "
                                                                "records written before verdict feedback")
    summary: str = ""
    created_at: float = 0.0
    status: Status = "open"
    plan: Plan | None = None
    plans_version: int = 0
    trigger_id: str | None = None
    round: int = Field(0, description="Plan changes and reopenings so far: each may escalate once")
    opened_at: float = 0.0
    ack_deadline: float | None = None
    resolve_deadline: float | None = None
    escalated: bool = False
    escalation_level: Level | None = None
    overdue: bool = False
    triggered: list[str] = Field(default_factory=list, description="plan ids triggered for this alert")
    acked_by: str | None = None
    acked_at: float | None = None
    assignee: str | None = None
    note_keys: list[str] = Field(default_factory=list, description="digests of the latest notes applied")
    resolved_by: str | None = None
    resolved_at: float | None = None
    verdict: Verdict | None = None
    closed_at: float | None = None
    seq: int = 0
    updated_at: float = 0.0
    pages: list[Page] = Field(default_factory=list)

    @property
    def active(self) -> bool:
        """True while the alert still needs someone (open, acknowledged or escalated)."""
        return self.known and self.status in ACTIVE


class AuditRecord(BaseModel):
    """One transition of an alert, or one refused act, on risk.audit (key alert_id)."""

    audit_id: str
    alert_id: str
    seq: int
    action: Literal["raise", "plan", "ack", "assign", "note", "resolve", "reopen", "escalate", "overdue", "expire"]
    outcome: Literal["applied", "rejected"] = "applied"
    from_status: Status | None
    to_status: Status | None
    by: str
    note: str | None = None
    verdict: Verdict | None = None
    assignee: str | None = None
    via: str | None = Field(None, description="how `by` is known for a person's act: console (signed in) or cli")
    reason: str | None = None
    ts: AwareDatetime
    recorded_at: AwareDatetime
    plan_id: str | None = None
    trigger_id: str | None = None
    level: str | None = None
    category: str | None = None
    entity_type: str | None = None
    entity_id: str | None = None


@dataclass
class Outcome:
    """What one step produced: the new state (None: forget it), triggers, audit records and feedback.

    `verdicts` is (detector, verdict) of every verdict given, for the metrics; `feedback` the verdicts
    that move an operating point (models.feedback: not the required rules, not old records without
    reason codes); `case_times` is ("ack" or "resolve", team, seconds since the plan's trigger), the
    team being the one answerable then (the escalation team once escalated).
    """

    state: Lifecycle | None
    triggers: list[Trigger] = field(default_factory=list)
    audit: list[AuditRecord] = field(default_factory=list)
    verdicts: list[tuple[str, str]] = field(default_factory=list)
    feedback: list[VerdictNote] = field(default_factory=list)
    ack_seconds: list[float] = field(default_factory=list)
    case_times: list[tuple[str, str, float]] = field(default_factory=list)
    changed: bool = False
    given_up: list[AckEvent] = field(default_factory=list)

    def merge(self, other: Outcome) -> Outcome:
        """Append another step's outputs (its state wins)."""
        self.state = other.state
        self.triggers += other.triggers
        self.audit += other.audit
        self.verdicts += other.verdicts
        self.feedback += other.feedback
        self.ack_seconds += other.ack_seconds
        self.case_times += other.case_times
        self.given_up += other.given_up
        self.changed = self.changed or other.changed
        return self


def _record(s: Lifecycle, out: Outcome, action: str, before: Status | None, *, by: str, ts: float, now: float,
            note: str | None = None, verdict: str | None = None, outcome: str = "applied",
            reason: str | None = None, assignee: str | None = None, via: str | None = None) -> None:
    if outcome == "applied":
        s.seq += 1
        salt = f"{s.seq}"
    else:
        # A refused act changes nothing, so it has no sequence number: its content names it.
        salt = f"rejected|{by}|{ts}|{action}"
    out.audit.append(AuditRecord(
        audit_id=hashlib.sha256(f"{s.alert_id}|{action}|{salt}".encode()).hexdigest()[:24],
        alert_id=s.alert_id, seq=s.seq, action=action, outcome=outcome,  # type: ignore[arg-type]
        from_status=before, to_status=s.status if outcome == "applied" else before, by=by, note=note,
        verdict=verdict, assignee=assignee, via=via, reason=reason, ts=_utc(ts),  # type: ignore[arg-type]
        recorded_at=_utc(now),
        plan_id=s.plan.plan_id if s.plan else None, trigger_id=s.trigger_id, level=s.level,
        category=s.category, entity_type=s.entity_type, entity_id=s.entity_id))
    out.changed = True


def _start_plan(s: Lifecycle, plan: Plan, version: int, now: float, out: Outcome) -> None:
    trig = make_trigger(plan, version, alert_id=s.alert_id, level=s.level, category=s.category,
                        entity_type=s.entity_type, entity_id=s.entity_id, opened_at=_utc(now))
    s.plan, s.plans_version, s.trigger_id = plan, version, trig.trigger_id
    s.opened_at, s.ack_deadline, s.resolve_deadline = now, now + plan.ack_within, now + plan.resolve_within
    s.escalated, s.escalation_level, s.overdue = False, None, False
    s.triggered.append(plan.plan_id)
    out.triggers.append(trig)


def _alert_fields(alert: Any) -> dict[str, Any]:
    if isinstance(alert, dict):
        return alert
    d = alert.model_dump()
    d["created_at"] = alert.created_at.timestamp()
    d["summary"] = "; ".join(r.message for r in alert.reasons)[:1000]
    return d


def _codes(a: dict[str, Any]) -> list[str]:
    return [str(r["code"]) for r in a.get("reasons") or () if isinstance(r, dict) and "code" in r][:8]


def on_alert(state: Lifecycle | None, alert: Any, plans: PlanCatalogue, now: float) -> Outcome:
    """Apply a warning (first version or an update with the same alert_id); idempotent under redelivery."""
    a = _alert_fields(alert)
    level = a["level"]
    out = Outcome(state)
    if state is None or not state.known:
        early = list(state.early) if state is not None else []
        s = Lifecycle(alert_id=a["alert_id"], entity_type=a["entity_type"], entity_id=a["entity_id"],
                      category=a["category"], level=level, detector=a.get("detector", ""),
                      txn_type=a.get("txn_type") or "", codes=_codes(a),
                      summary=a.get("summary", ""), created_at=float(a["created_at"]), updated_at=now)
        plan = plans.select(s.category, level)
        if plan is not None:
            _start_plan(s, plan, plans.version, now, out)
        _record(s, out, "raise", None, by=SYSTEM, ts=now, now=now)
        out.state = s
        for act in early:
            out.merge(on_act(out.state, act, now))
        return out
    s = state.model_copy(deep=True)
    out.state = s
    rose = _RANK[level] > _RANK[s.level]
    if rose:
        s.level = level
        s.summary = a.get("summary", s.summary)
        out.changed = True
    plan = plans.select(s.category, s.level)
    if plan is not None and plan.plan_id not in s.triggered:
        # A rise that selects another plan is new work for (maybe) another team: it needs its own ack.
        before = s.status
        s.round += 1
        _start_plan(s, plan, plans.version, now, out)
        s.status, s.closed_at = "open", None
        _record(s, out, "plan", before, by=SYSTEM, ts=now, now=now,
                reason=f"level rose to {s.level}: plan {plan.plan_id} applies")
    if out.changed:
        s.updated_at = now
    return out


def team_of(s: Lifecycle) -> str:
    """The team answerable for an alert now: the plan's owner, its escalation team once escalated, else 'none'."""
    if s.plan is None:
        return "none"
    return s.plan.escalation_team if s.escalated else s.plan.owner_team


def on_act(state: Lifecycle | None, act: AckEvent, now: float) -> Outcome:
    """Apply an act (acknowledge, assign, note, resolve, reopen); refused acts are audited, not applied."""
    ts = act.ts.timestamp()
    if state is None or not state.known:
        # The warning may still be on its way (after an outage both topics are read at once): hold the act.
        s = state.model_copy(deep=True) if state is not None else Lifecycle(alert_id=act.alert_id, known=False,
                                                                           updated_at=now)
        if act not in s.early and len(s.early) < MAX_EARLY_ACTS:
            s.early.append(act)
        return Outcome(s, changed=True)
    s = state.model_copy(deep=True)
    out = Outcome(s)
    before = s.status
    kw: dict[str, Any] = {"by": act.by, "ts": ts, "now": now, "note": act.note, "via": act.via}

    def refuse(reason: str) -> Outcome:
        _record(s, out, act.action, before, outcome="rejected", reason=reason, verdict=act.verdict, **kw)
        out.changed = False
        return out

    if act.action == "ack":
        if before == "acknowledged":
            return out  # a repeat (or a redelivery): nothing new happened
        if before not in ACTIVE:
            return refuse(f"alert is {before}; reopen it before acknowledging")
        s.status, s.acked_by, s.acked_at = "acknowledged", act.by, ts
        out.ack_seconds.append(max(ts - s.opened_at, 0.0))
        out.case_times.append(("ack", team_of(s), max(ts - s.opened_at, 0.0)))
        _record(s, out, "ack", before, **kw)
    elif act.action == "assign":
        if s.assignee == act.assignee:
            return out  # a repeat (or a redelivery)
        if before not in ACTIVE:
            return refuse(f"alert is {before}; reopen it before assigning it")
        s.assignee = act.assignee
        _record(s, out, "assign", before, assignee=act.assignee, **kw)
    elif act.action == "note":
        # A note changes no status, so a redelivered one is recognised by its content, author and time.
        digest = hashlib.sha256(f"{act.by}|{ts}|{act.note}".encode()).hexdigest()[:16]
        if digest in s.note_keys:
            return out
        s.note_keys = [*s.note_keys, digest][-MAX_NOTE_KEYS:]
        _record(s, out, "note", before, **kw)
    else:
        act_on = _resolve if act.action == "resolve" else _reopen
        why = act_on(s, out, act, before, now, kw)
        if why is not None:
            return refuse(why) if why else out
    s.updated_at = now
    return out


def _resolve(s: Lifecycle, out: Outcome, act: AckEvent, before: Status, now: float, kw: dict[str, Any]) -> str | None:
    """Resolve the alert with the act's verdict; None when applied, "" for a repeat, else why it is refused."""
    ts = kw["ts"]
    if before == "resolved":
        if s.resolved_by == act.by and s.verdict == act.verdict:
            return ""
        return f"alert was already resolved by {s.resolved_by}; reopen it to change the verdict"
    s.status, s.resolved_by, s.resolved_at, s.verdict, s.closed_at = "resolved", act.by, ts, act.verdict, now
    if s.acked_at is None:
        # Resolving is also the first acknowledgement: time to act is what supervision measures.
        out.ack_seconds.append(max(ts - s.opened_at, 0.0))
        out.case_times.append(("ack", team_of(s), max(ts - s.opened_at, 0.0)))
        s.acked_by, s.acked_at = act.by, ts
    out.case_times.append(("resolve", team_of(s), max(ts - s.opened_at, 0.0)))
    if act.verdict is not None:
        out.verdicts.append((s.detector or "unknown", act.verdict))
        note = note_for(s.alert_id, s.detector, s.codes, act.verdict, ts, by=act.by)
        if note is not None:
            out.feedback.append(note)
    _record(s, out, "resolve", before, verdict=act.verdict, **kw)
    return None


def _reopen(s: Lifecycle, out: Outcome, act: AckEvent, before: Status, now: float, kw: dict[str, Any]) -> str | None:
    """Open a resolved or expired alert again, with fresh deadlines; None when applied, else why it is refused."""
    if before in ACTIVE:
        return f"alert is {before}, not resolved or expired; nothing to reopen"
    ack_within = s.plan.ack_within if s.plan else 0.0
    resolve_within = s.plan.resolve_within if s.plan else 0.0
    s.status, s.closed_at, s.round = "open", None, s.round + 1
    s.resolved_by = s.resolved_at = s.verdict = s.acked_by = s.acked_at = None
    s.opened_at, s.escalated, s.escalation_level, s.overdue = now, False, None, False
    if s.plan is not None:
        s.ack_deadline, s.resolve_deadline = now + ack_within, now + resolve_within
    _record(s, out, "reopen", before, **kw)
    return None


def tick(state: Lifecycle, now: float, expire_after: float = 7 * 86_400.0) -> Outcome:
    """Advance the clock: escalate once a missed ack deadline, flag overdue plans, expire, forget.

    `expire_after` is both how long an unresolved alert stays past its resolution deadline before
    it expires, and how long a closed alert is kept before it is forgotten.
    """
    out = Outcome(state)
    if not state.known:
        if now - state.updated_at >= ORPHAN_TTL:
            out.state, out.changed, out.given_up = None, True, list(state.early)
        return out
    s = state.model_copy(deep=True)
    out.state = s
    if s.status == "open" and s.ack_deadline is not None and now >= s.ack_deadline and not s.escalated:
        plan = s.plan
        assert plan is not None  # deadlines exist only with a plan
        s.escalated, s.escalation_level, s.status = True, next_level(s.level), "escalated"  # type: ignore[assignment]
        trig = make_trigger(plan, s.plans_version, alert_id=s.alert_id, level=s.escalation_level or s.level,
                            category=s.category, entity_type=s.entity_type, entity_id=s.entity_id,
                            opened_at=_utc(now), kind="escalation", ack_deadline=_utc(now + plan.ack_within),
                            resolve_deadline=_utc(s.resolve_deadline or now + plan.resolve_within), round=s.round)
        out.triggers.append(trig)
        _record(s, out, "escalate", "open", by=SYSTEM, ts=now, now=now,
                reason=f"not acknowledged within {plan.ack_within:g}s: escalated to {plan.escalation_team}")
    if s.active and s.resolve_deadline is not None and now >= s.resolve_deadline:
        if not s.overdue:
            s.overdue = True
            _record(s, out, "overdue", s.status, by=SYSTEM, ts=now, now=now,
                    reason="resolution deadline passed without a resolution")
        if now >= s.resolve_deadline + expire_after:
            before = s.status
            s.status, s.closed_at = "expired", now
            _record(s, out, "expire", before, by=SYSTEM, ts=now, now=now,
                    reason=f"unresolved {expire_after:g}s past the resolution deadline")
    elif not s.active and s.closed_at is not None and now >= s.closed_at + expire_after and not pending_pages(s):
        out.state, out.changed = None, True
    if out.changed and out.state is not None:
        s.updated_at = now
    return out


def next_due(s: Lifecycle, expire_after: float = 7 * 86_400.0) -> float | None:
    """The earliest time at which `tick` would change this state (None: only an input can)."""
    if not s.known:
        return s.updated_at + ORPHAN_TTL
    times: list[float] = []
    if s.active and s.resolve_deadline is not None:
        if s.status == "open" and s.ack_deadline is not None and not s.escalated:
            times.append(s.ack_deadline)
        times.append(s.resolve_deadline + (expire_after if s.overdue else 0.0))
    elif not s.active and s.closed_at is not None:
        times.append(s.closed_at + expire_after)
    return min(times) if times else None


__all__ = [
    "ACTIVE",
    "AckEvent",
    "AuditRecord",
    "Lifecycle",
    "Outcome",
    "decode_act",
    "make_act",
    "next_due",
    "on_act",
    "on_alert",
    "team_of",
    "tick",
]
