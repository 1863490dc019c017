"""Structuring: several transactions within a day, in or out, each just under the reporting threshold."""

from __future__ import annotations

from pydantic import Field

from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason

NEAR_MAX = 32  # near-threshold transactions an account remembers (AccountState.near_ts)


class StructuringParams(RuleParams):
    """Repeated transactions, in or out, just under the reporting threshold."""

    min_count: int = Field(3, ge=2)
    window_seconds: float = Field(86_400.0, gt=0)
    lower_fraction: float = Field(0.8, gt=0, lt=1)
    account_kinds: list[str] = Field(default_factory=lambda: ["customer"],
                                     description="kinds of account a split is looked for on: the platform's custody "
                                                 "and own accounts move sums near the threshold many times a day")


@register
class Structuring(TxnRule):
    """The `min_count`-th transaction within the window in [lower_fraction x threshold, threshold); regulator-required.

    Deposits count as debits do: splitting cash or top-ups into the platform to stay under the report
    is the textbook case, and a split on the way in and out of an account is layering. Its state is the
    account's times of near-threshold transactions (`AccountState.near_ts`).
    """

    type = "structuring"
    Params = StructuringParams
    order = 30
    required = True
    learns = True
    debit_only = False

    def setup(self) -> None:
        self.cooldown_seconds = self.p.window_seconds  # a day-long pattern: debits hours apart are one case
        self.lower = self.p.lower_fraction

    def gate(self, ev: Event) -> bool:
        t = ev.reporting_threshold
        return self.lower * t <= ev.txn.amount < t

    def check(self, ev: Event) -> list[Reason] | None:
        p, ts, txn = self.p, ev.ts, ev.txn
        window = p.window_seconds
        n = 1 + sum(1 for t in ev.state.near_ts if ts - t <= window)
        if n < p.min_count:
            return None
        return [Reason(code="structuring",
                       message=f"{n} transactions within {window / 3600:.0f} h each just under the "
                               f"{txn.currency} {ev.reporting_threshold:,.0f} reporting threshold",
                       value=float(n), threshold=float(p.min_count))]

    def learn(self, ev: Event) -> None:
        ts = ev.ts
        near_ts = ev.state.near_ts
        near_ts.append(ts)
        window = self.p.window_seconds
        while near_ts and (ts - near_ts[0] > window or len(near_ts) > NEAR_MAX):
            del near_ts[0]
