"""Per-instrument market risk: calm markets stay quiet, crashes and abnormal moves are found and deduped."""

from __future__ import annotations

import math
import pickle
import random

import pytest
from pydantic import ValidationError

from models.findings import Finding, open_or_update, to_alert, track
from models.market import InstrumentState, MarketOutcome, MarketParams, breadth_threshold, score_tick

T0 = 1_750_000_000.0


def walk(state: InstrumentState, n: int, *, seed: int = 1, sigma: float = 0.002, start: float = 100.0,
         t0: float = T0, step: float = 10.0, params: MarketParams | None = None) -> list[MarketOutcome]:
    """A calm random walk: returns the outcome of every tick."""
    rng, p, price, outs = random.Random(seed), params or MarketParams(), start, []
    for i in range(n):
        price *= math.exp(rng.gauss(0.0, sigma))
        outs.append(score_tick(state, t0 + step * i, price, f"w{seed}-{i}", "FUND-A", p))
    return outs


def test_calm_random_walk_has_no_findings() -> None:
    for seed in range(5):
        outs = walk(InstrumentState(), 2000, seed=seed)
        assert [f for o in outs for f in o.findings] == []
        assert all(0.0 <= o.score <= 1.0 for o in outs)


def test_warm_up_scores_zero() -> None:
    p = MarketParams(warmup_ticks=30)
    outs = walk(InstrumentState(), 31, params=p)
    assert all(o.score == 0.0 and not o.abnormal for o in outs)


def test_twelve_percent_drop_in_ten_minutes_is_a_crash() -> None:
    st = InstrumentState()
    walk(st, 200, step=10.0)
    t, price = T0 + 2000.0, st.last_price
    outs = []
    for i in range(1, 11):  # ten one-minute ticks, 1.27% down each: about -12% in all
        outs.append(score_tick(st, t + 60.0 * i, price * (1 - 0.0127) ** i, f"c{i}", "FUND-A", MarketParams()))
    crash = [f for o in outs for f in o.findings if f.category == "market_crash"]
    assert crash, "a 12% fall within the window must be a crash"
    assert outs[-1].crashed and outs[-1].stressed and outs[-1].drawdown_pct > 12
    last = crash[-1]
    assert last.level == "high"
    assert last.entity_type == "instrument" and last.entity_id == "FUND-A"
    assert last.reasons[0].message.startswith("price fell 12.")
    assert "minutes (from" in last.reasons[0].message
    assert 0.0 <= last.score <= 1.0


def test_drop_beyond_critical_is_critical_and_old_highs_expire() -> None:
    st, p = InstrumentState(), MarketParams()
    walk(st, 100)
    t, price = st.last_ts, st.last_price
    out = score_tick(st, t + 30, price * 0.75, "big", "FUND-A", p)
    assert {f.category: f.level for f in out.findings}["market_crash"] == "critical"
    # Long after the window the old high is forgotten: the lower price is the new normal.
    out = score_tick(st, t + 30 + p.crash_window_seconds + 120, price * 0.75, "later", "FUND-A", p)
    assert not any(f.category == "market_crash" for f in out.findings)


def test_abnormal_move_is_market_anomaly() -> None:
    st, p = InstrumentState(), MarketParams()
    walk(st, 300, sigma=0.002)
    out = score_tick(st, st.last_ts + 10, st.last_price * 0.985, "jump", "FUND-A", p)  # ~7.5 sigma
    assert out.abnormal and out.z < -p.anomaly_z
    assert out.score > 0.999
    [f] = out.findings
    assert (f.category, f.level, f.detector) == ("market_anomaly", "medium", "market.ew_volatility")
    assert [r.code for r in f.reasons] == ["abnormal_move"]  # one jump is not a volatility regime
    assert f.reasons[0].message.startswith("price fell 1.5% in one tick")
    huge = score_tick(st, st.last_ts + 10, st.last_price * 1.04, "jump2", "FUND-A", p)
    assert huge.findings[0].level == "high"
    assert "price rose" in huge.findings[0].reasons[0].message


