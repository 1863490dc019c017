"""Per-instrument market risk: abnormal returns, volatility shocks and crashes, scored before learning."""

from __future__ import annotations

import math
from array import array
from dataclasses import dataclass, field
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.findings import AlertMemory, Finding
from models.schemas import Reason

# A zero-variance product (a money-market NAV) would make any move infinite sigmas: floor at 1 bp.
MIN_SIGMA = 1e-4
# The drawdown window keeps the candidates for its high (a decreasing run of prices), at most one per
# time slot, so memory is bounded whatever the tick rate: at most CRASH_SLOTS + 1 prices. The price
# lost to a slot already holding a higher one mattered only in that slot's last window/64 seconds.
CRASH_SLOTS = 64
# The usual volatility learns each return only this many ticks later. Compared with a baseline that
# already contains them, a burst of 4-sigma moves can never look like 4x the usual volatility: the
# baseline would chase it (x1.5 per tick at alpha 0.03) faster than the short horizon can rise.
VOL_LAG = 8
# The tick spacing is a running median of the gaps between ticks (a "frugal" median: one float,
# moved 5% towards each new gap). A median, because the gaps that are not bars are the minority:
# weekends and holidays are 1 in 5 gaps of daily closes, the overnight gap 1 in 390 of minute bars.
# On daily closes it stays within 1.00-1.05 days; from a first gap 3x off it settles in ~22 ticks,
# inside the warm-up.
SPACING_STEP = 1.05
DETECTOR_RETURNS = "market.ew_volatility"
DETECTOR_DRAWDOWN = "market.drawdown"
_SQRT2 = math.sqrt(2.0)


class MarketParams(BaseModel):
    """Thresholds of the per-instrument market detectors.

    Every threshold is in the instrument's own units, whatever its bar interval: z in sigmas of its
    own per-tick returns, windows in seconds or in bars of its own tick spacing (whichever is
    longer). breadth_z = 2.4: one instrument moves 2.4 sigmas one way on 0.8% of its bars, so half
    of ten independent ones doing it in one bar is ~8e-9: it takes a common shock. On River's daily
    closes of ten US stocks (models.market_eval) it finds the 5 largest recorded sell-off days, with
    5 other warned days in 5 years; 2.5 missed the second largest, 3.0 (first set) three of five
    (docs/markets.md: the grid).
    That is per look: faster bars raise it (breadth_threshold), so the false alarms a day stay put.
    """

    model_config = ConfigDict(frozen=True, extra="forbid")

    anomaly_z: float = Field(default=5.0, gt=0, description="Abnormal |return|, in the instrument's own sigmas")
    warmup_ticks: int = Field(default=30, ge=VOL_LAG + 2, description="Returns learned before any return is judged")
    vol_shock_ratio: float = Field(default=4.0, gt=1, description="Short / long horizon volatility that is a shock")
    crash_drop_pct: float = Field(default=10.0, gt=0, lt=100, description="Fall from the window's high that is a crash")
    crash_window_seconds: float = Field(default=900.0, gt=0, description="How far back the crash high is looked for")
    crash_window_bars: int = Field(default=1, ge=1, description="The crash window in bars of the instrument's own "
                                                               "spacing, when longer than crash_window_seconds")
    critical_drop_pct: float = Field(default=20.0, gt=0, lt=100, description="Fall that makes a crash critical")
    long_alpha: float = Field(default=0.03, gt=0, lt=1, description="EW weight of the usual (long horizon) volatility")
    short_alpha: float = Field(default=0.3, gt=0, lt=1, description="EW weight of the short horizon volatility")
    breadth_z: float = Field(default=2.4, gt=0, description="A move, in the instrument's own sigmas over the breadth "
                                                            "horizon, that counts toward market-wide breadth")
    breadth_seconds: float = Field(default=60.0, gt=0, description="The breadth horizon: the move over about this "
                                                                   "long, or over one bar when bars are longer")
    breadth_z_per_decade: float = Field(default=0.35, ge=0, description="Added to breadth_z for each tenfold more "
                                                                        "breadth horizons a day than one")
    session_gap_bars: float = Field(default=10.0, gt=1, description="A gap of more bars than this opens a new "
                                                                    "session, whose first return is not judged")

    @model_validator(mode="after")
    def _consistent(self) -> MarketParams:
        if self.critical_drop_pct < self.crash_drop_pct:
            raise ValueError(f"critical_drop_pct ({self.critical_drop_pct}) must be >= crash_drop_pct "
                             f"({self.crash_drop_pct})")
        if self.short_alpha <= self.long_alpha:
            raise ValueError(f"short_alpha ({self.short_alpha}) must exceed long_alpha ({self.long_alpha}): "
                             "the short horizon is the faster one")
        return self


