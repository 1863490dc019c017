"""Pass-through: money just received from new counterparties sent on at once, a money mule's pattern."""

from __future__ import annotations

from pydantic import Field

from models.features import INFLOW_SECONDS, ONWARD_TYPES, faded, payers_since
from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Level, Reason


class PassThroughParams(RuleParams):
    """Money mule pass-through: an external debit mostly paid from money just received from new counterparties."""

    min_share: float = Field(0.5, gt=0, le=1, description="share of the debit covered by that recent inflow")
    min_multiple: float = Field(5.0, ge=1, description="the amount passed on, in multiples of the account's usual "
                                                       "debit of this type")
    min_passed: float = Field(0.8, gt=0, le=1, description="a split pass-through (several debits, the sum judged) "
                                                           "counts once this share of that inflow has gone out")
    min_payers: int | None = Field(3, ge=2, description="when this many payments in came from counterparties the "
                                                        "account never dealt with (within the inflow window), "
                                                        "passing most of them on is enough at many_multiple, and "
                                                        "an account too young for a usual amount is judged too "
                                                        "(None: never)")
    many_multiple: float = Field(2.0, ge=1, description="the bar, in multiples of the usual debit, with that many "
                                                        "payers")
    many_share: float = Field(0.8, gt=0, le=1, description="and the share of what they paid in that has gone on")
    many_level: Level | None = Field("medium", description="the level of a hit found only by the payers' count "
                                                            "(None: the rule's level)")


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
        return ev.inflow > 0.0 and (ev.history >= 3 or self._many(ev))

    def _many(self, ev: Event) -> bool:
        return self.p.min_payers is not None and payers_since(ev.state, ev.ts)[0] >= self.p.min_payers

    def setup(self) -> None:
        self._by_count = False  # whether this event's hit came from the payers' count alone (level_for)

    def check(self, ev: Event) -> list[Reason] | None:
        sent = min(ev.txn.amount, ev.inflow)
        found = self._against_usual(ev, sent) if ev.history >= 3 else None
        self._by_count = False
        if found is None:
            found = self._many_payers(ev, sent)
            self._by_count = found is not None
        return found

    def level_for(self, ev: Event) -> str | None:
        """`many_level` for a hit the payers' count found: the weaker evidence (measured: about one false
        hit a day per 1,500 accounts on an independent stream whose customers pay each other often)."""
        return self.p.many_level if self._by_count else None

    def _against_usual(self, ev: Event, sent: float) -> list[Reason] | None:
        """`min_multiple` x the usual debit passed on, in this debit or with the earlier ones."""
        p, txn = self.p, ev.txn
        amount, inflow, usual = txn.amount, ev.inflow, ev.usual
        need = self.need(p.min_multiple)
        if sent >= p.min_share * amount and sent >= need * usual:
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
        # The last part may outrun what is left of the inflow (the account spent some of it, or the
        # first part took most): the parts together must still be mostly that money.
        if total < p.min_share * (before + amount):
            return None
        # Both sums fade alike, so the share is exact and the multiple errs low.
        return [Reason(code="pass_through",
                       message=f"{total / (before + inflow):.0%} of the money counterparties this account never "
                               f"dealt with paid in lately has gone on, in this {txn.txn_type} and earlier debits "
                               f"({total / usual:.1f}x its usual)",
                       value=round(total / usual, 4), threshold=need)]

    def _many_payers(self, ev: Event, sent: float) -> list[Reason] | None:
        """Many strangers paid in and most of it went on by transfer or withdrawal: at `many_multiple` the
        usual, or at any amount on an account too young for a usual one (mule accounts are often opened
        for the job)."""
        p, txn, st = self.p, ev.txn, ev.state
        if p.min_payers is None or txn.txn_type not in ONWARD_TYPES:
            return None  # card payments spend received money
        n, paid, faded_paid = payers_since(st, ev.ts)  # scanned once per checked debit
        if n < p.min_payers:
            return None
        before = faded(st.in_sent, ev.ts - st.in_ts, INFLOW_SECONDS)
        total = before + sent
        # Most of what is left of it, and most of all of it (money spent at shops meanwhile shrinks what
        # is left, not what was paid in): half of it went on in false hits measured on 3,000 accounts.
        if total < p.min_passed * (before + ev.inflow) or total < p.many_share * faded_paid:
            return None
        young = ev.history < 3
        need = self.need(p.many_multiple)
        if not young and total < need * ev.usual:
            return None
        scale = "on an account with no usual amount yet" if young else f"{total / ev.usual:.1f}x its usual"
        return [Reason(code="pass_through",
                       message=f"{min(total / faded_paid, 1.0):.0%} of the {txn.currency} {paid:,.2f} that {n} "
                               f"counterparties this account never dealt with paid in over the last hours has gone "
                               f"on, in this {txn.txn_type}{' and earlier debits' if before > 0.0 else ''} "
                               f"({scale})",
                       value=round(total / ev.usual, 4) if not young else round(total, 2),
                       threshold=None if young else need)]
