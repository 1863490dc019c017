"""Velocity: far more debits in ten minutes than the account's own rhythm explains."""

from __future__ import annotations

import math

from pydantic import Field

from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason


class VelocityParams(RuleParams):
    """Unusually many debits in the short window: both an absolute and a relative floor."""

    min_debits: int = Field(8, ge=2)
    min_ratio: float = Field(6.0, ge=1)


@register
class Velocity(TxnRule):
    """At least `min_debits` debits in 10 minutes and `min_ratio` times what the account's gaps explain."""

    type = "velocity"
    Params = VelocityParams
    order = 40
    adaptive = True

    def setup(self) -> None:
        self.floor = max(2, math.ceil(self.p.min_debits / self.fb_max))

    def gate(self, ev: Event) -> bool:
        return ev.debits_10m >= self.floor

    def check(self, ev: Event) -> list[Reason] | None:
        p = self.p
        n, expected = ev.debits_10m, ev.expected_10m
        need = self.need_count(p.min_debits)
        if n < need or n < p.min_ratio * expected:
            return None
        usual = max(1, math.ceil(expected))
        return [Reason(code="velocity", message=f"{n} debits in 10 minutes (usual: at most {usual})",
                       value=float(n), threshold=float(p.min_debits))]
