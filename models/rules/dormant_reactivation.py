"""Dormant reactivation: a long-silent account wakes and within hours sends money to a new payee."""

from __future__ import annotations

import math
from bisect import bisect_left

from pydantic import Field

from models.features import DAY
from models.rules.base import Event, RuleParams, TxnRule, register, span
from models.schemas import Level, Reason

# (silence before waking, usual gap, sent since waking before this debit, seconds since waking)
Wake = tuple[float, float, float, float]


class DormantParams(RuleParams):
    """A dormant account wakes, and within hours money leaves to a payee it never paid."""

    factor: float = Field(10.0, ge=1, description="silence without a debit, in multiples of the account's usual "
                                                  "gap between debits")
    min_silence_seconds: float = Field(2 * 86_400.0, gt=0, description="and at least this long")
    session_seconds: float = Field(3 * 3600.0, ge=0, description="debits this long after waking still count")
    min_multiple: float = Field(2.0, ge=0, description="money sent since waking, in multiples of its usual debit "
                                                       "of this type")
    new_payee: bool = Field(True, description="only when the debit goes to a payee it never paid")
    shop_level: Level | None = Field("medium", description="the level when the debit is a card payment from the "
                                                           "account's own device or from none (a card at a till) "
                                                           "(None: the rule's level)")


@register
class DormantReactivation(TxnRule):
    """Silent for `factor` usual gaps (and `min_silence_seconds`), then `min_multiple` x usual sent since waking."""

    type = "dormant_reactivation"
    Params = DormantParams
    order = 60
    adaptive = True
    external_only = True

    def setup(self) -> None:
        self.any_payee = not self.p.new_payee

    def gate(self, ev: Event) -> bool:
        return ev.history >= 3 and (ev.new_payee or self.any_payee)

    def check(self, ev: Event) -> list[Reason] | None:
        st = ev.state
        gap = math.exp(st.gap_ew) if st.n_debits >= 3 else DAY
        wake = self.woke(ev, gap)
        if wake is None:
            return None
        txn = ev.txn
        idle, gap, before, since = wake
        total = before + txn.amount
        usual = ev.usual
        need = self.need(self.p.min_multiple)
        if total < need * usual:
            return None
        when = "now" if since == 0.0 else f"{span(since)} after waking"
        return [Reason(code="dormant_reactivation",
                       message=f"woke after {span(idle)} without a debit (usually {span(gap)} between them) and "
                               f"sent {txn.currency} {total:,.2f} ({total / usual:.1f}x its usual), {when}, to a "
                               "payee it never paid",
                       value=round(total / usual, 4), threshold=need)]

    def level_for(self, ev: Event) -> str | None:
        """`shop_level` for a card payment from the account's own device, or with no device at all.

        A customer back from a trip shops; a sold, rented or taken-over account sends the money on by
        transfer or withdrawal. Measured: 1 of 72 paged hits on card payments named a risky event, on four
        synth streams and two of the independent generator (docs/evaluation.md). It stays a warning with
        its plan; it does not page, and a later hit of the same wake by transfer raises it to high.
        """
        if self.p.shop_level is None or ev.txn.txn_type != "payment":
            return None
        return self.p.shop_level if ev.own_device or not ev.txn.device_id else None

    def woke(self, ev: Event, gap: float) -> Wake | None:
        """(silence, usual gap, sent since, seconds since) when the account woke from a dormancy within the
        rule's session: the first of its recent debits (or this one) came after a silence without debits of
        `factor` usual gaps and at least `min_silence_seconds`."""
        p, ts = self.p, ev.ts
        quiet = p.factor * gap
        if quiet < p.min_silence_seconds:
            quiet = p.min_silence_seconds
        dts = ev.state.debit_ts
        k = len(dts)
        if not k:
            return None
        first = bisect_left(dts, ts - p.session_seconds)
        if first == k:
            idle = ts - dts[-1]
            return (idle, gap, 0.0, 0.0) if idle >= quiet else None
        if first == 0:
            return None  # every remembered debit is in the session: no silence before it to see
        idle = dts[first] - dts[first - 1]
        if idle < quiet:
            return None
        return idle, gap, float(sum(ev.state.debit_amt[first:])), ts - dts[first]
