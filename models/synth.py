"""Seeded synthetic event streams: heterogeneous normal behaviour with labelled risk scenarios injected."""

from __future__ import annotations

import gc
import gzip
import io
import json
import math
from collections.abc import Iterable, Sequence
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta, timezone
from operator import itemgetter
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

# New scenarios go at the end: each one's random stream and cast follow its position, so the ones
# before it stay event for event what they were.
ALL_SCENARIOS: tuple[str, ...] = (
    "takeover", "card_testing", "spike", "structuring", "fund_isolation", "liquidity_run", "market_crash", "mule",
    "dormant")
DEFAULT_START = datetime(2026, 11, 1, tzinfo=timezone(timedelta(hours=8)))
REPORTING_THRESHOLD = 50_000.0  # CNY: a single transaction at or above it must be reported
TICK_SECONDS = 60.0
_DAY, _HOUR = 86400.0, 3600.0
_EPOCH = datetime(1970, 1, 1, tzinfo=UTC)
_CST = timezone(timedelta(hours=8))
_ACCOUNT_SCENARIOS = ("takeover", "card_testing", "spike", "structuring", "mule", "dormant")

# (txn_type, direction, base share, amount as a multiple of the account's median); debit = money leaves account_id.
_KINDS: tuple[tuple[str, str, float, float], ...] = (
    ("payment", "debit", 0.50, 1.0), ("transfer", "debit", 0.09, 1.5), ("transfer", "credit", 0.08, 1.5),
    ("deposit", "credit", 0.11, 3.0), ("withdrawal", "debit", 0.08, 2.5), ("investment", "debit", 0.06, 4.0),
    ("redemption", "credit", 0.05, 4.0), ("loan_repayment", "debit", 0.02, 1.0),
    ("loan_disbursement", "credit", 0.01, 20.0),
)
_KIND_SHARE = np.array([k[2] for k in _KINDS])
_LOAN_KINDS = np.array([k[0].startswith("loan") for k in _KINDS])
_CHANNELS = ("app", "web", "pos", "api")
_ZONES, _ZONE_SHARE = ((8, "CN"), (9, "JP"), (0, "GB"), (-5, "US")), np.array([0.88, 0.03, 0.03, 0.06])
_MCATS = ("grocery", "dining", "transport", "online", "utilities", "health", "education", "travel",
          "electronics", "entertainment")
_MCAT_SHARE = np.array([0.22, 0.2, 0.12, 0.18, 0.08, 0.05, 0.03, 0.04, 0.04, 0.04])
# Relative activity by local hour of a daytime person; night owls get it shifted by six hours.
_DAYTIME = np.array([0.3, 0.15, 0.1, 0.08, 0.08, 0.12, 0.3, 0.7, 1.0, 1.1, 1.2, 1.3,
                     1.4, 1.2, 1.1, 1.1, 1.2, 1.3, 1.5, 1.7, 1.8, 1.6, 1.2, 0.7])
_FAR_COUNTRIES = ("VN", "KH", "MM", "PH", "RU", "NG")

Tag = tuple[str, str] | None  # (scenario, scenario_instance) of a labelled event
FloatArray = npt.NDArray[np.float64]
Falls = dict[int, list[tuple[float, float, float, int]]]  # instrument -> (start, end, depth, window number)


@dataclass(slots=True)
class _Account:
    id: str
    kind: str
    currency: str
    tz: timezone
    offset: float  # seconds east of UTC, for local hours
    country: str
    median: float
    spread: float  # sigma of log amount around the median
    rate: float  # events per day
    hours: FloatArray  # activity weight per local hour
    kinds: FloatArray = field(default_factory=lambda: _KIND_SHARE)  # weight per entry of _KINDS
    channels: FloatArray = field(default_factory=lambda: np.array([0.0, 0.0, 0.0, 1.0]))  # per _CHANNELS
    devices: list[tuple[str, str]] = field(default_factory=list)  # (device_id, ip)
    favourites: list[int] = field(default_factory=list)  # indices into the merchant pool
    contacts: list[str] = field(default_factory=list)
    p_new: float = 0.0  # chance that a payment or transfer goes to a counterparty never used before
    bank: str = ""
    products: list[str] = field(default_factory=list)  # custody accounts holding its investments
    loan: float = 0.0  # fixed instalment


def _rng(seed: int, stream: int) -> np.random.Generator:
    # One independent stream per concern, so dropping a scenario leaves every other event unchanged.
    return np.random.default_rng([seed, stream])


