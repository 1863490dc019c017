"""Platform account on a new device: money leaves an account the platform holds, from a device it never used.

Custody accounts (customers' segregated money) and the platform's own accounts are moved by a
few operators from a few known machines. A debit from one of them on a device the account has
never used is an operator's credentials at work somewhere new: the access-control risk the
study behind riskwatch names beside fund isolation, and the first step of most insider and
account-takeover losses on such accounts.
"""

from __future__ import annotations

from pydantic import Field

from models.features import KNOWN_DEVICES
from models.rules.base import Event, RuleParams, TxnRule, register
from models.schemas import Reason


class PlatformAccountNewDeviceParams(RuleParams):
    """Which account kinds are the platform's, and how much history makes a device 'new'."""

    account_kinds: list[str] = Field(default_factory=lambda: ["custody", "platform_own"],
                                     description="kinds of account whose debits must come from known devices")
    min_history: int = Field(5, ge=1, description="transactions the account made before, with at least one "
                                                  "device seen: a new account has no known devices yet")


@register
class PlatformAccountNewDevice(TxnRule):
    """A debit from an `account_kinds` account on a device not among the last devices it used."""

    type = "platform_account_new_device"
    Params = PlatformAccountNewDeviceParams
    order = 80

    def gate(self, ev: Event) -> bool:
        return ev.new_device

    def check(self, ev: Event) -> list[Reason] | None:
        st = ev.state
        known = len(st.devices)
        if st.n < self.p.min_history or not known:
            return None
        txn = ev.txn
        devices = f"{known} device{'s' if known > 1 else ''}"
        if known >= KNOWN_DEVICES:
            devices = f"its last {known} devices"
        return [Reason(code="platform_account_new_device",
                       message=f"{txn.txn_type} of {txn.currency} {txn.amount:,.2f} from {txn.account_kind} account "
                               f"{txn.account_id} on device {txn.device_id}, which it never used before "
                               f"({devices} in {st.n} transactions)",
                       value=float(st.n), threshold=float(self.p.min_history))]
