"""The transaction anomaly detector: per-account surprises, summed, calibrated online to [0, 1]."""

from __future__ import annotations

import math
from array import array
from collections.abc import Mapping
from typing import Any

from river import base

from models.features import (
    DORMANT_FACTOR,
    DORMANT_MIN_SECONDS,
    SESSION_SECONDS,
    VELOCITY_WINDOW,
    TxnFeatures,
    tiny_amount,
)
from models.findings import span_text

# How much each surprise counts: nats of evidence, scaled down for features that legitimately vary.
WEIGHTS: dict[str, float] = {
    "amount": 1.0,
    "new_counterparty": 0.7,
    "new_device": 1.0,
    "new_country": 1.0,
    "velocity": 0.6,
    "tiny_burst": 1.2,
    "hour": 0.5,
    "spend": 0.6,
    "pass_through": 1.0,
    "dormant": 1.0,
    "session": 0.7,
}


# No single feature may carry more than this many nats: one odd trait alone (a new phone, a big
# purchase) is common; risk shows as several at once. Extremes are the deterministic rules' job.
CAP = 6.0


def _poisson_tail_surprise(k: int, lam: float) -> float:
    """-ln P(X >= k) for X ~ Poisson(lam): how surprising k or more events are."""
    if k <= 0:
        return 0.0
    term = math.exp(-lam)
    cdf = term
    for i in range(1, k):
        term *= lam / i
        cdf += term
    tail = max(1.0 - cdf, 1e-300)
    return -math.log(tail)


def surprises(f: TxnFeatures) -> dict[str, float]:
    """Non-negative surprises (nats) of the features that stand out; absent means 'as usual'."""
    conf = f.history / (f.history + 4.0)
    out: dict[str, float] = {}
    z = f.amount_z
    if not f.debit:
        # Incoming money is rarely the loss event; only a huge credit is worth a mention.
        if z > 3.0:
            out["amount"] = (z - 3.0) * conf * 0.5
        return out
    if not f.external:
        # Money that stays on the platform in the customer's name (an investment, a loan repayment)
        # is not where losses happen: only an extreme amount is worth a mention.
        if z > 3.0:
            out["amount"] = min(z - 3.0, CAP) * conf * 0.5
    elif z > 1.0:
        out["amount"] = min(z - 1.0, CAP) * conf
    if f.new_counterparty:
        out["new_counterparty"] = -math.log(f.p_new_counterparty)
    if (f.new_device or f.fresh_device) and f.p_new_device < 1.0:
        # A device first seen minutes ago is as telling as a new one: takeovers come in sessions.
        out["new_device"] = -math.log(f.p_new_device)
    if f.new_country:
        # A debit from a country the account never paid from: with a new device, the classic takeover.
        v = -math.log(f.p_new_country)
        out["new_country"] = v if v < CAP else CAP
    if f.debits_10m > max(1, f.burst_max):
        # Only bursts beyond the account's own largest so far: people shop in bursts too.
        v = _poisson_tail_surprise(f.debits_10m - f.burst_max, f.expected_10m) - 1.0
        if v > 0:
            out["velocity"] = min(v, CAP)
    if f.tiny_10m >= 2:
        out["tiny_burst"] = float(f.tiny_10m - 1)
    if f.hour_share < 1.0 / 24.0:
        out["hour"] = -math.log(f.hour_share * 24.0) * conf
    if f.day_out_ratio > 3.0:
        out["spend"] = math.log(f.day_out_ratio / 3.0)
    v = pass_through(f)
    if v > 0.0:
        out["pass_through"] = v
    v = dormancy(f.idle, f.typical_gap)
    if v > 0.0:
        out["dormant"] = v
    if f.session > 0.0:
        # Last: the session's share is what is left out when the evidence is carried on.
        out["session"] = min(f.session, CAP)
    return out


