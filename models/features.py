"""Per-account streaming features: compact state and the surprises it yields for one transaction."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from hashlib import blake2b
from typing import Any

# Bounds on per-account memory: every array below is capped, so an account costs well under 1 KiB.
AMOUNT_HISTORY = 24
DEBIT_HISTORY = 32
KNOWN_COUNTERPARTIES = 24
KNOWN_DEVICES = 6
VELOCITY_WINDOW = 600.0  # seconds: the "short window" of the velocity feature
HOUR = 3600.0
DAY = 86400.0
TINY_AMOUNT = 5.0  # major units: below this, a debit is a card-testing probe rather than a purchase
_LN2 = math.log(2.0)


def stable_hash(value: str) -> int:
    """A 63-bit hash stable across processes (str hash() is salted per process, so it cannot be stored)."""
    return int.from_bytes(blake2b(value.encode(), digest_size=8).digest(), "little") >> 1


class AccountState:
    """What riskwatch remembers about one account: bounded, picklable, a few hundred bytes."""

    __slots__ = (
        "alerts",
        "counterparties",
        "day_in",
        "day_out",
        "day_out_ew",
        "day_start",
        "debit_amt",
        "debit_ts",
        "devices",
        "first_ts",
        "gap_ew",
        "hours",
        "last_ts",
        "log_amounts",
        "n",
        "n_debits",
        "near_ts",
        "new_cp",
        "new_dev",
        "recent_ids",
    )

    def __init__(self) -> None:
        self.n = 0
        self.n_debits = 0
        self.first_ts = 0.0
        self.last_ts = 0.0
        self.log_amounts = array("f")
        self.debit_ts = array("d")
        self.debit_amt = array("f")
        self.counterparties = array("q")
        self.new_cp = 0
        self.devices = array("q")
        self.new_dev = 0
        self.hours = array("H", bytes(48))
        self.gap_ew = 0.0  # EW mean of log seconds between debits
        self.day_start = 0.0
        self.day_in = 0.0
        self.day_out = 0.0
        self.day_out_ew = 0.0
        self.near_ts = array("d")  # times of debits just under the reporting threshold
        self.recent_ids = array("q")  # hashes of the last event ids, to score a redelivered event once
        self.alerts: dict[str, tuple[str, float, list[str], str]] = {}

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)


@dataclass(slots=True)
class TxnFeatures:
    """Features of one transaction against its account's history, with the baselines used."""

    history: int
    amount_z: float
    amount_ratio: float
    median_amount: float
    new_counterparty: bool
    p_new_counterparty: float
    new_device: bool
    p_new_device: float
    debits_10m: int
    expected_10m: float
    tiny_10m: int
    debits_1h: int
    debits_24h: int
    sum_1h: float
    sum_24h: float
    hour_share: float
    day_out: float
    day_in: float
    day_out_ratio: float
    near_threshold_24h: int = 0
    extra: dict[str, float] = field(default_factory=dict)


