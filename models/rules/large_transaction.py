"""Large transaction: one transaction at or above the currency's regulatory reporting threshold."""

from __future__ import annotations

import logging

from pydantic import Field

from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason

log = logging.getLogger(__name__)


class LargeTransactionParams(RuleParams):
    """Reporting thresholds in major units of the event currency."""

    default_threshold: float = Field(50_000.0, gt=0)
    thresholds: dict[str, float] = Field(default_factory=dict)

    def threshold(self, currency: str) -> float:
        """The reporting threshold for a currency."""
        return self.thresholds.get(currency, self.default_threshold)


@register
class LargeTransaction(TxnRule):
    """Any transaction, either direction, at or above the threshold; a regulator requires it."""

    type = "large_transaction"
    Params = LargeTransactionParams
    order = 20
    debit_only = False
    required = True

    def setup(self) -> None:
        self._limits: dict[str, float] = {}

    def limit(self, currency: str) -> float:
        """The threshold for a currency, looked up once per currency."""
        t = self._limits.get(currency)
        if t is None:
            t = self._limits[currency] = self.p.threshold(currency)
            if currency not in self.p.thresholds:
                # Once per currency: 50,000 is a CNY figure, far too low for JPY and too high for others,
                # and both this rule and structuring depend on it.
                log.warning("rule %s: no reporting threshold for %s; using the default %s %s. Set "
                            "rules.%s.params.thresholds.%s in the rule catalogue to your regulator's figure.",
                            self.id, currency, f"{t:,.0f}", currency, self.id, currency)
        return t

    def gate(self, ev: Event) -> bool:
        txn = ev.txn
        t = self._limits.get(txn.currency)
        return txn.amount >= (t if t is not None else self.limit(txn.currency))

    def check(self, ev: Event) -> list[Reason] | None:
        txn = ev.txn
        threshold = self.limit(txn.currency)
        return [Reason(code="large_transaction",
                       message=f"{txn.txn_type} of {txn.currency} {txn.amount:,.2f}, at or above the "
                               f"{txn.currency} {threshold:,.0f} reporting threshold",
                       value=txn.amount, threshold=threshold)]
