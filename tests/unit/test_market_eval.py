"""Market monitors at any bar interval: real daily closes, generated minute bars and 5-second ticks."""

from __future__ import annotations

from datetime import date

import pytest

from models import market_eval as me


@pytest.fixture(scope="module")
def daily() -> me.DailyReport:
    return me.evaluate_daily()


def test_stress_days_are_from_the_record_and_in_the_data() -> None:
    tickers, closes = me.sp500_closes()
    days = {d for d, _ in closes}
    assert tickers == ["AAPL", "AMZN", "IBM", "INTC", "JNJ", "JPM", "KO", "MSFT", "WMT", "XOM"]
    assert len(me.STRESS_DAYS) == 5 and all(d in days for d, _ in me.STRESS_DAYS)
    assert closes[0][1] == pytest.approx([100 * (1 + r / 100) for r in (
        1.042235, -1.809506, -0.753669, 0.142857, -0.09274, 0.06169, -0.41269, 1.125227, -0.111919, -0.372418)])


def test_real_daily_closes_warn_on_recorded_sell_offs_and_rarely_otherwise(daily: me.DailyReport) -> None:
    assert sum(daily.hits.values()) >= 4, daily.hits
    assert daily.false_per_year <= 2.0, daily.other
    assert 4.9 < daily.years < 5.0


def test_warned_days_come_from_market_stress_alerts_only() -> None:
    tickers, closes = me.sp500_closes()
    sell_off = [(d, p) for d, p in closes if date(2015, 6, 1) <= d <= date(2015, 8, 24)]
    alerts = me.run(me.daily_ticks(tickers, sell_off))
    assert date(2015, 8, 24) in me.warned_days(alerts)
    assert me.warned_days(alerts, "no_such_category") == set()
    [stress] = [a for a in alerts if a.category == "market_stress" and a.event_ts.date() == date(2015, 8, 24)]
    assert [r.code for r in stress.reasons] == ["market_breadth"]
    assert all(e.endswith("2015-08-24") for e in stress.event_ids)


def test_generated_minute_bar_crashes_warn_within_minutes() -> None:
    report = me.evaluate_intraday(me.synth_minute_bars(seed=7, days=3.0))
    assert len(report.delays) == 1
    for window in report.delays.values():
        assert window["first"] is not None and window["first"] <= 120
        assert window["stress"] is not None and window["stress"] <= 300
        assert all(d is not None and d <= 300 for d in window["instruments"].values())
    assert report.false_stress == 0 and report.hours > 70


@pytest.mark.parametrize("seed", [1, 2])
def test_five_second_ticks_crash_warns_within_minutes(seed: int) -> None:
    report = me.evaluate_intraday(me.gbm_ticks(seed=seed, hours=3.0))
    [window] = report.delays.values()
    assert window["stress"] is not None and window["stress"] <= 300
    assert report.false_stress == 0


@pytest.mark.parametrize("step", [300.0, 3600.0])
def test_five_minute_and_hourly_bar_crashes_warn_and_calm_bars_do_not(step: float) -> None:
    # Sixty days of bars, the crash on day 48: the falling instruments' own sigmas are per bar.
    report = me.evaluate_intraday(me.gbm_ticks(seed=2, hours=24.0 * 60, step=step, crash_at=0.8))
    [window] = report.delays.values()
    assert window["stress"] is not None and window["stress"] <= 2 * step
    assert all(d is not None for d in window["instruments"].values())
    assert report.false_stress == 0 and report.hours > 1400


def test_calm_five_second_ticks_raise_no_market_stress() -> None:
    report = me.evaluate_intraday(me.gbm_ticks(seed=4, hours=3.0, crash_at=2.0))  # the crash never comes
    assert report.delays == {} and report.false_stress == 0


def test_overnight_gaps_of_minute_bars_raise_no_market_stress() -> None:
    # Nights of ~20 minute-sigmas for every instrument: judged as minute moves, every open was stress.
    report = me.evaluate_intraday(me.session_minute_bars(seed=1, days=6))
    assert report.false_stress == 0 and report.hours > 100


def test_correlated_minute_bars_raise_no_market_stress() -> None:
    # Ten instruments at correlation 0.5: a flat 2.5-sigma breadth move made 11-12 alerts in 20 days.
    report = me.evaluate_intraday(me.session_minute_bars(seed=1, days=20, corr=0.5))
    assert report.false_stress == 0