class InstrumentState:
    """What riskwatch remembers about one instrument: a few hundred bytes pickled, whatever the tick rate."""

    # New slots go at the end, with a default in _DEFAULTS: a state pickled by an older version (a
    # shorter tuple) then still loads. So the order is the pickle format, not alphabetical.
    __slots__ = ("alerts", "hist_px", "hist_ts", "last_price", "last_ts", "n", "pending",  # noqa: RUF023
                 "var_long", "var_short", "spacing", "drift", "offset")

    def __init__(self) -> None:
        self.last_price = 0.0
        self.last_ts = 0.0
        self.n = 0  # ticks learned (returns learned = n - 1)
        self.var_long = 0.0  # EW mean of squared log returns: the instrument's usual volatility
        self.var_short = 0.0
        self.pending = array("d")  # the last VOL_LAG returns, not yet in var_long
        self.hist_ts = array("d")  # candidates for the crash window's high: times, and decreasing prices
        self.hist_px = array("d")
        self.alerts: AlertMemory = {}
        self.spacing = 0.0  # running median of the gaps between ticks, seconds (0: not known yet)
        self.drift = 0.0  # EW sum of returns over the breadth horizon
        # Input offset of the last tick applied (-1: none, or not known to a replay): a tick at or
        # below it is a redelivery, skipped; scoring it again would learn a zero return.
        self.offset = -1

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        if len(state) > len(self.__slots__):
            raise ValueError(f"instrument state has {len(state)} fields, this version knows {len(self.__slots__)}")
        for name, value in zip(self.__slots__, state, strict=False):
            setattr(self, name, value)
        for name in self.__slots__[len(state):]:
            setattr(self, name, _DEFAULTS[name])


# Defaults of the slots added after the first release, for states pickled before them.
_DEFAULTS: dict[str, Any] = {"spacing": 0.0, "drift": 0.0, "offset": -1}


@dataclass(slots=True)
class MarketOutcome:
    """The score of one tick against its instrument's history, and what it revealed."""

    score: float
    z: float
    abnormal: bool
    findings: list[Finding] = field(default_factory=list)
    vol_ratio: float = 0.0
    drawdown_pct: float = 0.0
    crashed: bool = False
    move: int = 0  # -1 or +1: a move of at least breadth_z sigmas over the breadth horizon, that way
    spacing: float = 0.0  # the instrument's tick spacing as estimated so far, seconds

    @property
    def stressed(self) -> bool:
        """True when the tick moved abnormally or the instrument is in a crash: what market stress counts.

        Kept apart from `findings`, so a caller that filters findings (a disabled rule) still counts it.
        """
        return self.abnormal or self.crashed


def _fmt_price(p: float) -> str:
    return f"{p:,.2f}" if p >= 1 else f"{p:.4g}"


def _fmt_pct(x: float) -> str:
    # Two significant digits below 1%: a money-market fund's 0.012% move must not print as 0.0%.
    return f"{x:.1f}%" if abs(x) >= 1 else f"{x:.2g}%"


def _fmt_span(seconds: float) -> str:
    if seconds < 90:
        return f"{max(seconds, 0.0):.0f} seconds"
    if seconds < 5400:
        return f"{seconds / 60:.0f} minutes"
    return f"{seconds / 3600:.1f} hours"


