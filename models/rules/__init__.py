"""The rules catalogue: a versioned YAML file of deterministic risk rules, validated at load.

Per-transaction rules are plug-ins, one module each in this package (see models/rules/base.py),
found here at import: adding one is its module, its catalogue entry and its test. The other rule
kinds (the model, lists, platform and market monitors) keep their parameters in their own modules.
"""

from __future__ import annotations

import importlib
import pkgutil
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from deploy import resource
from models.aggregates import LiquidityParams, MarketStressParams
from models.detector import WEIGHTS
from models.lists import ListsParams
from models.market import MarketParams
from models.rules.base import REGISTRY, Event, RuleParams, TxnRule, register
from models.schemas import Level
from models.yamlconf import parse_yaml_model, read_text

for _mod in pkgutil.iter_modules(__path__):
    if _mod.name != "base":
        importlib.import_module(f"{__name__}.{_mod.name}")

from models.rules.amount_spike import AmountSpikeParams  # noqa: E402 - the rule modules are imported above
from models.rules.dormant_reactivation import DormantParams  # noqa: E402
from models.rules.fund_isolation import FundIsolationParams  # noqa: E402
from models.rules.large_transaction import LargeTransactionParams  # noqa: E402
from models.rules.pass_through import PassThroughParams  # noqa: E402
from models.rules.structuring import StructuringParams  # noqa: E402
from models.rules.velocity import VelocityParams  # noqa: E402


class AnomalyParams(RuleParams):
    """The transaction model: how many warnings it may open, and when its score becomes one.

    The budget is in new warnings per 1,000 transactions: what a risk-ops lead staffs for
    (1,000,000 transactions a day at 2.0 is about 2,000 cases a day), and what each worker can
    count exactly for the partitions it scores. Each partition's detector learns the score at
    which it spends that budget (models.detector.SurpriseDetector.spend), so the rate reached
    follows the budget whatever the traffic's mix, instead of a fixed score cut.

    >>> AnomalyParams(target_alert_rate=0.004).budget
    0.004
    """

    budget_per_1000: float = Field(2.0, gt=0, le=100, description="new model warnings per 1,000 transactions")
    target_alert_rate: float | None = Field(
        None, gt=0, lt=0.5, description="deprecated (catalogues before version 2 of the budget): the budget as a "
                                        "share of transactions; used when budget_per_1000 is not given")
    categories: dict[str, str] = Field(
        default_factory=dict, description="lead reason code -> category of the model warning it leads, e.g. "
                                          "{tiny_burst: card_testing}; unlisted codes keep the rule's category")
    budgets: dict[str, float] = Field(
        default_factory=dict, description="category -> its own budget in new warnings per 1,000 transactions; "
                                          "a category not listed gets budget_per_1000")
    min_evidence: float = Field(0.0, ge=0, description="nats of surprise a warning needs at least (0: the budget "
                                                       "alone decides; docs/evaluation.md measures why)")
    high_evidence: float = Field(6.0, ge=0, description="nats of surprise that make a model warning 'high' "
                                                        "(docs/evaluation.md measures 5 to 8)")
    calibrate_below: float = Field(7.0, ge=0, description="nats of surprise from which an event is too unusual "
                                                         "to teach the calibration (docs/evaluation.md: 6, 7, 8)")
    entity_warmup: int = Field(3, ge=0, description="transactions an account needs before model warnings")
    global_warmup: int = Field(250, ge=0, description="events a partition's model needs before any warning")

    @model_validator(mode="after")
    def _known_codes(self) -> AnomalyParams:
        unknown = sorted(set(self.categories) - set(WEIGHTS))
        if unknown:
            raise ValueError(f"categories: unknown reason codes {unknown}; known: {', '.join(sorted(WEIGHTS))}")
        bad = sorted(k for k, v in self.budgets.items() if not 0 < v <= 100)
        if bad:
            raise ValueError(f"budgets: {bad} must be above 0 and at most 100 warnings per 1,000 transactions")
        return self

    @property
    def budget(self) -> float:
        """New model warnings per transaction (of the rule's own category, when budgets do not name it)."""
        if self.target_alert_rate is not None and "budget_per_1000" not in self.model_fields_set:
            return self.target_alert_rate
        return self.budget_per_1000 / 1000.0

    def budgets_for(self, category: str) -> dict[str, float]:
        """Per-event budget of every category the model warns in, `category` being the rule's own."""
        out = {category: self.budgets[category] / 1000.0 if category in self.budgets else self.budget}
        for cat in self.categories.values():
            out[cat] = self.budgets.get(cat, self.budget_per_1000) / 1000.0
        return out


# Rule kinds that are not per-transaction plug-ins: one entry each, its id its type.
SINGLETONS: dict[str, type[BaseModel]] = {
    "anomaly": AnomalyParams,
    "liquidity_run": LiquidityParams,
    "market_anomaly": MarketParams,
    "market_crash": MarketParams,
    "market_stress": MarketStressParams,
    "lists": ListsParams,
}
PARAMS: dict[str, type[BaseModel]] = {**{t: cls.Params for t, cls in REGISTRY.items()}, **SINGLETONS}
# Rules a regulator requires: analysts' verdicts never make them harder to raise (models.feedback).
REQUIRED_RULES = frozenset(t for t, cls in REGISTRY.items() if cls.required)
# Rules whose threshold analysts' verdicts move (models.feedback).
ADAPTIVE_RULES = frozenset(t for t, cls in REGISTRY.items() if cls.adaptive and not cls.required)


