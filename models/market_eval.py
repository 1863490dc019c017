"""Market monitors at any bar interval, measured: real daily closes, generated minute bars, 5-second ticks.

Everything runs through `models.pipeline.Pipeline`, the worker's stage 1 and stage 2 in one
process, so what is measured here is what the worker does. Nothing is downloaded: the daily closes
are River's `sp500.csv.gz` (ten large US stocks, 2013-02-11 to 2018-02-06), compounded from 100.

The market-wide stress days were chosen from the public record before any tuning, not from what
the detector finds: the five largest one-day falls of the Dow Jones Industrial Average inside the
data's range, per Wikipedia's "List of largest daily changes in the Dow Jones Industrial Average"
(largest point losses; the same five are the S&P 500's five largest percentage falls of the span).

Run ``python -m models.market_eval`` for the numbers (docs/markets.md records them).
"""

from __future__ import annotations

import csv
import gzip
import math
import random
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import UTC, date, datetime, timedelta
from typing import Any

from models.evaluation import detection_delays
from models.pipeline import Pipeline
from models.rules import Catalogue, load_catalogue
from models.schemas import Alert, MarketTick, decode_object

# (day, what happened): Dow points lost that day, from the Wikipedia list named above.
STRESS_DAYS: tuple[tuple[date, str], ...] = (
    (date(2015, 8, 21), "China slowdown fears, Dow -531 (-3.1%)"),
    (date(2015, 8, 24), "'Black Monday' after the yuan devaluation, Dow -588 (-3.6%)"),
    (date(2016, 6, 24), "Brexit referendum result, Dow -611 (-3.4%)"),
    (date(2018, 2, 2), "Wage growth lifts bond yields, Dow -666 (-2.5%)"),
    (date(2018, 2, 5), "'Volmageddon', Dow -1,175 (-4.6%)"),
)
STRESS_SOURCE = ("Wikipedia, 'List of largest daily changes in the Dow Jones Industrial Average' "
                 "(largest point losses), five largest inside 2013-02-11..2018-02-06")
CLOSE_UTC_HOUR = 21  # 16:00 New York (EST); one fixed hour a day is all the monitors need


def sp500_closes() -> tuple[list[str], list[tuple[date, list[float]]]]:
    """(tickers, [(day, closes)]) of River's SP500Stocks, prices compounded from 100 on the first day."""
    from river.datasets import SP500Stocks  # River is a dependency; imported here to keep imports light

    with gzip.open(SP500Stocks().path, "rt", newline="") as f:
        rows = list(csv.reader(f))
    tickers = [c for c in rows[0][1:] if c != "next_day_return"]
    prices = [100.0] * len(tickers)
    out = []
    for row in rows[1:]:
        prices = [p * (1.0 + float(r) / 100.0) for p, r in zip(prices, row[1:1 + len(tickers)], strict=True)]
        out.append((date.fromisoformat(row[0]), prices))
    return tickers, out


def daily_ticks(tickers: Sequence[str], closes: Iterable[tuple[date, Sequence[float]]]) -> list[MarketTick]:
    """One MarketTick per instrument and day, at the close."""
    ticks = []
    for day, prices in closes:
        ts = datetime(day.year, day.month, day.day, CLOSE_UTC_HOUR, tzinfo=UTC)
        for name, price in zip(tickers, prices, strict=True):
            ticks.append(MarketTick(event_id=f"{name}-{day.isoformat()}", ts=ts, instrument=name, price=price))
    return ticks


def run(ticks: Iterable[MarketTick], catalogue: Catalogue | None = None) -> list[Alert]:
    """Every alert (new or updated) the worker's scoring raises on the ticks, in time order."""
    pipe = Pipeline(catalogue or load_catalogue())
    alerts: list[Alert] = []
    for t in sorted(ticks, key=lambda t: (t.ts, t.instrument)):
        alerts.extend(pipe.process(t).alerts)
    return alerts + pipe.finish()


