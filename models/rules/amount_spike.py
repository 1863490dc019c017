"""Amount spike: an external debit far above both the account's usual amount and its largest recent one."""

from __future__ import annotations

import math

from pydantic import Field

from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason


class AmountSpikeParams(RuleParams):
    """An external debit far above both the account's usual amount and the largest it made lately."""

    min_multiple: float = Field(10.0, ge=1, description="the amount, in multiples of the account's usual debit "
                                                        "of this type")
    min_over_max: float = Field(3.0, ge=1, description="and in multiples of the largest of its last 24 debits "
                                                       "(each against its own type)")


@register
class AmountSpike(TxnRule):
    """`min_multiple` x the account's usual amount for the type and `min_over_max` x its largest recent debit."""

    type = "amount_spike"
    Params = AmountSpikeParams
    order = 70
    adaptive = True
    external_only = True

    def setup(self) -> None:
        # In the log units the account's amounts are kept in: most debits stop at this comparison.
        self.lmed = math.log(self.p.min_multiple / self.fb_max)
        self.lmax = math.log(self.p.min_over_max)

    def gate(self, ev: Event) -> bool:
        return ev.history >= 3 and ev.lg_amount - ev.state.log_med >= self.lmed

    def check(self, ev: Event) -> list[Reason] | None:
        st = ev.state
        over = ev.lg_amount - max(st.log_amounts)
        if over < self.lmax:
            return None
        to_usual, to_max = math.exp(ev.lg_amount - st.log_med), math.exp(over)
        need = self.need(self.p.min_multiple)
        if to_usual < need:
            return None
        txn = ev.txn
        return [Reason(code="amount_spike",
                       message=f"{txn.txn_type} of {txn.currency} {txn.amount:,.2f}: {to_usual:.1f}x this "
                               f"account's usual and {to_max:.1f}x the largest of its recent debits",
                       value=round(to_usual, 4), threshold=need)]
