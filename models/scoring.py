"""Score one transaction: features, the River detector and the rules, into findings and warnings."""

from __future__ import annotations

import math
from collections.abc import Callable, MutableMapping
from dataclasses import dataclass, field, replace

from app.schemas import Alert, Reason, Transaction
from models.detector import SurpriseDetector, explain, surprises
from models.features import AccountState, TxnFeatures, learn, observe, stable_hash
from models.findings import Finding, open_or_update, to_alert
from models.rules import (
    AnomalyParams,
    Catalogue,
    FundIsolationParams,
    LargeTransactionParams,
    StructuringParams,
    VelocityParams,
)

# Where a rule hit sits on the calibrated scale. Medium and low rules (reporting duties such as
# large transactions) stay below the model threshold; high and critical rule hits sit above it,
# because deterministic evidence of fraud outranks any model rank.
LEVEL_SCORE = {"low": 0.9, "medium": 0.95}
RECENT_IDS = 16


@dataclass(slots=True)
class TxnOutcome:
    """What scoring one transaction produced."""

    event_id: str
    score: float
    raw: float
    findings: list[Finding] = field(default_factory=list)
    alerts: list[Alert] = field(default_factory=list)
    new_ids: list[str] = field(default_factory=list)
    dropped: list[str] = field(default_factory=list)
    duplicate: bool = False
    late: bool = False


