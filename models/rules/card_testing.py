"""Card testing: a run of tiny debits minutes apart, to payees the account never paid."""

from __future__ import annotations

import math

from pydantic import Field

from models.features import tiny_amount, tiny_debit_times
from models.rules.base import Event, RuleParams, TxnRule, register, span
from models.schemas import Reason


class CardTestingParams(RuleParams):
    """How many tiny debits in ten minutes make a card test, and which accounts' habits explain them."""

    min_debits: int = Field(3, ge=2, description="debits under the currency's probe ceiling in 10 minutes, "
                                                 "this one included (models.features.TINY_AMOUNTS)")
    min_usual_over_tiny: float = Field(2.0, ge=0, description="the account's usual debit must be at least this "
                                                              "many probe ceilings: tiny is its habit otherwise")


@register
class CardTesting(TxnRule):
    """`min_debits` tiny debits in 10 minutes, this one to a payee the account never paid."""

    type = "card_testing"
    Params = CardTestingParams
    order = 35
    adaptive = True
    external_only = True

    def setup(self) -> None:
        # Verdicts may lower the count needed to this; the gate must let such events through.
        self.floor = max(2, math.ceil(self.p.min_debits / self.fb_max))

    def gate(self, ev: Event) -> bool:
        # A stolen card's number is tried on small merchants it never paid; most debits stop at the
        # first comparison (one debit in ten minutes).
        return ev.debits_10m >= self.floor and ev.new_payee and ev.txn.amount < tiny_amount(ev.txn.currency)

    def check(self, ev: Event) -> list[Reason] | None:
        txn, st = ev.txn, ev.state
        cut = tiny_amount(txn.currency)
        if ev.history >= 3 and ev.usual < self.p.min_usual_over_tiny * cut:
            return None
        tiny = tiny_debit_times(st, ev.ts, cut)
        n = len(tiny) + 1
        need = math.ceil(self.need(float(self.p.min_debits)))
        if n < need:
            return None
        since = ev.ts - tiny[0] if tiny else 0.0
        return [Reason(code="card_testing",
                       message=f"{n} debits under {txn.currency} {cut:,.0f} in {span(max(since, 60.0))}, this one "
                               f"({txn.amount:,.2f}) to a payee the account never paid: a card being tested",
                       value=float(n), threshold=float(need))]