def _median(values: array[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


def _push(buf: array[Any], value: Any, cap: int) -> None:
    buf.append(value)
    if len(buf) > cap:
        del buf[0]


def observe(state: AccountState, *, ts: float, amount: float, debit: bool, counterparty: str,
            device: str | None, local_hour: int) -> TxnFeatures:
    """Compute the features of a transaction from the state before it (score before learn)."""
    la = math.log(amount)
    n_hist = len(state.log_amounts)
    if n_hist >= 3:
        med = _median(state.log_amounts)
        mad = _median(array("f", (abs(v - med) for v in state.log_amounts)))
        # Floor the spread: an account that always pays 100.00 must not alarm at 101.
        z = (la - med) / max(1.4826 * mad, 0.35)
        median_amount = math.exp(med)
    else:
        z, median_amount = 0.0, amount
    cp = stable_hash(counterparty)
    new_cp = cp not in state.counterparties
    dev = stable_hash(device) if device else 0
    new_dev = bool(device) and dev not in state.devices
    n_d = state.n_debits
    p_new_cp = (state.new_cp + 1.0) / (n_d + 2.0)
    p_new_dev = (state.new_dev + 1.0) / (state.n + 2.0)

    c10 = c1h = c24 = tiny = 0
    s1h = s24 = 0.0
    for t, a in zip(state.debit_ts, state.debit_amt, strict=True):
        age = ts - t
        if age < DAY:
            c24 += 1
            s24 += a
            if age < HOUR:
                c1h += 1
                s1h += a
                if age < VELOCITY_WINDOW:
                    c10 += 1
                    if a < TINY_AMOUNT:
                        tiny += 1
    # Expected debits in 10 minutes from the account's typical gap; floor keeps new accounts sane.
    typical_gap = math.exp(state.gap_ew) if state.n_debits >= 3 else HOUR
    expected = min(VELOCITY_WINDOW / max(typical_gap, 30.0), 20.0)

    hour_share = (state.hours[local_hour] + 1.0) / (state.n + 24.0)
    same_day = ts - state.day_start < DAY
    day_out = (state.day_out if same_day else 0.0) + (amount if debit else 0.0)
    day_in = (state.day_in if same_day else 0.0) + (0.0 if debit else amount)
    day_ratio = day_out / state.day_out_ew if state.day_out_ew > 0 else 1.0
    return TxnFeatures(
        history=n_hist,
        amount_z=z,
        amount_ratio=amount / median_amount if median_amount > 0 else 1.0,
        median_amount=median_amount,
        new_counterparty=new_cp,
        p_new_counterparty=p_new_cp,
        new_device=new_dev,
        p_new_device=p_new_dev,
        debits_10m=c10 + (1 if debit else 0),
        expected_10m=expected,
        tiny_10m=tiny + (1 if debit and amount < TINY_AMOUNT else 0),
        debits_1h=c1h + (1 if debit else 0),
        debits_24h=c24 + (1 if debit else 0),
        sum_1h=s1h + (amount if debit else 0.0),
        sum_24h=s24 + (amount if debit else 0.0),
        hour_share=hour_share,
        day_out=day_out,
        day_in=day_in,
        day_out_ratio=day_ratio,
    )


def learn(state: AccountState, *, ts: float, amount: float, debit: bool, counterparty: str,
          device: str | None, local_hour: int) -> None:
    """Fold a transaction into its account's state, after it was scored."""
    if state.n == 0:
        state.first_ts = ts
    state.n += 1
    if state.hours[local_hour] < 65000:
        state.hours[local_hour] += 1
    if device:
        dev = stable_hash(device)
        if dev not in state.devices:
            state.new_dev += 1
            _push(state.devices, dev, KNOWN_DEVICES)
    if ts - state.day_start >= DAY:
        if state.day_start:
            # Daily outflow baseline, EW over days; seeded by the first full day.
            state.day_out_ew = state.day_out if state.day_out_ew == 0 else 0.8 * state.day_out_ew + 0.2 * state.day_out
        state.day_start, state.day_in, state.day_out = ts, 0.0, 0.0
    if debit:
        state.day_out += amount
        if state.debit_ts:
            gap = max(ts - state.debit_ts[-1], 1.0)
            lg = math.log(gap)
            state.gap_ew = lg if state.n_debits <= 1 else 0.9 * state.gap_ew + 0.1 * lg
        state.n_debits += 1
        cp = stable_hash(counterparty)
        if cp not in state.counterparties:
            state.new_cp += 1
            _push(state.counterparties, cp, KNOWN_COUNTERPARTIES)
        _push(state.log_amounts, math.log(amount), AMOUNT_HISTORY)
        _push(state.debit_ts, ts, DEBIT_HISTORY)
        _push(state.debit_amt, amount, DEBIT_HISTORY)
    else:
        state.day_in += amount
    state.last_ts = max(state.last_ts, ts)


__all__ = ["AccountState", "TxnFeatures", "learn", "observe", "stable_hash"]