def pass_through(f: TxnFeatures) -> float:
    """Nats for sending on money just received from new counterparties (a mule's pattern), 0 if not so.

    Counts when most of this external debit is covered by that recent inflow: ln of the amount
    passed through against the account's usual debit of this type.
    """
    if not f.external or f.inflow_new <= 0.0:
        return 0.0
    return _pass_through(f.amount, f.inflow_new, f.median_amount)


def _pass_through(amount: float, inflow: float, usual: float) -> float:
    sent = amount if amount < inflow else inflow
    if sent < 0.5 * amount or sent <= usual:
        return 0.0
    v = math.log(sent / usual)
    return v if v < CAP else CAP


def dormancy(idle: float, typical_gap: float) -> float:
    """Nats for waking after a silence far longer than the account's rhythm, 0 if it is not dormant."""
    quiet = DORMANT_FACTOR * typical_gap
    if quiet < DORMANT_MIN_SECONDS:
        quiet = DORMANT_MIN_SECONDS
    if idle <= quiet:
        return 0.0
    v = 1.0 + math.log(idle / quiet)
    return v if v < 4.0 else 4.0


# Every event above the largest raw score in the calibration tied at 1.0, which lost the ranking at
# the very top: on indep seed 1, 453 events (46 of them normal) tied, more than a 0.25-per-1,000
# budget, so the recall-versus-budget curve read 0 there. Below this hair every operating point the
# budget controller can reach (its share never goes under budget / e^3), so no warning changes.
TIE_BREAK = 1e-9


class Calibrator:
    """Online empirical CDF of raw scores on a log-spaced histogram, with exponential forgetting."""

    __slots__ = ("bins", "counts", "horizon", "log_span", "max_raw", "top", "total")

    def __init__(self, bins: int = 256, max_raw: float = 64.0, horizon: float = 200_000.0) -> None:
        self.bins = bins
        self.max_raw = max_raw
        self.horizon = horizon
        self.counts = array("d", bytes(8 * bins))
        self.total = 0.0
        self._constants()

    def _constants(self) -> None:
        # The two constants of _pos, for the scorer's inlined copy (derived: not pickled).
        self.log_span = math.log1p(self.max_raw)
        self.top = self.bins - 1e-9

    def _pos(self, raw: float) -> float:
        return min(math.log1p(max(raw, 0.0)) / math.log1p(self.max_raw), 1.0) * (self.bins - 1e-9)

    def update(self, raw: float) -> None:
        """Count one raw score; halve all counts when the horizon is reached so old traffic fades."""
        self.counts[int(self._pos(raw))] += 1.0
        self.total += 1.0
        if self.total >= self.horizon:
            self.halve()

    def halve(self) -> None:
        """Halve every count and the total: old traffic fades (run when the horizon is reached)."""
        counts = self.counts
        for i in range(self.bins):
            counts[i] *= 0.5
        self.total *= 0.5

    def cdf(self, raw: float) -> float:
        """Share of past raw scores below `raw`, interpolated inside its bin; 0.5 before any data.

        Beyond the largest raw score seen, the share is 1 less a hair that shrinks as `raw` grows
        (TIE_BREAK): a larger raw score still ranks higher instead of tying at 1.0.
        """
        if self.total <= 0:
            return 0.5
        pos = self._pos(raw)
        b = int(pos)
        below = sum(self.counts[:b])
        cdf = (below + self.counts[b] * (pos - b)) / self.total
        return 1.0 - TIE_BREAK * (1.0 - pos / self.bins) if cdf >= 1.0 else max(cdf, 0.0)

    def __getstate__(self) -> tuple[Any, ...]:
        return (self.bins, self.max_raw, self.counts, self.total, self.horizon)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        self.bins, self.max_raw, self.counts, self.total, self.horizon = state
        self._constants()


