"""Pass-through: money just received from new counterparties sent on at once, a money mule's pattern."""

from __future__ import annotations

from pydantic import Field

from models.features import INFLOW_SECONDS, ONWARD_TYPES, faded
from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason


class PassThroughParams(RuleParams):
    """Money mule pass-through: an external debit mostly paid from money just received from new counterparties."""

    min_share: float = Field(0.5, gt=0, le=1, description="share of the debit covered by that recent inflow")
    min_multiple: float = Field(5.0, ge=1, description="the amount passed on, in multiples of the account's usual "
                                                       "debit of this type")
    min_passed: float = Field(0.8, gt=0, le=1, description="a split pass-through (several debits, the sum judged) "
                                                           "counts once this share of that inflow has gone out")


@register
class PassThrough(TxnRule):
    """An external debit at least `min_share` paid from recent inflow of new payers, `min_multiple` times usual.

    Its state is the account's faded inflow from new counterparties (AccountState.in_new), which
    the model's pass-through surprise keeps too.
    """

    type = "pass_through"
    Params = PassThroughParams
    order = 50
    adaptive = True
    external_only = True

    def gate(self, ev: Event) -> bool:
        return ev.inflow > 0.0 and ev.history >= 3

    def check(self, ev: Event) -> list[Reason] | None:
        p, txn = self.p, ev.txn
        amount, inflow, usual = txn.amount, ev.inflow, ev.usual
        sent = amount if amount < inflow else inflow
        if sent < p.min_share * amount:
            return None
        need = self.need(p.min_multiple)
        if sent >= need * usual:
            return [Reason(code="pass_through",
                           message=f"{txn.currency} {sent:,.2f} of this {txn.txn_type} passes on money received in "
                                   f"the last hours from counterparties this account never dealt with "
                                   f"({sent / usual:.1f}x its usual)",
                           value=round(sent / usual, 4), threshold=need)]
        # Split: what earlier transfers and withdrawals already passed on of the same inflow, faded alike,
        # plus this one (card payments spend received money; they do not pass it on).
        if txn.txn_type not in ONWARD_TYPES:
            return None
        st = ev.state
        before = faded(st.in_sent, ev.ts - st.in_ts, INFLOW_SECONDS)
        total = before + sent
        if before <= 0.0 or total < need * usual or total < p.min_passed * (before + inflow):
            return None
        # Both sums fade alike, so the share is exact and the multiple errs low.
        return [Reason(code="pass_through",
                       message=f"{total / (before + inflow):.0%} of the money counterparties this account never "
                               f"dealt with paid in lately has gone on, in this {txn.txn_type} and earlier debits "
                               f"({total / usual:.1f}x its usual)",
                       value=round(total / usual, 4), threshold=need)]
