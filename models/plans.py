"""The contingency-plan catalogue: which plan answers a warning, and the trigger that puts it in motion.

A plan maps (category, minimum level) to what must be done, by whom and by when. The catalogue
is a versioned YAML file (deploy/plans.yaml) validated at load; a warning selects the plan of its
category with the highest `min_level` at or below its own level, falling back to a `*` plan.

>>> cat = parse_plans('''
... version: 1
... plans:
...   fund-isolation:
...     title: Freeze and report
...     category: fund_isolation
...     min_level: low
...     actions: [freeze_account, notify_compliance, page_oncall]
...     owner_team: compliance
...     ack_within: 5m
...     resolve_within: 4h
...     runbook: docs/disposal.md#fund-isolation
... ''')
>>> cat.select("fund_isolation", "critical").plan_id
'fund-isolation'
>>> cat.select("velocity", "high") is None
True
>>> trigger_id("39420a2727473c06d8dc4e5e", "fund-isolation") == trigger_id("39420a2727473c06d8dc4e5e", "fund-isolation")
True
"""

from __future__ import annotations

import hashlib
import re
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, field_validator, model_validator

from deploy import resource
from models.schemas import LEVELS, Level
from models.yamlconf import parse_yaml_model, read_text

# What a plan may ask people (or systems) to do; a typo in the catalogue must fail at load, not
# surface as an action nobody recognises in the middle of an incident.
ACTIONS: frozenset[str] = frozenset({
    "freeze_account",
    "block_card",
    "hold_withdrawals",
    "notify_compliance",
    "file_large_transaction_report",
    "file_suspicious_transaction_report",
    "page_oncall",
    "raise_margin_requirements",
    "review_account",
    "review_transaction",
    "contact_customer",
    "notify_treasury",
    "activate_liquidity_reserve",
    "notify_management",
    "review_instrument",
    "review_exposure",
    "suspend_product_sales",
    "triage_warning",
})
WILDCARD = "*"
_RANK = {name: i for i, name in enumerate(LEVELS)}
_DURATION = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(s|m|h|d)\s*$")
_UNIT = {"s": 1.0, "m": 60.0, "h": 3600.0, "d": 86400.0}
DEFAULT_PLANS = resource("plans.yaml")
TriggerKind = Literal["plan", "escalation"]


def parse_duration(value: Any) -> float:
    """Seconds from a number or a string such as '90s', '15m', '4h', '1d'.

    >>> parse_duration("15m"), parse_duration(30), parse_duration("1.5h")
    (900.0, 30.0, 5400.0)
    """
    if isinstance(value, bool):
        raise ValueError("a duration must be a number of seconds or a string like '15m'")
    if isinstance(value, int | float):
        seconds = float(value)
    elif isinstance(value, str) and (m := _DURATION.match(value)):
        seconds = float(m.group(1)) * _UNIT[m.group(2)]
    else:
        raise ValueError(f"{value!r} is not a duration: write seconds or '<number><s|m|h|d>', e.g. '15m'")
    if not seconds > 0:
        raise ValueError(f"{value!r}: a duration must be positive")
    return seconds


def next_level(level: str) -> str:
    """The level one step more severe (critical stays critical)."""
    return LEVELS[min(_RANK.get(level, 0) + 1, len(LEVELS) - 1)]


def level_at_least(level: str, minimum: str) -> bool:
    """True when `level` is `minimum` or more severe."""
    return _RANK.get(level, -1) >= _RANK.get(minimum, len(LEVELS))