def _window_high(state: InstrumentState, since: float) -> tuple[float, float]:
    # Prices are kept decreasing, so the first one still inside the window is its high. The newest
    # kept price always is: a fall across a gap longer than the window (a weekend, a halt) is still
    # a fall in one bar.
    if state.hist_ts:
        since = min(since, state.hist_ts[-1])
    for t, p in zip(state.hist_ts, state.hist_px, strict=True):
        if t >= since:
            return p, t
    return 0.0, 0.0


def _remember_price(state: InstrumentState, ts: float, price: float, window: float) -> None:
    hts, hpx = state.hist_ts, state.hist_px
    # A kept price at or below this one can never again be the window's high (this one outlives it);
    # dropping it on ties keeps the latest of equal highs, so "fell X% in N minutes" is the real fall.
    while hpx and hpx[-1] <= price:
        hts.pop()
        hpx.pop()
    slot_len = window / CRASH_SLOTS
    if not hts or math.floor(hts[-1] / slot_len) != math.floor(ts / slot_len):
        hts.append(ts)
        hpx.append(price)
    cutoff, k = ts - window, 0
    while k < len(hts) and hts[k] < cutoff:
        k += 1
    if k:
        del hts[:k]
        del hpx[:k]


def _learn_return(state: InstrumentState, r: float, params: MarketParams, warm: bool) -> None:
    # Running mean first, then EW: the first few returns are weighted equally instead of the first
    # one dominating the estimate for dozens of ticks.
    state.var_short += max(params.short_alpha, 1.0 / (state.n - 1)) * (r * r - state.var_short)
    state.pending.append(r)
    if len(state.pending) <= VOL_LAG:
        return
    old = state.pending.pop(0)
    r2 = old * old
    if warm:
        # Winsorise what the baseline learns at the anomaly threshold: a crash must not teach the
        # detector that crashes are usual, yet a lasting regime change still lifts the variance
        # (by up to 1 + alpha * z^2 per tick) within a few ticks.
        cap = params.anomaly_z * max(math.sqrt(state.var_long), MIN_SIGMA)
        r2 = min(r2, cap * cap)
    learned = state.n - 1 - VOL_LAG
    state.var_long += max(params.long_alpha, 1.0 / learned) * (r2 - state.var_long)


def _learn_spacing(state: InstrumentState, gap: float) -> float:
    # The frugal running median of the gaps (see SPACING_STEP); ticks at the same time are no gap.
    # It starts from the shorter of the first two gaps: minute bars that begin with a night would
    # otherwise take ~140 ticks to come down from 17 hours to a minute.
    m = state.spacing
    if gap > 0:
        if m <= 0 or (state.n <= 2 and gap < m):
            m = gap
        elif gap > m:
            m *= SPACING_STEP
        elif gap < m:
            m /= SPACING_STEP
        state.spacing = m
    return m


def crash_reach(params: MarketParams, spacing: float) -> float:
    """Seconds back the crash high is looked for: crash_window_seconds, or crash_window_bars bars if longer.

    Half a bar more than the bars, so a spacing estimate off by up to half a bar still reaches the
    close N bars back: on daily closes the default (1 bar) compares with the previous close, on
    ticks or minute bars it stays 900 seconds.
    """
    return max(params.crash_window_seconds, (params.crash_window_bars + 0.5) * spacing)


def breadth_threshold(params: MarketParams, spacing: float) -> float:
    """The breadth move, in sigmas, for an instrument `spacing` seconds apart: higher the more looks a day.

    A fixed threshold per bar is a fixed false-alarm rate per bar, 1,440 times as many a day on
    minute bars as on daily closes. In a one-factor market of correlation 0.3 to 0.5, each 0.35
    sigma more cuts the chance that half of ten instruments cross it together in one bar about
    tenfold, so breadth_z_per_decade = 0.35 holds the rate per day: 2.4 sigmas on daily closes, 2.88
    on hourly bars, 3.5 on minute bars and faster ticks (whose horizon is breadth_seconds). Measured
    on generated minute bars of ten instruments at correlation 0.5: 11-12 false market_stress
    alerts in 20 days at a flat 2.5, none at 3.6 nor 3.5.
    """
    looks = 86_400.0 / max(spacing, params.breadth_seconds)
    return params.breadth_z + params.breadth_z_per_decade * math.log10(looks) if looks > 1 else params.breadth_z