def test_sustained_volatility_is_a_volatility_shock() -> None:
    st, p = InstrumentState(), MarketParams()
    walk(st, 300, sigma=0.002)
    rng, price, codes = random.Random(3), st.last_price, set()
    for i in range(30):  # ~4.5 sigma moves, each below the abnormal threshold
        price *= math.exp(0.009 * (1 if rng.random() < 0.5 else -1))
        out = score_tick(st, st.last_ts + 10, price, f"v{i}", "FUND-A", p)
        codes |= {r.code for f in out.findings for r in f.reasons}
    assert "volatility_shock" in codes


def test_stale_tick_is_ignored_and_state_pickles() -> None:
    st, p = InstrumentState(), MarketParams()
    walk(st, 100)
    n = st.n
    out = score_tick(st, st.last_ts - 5, 1.0, "stale", "FUND-A", p)
    assert (out.score, out.findings, st.n) == (0.0, [], n)
    clone = pickle.loads(pickle.dumps(st))
    a = score_tick(st, st.last_ts + 10, st.last_price * 0.97, "x", "FUND-A", p)
    b = score_tick(clone, clone.last_ts + 10, clone.last_price * 0.97, "x", "FUND-A", p)
    assert (a.score, a.z, a.findings) == (b.score, b.z, b.findings)
    assert len(st.hist_ts) <= 65 and len(pickle.dumps(st)) < 4096


def test_history_is_bounded_at_high_tick_rates() -> None:
    st = InstrumentState()
    walk(st, 5000, step=0.05)  # 20 ticks a second
    assert len(st.hist_ts) == len(st.hist_px) <= 65


def test_dedup_reuses_alert_ids_within_cooldown() -> None:
    st, p = InstrumentState(), MarketParams()
    walk(st, 100)
    t, price, raised = st.last_ts, st.last_price, []
    for i in range(1, 6):
        out = score_tick(st, t + 60 * i, price * (1 - 0.055 * i), f"d{i}", "FUND-A", p)
        raised += track(st.alerts, [f for f in out.findings if f.category == "market_crash"], t + 60 * i, f"d{i}")
    assert len({r.alert_id for r in raised}) == 1
    assert [r.is_new for r in raised] == [True] + [False] * (len(raised) - 1)
    assert any(r.escalated for r in raised)  # high, then critical past a 20% fall
    assert raised[-1].event_ids == [f"d{i}" for i in range(6 - len(raised), 6)]
    alert = raised[-1].to_alert()
    assert alert.alert_id == raised[0].alert_id and alert.level == "critical"
    assert alert.created_at.tzinfo is not None and alert.created_at.timestamp() == t + 300


def test_open_or_update_cooldown_redelivery_and_cap() -> None:
    f = Finding("market_crash", "high", 0.9, "d", [], "instrument", "X")
    mem: dict = {}
    a, ids, new = open_or_update(mem, f, 0.0, "e0")
    assert new and len(a) == 24 and int(a, 16) >= 0
    assert open_or_update(mem, f, 10.0, "e0")[1] == ["e0"]  # a redelivered event adds nothing
    for i in range(1, 80):
        b, ids, new = open_or_update(mem, f, float(i), f"e{i}", max_ids=50)
        assert b == a and not new
    assert len(ids) == 50
    c, ids, new = open_or_update(mem, f, 79.0 + 1800.0, "late")
    assert new and c != a and ids == ["late"]
    # The id is a content hash: the same opening event always opens the same alert.
    assert open_or_update({}, f, 5.0, "late")[0] == c
    alert = to_alert(f, c, ids, created_at=1.0, event_ts=2.0)
    assert alert.event_ts.timestamp() == 2.0 and alert.category == "market_crash"