# The budget controller (SurpriseDetector.spend/refresh). Each new model warning lowers the
# exceedance share it warns at by GAIN (in log terms), each event raises it by GAIN * budget, so the
# share settles where new warnings come at `budget` per event. 0.05 moves the share 5% per warning:
# at a 2-in-1,000 budget it converges from 2x off in about 7,000 events of a partition and wanders
# about +-10% around its settled value.
BUDGET_GAIN = 0.05
# How far the learned share may sit from the budget itself (log units, e^3 = 20x): bounds what a
# burst of warnings or a long quiet spell can do to the operating point.
BUDGET_LOG_RANGE = 3.0
# Events between two re-computations of the operating point on the hot path (drift of at most
# GAIN * budget * 256 = 2.6% at the default budget in between).
BUDGET_REFRESH = 256.0
# An incident is not noise: within a window of events that should bring BUDGET_WINDOW warnings, at
# most BUDGET_BURST times that many count against the budget. Uncapped, a burst of N warnings lowers
# the share e^(GAIN * N) (to its floor at N = 120), and climbing back takes 1 / (GAIN * budget) =
# 10,000 events of a partition per factor e. The window is the time one warning is due (500 events of
# a partition at 2 per 1,000): ordinary traffic brings more than 4 in it 0.4% of the time, a liquidity
# run (a quarter of the accounts withdrawing within two hours) brings 15 and more to a partition. Measured on the
# evaluation streams (docs/evaluation.md): with 15 per window of 5, the runs' warnings took a third of
# the budget on full streams (0.48x left for ordinary traffic on seed 505, 0.54x now); on streams
# without incidents, what the cap clips of ordinary clustering costs 2-7% more warnings. 3 per window
# of 1 clipped 5-10%, and shifted enough of a day's warnings to bursts that confirmed verdicts no
# longer kept their kind's rate (tests/kafka/test_feedback_e2e.py).
BUDGET_WINDOW = 1.0
BUDGET_BURST = 4.0


# Per-type amount shifts (SurpriseDetector.learn_shift): a stochastic-approximation median of how far
# each transaction type sits from its accounts' typical debit, in log units. The step shrinks as
# 1/count from 0.1 and stays at SHIFT_STEP: a type's first few hundred events place it, and a
# median moved by sign steps cannot be dragged by the very outliers the detector is looking for.
SHIFT_STEP = 0.002
SHIFT_LIMIT = 4.0  # e^4 = 55x: no type is that far from its accounts' typical debit