def warned_days(alerts: Iterable[Alert], category: str = "market_stress") -> set[date]:
    """UTC days on which an alert of `category` was raised or updated (its event time)."""
    return {a.event_ts.astimezone(UTC).date() for a in alerts if a.category == category}


@dataclass(frozen=True)
class DailyReport:
    """Hits on the chosen stress days and the other warned days, for one category."""

    hits: dict[date, bool]
    other: list[date]
    years: float

    @property
    def false_per_year(self) -> float:
        """Warned days that are not chosen stress days, per year of data."""
        return len(self.other) / self.years


def evaluate_daily(category: str = "market_stress", catalogue: Catalogue | None = None) -> DailyReport:
    """Run River's daily closes through the monitors; which chosen days warned, and which others."""
    tickers, closes = sp500_closes()
    days = warned_days(run(daily_ticks(tickers, closes), catalogue), category)
    chosen = {d for d, _ in STRESS_DAYS}
    years = (closes[-1][0] - closes[0][0]).days / 365.25
    return DailyReport({d: d in days for d in sorted(chosen)}, sorted(days - chosen), years)


def crash_window_delays(events: Sequence[Mapping[str, Any]], alerts: Iterable[Alert]) -> dict[str, dict[str, Any]]:
    """Per crash window: seconds to its first warning, to its first market_stress, and to each instrument's first.

    Keys are the window ("#1"); values {"first": s, "stress": s, "instruments": {instance: s}}, None
    where no warning named any of the window's (or instrument's) crash ticks.
    """
    alerts = list(alerts)
    per_instance = detection_delays(events, alerts)
    stress = detection_delays(events, [a for a in alerts if a.category == "market_stress"])
    out: dict[str, dict[str, Any]] = {}
    for key, delay in sorted(per_instance.items()):
        if not key.startswith("market_crash:"):
            continue
        w = out.setdefault("#" + key.rsplit("#", 1)[1], {"first": None, "stress": None, "instruments": {}})
        w["instruments"][key] = delay
        w["first"] = _earliest(w["first"], delay)
        w["stress"] = _earliest(w["stress"], stress.get(key))
    return out


def _earliest(a: float | None, b: float | None) -> float | None:
    return b if a is None else a if b is None else min(a, b)


def synth_minute_bars(*, seed: int = 7, days: float = 6.0, instruments: int = 12) -> list[dict[str, Any]]:
    """models.synth's market ticks (about 60 s apart) with its generated intraday crashes, as contract dicts."""
    from models.synth import generate  # numpy-heavy; only this entry needs it

    return [e for e in generate(seed=seed, accounts=1, days=days, instruments=instruments,
                                scenarios=["market_crash"]) if e.get("event_type") == "market"]