def test_params_are_validated() -> None:
    with pytest.raises(ValidationError):
        MarketParams(anomaly_z=0)
    with pytest.raises(ValidationError):
        MarketParams(crash_drop_pct=25, critical_drop_pct=20)
    with pytest.raises(ValidationError):
        MarketParams(unknown=1)  # type: ignore[call-arg]
    with pytest.raises(ValidationError):
        MarketParams().anomaly_z = 3  # type: ignore[misc]


DAY = 86_400.0


def closes(n: int, *, seed: int = 1, sigma: float = 0.01, start: float = 1_420_000_000.0) -> list[tuple[float, float]]:
    """(ts, price) of n daily closes on weekdays only: Monday follows Friday by three days."""
    rng, t, price, out = random.Random(seed), start, 100.0, []
    while len(out) < n:
        if (t // DAY + 4) % 7 < 5:  # 1970-01-01 was a Thursday: days 0..4 after Monday are weekdays
            price *= math.exp(rng.gauss(0.0, sigma))
            out.append((t, price))
        t += DAY
    return out


def feed(st: InstrumentState, ticks: list[tuple[float, float]], p: MarketParams | None = None) -> list[MarketOutcome]:
    p = p or MarketParams()
    return [score_tick(st, ts, px, f"e{i}", "ACME", p) for i, (ts, px) in enumerate(ticks)]


@pytest.mark.parametrize(("gaps", "expect"), [
    ([DAY, DAY, DAY, DAY, 3 * DAY], DAY),  # daily closes, weekends
    ([60.0] * 389 + [17.5 * 3600], 60.0),  # minute bars, the overnight gap
    ([3.0, 5.0, 4.0, 6.0, 5.0, 7.0, 5.0], 5.0),  # irregular ticks: the median gap
])
def test_spacing_is_the_running_median_of_gaps(gaps: list[float], expect: float) -> None:
    st, t, p = InstrumentState(), T0, MarketParams()
    score_tick(st, t, 100.0, "e", "ACME", p)
    for i in range(600):
        t += gaps[i % len(gaps)]
        out = score_tick(st, t, 100.0, "e", "ACME", p)
    assert expect / 1.06 <= st.spacing == out.spacing <= expect * 1.06
    before = st.spacing
    score_tick(st, t, 100.0, "same-time", "ACME", p)  # a second tick at the same time is no gap
    assert st.spacing == before


def test_daily_breadth_move_is_flagged_without_being_abnormal() -> None:
    st = InstrumentState()
    feed(st, closes(200))
    sigma = math.sqrt(st.var_long)
    t = st.last_ts + DAY
    out = score_tick(st, t, st.last_price * math.exp(-3.2 * sigma), "down", "ACME", MarketParams())
    assert out.move == -1 and not out.abnormal and out.findings == []
    calm = score_tick(st, t + DAY, st.last_price * math.exp(0.5 * sigma), "calm", "ACME", MarketParams())
    assert calm.move == 0


def test_a_slide_of_small_ticks_is_one_breadth_move() -> None:
    # Twelve 5-second ticks falling 1.5 sigma each: no tick is unusual, the minute they make is (~4.6
    # sigmas, past the 3.6 a minute's breadth move needs).
    st, p = InstrumentState(), MarketParams()
    walk(st, 2000, step=5.0, sigma=0.0005)
    sigma, moves = math.sqrt(st.var_long), []
    for i in range(12):
        out = score_tick(st, st.last_ts + 5.0, st.last_price * math.exp(-1.5 * sigma), f"s{i}", "FUND-A", p)
        assert abs(out.z) < 2 and not out.abnormal
        moves.append(out.move)
    assert moves[-1] == -1 and moves[0] == 0


def test_daily_crash_window_is_one_bar_even_across_a_weekend() -> None:
    ticks = closes(120)
    while (ticks[-1][0] // DAY + 4) % 7 != 4:  # end on a Friday
        ticks.pop()
    st = InstrumentState()
    feed(st, ticks)
    # Monday's close 12% below Friday's: a crash within one bar, though 3 days (and 900 s) apart.
    out = score_tick(st, st.last_ts + 3 * DAY, st.last_price * 0.88, "monday", "ACME", MarketParams())
    assert out.crashed and out.drawdown_pct == pytest.approx(12.0)
    [crash] = [f for f in out.findings if f.category == "market_crash"]
    assert "3.0 days" not in crash.reasons[0].message and "72.0 hours" in crash.reasons[0].message


def test_crash_window_in_bars_counts_bars_not_one_close() -> None:
    two_day = [(ts, px) for ts, px in closes(100)]
    t, px = two_day[-1]
    two_day += [(t + DAY, px * 0.94), (t + 2 * DAY, px * 0.94 * 0.94)]  # -11.6% over two closes, -6% each
    one, two = InstrumentState(), InstrumentState()
    assert not feed(one, two_day)[-1].crashed
    assert feed(two, two_day, MarketParams(crash_window_bars=2))[-1].crashed


def test_state_pickled_by_the_previous_version_still_loads() -> None:
    st = InstrumentState()
    walk(st, 100)
    old = tuple(getattr(st, s) for s in InstrumentState.__slots__[:9])  # the nine slots of the last release
    assert InstrumentState.__slots__[:9] == ("alerts", "hist_px", "hist_ts", "last_price", "last_ts", "n",
                                             "pending", "var_long", "var_short")
    loaded = InstrumentState.__new__(InstrumentState)
    loaded.__setstate__(old)
    assert (loaded.spacing, loaded.drift, loaded.n) == (0.0, 0.0, st.n)
    out = score_tick(loaded, loaded.last_ts + 10, loaded.last_price * 0.97, "x", "FUND-A", MarketParams())
    assert out.abnormal and loaded.spacing == 10.0
    with pytest.raises(ValueError, match="fields"):
        InstrumentState.__new__(InstrumentState).__setstate__((*st.__getstate__(), 1.0))


def test_a_night_between_minute_bars_opens_a_session_not_an_abnormal_move() -> None:
    st, p, rng = InstrumentState(), MarketParams(), random.Random(5)
    price, t, outs = 100.0, T0, []
    for session in range(3):
        price *= 1.02 if session else 1.0  # each night: +2%, some 40 minute-sigmas
        for m in range(390):
            price *= math.exp(rng.gauss(0.0, 0.0005))
            outs.append(score_tick(st, t + 60.0 * m, price, f"m{session}-{m}", "ACME", p))
        t += DAY
    opens = [outs[390], outs[780]]
    assert all(o.z == 0.0 and not o.abnormal and o.move == 0 and o.findings == [] for o in opens)
    assert [f for o in outs for f in o.findings] == []
    assert st.spacing == pytest.approx(60.0, rel=0.06) and st.n == 1 + 3 * 390 - 3
    # A fall across the night is still a crash.
    gap_down = score_tick(st, t, st.last_price * 0.85, "open", "ACME", p)
    assert gap_down.crashed and [f.category for f in gap_down.findings] == ["market_crash"]


def test_spacing_starts_right_when_the_data_starts_with_a_night() -> None:
    st, p = InstrumentState(), MarketParams()
    score_tick(st, T0, 100.0, "close", "ACME", p)
    t = T0 + 17.5 * 3600
    for m in range(5):
        score_tick(st, t + 60.0 * m, 100.0, f"m{m}", "ACME", p)
    assert st.spacing == pytest.approx(60.0, rel=0.06)


def test_breadth_threshold_holds_the_rate_per_day_not_per_bar() -> None:
    p = MarketParams()
    assert breadth_threshold(p, 86_400.0) == breadth_threshold(p, 3 * 86_400.0) == 2.4
    assert breadth_threshold(p, 3600.0) == pytest.approx(2.4 + 0.35 * math.log10(24))
    minute = breadth_threshold(p, 60.0)
    assert minute == pytest.approx(3.505, abs=1e-3)
    assert breadth_threshold(p, 5.0) == breadth_threshold(p, 0.0) == minute  # the horizon is one minute
    assert breadth_threshold(MarketParams(breadth_z_per_decade=0), 60.0) == 2.4
