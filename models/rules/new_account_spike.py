"""New-account spike: a debit far above everything an account too young for a usual amount has sent."""

from __future__ import annotations

import math

from pydantic import Field

from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason


class NewAccountSpikeParams(RuleParams):
    """How far above its few earlier debits a young account's debit must be, and how few is young."""

    min_multiple: float = Field(20.0, ge=1, description="the amount, in multiples of the largest earlier debit "
                                                        "(each against its own type)")
    min_debits: int = Field(2, ge=1, le=2, description="earlier debits needed: one says nothing of a habit (a "
                                                       "first payment is often a small test)")


@register
class NewAccountSpike(TxnRule):
    """While an account has fewer than the 3 debits amount_spike needs, `min_multiple` x all of its earlier ones."""

    type = "new_account_spike"
    Params = NewAccountSpikeParams
    order = 71
    adaptive = True
    external_only = True

    def setup(self) -> None:
        self.lmul = math.log(self.p.min_multiple / self.fb_max)
        self.young = self.p.min_debits

    def gate(self, ev: Event) -> bool:
        # Three debits make a usual amount (models.features.learn); from then on amount_spike judges.
        return self.young <= ev.history < 3 and ev.lg_amount - max(ev.state.log_amounts) >= self.lmul

    def check(self, ev: Event) -> list[Reason] | None:
        over = math.exp(ev.lg_amount - max(ev.state.log_amounts))
        need = self.need(self.p.min_multiple)
        if over < need:
            return None
        txn = ev.txn
        return [Reason(code="new_account_spike",
                       message=f"{txn.txn_type} of {txn.currency} {txn.amount:,.2f}: {over:.1f}x the largest of the "
                               f"{ev.history} debits this young account made before",
                       value=round(over, 4), threshold=need)]