class Rule(BaseModel):
    """One catalogue entry: what it flags, how serious, with which parameters, in one sentence."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    id: str
    type: str = ""  # the rule type (models/rules/<type>.py); the id when not given
    category: str
    level: Level
    enabled: bool = True
    description: str = Field(min_length=1)
    params: Any = None

    @model_validator(mode="before")
    @classmethod
    def _typed_params(cls, data: Any) -> Any:
        if isinstance(data, dict):
            rid = data.get("id")
            kind = data.get("type") or rid
            # The registry as it is now, not as it was at import: a plug-in registered later is known.
            model = REGISTRY[kind].Params if kind in REGISTRY else SINGLETONS.get(str(kind))
            if model is None:
                what = f"rule type {kind!r} (of rule {rid!r})" if kind != rid else f"rule id {rid!r}"
                raise ValueError(f"unknown {what}; known types: {', '.join(sorted({*REGISTRY, *SINGLETONS}))}")
            if kind in SINGLETONS and kind != rid:
                raise ValueError(f"rule {rid!r}: a {kind} rule runs once, under its own id {kind!r}")
            data = {**data, "type": kind, "params": model.model_validate(data.get("params") or {})}
        return data


class Catalogue(BaseModel):
    """A versioned set of rules; a worker applies a new version only if it is newer and valid."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    version: int = Field(ge=1)
    rules: dict[str, Rule]

    @model_validator(mode="before")
    @classmethod
    def _ids_from_keys(cls, data: Any) -> Any:
        if isinstance(data, dict) and isinstance(data.get("rules"), dict):
            data = {**data, "rules": {k: {**(v or {}), "id": k} for k, v in data["rules"].items()}}
        return data

    @model_validator(mode="after")
    def _budgets_name_model_categories(self) -> Catalogue:
        anomaly = self.rules.get("anomaly")
        if anomaly is not None:
            p = anomaly.params
            known = {anomaly.category, *p.categories.values()}
            stray = sorted(set(p.budgets) - known)
            if stray:
                raise ValueError(f"anomaly.params.budgets names {stray}, which no model warning can have; "
                                 f"its categories are {sorted(known)}")
        return self

    def raised_categories(self) -> dict[str, str]:
        """Every category a warning can carry, with its rule's level: the lists rule raises in its lists'
        categories, the model also in the categories its reason codes are routed to."""
        out: dict[str, str] = {}
        for rid, r in self.rules.items():
            if rid == "lists":
                for d in r.params.lists.values():
                    if d.type != "allow":
                        out.setdefault(d.warn_category, d.warn_level)
                continue
            out.setdefault(r.category, r.level)
            if rid == "anomaly":
                for cat in r.params.categories.values():
                    out.setdefault(cat, r.level)
        return out

    def rule(self, rule_id: str) -> Rule | None:
        """The rule if present and enabled."""
        r = self.rules.get(rule_id)
        return r if r is not None and r.enabled else None

    def params(self, rule_id: str, kind: type[Any]) -> Any:
        """Parameters of a rule, or the defaults when the rule is absent."""
        r = self.rules.get(rule_id)
        return r.params if r is not None else kind()

    def txn_rules(self) -> list[Rule]:
        """The enabled per-transaction rules, in the order their findings are listed (type, then catalogue order)."""
        on = [r for r in self.rules.values() if r.enabled and r.type in REGISTRY]
        return sorted(on, key=lambda r: REGISTRY[r.type].order)

    def required_ids(self) -> frozenset[str]:
        """Ids of the rules a regulator requires (every instance of a required type)."""
        return frozenset(rid for rid, r in self.rules.items() if r.type in REQUIRED_RULES)


DEFAULT_RULES = resource("rules.yaml")


def parse_catalogue(text: str | bytes, source: str = "rules") -> Catalogue:
    """Validate catalogue YAML (or JSON) text; ConfigError names the rule, field and problem."""
    return parse_yaml_model(text, Catalogue, source, "'version' and 'rules'", "the catalogue was not applied")


def load_catalogue(path: Path | str | None = None) -> Catalogue:
    """Read and validate a catalogue file (the shipped deploy/rules.yaml by default)."""
    p = Path(path) if path else DEFAULT_RULES
    return parse_catalogue(read_text(p, "rules", "RISKWATCH_RULES_FILE"), str(p))


__all__ = [
    "ADAPTIVE_RULES",
    "DEFAULT_RULES",
    "PARAMS",
    "REGISTRY",
    "REQUIRED_RULES",
    "SINGLETONS",
    "AmountSpikeParams",
    "AnomalyParams",
    "Catalogue",
    "DormantParams",
    "Event",
    "FundIsolationParams",
    "LargeTransactionParams",
    "PassThroughParams",
    "Rule",
    "RuleParams",
    "StructuringParams",
    "TxnRule",
    "VelocityParams",
    "load_catalogue",
    "parse_catalogue",
    "register",
]
