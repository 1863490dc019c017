"""New access on a young account: money sent to a new payee from a device and a country the account never used."""

from __future__ import annotations

from pydantic import Field

from models.features import ONWARD_TYPES, stable_hash
from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason


class NewAccessParams(RuleParams):
    """How young an account is while this rule, not the model, judges a change of device and country."""

    max_debits: int = Field(3, ge=1, le=24, description="the account has made fewer debits than this: too few "
                                                        "for the model (its entity_warmup, 3), which judges "
                                                        "older accounts on the same evidence and their habits")
    account_kinds: list[str] = Field(default_factory=lambda: ["customer"],
                                     description="kinds of account it is looked for on (platform accounts have "
                                                 "platform_account_new_device)")


@register
class NewAccess(TxnRule):
    """A young account's transfer or withdrawal to a new payee, from a device and a country it never used.

    A takeover's first cash-out comes from the fraudster's phone, often from another country, to a
    mule the account never paid. On an account with a history the model weighs that (first use of
    the device, first debit from the country) against its habits; on a young one it is still
    warming up, and the third new payee (payee_fanout) came two debits late. A device and a country
    both new to an account already seen on another device and in another country, at once, sending
    money on: measured, 1 false hit in 2.2 million normal transactions over sixteen independent and
    synthetic streams, against 9-17 takeovers warned at their first debit on each one-day independent
    stream (docs/evaluation.md). A device first seen within the hour counts as new (Event.own_device).
    A customer abroad on a new phone paying a new person looks alike: it pages because on a young
    account nothing else will for two more debits.
    """

    type = "new_access"
    Params = NewAccessParams
    order = 44
    external_only = True

    def gate(self, ev: Event) -> bool:
        return (ev.history < self.p.max_debits and ev.new_payee and ev.txn.txn_type in ONWARD_TYPES
                and bool(ev.txn.device_id) and not ev.own_device)

    def check(self, ev: Event) -> list[Reason] | None:
        st, txn = ev.state, ev.txn
        country = txn.country
        if not st.countries or not country or stable_hash(country) in st.countries:
            return None
        # A device first seen within the hour is not the account's own yet (Event.own_device): a
        # takeover's first debit may come from the account's own country, the next one from another.
        others = len(st.devices) if ev.new_device else len(st.devices) - 1
        if others < 1:
            return None
        device = "a device" if ev.new_device else "a device first seen within the hour"
        debits = ev.history
        return [Reason(code="new_access",
                       message=f"{txn.txn_type} of {txn.currency} {txn.amount:,.2f} to a payee this young account "
                               f"never paid, from {device} and a country ({country}) it never used: its "
                               f"{debits} earlier debit{'s' if debits != 1 else ''} came from "
                               f"{_count(len(st.countries), 'other country', 'other countries')} and it was seen "
                               f"on {_count(others, 'other device', 'other devices')}",
                       value=float(debits), threshold=float(self.p.max_debits))]


def _count(n: int, one: str, many: str) -> str:
    return f"{'one' if n == 1 else n} {one if n == 1 else many}"