def score_tick(state: InstrumentState, tick_ts: float, price: float, event_id: str, instrument: str,
               params: MarketParams) -> MarketOutcome:
    """Score one price tick against the instrument's history, then fold it into that history.

    The score is the two-sided normal tail mass of the return's z, erf(|z| / sqrt 2): 0.95 at
    two sigmas, 0 during warm-up. `event_id` is part of the call so every detector is called the
    same way; dedup of the findings into alerts is the caller's (models.findings.track).

    >>> import random
    >>> rng, st, p = random.Random(7), InstrumentState(), MarketParams()
    >>> price = 100.0
    >>> for i in range(200):
    ...     price *= 1 + rng.gauss(0, 0.002)
    ...     out = score_tick(st, 60.0 * i, price, f"t{i}", "FUND-A", p)
    >>> out.findings
    []
    >>> out = score_tick(st, 60.0 * 200, price * 0.95, "t200", "FUND-A", p)
    >>> [f.category for f in out.findings], out.abnormal, round(out.score, 3)
    (['market_anomaly'], True, 1.0)
    """
    if state.n and tick_ts < state.last_ts:
        # A tick older than the last one is stale: its price against the newer one is a fake return.
        return MarketOutcome(0.0, 0.0, False)
    if state.n == 0:
        state.last_price, state.last_ts, state.n = price, tick_ts, 1
        _remember_price(state, tick_ts, price, crash_reach(params, state.spacing))
        return MarketOutcome(0.0, 0.0, False)

    prev = state.last_price
    r = math.log(price / prev)
    gap = tick_ts - state.last_ts
    spacing = _learn_spacing(state, gap)
    # A gap of many bars (a night between minute bars, a lunch break, a halt) opens a new session:
    # the return across it is not a bar's, so it is neither judged against per-bar volatility nor
    # learned (every open would otherwise be an abnormal move of every instrument). A fall across
    # it is still a crash.
    fresh = state.n > 1 and gap > params.session_gap_bars * spacing
    warm = state.n - 1 >= params.warmup_ticks
    judged = warm and not fresh
    sigma = max(math.sqrt(state.var_long), MIN_SIGMA)
    z = r / sigma if not fresh else 0.0
    score = math.erf(abs(z) / _SQRT2) if judged else 0.0
    abnormal = judged and abs(z) >= params.anomaly_z
    move = _breadth_move(state, params, r, sigma, spacing, fresh, judged)
    findings: list[Finding] = []
    anomaly, vol_ratio = _anomaly(state, params, r, z, sigma, price / prev, judged, abnormal, score, instrument)
    if anomaly is not None:
        findings.append(anomaly)
    reach = crash_reach(params, spacing)
    high_px, high_ts = _window_high(state, tick_ts - reach)
    drawdown = (1.0 - price / high_px) * 100.0 if high_px > price else 0.0
    if crashed := drawdown >= params.crash_drop_pct:
        findings.append(_crash(params, drawdown, tick_ts - high_ts, high_px, price, instrument))

    if not fresh:
        state.n += 1
        _learn_return(state, r, params, warm)
    state.last_price, state.last_ts = price, tick_ts
    _remember_price(state, tick_ts, price, reach)
    return MarketOutcome(score, z, abnormal, findings, vol_ratio, drawdown, crashed, move, spacing)


