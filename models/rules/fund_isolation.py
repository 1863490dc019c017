"""Fund isolation: customer money in a segregated account sent to an account the platform owns."""

from __future__ import annotations

from pydantic import Field

from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason


class FundIsolationParams(RuleParams):
    """Which account kinds must never send money to which counterparty kinds."""

    from_kinds: list[str] = Field(default_factory=lambda: ["custody"])
    to_kinds: list[str] = Field(default_factory=lambda: ["platform_own"])


@register
class FundIsolation(TxnRule):
    """A debit from a `from_kinds` account to a `to_kinds` counterparty; a regulator requires it."""

    type = "fund_isolation"
    Params = FundIsolationParams
    order = 10
    required = True

    def setup(self) -> None:
        self.account_kinds = frozenset(self.p.from_kinds)
        self.to_kinds = frozenset(self.p.to_kinds)

    def gate(self, ev: Event) -> bool:
        return ev.txn.counterparty_kind in self.to_kinds

    def check(self, ev: Event) -> list[Reason] | None:
        txn = ev.txn
        return [Reason(code="fund_isolation",
                       message=f"{txn.currency} {txn.amount:,.2f} moved from {txn.account_kind} account "
                               f"{txn.account_id} to {txn.counterparty_kind} account {txn.counterparty_id}",
                       value=txn.amount)]