def _pick(rng: np.random.Generator, weights: npt.NDArray[Any], n: int) -> list[int]:
    cum = np.cumsum(weights)
    idx = np.minimum(np.searchsorted(cum, rng.random(n) * cum[-1], side="right"), len(weights) - 1)
    return [int(i) for i in idx]


def _device(rng: np.random.Generator) -> tuple[str, str]:
    a, b, c, d = rng.integers(1, 255, 4).tolist()
    return f"dev-{int(rng.integers(1 << 32)):08x}", f"{a}.{b}.{c}.{d}"


def _external(rng: np.random.Generator) -> str:
    # Same namespace for legitimate and fraudulent new payees: an id must not give the label away.
    return f"X{int(rng.integers(10**7)):07d}"


def _times(rng: np.random.Generator, hours: FloatArray, offset: float, n: int, lo: float, hi: float) -> FloatArray:
    """n sorted times in [lo, hi) following a local-hour activity profile, by rejection."""
    accept = hours / hours.max()
    got = np.empty(0)
    while got.size < n:
        cand = rng.uniform(lo, hi, 3 * n + 16)
        h = ((cand + offset) // _HOUR % 24).astype(np.intp)
        got = np.concatenate([got, cand[rng.random(cand.size) < accept[h]]])
    return np.sort(got[:n])


class _Stream:
    """Builds one stream: the world of accounts, then their events, then ids and timestamps."""

    def __init__(self, seed: int, accounts: int, days: float, start: datetime, instruments: int) -> None:
        self.seed, self.days, self.instruments = seed, days, instruments
        self.t0 = start.timestamp()
        self.t1 = self.t0 + days * _DAY
        self.rows: list[tuple[int, timezone, dict[str, Any]]] = []
        self.silent: dict[str, tuple[float, float]] = {}  # account -> (from, to): its own activity paused
        rng = _rng(seed, 0)
        self.n_merchants = max(300, 3 * accounts)
        self.mcat = [_MCATS[i] for i in _pick(rng, _MCAT_SHARE, self.n_merchants)]
        self.customer_ids = [f"A{k:05d}" for k in range(accounts)]
        self.custody_ids = [f"C{k:03d}" for k in range(1, max(4, math.ceil(accounts / 50)) + 1)]
        self.customers = self._customers(rng, accounts)
        # P00 lends to customers; P01 and P02 are the platform's operating accounts.
        self.institutions = [
            _Account(aid, "custody" if aid[0] == "C" else "platform_own", "CNY", _CST, 8 * _HOUR, "CN",
                     median=math.exp(rng.uniform(math.log(2000), math.log(20000))), spread=0.8,
                     rate=float(rng.uniform(20, 60)) if aid[0] == "C" else 10.0, hours=_DAYTIME + 0.2)
            for aid in [*self.custody_ids, "P01", "P02"]
        ]

    def _customers(self, rng: np.random.Generator, n: int) -> list[_Account]:
        # Every trait is drawn for all accounts at once: per-account scalar draws cost ~1 ms per account.
        zone = _pick(rng, _ZONE_SHARE, n)
        usd = ((np.array(zone) == 3) | (rng.random(n) < 0.03)).tolist()
        median = np.clip(np.exp(rng.normal(math.log(250), 1.1, n)), 15, 8000).tolist()
        spread, p_new, loan = rng.uniform(0.35, 0.9, n), rng.uniform(0.02, 0.15, n), rng.uniform(1, 4, n)
        rate = np.clip(np.exp(rng.normal(math.log(8), 0.8, n)), 2, 60)
        owl = rng.random(n) < 0.1
        hours = np.where(owl[:, None], np.roll(_DAYTIME, 6), _DAYTIME) * rng.gamma(6.0, 1 / 6, (n, 24))
        kinds = rng.gamma(np.tile(_KIND_SHARE * 30, (n, 1))) * np.where(_LOAN_KINDS, rng.random((n, 1)) < 0.3, 1)
        bot = rng.random((n, 1)) < 0.05  # API users: bookkeeping software and small businesses
        channels = rng.gamma(np.where(bot, [0.3, 0.3, 0.05, 3.0], [6.0, 2.5, 2.5, 0.05]))
        dev_ids, ips = rng.integers(1 << 32, size=(n, 2)).tolist(), rng.integers(1, 255, (n, 2, 4)).tolist()
        n_dev, n_prod = (1 + (rng.random(n) < 0.4)).tolist(), (1 + (rng.random(n) < 0.3)).tolist()
        n_fav, favs = rng.integers(3, 16, n).tolist(), rng.integers(0, self.n_merchants, (n, 15)).tolist()
        n_con, con = rng.integers(1, 7, n).tolist(), rng.integers(0, n, (n, 6)).tolist()
        con_ext, ext = (rng.random((n, 6)) < 0.5).tolist(), rng.integers(10**7, size=(n, 6)).tolist()
        banks, prods = rng.integers(10**7, size=n).tolist(), rng.integers(0, len(self.custody_ids), (n, 2)).tolist()
        out = []
        for k in range(n):
            hours_east, country = _ZONES[zone[k]]
            m = max(median[k] / 7.0, 8.0) if usd[k] else median[k]  # USD: similar value in fewer units
            out.append(_Account(
                self.customer_ids[k], "customer", "USD" if usd[k] else "CNY", timezone(timedelta(hours=hours_east)),
                hours_east * _HOUR, country, m, float(spread[k]), float(rate[k]), hours[k], kinds[k], channels[k],
                devices=[(f"dev-{dev_ids[k][j]:08x}", ".".join(map(str, ips[k][j]))) for j in range(n_dev[k])],
                favourites=list(dict.fromkeys(favs[k][: n_fav[k]])),
                contacts=[f"X{ext[k][j]:07d}" if con_ext[k][j] else self.customer_ids[con[k][j]]
                          for j in range(n_con[k])],
                p_new=float(p_new[k]), bank=f"B{banks[k]:07d}",
                products=[self.custody_ids[i] for i in prods[k][: n_prod[k]]], loan=m * float(loan[k]),
            ))
        return out

    def txn(self, acc: _Account, t: float, txn_type: str, direction: str, cp: str, amount: float, channel: str,
            *, cp_kind: str = "customer", device: tuple[str, str] | None = None, mcat: str | None = None,
            country: str | None = None, tag: Tag = None) -> None:
        ev: dict[str, Any] = {
            "event_id": "", "event_type": "transaction", "ts": "", "account_id": acc.id, "counterparty_id": cp,
            "amount": max(round(float(amount), 2), 0.01), "currency": acc.currency, "direction": direction,
            "txn_type": txn_type, "channel": channel, "account_kind": acc.kind, "counterparty_kind": cp_kind,
            "country": country or acc.country,
        }
        if device is not None:
            ev["device_id"], ev["ip"] = device
        if mcat is not None:
            ev["merchant_category"] = mcat
        ev["label"] = 0 if tag is None else 1
        if tag is not None:
            ev["scenario"], ev["scenario_instance"] = tag
        self.rows.append((round(t * 1000), acc.tz, ev))

    def normal(self, rng: np.random.Generator, acc: _Account) -> None:
        n = int(rng.poisson(acc.rate * self.days))
        times = _times(rng, acc.hours, acc.offset, n, self.t0, self.t1).tolist()
        kinds, chans = _pick(rng, acc.kinds, n), _pick(rng, acc.channels, n)
        favs = _pick(rng, 1.0 / np.arange(1, len(acc.favourites) + 1) ** 1.1, n)  # a few favourites take most
        z, dev_u = rng.standard_normal(n).tolist(), rng.random(n).tolist()
        new = (rng.random(n) < acc.p_new).tolist()
        anywhere, ext = rng.integers(0, self.n_merchants, n).tolist(), rng.integers(10**7, size=n).tolist()
        for i in range(n):
            txn_type, direction, _, factor = _KINDS[kinds[i]]
            channel = _CHANNELS[chans[i]]
            if txn_type != "payment" and channel == "pos":
                channel = "app"
            mcat, cp_kind = None, "customer"
            if txn_type == "payment":
                m = anywhere[i] if new[i] else acc.favourites[favs[i]]
                cp, mcat = f"M{m:05d}", self.mcat[m]
            elif txn_type == "transfer":
                cp = f"X{ext[i]:07d}" if new[i] else acc.contacts[favs[i] % len(acc.contacts)]
            elif txn_type in ("deposit", "withdrawal"):
                cp = acc.bank
            elif txn_type in ("investment", "redemption"):
                cp, cp_kind = acc.products[favs[i] % len(acc.products)], "custody"
            else:
                cp, cp_kind = "P00", "platform_own"
            amount = acc.loan if txn_type == "loan_repayment" else acc.median * factor * math.exp(acc.spread * z[i])
            device = None
            if channel in ("app", "web"):
                # Now and then a customer legitimately shows up on a new phone.
                device = _device(rng) if dev_u[i] < 0.003 else acc.devices[int(dev_u[i] > 0.85) % len(acc.devices)]
            self.txn(acc, times[i], txn_type, direction, cp, amount, channel, cp_kind=cp_kind, device=device,
                     mcat=mcat)

    def institution(self, rng: np.random.Generator, acc: _Account) -> None:
        n = int(rng.poisson(acc.rate * self.days))
        times = _times(rng, acc.hours, acc.offset, n, self.t0, self.t1).tolist()
        who, m = rng.integers(len(self.customer_ids), size=n).tolist(), rng.integers(self.n_merchants, size=n).tolist()
        custody = rng.integers(len(self.custody_ids), size=n).tolist()
        for i, (t, u, z) in enumerate(zip(times, rng.random(n).tolist(), rng.standard_normal(n).tolist(), strict=True)):
            amount, customer = acc.median * math.exp(0.8 * z), self.customer_ids[who[i]]
            # Custody pays out redemptions and takes in investments; the platform may top it up, never take.
            if acc.kind == "custody" and u < 0.55:
                self.txn(acc, t, "redemption", "debit", customer, amount, "api")
            elif acc.kind == "custody" and u < 0.95:
                self.txn(acc, t, "investment", "credit", customer, amount, "api")
            elif acc.kind == "custody":
                self.txn(acc, t, "transfer", "credit", "P01", amount * 5, "api", cp_kind="platform_own")
            elif u < 0.5:
                self.txn(acc, t, "payment", "debit", f"M{m[i]:05d}", amount, "api", mcat=self.mcat[m[i]])
            elif u < 0.8:
                self.txn(acc, t, "transfer", "debit", self.custody_ids[custody[i]], amount * 5, "api",
                         cp_kind="custody")
            else:
                self.txn(acc, t, "transfer", "credit", customer, amount / 50, "app")  # fees

    def big_purchase(self, rng: np.random.Generator, acc: _Account) -> None:
        t = float(_times(rng, acc.hours, acc.offset, 1, self.t0 + 0.2 * (self.t1 - self.t0), self.t1)[0])
        m = int(rng.integers(self.n_merchants))
        self.txn(acc, t, "payment", "debit", f"M{m:05d}", acc.median * rng.uniform(5, 10), "app",
                 device=acc.devices[0], mcat=str(rng.choice(["electronics", "travel"])))

    def takeover(self, rng: np.random.Generator, acc: _Account, t: float, tag: Tag) -> None:
        # Move to one of the account's four quietest local hours on that day.
        t = t - (t + acc.offset) % _DAY + (int(rng.choice(np.argsort(acc.hours)[:4])) + rng.random()) * _HOUR
        t += _DAY if t < self.t0 + 0.25 * (self.t1 - self.t0) else 0.0
        device = _device(rng)
        country = acc.country if rng.random() < 0.6 else str(rng.choice(_FAR_COUNTRIES))
        mules = [_external(rng) for _ in range(int(rng.integers(1, 4)))]
        for _ in range(int(rng.integers(3, 9))):
            m, card, u = int(rng.integers(self.n_merchants)), int(rng.integers(10**7)), rng.random()
            # Mostly to mule accounts, some cash-out to a fresh bank card, a little shopping.
            txn_type, cp, channel, mcat = (("transfer", str(rng.choice(mules)), "app", None) if u < 0.6 else
                                           ("withdrawal", f"B{card:07d}", "app", None) if u < 0.85 else
                                           ("payment", f"M{m:05d}", "web", self.mcat[m]))
            self.txn(acc, t, txn_type, "debit", cp, acc.median * rng.uniform(3, 8), channel, device=device,
                     mcat=mcat, country=country, tag=tag)
            t += 10 + rng.exponential(90)

    def card_testing(self, rng: np.random.Generator, acc: _Account, t: float, tag: Tag) -> None:
        device = _device(rng) if rng.random() < 0.5 else None
        channel = "web" if device else "api"
        for _ in range(int(rng.integers(5, 16))):
            m = int(rng.integers(self.n_merchants))
            self.txn(acc, t, "payment", "debit", f"M{m:05d}", rng.uniform(0.5, 3.0), channel, device=device,
                     mcat="online", tag=tag)
            t += rng.uniform(5, 60)
        for _ in range(int(rng.integers(1, 3))):
            t += rng.uniform(60, 600)
            m = int(rng.integers(self.n_merchants))
            self.txn(acc, t, "payment", "debit", f"M{m:05d}", acc.median * rng.uniform(2, 6), channel,
                     device=device, mcat=str(rng.choice(["electronics", "online"])), tag=tag)

    def spike(self, rng: np.random.Generator, acc: _Account, t: float, tag: Tag) -> None:
        t = float(_times(rng, acc.hours, acc.offset, 1, t, t + _DAY)[0])  # at an hour it is usually active
        amount = acc.median * math.exp(rng.uniform(math.log(15), math.log(100)))
        m = int(rng.integers(self.n_merchants))
        if rng.random() < 0.5:
            self.txn(acc, t, "payment", "debit", f"M{m:05d}", amount, "app", device=acc.devices[0],
                     mcat=self.mcat[m], tag=tag)
        else:
            self.txn(acc, t, "transfer", "debit", _external(rng), amount, "app", device=acc.devices[0], tag=tag)

    def mule(self, rng: np.random.Generator, acc: _Account, t: float, tag: Tag) -> None:
        # A money mule: transfers in from several payers it never dealt with, sent on within the hour or two
        # to one or two new payees (or cashed out to a new card), keeping a small cut.
        t = float(_times(rng, acc.hours, acc.offset, 1, t, t + _DAY)[0])
        total = 0.0
        for _ in range(int(rng.integers(3, 9))):
            amount = acc.median * rng.uniform(2, 12)
            self.txn(acc, t, "transfer", "credit", _external(rng), amount, "app", device=acc.devices[0], tag=tag)
            total += round(amount, 2)
            t += rng.uniform(2, 25) * 60
        left = total * rng.uniform(0.85, 0.97)
        for k in range(int(rng.integers(1, 3)), 0, -1):
            t += rng.uniform(3, 40) * 60
            part = left if k == 1 else left * rng.uniform(0.4, 0.7)
            left -= part
            if rng.random() < 0.7:
                self.txn(acc, t, "transfer", "debit", _external(rng), part, "app", device=acc.devices[0], tag=tag)
            else:
                self.txn(acc, t, "withdrawal", "debit", f"B{int(rng.integers(10**7)):07d}", part, "app",
                         device=acc.devices[0], tag=tag)

    def dormant(self, rng: np.random.Generator, acc: _Account, t: float, tag: Tag, *, emit: bool = True) -> None:
        # A sold or taken-over account that had gone quiet: silent for most of the stream, then a short run of
        # transfers and a cash-out to payees it never used, often from a new device.
        span = self.t1 - self.t0
        lo = self.t0 + rng.uniform(0.3, 0.35) * span  # after a history of its own
        quiet = min(rng.uniform(0.55, 0.6) * span, 30 * _DAY)
        wake = float(_times(rng, acc.hours, acc.offset, 1, lo + quiet, min(lo + quiet + _DAY, self.t1))[0])
        self.silent[acc.id] = (lo, wake + 2 * _HOUR)
        if not emit:
            return
        device = _device(rng) if rng.random() < 0.6 else acc.devices[0]
        t = wake
        for _ in range(int(rng.integers(2, 6))):
            if rng.random() < 0.7:
                self.txn(acc, t, "transfer", "debit", _external(rng), acc.median * rng.uniform(2, 6), "app",
                         device=device, tag=tag)
            else:
                self.txn(acc, t, "withdrawal", "debit", f"B{int(rng.integers(10**7)):07d}",
                         acc.median * rng.uniform(2, 6), "app", device=device, tag=tag)
            t += rng.uniform(1, 20) * 60

    def vacation(self, rng: np.random.Generator, acc: _Account) -> None:
        """An ordinary customer away for days, then back to their usual habits (no label)."""
        span = self.t1 - self.t0
        lo = self.t0 + rng.uniform(0.2, 0.35) * span
        self.silent.setdefault(acc.id, (lo, lo + min(rng.uniform(0.5, 0.6) * span, 21 * _DAY)))

    def structuring(self, rng: np.random.Generator, acc: _Account, t: float, tag: Tag) -> None:
        t = float(_times(rng, acc.hours, acc.offset, 1, t, t + _DAY)[0])
        window = min(23.5 * _HOUR, 0.95 * max(self.t1 - t, _HOUR))
        payees = [_external(rng) for _ in range(int(rng.integers(1, 4)))]
        for dt in np.sort(rng.uniform(0, window, int(rng.integers(3, 6)))).tolist():
            # Stay inside [90%, 99.9%] of the threshold even after rounding to cents.
            amount = rng.uniform(0.9 * REPORTING_THRESHOLD + 0.5, 0.999 * REPORTING_THRESHOLD - 0.5)
            kind = "transfer" if rng.random() < 0.7 else "withdrawal"
            cp = str(rng.choice(payees)) if kind == "transfer" else acc.bank
            self.txn(acc, t + dt, kind, "debit", cp, amount, "app", device=acc.devices[0], tag=tag)

    def fund_isolation(self, rng: np.random.Generator, acc: _Account, t: float, tag: Tag) -> None:
        target = str(rng.choice(["P00", "P01", "P02"]))
        for _ in range(1 + int(rng.random() < 0.3)):
            self.txn(acc, t, "transfer", "debit", target, acc.median * rng.uniform(20, 200), "api",
                     cp_kind="platform_own", tag=tag)
            t += rng.uniform(30, 900)

    def liquidity_run(self, rng: np.random.Generator, pool: list[_Account], lo: float, hi: float, k: int) -> None:
        dur = min(rng.uniform(1, 2) * _HOUR, hi - lo)
        t = rng.uniform(lo, hi - dur)
        tag = ("liquidity_run", f"liquidity_run:platform#{k}")
        for i in np.sort(rng.choice(len(pool), max(1, round(rng.uniform(0.25, 0.4) * len(pool))), replace=False)):
            acc = pool[int(i)]
            ts = t + dur * rng.beta(2.0, 1.3)  # the run gathers pace as word spreads
            amount = acc.median * math.exp(rng.normal(math.log(25), 0.4)) * rng.uniform(0.4, 1.0)
            u = rng.random()
            if u < 0.5:  # cash out of the product first, then (mostly) off the platform
                self.txn(acc, ts, "redemption", "credit", acc.products[0], amount, "app", cp_kind="custody",
                         device=acc.devices[0], tag=tag)
                ts += rng.uniform(60, 600)
            if u < 0.3 or u >= 0.5:
                self.txn(acc, ts, "withdrawal", "debit", acc.bank, amount, "app", device=acc.devices[0], tag=tag)

    def crash_falls(self, crng: np.random.Generator, windows: int) -> Falls:
        falls: Falls = {}
        least = min(self.instruments, max(3, math.ceil(0.4 * self.instruments)))
        most = max(least, math.ceil(0.7 * self.instruments))
        for w, (lo, hi) in enumerate(self.segments(windows)):
            tc = crng.uniform(lo, max(lo, hi - 1800))
            hit = crng.choice(self.instruments, int(crng.integers(least, most + 1)), replace=False)
            for j in np.sort(hit).tolist():
                fs = tc + crng.uniform(0, 180)  # not every instrument reacts in the same minute
                falls.setdefault(j, []).append((fs, fs + crng.uniform(5, 15) * 60, crng.uniform(0.10, 0.25), w + 1))
        return falls

    def market(self, rng: np.random.Generator, falls: Falls) -> None:
        n = int((self.t1 - self.t0) // TICK_SECONDS)
        for j in range(self.instruments):
            name, venue = f"INS{j + 1:02d}", ("SSE", "SZSE", "HKEX", "platform")[j % 4]
            p0 = math.exp(rng.uniform(0, math.log(200)))
            sigma = math.exp(rng.uniform(math.log(0.004), math.log(0.04))) / math.sqrt(_DAY / TICK_SECONDS)
            half_spread, base_volume = rng.uniform(0.0001, 0.001), math.exp(rng.uniform(math.log(1e3), math.log(1e6)))
            times = self.t0 + TICK_SECONDS * np.arange(n) + rng.uniform(0, 10, n)
            r, volume = rng.normal(0, sigma, n), base_volume * rng.lognormal(0, 0.5, n)
            tags: dict[int, Tag] = {}
            for fs, fe, depth, w in falls.get(j, []):
                idx = np.nonzero((times >= fs) & (times <= fe))[0]
                r[idx] += math.log(1 - depth) / max(idx.size, 1)
                volume[idx] *= 5  # panic selling
                tags.update(dict.fromkeys(idx.tolist(), ("market_crash", f"market_crash:{name}#{w}")))
            prices = p0 * np.exp(np.cumsum(r))
            columns = (np.round(times * 1000).astype(np.int64).tolist(), prices.round(4).tolist(),
                       volume.round(2).tolist(), (prices * (1 - half_spread)).round(4).tolist(),
                       (prices * (1 + half_spread)).round(4).tolist())
            for i, (ms, p, v, bid, ask) in enumerate(zip(*columns, strict=True)):
                ev: dict[str, Any] = {"event_id": "", "event_type": "market", "ts": "", "instrument": name,
                                      "price": p, "volume": v, "bid": bid, "ask": ask, "venue": venue, "label": 0}
                tag = tags.get(i)
                if tag is not None:
                    ev["label"], ev["scenario"], ev["scenario_instance"] = 1, *tag
                self.rows.append((ms, _CST, ev))

    def segments(self, k: int) -> list[tuple[float, float]]:
        """k disjoint slices of the stream after a warm-up, so platform-wide episodes never overlap."""
        lo, hi = self.t0 + 0.3 * (self.t1 - self.t0), self.t0 + 0.95 * (self.t1 - self.t0)
        return [(lo + i * (hi - lo) / k, lo + (i + 1) * (hi - lo) / k) for i in range(k)]

    def finish(self) -> list[dict[str, Any]]:
        if self.silent:
            # Unlabelled activity of a silenced account inside its silence is dropped; its episode is kept.
            silent = {a: (round(lo * 1000), round(hi * 1000)) for a, (lo, hi) in self.silent.items()}
            self.rows = [r for r in self.rows
                         if r[2].get("label") or (w := silent.get(r[2].get("account_id", ""))) is None
                         or not w[0] <= r[0] < w[1]]
        self.rows.sort(key=itemgetter(0))  # stable: ties keep generation order, so output stays deterministic
        for n, (ms, tz, ev) in enumerate(self.rows):
            ev["event_id"] = f"{self.seed}-{n:08d}"
            ev["ts"] = (_EPOCH + timedelta(milliseconds=ms)).astimezone(tz).isoformat(timespec="milliseconds")
        return [row[2] for row in self.rows]


def _check_args(seed: int, accounts: int, days: float, start: datetime, instruments: int,
                scenarios: Sequence[str], rate_scale: float) -> None:
    """Refuse arguments generate() cannot honour, saying which and why."""
    unknown = sorted(set(scenarios) - set(ALL_SCENARIOS))
    if unknown:
        raise ValueError(f"unknown scenarios {unknown}; choose from {list(ALL_SCENARIOS)}")
    if seed < 0 or accounts < 1 or days <= 0 or instruments < 0 or rate_scale < 0:
        raise ValueError(f"need seed >= 0, accounts >= 1, days > 0, instruments >= 0, rate_scale >= 0; got "
                         f"{seed=}, {accounts=}, {days=}, {instruments=}, {rate_scale=}")
    if start.utcoffset() is None:
        raise ValueError(f"start must be timezone-aware, got {start.isoformat()}; add e.g. tzinfo=+08:00")


def _cast(s: _Stream, arng: np.random.Generator, n_inst: int) -> tuple[dict[str, list[_Account]], list[_Account]]:
    """Who plays which account-level part (n_inst each), and the customers left as bystanders."""
    accounts = len(s.customers)
    order = arng.permutation(accounts).tolist()
    cast: dict[str, list[_Account]] = {}
    used: set[int] = set()
    for name in _ACCOUNT_SCENARIOS:
        # Structurers move real money: CNY accounts with a sizeable median. An account that went dormant
        # had been active: at least a few transactions a day before it fell silent.
        fits = [i for i in order if (name != "structuring"
                or (s.customers[i].currency == "CNY" and s.customers[i].median >= 300))
                and (name != "dormant" or s.customers[i].rate >= 6)] or order
        free = [i for i in fits if i not in used] or fits
        cast[name] = [s.customers[free[k % len(free)]] for k in range(n_inst)]
        used.update(free[:n_inst])
    cast["fund_isolation"] = [s.institutions[k % len(s.custody_ids)] for k in range(n_inst)]
    bystanders = [s.customers[i] for i in order if i not in used] or s.customers
    return cast, bystanders


def generate(*, seed: int = 7, accounts: int = 500, days: float = 3.0, start: datetime = DEFAULT_START,
             instruments: int = 12, scenarios: Sequence[str] = ALL_SCENARIOS,
             rate_scale: float = 1.0) -> list[dict[str, Any]]:
    """A labelled synthetic stream of transactions and market ticks as contract dicts, sorted by ts.

    Labelled events carry `scenario` and `scenario_instance`. Instances: max(3, round(accounts / 100
    * rate_scale)) per account scenario and for fund isolation; max(3, round(days * rate_scale))
    liquidity runs; max(1, round(days / 3 * rate_scale)) crash windows, each hitting at least 40%
    (and at least 3) of the instruments. Scenarios start after the first 30% of the stream.

    >>> events = generate(seed=1, accounts=20, days=0.5, instruments=2)
    >>> events == generate(seed=1, accounts=20, days=0.5, instruments=2)
    True
    >>> sorted({e["scenario"] for e in events if e["label"]})[:3]
    ['card_testing', 'dormant', 'fund_isolation']
    """
    _check_args(seed, accounts, days, start, instruments, scenarios, rate_scale)
    paused = gc.isenabled()
    gc.disable()  # the events hold no cycles, yet rescanning them every ~700 allocations costs ~20% of the time
    try:
        s = _Stream(seed, accounts, days, start, instruments)
        rng = _rng(seed, 1)
        for acc in s.customers:
            s.normal(rng, acc)
        for acc in s.institutions:
            s.institution(rng, acc)

        # Who plays which part is drawn whatever scenarios are asked for, so subsets stay comparable.
        arng = _rng(seed, 2)
        cast, bystanders = _cast(s, arng, max(3, round(accounts / 100 * rate_scale)))
        for acc in bystanders[: max(1, round(0.01 * accounts))]:
            s.big_purchase(arng, acc)
        # About 1% of ordinary customers go quiet for days and come back: what a dormant account must be told from.
        vrng = _rng(seed, 4)
        for acc in bystanders[max(1, round(0.01 * accounts)):][: max(1, round(0.01 * accounts))]:
            s.vacation(vrng, acc)

        for k, name in enumerate(ALL_SCENARIOS):
            srng = _rng(seed, 100 + k)
            if name in cast:
                for j, acc in enumerate(cast[name]):
                    repeat = any(other is acc for other in cast[name][:j])  # only when accounts are scarce
                    tag = (name, f"{name}:{acc.id}" + (f"#{j}" if repeat else ""))
                    t = float(srng.uniform(s.t0 + 0.3 * (s.t1 - s.t0), s.t0 + 0.9 * (s.t1 - s.t0)))
                    if name in scenarios:
                        getattr(s, name)(srng, acc, t, tag)
                    elif name == "dormant":
                        s.dormant(srng, acc, t, tag, emit=False)  # its silence stays: other events do not move
            elif name == "liquidity_run" and name in scenarios:
                for j, (lo, hi) in enumerate(s.segments(max(3, round(days * rate_scale)))):
                    s.liquidity_run(srng, bystanders, lo, hi, j + 1)
            elif name == "market_crash":
                windows = max(1, round(days / 3 * rate_scale))
                s.market(_rng(seed, 3), s.crash_falls(srng, windows) if name in scenarios and instruments else {})
        return s.finish()
    finally:
        if paused:
            gc.enable()


def write_jsonl(events: Iterable[dict[str, Any]], path: str | Path) -> int:
    """Write events one JSON object per line, gzip-compressed if path ends with .gz; return the count."""
    path, n = Path(path), 0
    with open(path, "wb") as raw:
        # mtime=0 and no file name in the header: the same events always give the same bytes.
        binary: Any = gzip.GzipFile(filename="", mode="wb", fileobj=raw, mtime=0) if path.suffix == ".gz" else raw
        with io.TextIOWrapper(binary, encoding="utf-8", newline="\n") as out:
            for ev in events:
                out.write(json.dumps(ev, separators=(",", ":")) + "\n")
                n += 1
    return n


def sample(path: str | Path, *, seed: int = 7) -> int:
    """Write the small demo stream for tests/data (200 accounts, 2 days, 5 instruments); return its event count."""
    return write_jsonl(generate(seed=seed, accounts=200, days=2.0, instruments=5), path)


__all__ = ["ALL_SCENARIOS", "DEFAULT_START", "REPORTING_THRESHOLD", "TICK_SECONDS", "generate", "sample",
           "write_jsonl"]