def gbm_ticks(*, seed: int = 1, instruments: int = 10, hours: float = 12.0, step: float = 5.0,
              crash_at: float = 0.75, depth: tuple[float, float] = (0.06, 0.12), sigmas: float | None = None,
              t0: datetime = datetime(2026, 3, 2, tzinfo=UTC)) -> list[dict[str, Any]]:
    """Seeded random walks ticking about every `step` seconds (jittered, asynchronous), with one crash.

    At `crash_at` of the span, 40-70% of the instruments fall by `depth` (a fraction, drawn per
    instrument) over 5 to 15 minutes (one to three bars when bars are longer than 5 minutes), as
    models.synth's crashes do, but shallower by default: falls of 6-12% are below the 10%
    per-instrument crash rule. With `sigmas`, each fall is instead that
    many of the instrument's own sigmas over the fall's span: a slide no single tick of which is
    unusual (10 sigmas over 10 minutes of 5-second ticks are 0.9 sigma a tick), the hardest case.
    Labelled like models.synth (scenario market_crash, instance "market_crash:<name>#1").
    """
    rng = random.Random(seed)
    n = int(hours * 3600 / step)
    start = t0.timestamp()
    tc = start + crash_at * hours * 3600
    hit = set(rng.sample(range(instruments), rng.randint(math.ceil(0.4 * instruments), math.ceil(0.7 * instruments))))
    events: list[tuple[float, dict[str, Any]]] = []
    for j in range(instruments):
        name = f"GBM{j + 1:02d}"
        sigma = math.exp(rng.uniform(math.log(0.004), math.log(0.04))) / math.sqrt(86_400 / step)
        fall = None
        if j in hit:
            fs = tc + rng.uniform(0, 180)
            span = rng.uniform(5, 15)
            fe = fs + max(span * 60, span / 5 * step)  # minutes on ticks, bars when bars are longer
            if sigmas is None:
                size = math.log(1 - rng.uniform(*depth))
            else:
                size = -sigmas * sigma * math.sqrt((fe - fs) / step)
            fall = (fs, fe, size)
        log_p = math.log(rng.uniform(5, 200))
        for i in range(n):
            ts = start + step * i + rng.uniform(0, step / 2)
            r = rng.gauss(0.0, sigma)
            ev: dict[str, Any] = {"event_id": f"{name}-{i:07d}", "event_type": "market", "instrument": name,
                                  "label": 0}
            if fall is not None and fall[0] <= ts <= fall[1]:
                r += fall[2] * step / (fall[1] - fall[0])
                ev.update(label=1, scenario="market_crash", scenario_instance=f"market_crash:{name}#1")
            log_p += r
            ev["price"] = round(math.exp(log_p), 6)
            ev["ts"] = datetime.fromtimestamp(ts, UTC).isoformat(timespec="milliseconds")
            events.append((ts, ev))
    events.sort(key=lambda x: x[0])
    return [e for _, e in events]


def session_minute_bars(*, seed: int = 1, instruments: int = 10, days: int = 10, gap_sigma: float = 0.01,
                        corr: float = 0.3, t0: datetime = datetime(2026, 3, 2, 14, 30, tzinfo=UTC),
                        ) -> list[dict[str, Any]]:
    """Minute bars of a market open 6.5 hours on weekdays: correlated moves, and a night between sessions.

    Minute returns share a common factor (correlation `corr`); the night moves every instrument by a
    common gap of `gap_sigma` (1% by default, some 20 minute-sigmas) plus its own half of that. No
    crash: any market_stress here is a false alarm, which every open made before sessions were known.
    """
    rng = random.Random(seed)
    sig = [math.exp(rng.uniform(math.log(0.01), math.log(0.03))) / math.sqrt(390) for _ in range(instruments)]
    log_p = [math.log(rng.uniform(5, 200)) for _ in range(instruments)]
    events: list[dict[str, Any]] = []
    day, opened = t0, 0
    while opened < days:
        if day.weekday() < 5:
            common = rng.gauss(0.0, gap_sigma)
            for j in range(instruments):
                if opened:
                    log_p[j] += common + rng.gauss(0.0, gap_sigma / 2)
            for m in range(390):
                f = rng.gauss(0.0, 1.0)
                ts = (day + timedelta(minutes=m)).isoformat()
                for j in range(instruments):
                    log_p[j] += sig[j] * (math.sqrt(corr) * f + math.sqrt(1 - corr) * rng.gauss(0.0, 1.0))
                    events.append({"event_id": f"S{j:02d}-{opened}-{m:03d}", "event_type": "market", "ts": ts,
                                   "instrument": f"S{j:02d}", "price": round(math.exp(log_p[j]), 6), "label": 0})
            opened += 1
        day += timedelta(days=1)
    return events


@dataclass(frozen=True)
class IntradayReport:
    """Warnings on generated intraday ticks: delays per crash window, and warnings outside any crash."""

    delays: dict[str, dict[str, Any]]
    false_stress: int  # market_stress alerts naming no crash tick
    hours: float