class StormCap:
    """Caps new warnings per category per event-time minute, so one incident cannot bury on-call."""

    __slots__ = ("cap", "counts")

    def __init__(self, cap: int) -> None:
        self.cap = cap
        self.counts: dict[tuple[str, int], int] = {}

    def admit(self, category: str, ts: float) -> bool:
        """Count a new warning; False once the category's cap for that minute is used up."""
        minute = int(ts // 60)
        key = (category, minute)
        n = self.counts.get(key, 0)
        if n >= self.cap:
            return False
        self.counts[key] = n + 1
        if len(self.counts) > 4096:
            for k in [k for k in self.counts if k[1] < minute - 5]:
                del self.counts[k]
        return True


class TransactionScorer:
    """Scores transactions against their account's state; the same object serves worker and replay."""

    def __init__(self, catalogue: Catalogue, detector: SurpriseDetector | None = None, *,
                 cooldown: float = 1800.0, storm_cap: int = 200, allowed_lateness: float = 3600.0,
                 on_finding: Callable[[Finding], None] | None = None) -> None:
        self.detector = detector if detector is not None else SurpriseDetector()
        self.cooldown = cooldown
        self.allowed_lateness = allowed_lateness
        self.storm = StormCap(storm_cap)
        self.on_finding = on_finding
        self.set_catalogue(catalogue)

    def set_catalogue(self, catalogue: Catalogue) -> None:
        """Apply a (validated) rule catalogue; takes effect with the next event."""
        self.catalogue = catalogue
        c = catalogue
        self._large = c.params("large_transaction", LargeTransactionParams)
        self._struct = c.params("structuring", StructuringParams)
        self._fund = c.params("fund_isolation", FundIsolationParams)
        self._vel = c.params("velocity", VelocityParams)
        self._anom = c.params("anomaly", AnomalyParams)
        self._on = {rid for rid in c.rules if c.rule(rid) is not None}
        self._threshold = 1.0 - self._anom.target_alert_rate
        # Structuring is a day-long pattern: its debits hours apart are one case, not several.
        self._cooldowns = {"structuring": self._struct.window_seconds}

    @property
    def threshold(self) -> float:
        """Calibrated score at or above which the model may warn."""
        return self._threshold

    def process(self, txn: Transaction, state: AccountState, ts: float | None = None) -> TxnOutcome:
        """Score, then learn; mutates `state` and returns the findings and warnings to publish."""
        if ts is None:
            ts = txn.ts.timestamp()
        eid = stable_hash(txn.event_id)
        if eid in state.recent_ids:
            return TxnOutcome(txn.event_id, 0.0, 0.0, duplicate=True)
        debit = txn.direction == "debit"
        hour = txn.ts.hour
        f = observe(state, ts, txn.amount, debit, txn.counterparty_id, txn.device_id, hour, txn.txn_type)
        x = surprises(f)
        det = self.detector
        raw = det.raw(x)
        cal = det.score_raw(raw)
        if f.history < self._anom.entity_warmup or det.seen < self._anom.global_warmup:
            # A cold model may rank but not alarm: its scores stay below the alert threshold.
            cal *= self._threshold * (1.0 - 1e-9)
        near = debit and self._is_near(txn)
        findings = self._rules(txn, f, ts, debit, near, state)
        if cal >= self._threshold:
            model = self._model(txn, f, x, raw, cal, hour)
            if model is not None:
                findings.append(model)
        score = cal
        for fd in findings:
            if fd.score > score:
                score = fd.score
        late = state.n > 0 and ts < state.last_ts - self.allowed_lateness
        if not late:
            # Late events are scored but not learned: they would corrupt windows already moved past.
            det.learn_raw(raw)
            learn(state, f)
            if near:
                state.near_ts.append(ts)
                while state.near_ts and (ts - state.near_ts[0] > self._struct.window_seconds
                                         or len(state.near_ts) > 32):
                    del state.near_ts[0]
        state.recent_ids.append(eid)
        if len(state.recent_ids) > RECENT_IDS:
            del state.recent_ids[0]
        out = TxnOutcome(txn.event_id, score, raw, findings, late=late)
        if findings:
            self._alerts(out, state, ts, txn.event_id)
        return out

    def _finding(self, rule_id: str, entity_id: str, reasons: list[Reason]) -> Finding:
        r = self.catalogue.rules[rule_id]
        score = 1.0 if r.level == "critical" else LEVEL_SCORE.get(r.level, 1.0 - (1.0 - self._threshold) / 2)
        return Finding(category=r.category, level=r.level, score=score, detector=f"rule:{rule_id}",
                       reasons=reasons, entity_type="account", entity_id=entity_id)

    def _is_near(self, txn: Transaction) -> bool:
        t = self._large.threshold(txn.currency)
        return self._struct.lower_fraction * t <= txn.amount < t

    def _rules(self, txn: Transaction, f: TxnFeatures, ts: float, debit: bool, near: bool,
               state: AccountState) -> list[Finding]:
        on = self._on
        out: list[Finding] = []
        acct = txn.account_id

        def hit(rule_id: str, reasons: list[Reason]) -> None:
            out.append(self._finding(rule_id, acct, reasons))

        if debit and "fund_isolation" in on and txn.account_kind in self._fund.from_kinds \
                and txn.counterparty_kind in self._fund.to_kinds:
            hit("fund_isolation", [Reason(
                code="fund_isolation",
                message=f"{txn.currency} {txn.amount:,.2f} moved from {txn.account_kind} account {acct} "
                        f"to {txn.counterparty_kind} account {txn.counterparty_id}",
                value=txn.amount)])
        threshold = self._large.threshold(txn.currency)
        if "large_transaction" in on and txn.amount >= threshold:
            hit("large_transaction", [Reason(
                code="large_transaction",
                message=f"{txn.txn_type} of {txn.currency} {txn.amount:,.2f}, at or above the "
                        f"{txn.currency} {threshold:,.0f} reporting threshold",
                value=txn.amount, threshold=threshold)])
        if near and "structuring" in on:
            window = self._struct.window_seconds
            n = 1 + sum(1 for t in state.near_ts if ts - t <= window)
            if n >= self._struct.min_count:
                hit("structuring", [Reason(
                    code="structuring",
                    message=f"{n} debits within {window / 3600:.0f} h each just under the "
                            f"{txn.currency} {threshold:,.0f} reporting threshold",
                    value=float(n), threshold=float(self._struct.min_count))])
        if debit and f.debits_10m > 1 and "velocity" in on:
            v = self._vel
            if f.debits_10m >= v.min_debits and f.debits_10m >= v.min_ratio * f.expected_10m:
                usual = max(1, math.ceil(f.expected_10m))
                hit("velocity", [Reason(
                    code="velocity",
                    message=f"{f.debits_10m} debits in 10 minutes (usual: at most {usual})",
                    value=float(f.debits_10m), threshold=float(v.min_debits))])
        return out

    def _model(self, txn: Transaction, f: TxnFeatures, x: dict[str, float], raw: float, cal: float,
               hour: int) -> Finding | None:
        rule = self.catalogue.rule("anomaly")
        p = self._anom
        if rule is None or f.history < p.entity_warmup or self.detector.seen < p.global_warmup:
            return None
        if cal < self.threshold or raw < p.min_evidence:
            return None
        level = "high" if raw >= p.high_evidence else rule.level
        reasons = [Reason(code=code, message=msg, value=round(val, 4),
                          threshold=None if base is None else round(base, 4))
                   for code, msg, val, base in explain(x, f, txn.currency, hour)]
        return Finding(category=rule.category, level=level, score=cal, detector="surprise",
                       reasons=reasons, entity_type="account", entity_id=txn.account_id)

    def _alerts(self, out: TxnOutcome, state: AccountState, ts: float, event_id: str) -> None:
        for fd in out.findings:
            if self.on_finding is not None:
                self.on_finding(fd)
            prev = state.alerts.get(fd.category)
            alert_id, ids, is_new = open_or_update(state.alerts, fd, ts, event_id, self.cooldown,
                                                   cooldowns=self._cooldowns)
            if is_new and not self.storm.admit(fd.category, ts):
                del state.alerts[fd.category]
                if prev is not None:
                    state.alerts[fd.category] = prev
                out.dropped.append(fd.category)
                continue
            # An update never lowers the level an ongoing warning already reached.
            fd = replace(fd, level=state.alerts[fd.category][3])
            if is_new:
                out.new_ids.append(alert_id)
            out.alerts.append(to_alert(fd, alert_id, ids, created_at=ts, event_ts=ts))


def evict_idle(states: MutableMapping[str, AccountState], now: float, ttl: float,
               keys: list[str] | None = None) -> int:
    """Delete entities idle for longer than `ttl` (checking `keys` only, when given); returns how many."""
    stale = [k for k in (keys if keys is not None else list(states)) if
             (s := states.get(k)) is not None and now - s.last_ts > ttl]
    for k in stale:
        del states[k]
    return len(stale)


__all__ = ["LEVEL_SCORE", "StormCap", "TransactionScorer", "TxnOutcome", "evict_idle"]