class Plan(BaseModel):
    """One contingency plan: what to do about a kind of warning, who owns it, and the deadlines."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    plan_id: str = Field(pattern=r"^[a-z0-9][a-z0-9_.-]{0,63}$")
    title: str = Field(min_length=1, max_length=200)
    category: str = Field(pattern=r"^(\*|[a-z][a-z0-9_]{0,63})$")
    min_level: Level = "low"
    actions: list[str] = Field(min_length=1, max_length=20)
    owner_team: str = Field(pattern=r"^[a-z][a-z0-9-]{0,63}$")
    escalation_team: str = Field("risk-duty", pattern=r"^[a-z][a-z0-9-]{0,63}$")
    escalation_actions: list[str] = Field(default_factory=lambda: ["page_oncall", "notify_management"],
                                          min_length=1, max_length=20)
    ack_within: float = Field(description="Seconds from the trigger to the acknowledgement deadline")
    resolve_within: float = Field(description="Seconds from the trigger to the resolution deadline")
    runbook: str = Field(min_length=1, max_length=512)

    @field_validator("ack_within", "resolve_within", mode="before")
    @classmethod
    def _duration(cls, value: Any) -> float:
        return parse_duration(value)

    @field_validator("actions", "escalation_actions")
    @classmethod
    def _known_actions(cls, actions: list[str]) -> list[str]:
        unknown = [a for a in actions if a not in ACTIONS]
        if unknown:
            raise ValueError(f"unknown action {unknown[0]!r}; known actions: {', '.join(sorted(ACTIONS))}")
        if len(set(actions)) != len(actions):
            raise ValueError("an action is listed twice")
        return actions

    @model_validator(mode="after")
    def _deadlines_in_order(self) -> Plan:
        if self.resolve_within < self.ack_within:
            raise ValueError(f"resolve_within ({self.resolve_within:g}s) is shorter than ack_within "
                             f"({self.ack_within:g}s): a plan cannot be resolved before it is acknowledged")
        return self


class PlanCatalogue(BaseModel):
    """A versioned set of plans with at most one plan per (category, min_level)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    plans: dict[str, Plan]

    @model_validator(mode="before")
    @classmethod
    def _ids_from_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("plans"), dict):
            plans = {}
            for k, v in data["plans"].items():
                if not isinstance(v, dict):
                    raise ValueError(f"plan {k!r} must be a mapping of fields")
                plans[k] = {**v, "plan_id": k}
            data = {**data, "plans": plans}
        return data

    @model_validator(mode="after")
    def _unique_matches(self) -> PlanCatalogue:
        seen: dict[tuple[str, str], str] = {}
        for p in self.plans.values():
            key = (p.category, p.min_level)
            if key in seen:
                raise ValueError(f"plans {seen[key]!r} and {p.plan_id!r} both match category {p.category!r} "
                                 f"from level {p.min_level!r}; keep one")
            seen[key] = p.plan_id
        return self

    def select(self, category: str, level: str) -> Plan | None:
        """The plan for a warning: its category's plan with the highest min_level <= level, else `*`'s."""
        for cat in (category, WILDCARD):
            best: Plan | None = None
            for p in self.plans.values():
                if p.category == cat and level_at_least(level, p.min_level) and (
                        best is None or _RANK[p.min_level] > _RANK[best.min_level]):
                    best = p
            if best is not None:
                return best
        return None

    def uncovered(self, categories: dict[str, str]) -> list[str]:
        """Categories (with the lowest level they are raised at) that no plan answers."""
        return [c for c, lvl in sorted(categories.items()) if self.select(c, lvl) is None]

    def teams(self) -> set[str]:
        """Every team a plan pages: owners and escalation teams."""
        return {p.owner_team for p in self.plans.values()} | {p.escalation_team for p in self.plans.values()}


class Trigger(BaseModel):
    """A contingency trigger on risk.contingency (key entity_id): one plan set in motion for one alert."""

    model_config = ConfigDict(extra="ignore", frozen=True)

    trigger_id: str
    kind: TriggerKind = "plan"
    alert_id: str
    plan_id: str
    plans_version: int
    title: str
    actions: list[str]
    owner_team: str
    level: Level
    category: str
    entity_type: str
    entity_id: str
    opened_at: AwareDatetime
    ack_deadline: AwareDatetime
    resolve_deadline: AwareDatetime
    runbook: str
    escalation_of: str | None = Field(None, description="trigger_id of the plan trigger this escalates")


def trigger_id(alert_id: str, plan_id: str, kind: str = "plan") -> str:
    """Deterministic id of the trigger of `plan_id` for `alert_id`: redelivery cannot make a second one."""
    return hashlib.sha256(f"{alert_id}|{plan_id}|{kind}".encode()).hexdigest()[:24]


def make_trigger(plan: Plan, version: int, *, alert_id: str, level: str, category: str, entity_type: str,
                 entity_id: str, opened_at: datetime, kind: TriggerKind = "plan",
                 ack_deadline: datetime | None = None, resolve_deadline: datetime | None = None,
                 round: int = 0) -> Trigger:
    """The trigger message for a plan (kind 'plan') or its escalation (kind 'escalation').

    `round` counts reopenings and plan changes of the alert: each may escalate once, under its own id.
    """
    escalation = kind == "escalation"
    return Trigger(
        trigger_id=trigger_id(alert_id, plan.plan_id, kind if round == 0 else f"{kind}-{round}"),
        kind=kind,
        alert_id=alert_id,
        plan_id=plan.plan_id,
        plans_version=version,
        title=f"Escalation: {plan.title}" if escalation else plan.title,
        actions=list(plan.escalation_actions if escalation else plan.actions),
        owner_team=plan.escalation_team if escalation else plan.owner_team,
        level=level,  # type: ignore[arg-type]  # pydantic checks the Literal
        category=category,
        entity_type=entity_type,
        entity_id=entity_id,
        opened_at=opened_at,
        ack_deadline=ack_deadline or opened_at + timedelta(seconds=plan.ack_within),
        resolve_deadline=resolve_deadline or opened_at + timedelta(seconds=plan.resolve_within),
        runbook=plan.runbook,
        escalation_of=trigger_id(alert_id, plan.plan_id) if escalation else None,
    )


def parse_plans(text: str | bytes, source: str = "plans") -> PlanCatalogue:
    """Validate plan-catalogue YAML text; ConfigError names the plan, field and problem."""
    return parse_yaml_model(text, PlanCatalogue, source, "'version' and 'plans'", "the plan catalogue was not loaded")


def load_plans(path: Path | str | None = None) -> PlanCatalogue:
    """Read and validate a plan-catalogue file (the shipped deploy/plans.yaml by default)."""
    p = Path(path) if path else DEFAULT_PLANS
    return parse_plans(read_text(p, "plans", "RISKWATCH_PLANS_FILE"), str(p))


__all__ = [
    "ACTIONS",
    "DEFAULT_PLANS",
    "Plan",
    "PlanCatalogue",
    "Trigger",
    "level_at_least",
    "load_plans",
    "make_trigger",
    "next_level",
    "parse_duration",
    "parse_plans",
    "trigger_id",
]