class SurpriseDetector(base.AnomalyDetector):
    """River anomaly detector over per-account surprises: raw = weighted sum, score = online ECDF rank.

    It also keeps the model's operating point: the share of events whose score may open a warning,
    learned so that new warnings are opened at the budgeted rate (`spend`, `refresh`).

    >>> det = SurpriseDetector()
    >>> for i in range(1000):
    ...     det.learn_one({"amount": (i % 10) / 10})
    >>> det.score_one({"amount": 0.0}) < 0.2 < det.score_one({"amount": 5.0})
    True
    """

    # Budget controller state; class defaults so detectors pickled before it existed still load.
    _anchor = 0.0  # calibration total at the last refresh
    _refresh_at = 0.0
    # category -> [log(share / budget), calibration total where its spend window began, warnings counted
    # in that window, share in force]: one operating point per category of model warning (plain lists,
    # so the restricted unpickler needs no new class).
    points: dict[str, list[float]] | None = None
    share = 0.0  # the largest share in force over the categories: no score below 1 - share can warn
    # (txn_type, debit) -> [shift, count]: how much larger this type of transaction usually is than the
    # account's typical debit, in log units. Mixing card payments with withdrawals and investments
    # otherwise widens every account's spread so much that a 20x spike is a 3-sigma move. None until
    # first used, so detectors pickled before it existed still load.
    # Indexed by `debit` (credits at 0, debits at 1), then by transaction type.
    shifts: tuple[dict[str, list[float]], dict[str, list[float]]] | None = None

    def __init__(self, weights: dict[str, float] | None = None, horizon: float = 200_000.0) -> None:
        self.weights = weights
        self.horizon = horizon
        self._w = dict(WEIGHTS if weights is None else weights)
        self.calibrator = Calibrator(horizon=horizon)

    def raw(self, x: dict[Any, Any]) -> float:
        """Weighted evidence in nats before calibration."""
        w = self._w
        return sum(v * w.get(k, 0.0) for k, v in x.items())

    def learn_one(self, x: dict[Any, Any]) -> None:
        """Add the event's raw score to the calibration histogram."""
        self.calibrator.update(self.raw(x))

    def score_one(self, x: dict[Any, Any]) -> float:
        """Calibrated score in [0, 1]: the share of past events that were less surprising."""
        return self.calibrator.cdf(self.raw(x))

    def learn_raw(self, raw: float) -> None:
        """learn_one for a raw score already computed (the hot path computes it once)."""
        self.calibrator.update(raw)

    def score_raw(self, raw: float) -> float:
        """score_one for a raw score already computed."""
        return self.calibrator.cdf(raw)

    @property
    def seen(self) -> float:
        """Events the calibration has seen (decayed)."""
        return self.calibrator.total

    def shift(self, txn_type: str, debit: bool) -> float:
        """The learned log-amount shift of a transaction type (0 for a type not seen yet)."""
        shifts = self.shifts
        if shifts is None:
            return 0.0
        entry = shifts[debit].get(txn_type)
        return 0.0 if entry is None else entry[0]

    def learn_shift(self, txn_type: str, debit: bool, residual: float) -> None:
        """Move the type's shift one step towards `residual`'s side (log amount - shift - account median)."""
        shifts = self.shifts
        if shifts is None:
            shifts = self.shifts = ({}, {})
        entry = shifts[debit].get(txn_type)
        if entry is None:
            entry = shifts[debit][txn_type] = [0.0, 0.0]
        n = entry[1] + 1.0
        entry[1] = n
        step = 0.1 / n
        if step < SHIFT_STEP:
            step = SHIFT_STEP
        if residual > 0.0:
            v = entry[0] + step
            entry[0] = v if v < SHIFT_LIMIT else SHIFT_LIMIT
        elif residual < 0.0:
            v = entry[0] - step
            entry[0] = v if v > -SHIFT_LIMIT else -SHIFT_LIMIT

    def refresh(self, budgets: Mapping[str, float], warmup: float = 0.0) -> float:
        """Let each category's share drift up for the events seen since the last refresh; return the largest.

        `budgets` maps each category of model warning to its budget in new warnings per event. Called
        every BUDGET_REFRESH events and before `spend`. Events before `warmup` (the calibration's own
        warm-up, when no warning can be raised) do not count: the share would otherwise start 20x too
        high and spend a burst of warnings coming down.
        """
        if self.weights is None and len(self._w) != len(WEIGHTS):
            # Pickled by a release with fewer features: their weights are the defaults of now.
            self._w = dict(WEIGHTS)
        points = self.points
        if points is None:
            points = self.points = {}
        total = self.calibrator.total
        seen = total - max(self._anchor, warmup)
        # A halving of the calibration (seen < 0) loses at most BUDGET_REFRESH events of drift.
        top = 0.0
        for category, budget in budgets.items():
            point = points.get(category)
            if point is None:
                point = points[category] = [0.0, 0.0, 0.0, budget]
            if seen > 0:
                point[0] = min(point[0] + BUDGET_GAIN * budget * seen, BUDGET_LOG_RANGE)
            point[3] = budget * math.exp(point[0])
            if point[3] > top:
                top = point[3]
        self._anchor = total
        self._refresh_at = total + BUDGET_REFRESH
        self.share = top
        return top

    def share_of(self, category: str) -> float:
        """The share of events a model warning of `category` may be opened at (0 before any refresh)."""
        point = None if self.points is None else self.points.get(category)
        return 0.0 if point is None else point[3]

    def spend(self, category: str, budgets: Mapping[str, float], warmup: float = 0.0) -> float:
        """Count one new model warning of `category` against its budget; return its (lower) share now.

        Past BUDGET_BURST times the warnings a window of events should bring, further warnings of
        that window are an incident, not noise, and do not move the share.
        """
        self.refresh(budgets, warmup)
        budget = budgets.get(category)
        if budget is None:
            return self.share
        point = self.points[category]  # type: ignore[index]  # refresh() made it
        total = self.calibrator.total
        if not point[1] <= total < point[1] + BUDGET_WINDOW / budget:
            point[1], point[2] = total, 0.0
        if point[2] < BUDGET_BURST * BUDGET_WINDOW:
            point[2] += 1.0
            point[0] = max(point[0] - BUDGET_GAIN, -BUDGET_LOG_RANGE)
            point[3] = budget * math.exp(point[0])
            self.share = max(p[3] for p in self.points.values())  # type: ignore[union-attr]
        return point[3]


