"""Amount spike: an external debit far above both the account's usual amount and its largest recent one."""

from __future__ import annotations

import math

from pydantic import Field

from models.features import ONWARD_TYPES
from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Level, Reason


class AmountSpikeParams(RuleParams):
    """An external debit far above both the account's usual amount and the largest it made lately."""

    min_multiple: float = Field(10.0, ge=1, description="the amount, in multiples of the account's usual debit "
                                                        "of this type")
    min_over_max: float = Field(3.0, ge=1, description="and in multiples of the largest of its last 24 debits "
                                                       "(each against its own type)")
    familiar_level: Level | None = Field("medium", description="the level of a spike the account's own habits "
                                                               "explain: from its own device, to a payee it already "
                                                               "paid (None: the rule's level)")
    shop_payments_familiar: bool = Field(True, description="a card payment from the account's own device counts as "
                                                           "familiar at a shop it never used too: most big "
                                                           "purchases are the customer's, and stolen cards pay from "
                                                           "the fraudster's device")
    past_outlier_level: Level | None = Field("medium", description="the level of a transfer or withdrawal to a "
                                                                   "new payee that clears min_over_max only with "
                                                                   "the largest recent debit set aside (one "
                                                                   "earlier outlier, a rent or a car, does not hide "
                                                                   "it; None: not warned)")


@register
class AmountSpike(TxnRule):
    """`min_multiple` x the account's usual amount for the type and `min_over_max` x its largest recent debit."""

    type = "amount_spike"
    Params = AmountSpikeParams
    order = 70
    adaptive = True
    external_only = True

    def setup(self) -> None:
        self._past_outlier = False  # whether this event's hit set the largest recent debit aside (level_for)
        # In the log units the account's amounts are kept in: most debits stop at this comparison.
        self.lmed = math.log(self.p.min_multiple / self.fb_max)
        self.lmax = math.log(self.p.min_over_max)

    def gate(self, ev: Event) -> bool:
        return ev.history >= 3 and ev.lg_amount - ev.state.log_med >= self.lmed

    def check(self, ev: Event) -> list[Reason] | None:
        st = ev.state
        self._past_outlier = False
        over = ev.lg_amount - max(st.log_amounts)
        if over < self.lmax:
            if not self._outlier_may_hide(ev):
                return None
            # The largest recent debit set aside: one earlier rent or car payment then no longer hides
            # a scam's or a takeover's transfer far above everything else the account sends.
            over = ev.lg_amount - sorted(st.log_amounts)[-2]
            if over < self.lmax:
                return None
            self._past_outlier = True
        to_usual, to_max = math.exp(ev.lg_amount - st.log_med), math.exp(over)
        need = self.need(self.p.min_multiple)
        if to_usual < need:
            return None
        txn = ev.txn
        largest = "all but the largest" if self._past_outlier else "the largest"
        return [Reason(code="amount_spike",
                       message=f"{txn.txn_type} of {txn.currency} {txn.amount:,.2f}: {to_usual:.1f}x this "
                               f"account's usual and {to_max:.1f}x {largest} of its recent debits"
                               f"{self._familiar(ev)}",
                       value=round(to_usual, 4), threshold=need)]

    def _outlier_may_hide(self, ev: Event) -> bool:
        """Whether the second-largest recent debit judges this one: a transfer or withdrawal to a new payee.

        Not card payments: a big purchase at a new shop is most often the customer's (see `level_for`).
        Four amounts at least, so that three remain beside the one set aside.
        """
        return (self.p.past_outlier_level is not None and ev.new_payee and ev.txn.txn_type in ONWARD_TYPES
                and len(ev.state.log_amounts) >= 4)

    def _familiar(self, ev: Event) -> str:
        """How the account's own habits explain the spike, as the reason's last words; "" when they do not."""
        if self.p.familiar_level is None or not ev.own_device:
            return ""
        if not ev.new_payee:
            return ", to a payee it paid before from its own device"
        if self.p.shop_payments_familiar and ev.txn.txn_type == "payment":
            return ", a card payment from its own device"
        return ""

    def level_for(self, ev: Event) -> str | None:
        """`familiar_level` for a spike from the account's own device to a known payee, or a card payment.

        A big payment to someone the account already pays, from its usual phone, is most often the
        customer (rent, a car, a known shop): measured, 2-9% of those hits were risky against 8-71%
        of the others; of the pages a big card payment from that phone at a new shop sent, 73% were
        false on synth and 96% on the independent generator (docs/evaluation.md).
        It stays a warning with its plan; it does not page. A transfer or withdrawal to a new payee
        still pages from any device: that is where takeovers and scams send the money.
        """
        if self._past_outlier:
            return self.p.past_outlier_level
        return self.p.familiar_level if self._familiar(ev) else None