def evaluate_intraday(events: Sequence[Mapping[str, Any]], catalogue: Catalogue | None = None) -> IntradayReport:
    """Run generated ticks (contract dicts with labels) through the monitors and measure the delays."""
    ticks = [decode_object(dict(e)) for e in events]
    alerts = run([t for t in ticks if isinstance(t, MarketTick)], catalogue)
    crash_ids = {str(e["event_id"]) for e in events if e.get("label") == 1}
    false_stress = {a.alert_id for a in alerts
                    if a.category == "market_stress" and not crash_ids.intersection(a.event_ids)}
    span = (ticks[-1].ts - ticks[0].ts) / timedelta(hours=1) if ticks else 0.0
    return IntradayReport(crash_window_delays(events, alerts), len(false_stress), span)


def _delays_text(report: IntradayReport) -> list[str]:
    lines = []
    for w, d in report.delays.items():
        own = [v for v in d["instruments"].values() if v is not None]
        first, stress = (("never" if v is None else f"after {v:.0f} s") for v in (d["first"], d["stress"]))
        slowest = f", slowest after {max(own):.0f} s" if own else ""
        lines.append(f"  crash {w}: first warning {first}, market_stress {stress}; {len(own)} of "
                     f"{len(d['instruments'])} instruments warned{slowest}")
    lines.append(f"  market_stress alerts outside the crashes: {report.false_stress} in {report.hours:.0f} hours")
    return lines


def main() -> None:
    """Print the measurements docs/markets.md reports."""
    print(f"Daily closes: river sp500 (10 stocks). Stress days: {STRESS_SOURCE}")
    for category in ("market_stress", "market_crash"):
        rep = evaluate_daily(category)
        print(f"{category}:")
        for (d, what), (_, hit) in zip(STRESS_DAYS, rep.hits.items(), strict=True):
            print(f"  {d}  {'HIT ' if hit else 'miss'}  {what}")
        print(f"  hits {sum(rep.hits.values())}/{len(rep.hits)}; other warned days {len(rep.other)} "
              f"({rep.false_per_year:.2f} a year over {rep.years:.2f} years): "
              + ", ".join(d.isoformat() for d in rep.other))
    print("Generated minute bars (models.synth, ~60 s ticks, 12 instruments, 6 days, seeds 7 and 8):")
    for seed in (7, 8):
        for line in _delays_text(evaluate_intraday(synth_minute_bars(seed=seed))):
            print(line)
    print("Generated 5-second ticks (gbm_ticks, 10 instruments, 12 hours, falls of 6-12%, seeds 1-3):")
    for seed in (1, 2, 3):
        for line in _delays_text(evaluate_intraday(gbm_ticks(seed=seed))):
            print(line)
    for what, step, days in (("5-minute", 300.0, 60), ("hourly", 3600.0, 60)):
        print(f"Generated {what} bars (gbm_ticks, 10 instruments, {days} days, falls of 6-12% over 1-3 bars, "
              "seeds 1-3):")
        for seed in (1, 2, 3):
            for line in _delays_text(evaluate_intraday(gbm_ticks(seed=seed, hours=24.0 * days, step=step,
                                                                 crash_at=0.8))):
                print(line)
    print("Generated minute bars in sessions, nights moving every instrument ~20 minute-sigmas (10 days, seeds 1-3):")
    for seed in (1, 2, 3):
        night = evaluate_intraday(session_minute_bars(seed=seed))
        print(f"  market_stress alerts: {night.false_stress} in {night.hours:.0f} hours")
    print("The same at correlation 0.5 (20 days, seeds 1-3):")
    for seed in (1, 2, 3):
        night = evaluate_intraday(session_minute_bars(seed=seed, days=20, corr=0.5))
        print(f"  market_stress alerts: {night.false_stress} in {night.hours:.0f} hours")
    print("Generated 5-second ticks, slides of 20 own sigmas that no single tick shows (4 hours, seeds 1-5):")
    for seed in range(1, 6):
        for line in _delays_text(evaluate_intraday(gbm_ticks(seed=seed, hours=4.0, sigmas=20.0))):
            print(line)


if __name__ == "__main__":
    main()