def explain(x: dict[str, float], f: TxnFeatures, currency: str, local_hour: int, top: int = 3,
            min_nats: float = 1.0) -> list[tuple[str, str, float, float | None]]:
    """Readable reasons for the largest surprises: (code, message, value, baseline)."""
    out: list[tuple[float, tuple[str, str, float, float | None]]] = []
    for k, v in x.items():
        contrib = v * WEIGHTS.get(k, 0.0)
        if contrib < min_nats:
            continue
        if k == "amount":
            r = (k, f"amount {f.amount_ratio:.1f}x this account's median ({currency} {f.median_amount:,.0f})",
                 f.amount_ratio, f.median_amount)
        elif k == "new_counterparty":
            r = (k, f"first payment to this counterparty (account pays new ones "
                 f"{f.p_new_counterparty:.0%} of the time)", 1.0, f.p_new_counterparty)
        elif k == "new_device":
            r = (k, f"first use of this device on the account (new devices {f.p_new_device:.0%} of the time)",
                 1.0, f.p_new_device)
        elif k == "new_country":
            r = (k, f"first debit from {f.country} on the account (new countries {f.p_new_country:.0%} of the time)",
                 1.0, f.p_new_country)
        elif k == "velocity":
            hi = max(1, math.ceil(f.expected_10m + 2 * math.sqrt(f.expected_10m)))
            r = (k, f"{f.debits_10m} debits in {VELOCITY_WINDOW / 60:.0f} minutes (usual: 0-{hi})",
                 float(f.debits_10m), float(hi))
        elif k == "tiny_burst":
            r = (k, f"{f.tiny_10m} tiny debits (under {currency} {tiny_amount(currency):g}) in "
                    f"{VELOCITY_WINDOW / 60:.0f} minutes, "
                 "a card-testing pattern", float(f.tiny_10m), 1.0)
        elif k == "pass_through":
            sent = min(f.amount, f.inflow_new)
            r = (k, f"sends on {currency} {sent:,.0f} of {currency} {f.inflow_new:,.0f} received from new "
                 "counterparties in the last hours, a money-mule pattern", sent, f.inflow_new)
        elif k == "dormant":
            r = (k, f"first transaction in {f.idle / 86400:.1f} days; this account usually transacts every "
                 f"{span_text(f.typical_gap)}", f.idle / 86400, f.typical_gap / 86400)
        elif k == "session":
            r = (k, f"follows other unusual activity on this account in the last {SESSION_SECONDS / 60:.0f} "
                 "minutes", f.session, 1.0)
        elif k == "hour":
            r = (k, f"active at {local_hour:02d}h local time, when this account rarely is "
                 f"({f.hour_share:.1%} of its activity)", f.hour_share, 1 / 24)
        else:
            r = (k, f"{currency} {f.day_out:,.0f} out today, {f.day_out_ratio:.1f}x its usual daily outflow",
                 f.day_out_ratio, 1.0)
        out.append((contrib, r))
    out.sort(key=lambda t: -t[0])
    return [r for _, r in out[:top]]


__all__ = [
    "BUDGET_GAIN",
    "BUDGET_LOG_RANGE",
    "TIE_BREAK",
    "WEIGHTS",
    "Calibrator",
    "SurpriseDetector",
    "dormancy",
    "explain",
    "pass_through",
    "surprises",
]