def _breadth_move(state: InstrumentState, params: MarketParams, r: float, sigma: float, spacing: float, fresh: bool,
                  judged: bool) -> int:
    """The tick's direction (1 up, -1 down) when its move over the breadth horizon is large enough, else 0.

    The move is an EW sum of the returns of the horizon's k ticks (k = 1 once bars are as long as
    the horizon, so on minute bars and daily closes it is this tick's z). Scaled by its own spread,
    sigma / sqrt(a (2 - a)), it is in sigmas whatever the tick rate: twelve 5-second ticks falling
    1 sigma each are a 4-sigma move, as the minute bar holding them would be.
    """
    a = min(1.0, spacing / params.breadth_seconds) if spacing > 0 else 1.0
    drift = state.drift = (1.0 - a) * state.drift + r if not fresh else 0.0
    z_move = drift * math.sqrt(a * (2.0 - a)) / sigma
    return (1 if z_move > 0 else -1) if judged and abs(z_move) >= breadth_threshold(params, spacing) else 0


def _anomaly(state: InstrumentState, params: MarketParams, r: float, z: float, sigma: float, change: float,
             judged: bool, abnormal: bool, score: float, instrument: str) -> tuple[Finding | None, float]:
    """The market_anomaly finding of a tick (an abnormal move, a volatility shock; None: neither) and its vol ratio.

    `change` is the price over the previous one.
    """
    reasons: list[Reason] = []
    level = "medium"
    anomaly_score = score
    if abnormal:
        pct = (change - 1.0) * 100.0
        verb = "fell" if pct < 0 else "rose"
        reasons.append(Reason(
            code="abnormal_move",
            message=f"price {verb} {_fmt_pct(abs(pct))} in one tick, {abs(z):.1f}x this instrument's usual "
                    f"move (sigma {_fmt_pct(sigma * 100)})",
            value=round(abs(z), 3), threshold=params.anomaly_z))
        if abs(z) >= 2 * params.anomaly_z:
            level = "high"
    # The shock is judged with this tick included, against the usual volatility without it.
    var_short_after = state.var_short + params.short_alpha * (r * r - state.var_short)
    ratio_before = math.sqrt(state.var_short) / sigma
    vol_ratio = math.sqrt(var_short_after) / sigma
    # One jump alone lifts the short volatility past the ratio; that is an abnormal move, reported as
    # such. A shock is volatility that stays high, so an abnormal tick only adds it if it was already on.
    if judged and vol_ratio >= params.vol_shock_ratio and (not abnormal or ratio_before >= params.vol_shock_ratio):
        reasons.append(Reason(
            code="volatility_shock",
            message=f"short-term volatility {vol_ratio:.1f}x its usual level",
            value=round(vol_ratio, 3), threshold=params.vol_shock_ratio))
        if vol_ratio >= 2 * params.vol_shock_ratio:
            level = "high"
        anomaly_score = max(anomaly_score, math.erf(vol_ratio / _SQRT2))
    if not reasons:
        return None, vol_ratio
    return Finding("market_anomaly", level, anomaly_score, DETECTOR_RETURNS, reasons, "instrument", instrument), \
        vol_ratio


def _crash(params: MarketParams, drawdown: float, span: float, high_px: float, price: float,
           instrument: str) -> Finding:
    """The market_crash finding of a fall of `drawdown` percent from `high_px` within `span` seconds."""
    crit = drawdown >= params.critical_drop_pct
    return Finding(
        "market_crash", "critical" if crit else "high",
        # A ranking aid, not a probability: 0.75 at the crash threshold's default, 1 at critical.
        min(1.0, 0.5 + 0.5 * drawdown / params.critical_drop_pct),
        DETECTOR_DRAWDOWN,
        [Reason(code="price_crash",
                message=f"price fell {drawdown:.1f}% in {_fmt_span(span)} "
                        f"(from {_fmt_price(high_px)} to {_fmt_price(price)})",
                value=round(drawdown, 3),
                threshold=params.critical_drop_pct if crit else params.crash_drop_pct)],
        "instrument", instrument)


__all__ = ["InstrumentState", "MarketOutcome", "MarketParams", "breadth_threshold", "crash_reach", "score_tick"]
