"""What a per-transaction rule plug-in is: its parameters, its gate, its check and reasons, and the registry.

A rule is one module in this package holding one `TxnRule` subclass decorated with `@register`.
Its `gate` is the cheap test the scorer's fast path runs on every event (a rule that does not
define one is evaluated on every event: slower, never silently skipped); `check` runs only when
the gate passes and returns the reasons of a hit. The catalogue (deploy/rules.yaml) names which
rules run, each entry by `type` (its id by default), so one rule type can run twice with two ids
and two sets of parameters.

>>> from models.rules import REGISTRY
>>> sorted(REGISTRY)[:3]
['amount_spike', 'card_testing', 'dormant_reactivation']
"""

from __future__ import annotations

import builtins
import math
from typing import TYPE_CHECKING, Any, ClassVar, TypeVar

from pydantic import BaseModel, ConfigDict

from models.features import DAY, HOUR, AccountState, stable_hash
from models.schemas import Reason, TransactionFields

if TYPE_CHECKING:  # the scorer's Protocol; imported for types only (scoring imports this package)
    from models.scoring import Feedback


class RuleParams(BaseModel):
    """Base of every rule's parameters: unknown keys are refused, values are frozen once loaded."""

    model_config = ConfigDict(extra="forbid", frozen=True)


class Event:
    """What a per-transaction rule sees of one transaction; the scorer fills one object per event.

    `state` is the account's state before this transaction is learned. The other fields are what
    the scorer computes for the model anyway, so a rule's gate costs a comparison or two.
    """

    __slots__ = ("debit", "debits_10m", "expected_10m", "external", "history", "inflow", "lg_amount", "new_device",
                 "new_payee", "reporting_threshold", "shift", "state", "ts", "txn")

    def __init__(self) -> None:
        self.txn: TransactionFields = None  # type: ignore[assignment]  # set before every use
        self.state: AccountState = AccountState()
        self.ts = 0.0
        self.debit = False
        self.external = False  # a debit whose money leaves the platform (payment, transfer, withdrawal)
        self.history = 0  # amounts the account's state remembers (the usual amount needs 3)
        self.lg_amount = 0.0  # log(amount) minus the type's shift: comparable with state.log_med
        self.shift = 0.0  # the learned log-amount shift of this transaction's type
        self.inflow = 0.0  # money received lately from counterparties the account never dealt with (faded)
        self.new_payee = False
        self.new_device = False
        self.debits_10m = 0  # debits in the last 10 minutes, this one included (0 for a credit)
        self.expected_10m = 0.0  # how many the account's rhythm explains
        self.reporting_threshold = math.inf  # the currency's reporting threshold (the large_transaction rule's)

    @property
    def usual(self) -> float:
        """The account's usual amount for this transaction's type."""
        return math.exp(self.state.log_med + self.shift)

    @property
    def own_device(self) -> bool:
        """True when the transaction comes from a device the account used before the last hour.

        A device first seen within the hour is a takeover's as often as the customer's: not its own yet.
        """
        device = self.txn.device_id
        if not device or self.new_device:
            return False
        st = self.state
        return not (st.fresh_dev == stable_hash(device) and self.ts - st.fresh_dev_ts < HOUR)


class TxnRule:
    """Base of a per-transaction rule: one instance per catalogue entry of its type.

    Subclasses set `type`, `Params`, and override `check` (and `setup`, `gate`, `learn` when they can).
    """

    type: ClassVar[str]
    Params: ClassVar[builtins.type[RuleParams]]  # `type` is the rule type's name in this class
    order: ClassVar[int] = 100  # findings of one event are listed in this order
    debit_only: ClassVar[bool] = True  # the gate is not even asked for credits
    external_only: ClassVar[bool] = False  # ... nor for debits that stay on the platform
    # Account kinds whose transactions the gate is asked about (None: every kind); set per instance
    # from the parameters' `account_kinds` when they have one (a rule may set it in `setup` instead).
    # With the two flags above, the scorer skips the gate without a call.
    account_kinds: frozenset[str] | None = None
    required: ClassVar[bool] = False  # a regulator requires it: verdicts never loosen or suppress it
    adaptive: ClassVar[bool] = False  # analysts' verdicts move its threshold (models.feedback)
    learns: ClassVar[bool] = False  # keeps state of its own in AccountState: `learn` runs after its gate passed
    cooldown_seconds: float | None = None  # hits this far apart stay one warning (None: the scorer's default)

    def __init__(self, rule_id: str, params: Any, feedback: Feedback | None = None) -> None:
        self.id = rule_id
        self.detector = f"rule:{rule_id}"
        self.p = params
        self.feedback = feedback
        # The most a verdict can loosen a threshold: gates must let through what the check may accept.
        self.fb_max = 1.0 if feedback is None else max(1.0, feedback.max_factor)
        kinds = getattr(params, "account_kinds", None)
        if kinds is not None:
            self.account_kinds = frozenset(kinds)
        self.setup()

    def setup(self) -> None:
        """Derive per-instance constants from the parameters (runs once, at the end of __init__)."""

    def gate(self, ev: Event) -> bool:
        """Cheap test on every event (debits only when `debit_only`): False means `check` cannot hit."""
        return True

    def check(self, ev: Event) -> list[Reason] | None:
        """The reasons of a hit on this event, or None."""
        raise NotImplementedError

    def level_for(self, ev: Event) -> str | None:
        """The level of this event's hit when the rule lowers it (after a hit); None keeps the catalogue's."""
        return None

    def learn(self, ev: Event) -> None:
        """Update this rule's own part of the account's state after an event that passed its gate (when `learns`)."""

    def need(self, base: float) -> float:
        """A multiple-style threshold after analysts' verdicts (an adaptive rule's; others keep `base`)."""
        if self.adaptive and self.feedback is not None:
            return base / self.feedback.factor(self.detector, (self.type,))
        return base

    def need_count(self, base: int, floor: int = 1) -> int:
        """A count-style threshold after analysts' verdicts, rounded up and never under `floor`."""
        if self.adaptive and self.feedback is not None:
            return max(floor, math.ceil(self.need(base)))
        return base


R = TypeVar("R", bound="type[TxnRule]")
REGISTRY: dict[str, type[TxnRule]] = {}


def register(cls: R) -> R:
    """Class decorator: make a rule type known to catalogues and the scorer (one type, one class)."""
    if cls.type in REGISTRY and REGISTRY[cls.type] is not cls:
        raise ValueError(f"two rule classes claim the type {cls.type!r}: {REGISTRY[cls.type]} and {cls}")
    REGISTRY[cls.type] = cls
    return cls


def span(seconds: float) -> str:
    """A duration as a person says it: 40 min, 5.5 h, 3.2 days.

    >>> span(2400), span(19800), span(3.2 * 86400)
    ('40 min', '5.5 h', '3.2 days')
    """
    if seconds < HOUR:
        return f"{seconds / 60:.0f} min"
    if seconds < 2 * DAY:
        return f"{seconds / HOUR:.1f} h"
    return f"{seconds / DAY:.1f} days"

