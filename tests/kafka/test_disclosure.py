"""Disclosure summaries: the pure two-stage aggregation, and a known day through a real worker."""

from __future__ import annotations

import asyncio
import json
import random
import subprocess
import sys
import time
from collections import defaultdict
from collections.abc import Callable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from agents.disclosure import Disclosure
from agents.sink import Sink
from app.cli_disposal import parse_since, render
from app.faust_app import ALERTS, CONTINGENCY, DISCLOSURE, TRANSACTIONS, create_app
from app.settings import Settings
from models.disclosure import (
    DAY,
    HOUR,
    AlertSnapshot,
    DisclosureBook,
    DisclosureSummary,
    FlowTotals,
    latest,
    parse_partial,
    window_start,
)
from models.schemas import Transaction
from tests.conftest import ROOT, consume, produce, settings_env

CST = timezone(timedelta(hours=8))
DAY_START = datetime(2026, 11, 2, tzinfo=CST)
TYPES = ["payment", "transfer", "withdrawal", "deposit", "investment", "redemption"]


def add(t: FlowTotals, ts: float, amount: float, txn_type: str = "deposit", direction: str = "credit",
        currency: str = "CNY", kind: str = "customer", cp_kind: str = "customer", offset: int | None = None) -> bool:
    return t.add(ts=ts, txn_type=txn_type, direction=direction, amount=amount, currency=currency,
                 account_kind=kind, counterparty_kind=cp_kind, offset=offset)


def test_windows_align_to_the_platform_time_zone() -> None:
    ts = datetime(2026, 11, 2, 23, 30, tzinfo=CST).timestamp()
    assert window_start(ts, DAY, 480) == DAY_START.timestamp()
    assert window_start(ts, HOUR, 480) == datetime(2026, 11, 2, 23, tzinfo=CST).timestamp()
    assert window_start(ts, DAY, 0) == datetime(2026, 11, 2, tzinfo=UTC).timestamp()


def test_totals_count_custody_movements_and_skip_redelivered_offsets() -> None:
    t = FlowTotals(source="t0", hour=0)
    assert add(t, 1, 100.0, "withdrawal", "debit", kind="custody", cp_kind="platform_own", offset=1)
    assert add(t, 2, 40.0, "deposit", "credit", kind="custody", offset=2)
    assert add(t, 3, 7.5, "payment", "debit", currency="USD", offset=3)
    assert not add(t, 1, 100.0, "withdrawal", "debit", kind="custody", cp_kind="platform_own", offset=1)
    assert t.transactions == 3 and t.last_offset == 3
    c = t.custody["CNY"]
    assert (c.inflow, c.outflow, c.to_platform_own, c.n) == (40.0, 100.0, 100.0, 2)
    assert t.money["USD"]["payment"].outflow == 7.5 and t.money["CNY"]["withdrawal"].n == 1


def test_the_book_replaces_partials_so_resending_never_double_counts() -> None:
    book = DisclosureBook()
    t = FlowTotals(source="t0", hour=0)
    add(t, 10, 100.0, offset=1)
    book.apply(t.model_copy(deep=True))
    add(t, 20, 50.0, offset=2)
    book.apply(t.model_copy(deep=True))
    book.apply(t.model_copy(deep=True))
    stale = FlowTotals(source="t0", hour=0, last_offset=1, transactions=1)
    assert book.apply(stale) == [], "an older cumulative total arriving late is ignored"
    other = FlowTotals(source="t1", hour=HOUR)
    add(other, HOUR + 5, 10.0, offset=9)
    book.apply(other)
    day = book.summary("day", 0, now=0)
    assert day.transactions == 3 and day.money["CNY"]["deposit"].inflow == 160.0
    assert book.summary("hour", 0, now=0).transactions == 2
    assert day.totals["CNY"].inflow == 160.0


def test_a_warning_counts_once_at_its_highest_level_and_plans_follow_it() -> None:
    book = DisclosureBook()
    book.apply(AlertSnapshot(alert_id="a", created_at=100, category="velocity", level="high", plans_opened=1))
    book.apply(AlertSnapshot(alert_id="a", created_at=100, category="velocity", level="critical", plans_opened=2,
                             resolved=True))
    book.apply(AlertSnapshot(alert_id="b", created_at=HOUR + 1, category="fund_isolation", level="critical",
                             plans_opened=1, overdue=True))
    day = book.summary("day", 0, now=0)
    assert day.warnings.total == 2 and day.warnings.by_level == {"critical": 2}
    assert day.warnings.by_category == {"velocity": 1, "fund_isolation": 1}
    assert (day.plans.opened, day.plans.resolved, day.plans.overdue) == (3, 1, 1)
    assert book.summary("hour", 0, now=0).warnings.total == 1


def test_complete_once_event_time_passes_the_end_plus_grace_and_old_hours_are_forgotten() -> None:
    book = DisclosureBook(grace_seconds=600)
    t = FlowTotals(source="t0", hour=0)
    add(t, 3000, 1.0, offset=1)
    book.apply(t)
    assert not book.summary("hour", 0, now=0).complete
    late = FlowTotals(source="t0", hour=HOUR)
    add(late, HOUR + 600, 1.0, offset=2)
    book.apply(late)
    assert book.summary("hour", 0, now=0).complete and not book.summary("day", 0, now=0).complete
    assert book.forget_before(HOUR) == 1 and book.summary("hour", 0, now=0).transactions == 0


_txns = st.lists(st.tuples(st.floats(0, 2 * DAY - 1), st.sampled_from(TYPES), st.sampled_from(["debit", "credit"]),
                           st.integers(1, 10_000), st.sampled_from(["customer", "custody"]), st.integers(0, 3)),
                 max_size=60)


@settings(max_examples=100, deadline=None)
@given(_txns, st.randoms(use_true_random=False))
def test_summaries_equal_direct_sums_however_partials_are_split_and_resent(txns: list[Any], rnd: random.Random
                                                                         ) -> None:
    stage1: dict[tuple[int, int], FlowTotals] = {}
    partials: list[FlowTotals] = []
    offsets = defaultdict(int)
    for ts, txn_type, direction, cents, kind, partition in txns:
        hour = window_start(ts, HOUR)
        t = stage1.setdefault((partition, hour), FlowTotals(source=f"t{partition}", hour=hour))
        offsets[partition] += 1
        add(t, ts, cents / 100, txn_type, direction, kind=kind, offset=offsets[partition])
        partials.append(t.model_copy(deep=True))
    rnd.shuffle(partials)  # out of order and with every intermediate version: the book must still converge
    book = DisclosureBook()
    for p in partials + [t.model_copy(deep=True) for t in stage1.values()]:
        book.apply(parse_partial(p.model_dump_json()))
    for day in (0, DAY):
        s = book.summary("day", day, now=0)
        mine = [x for x in txns if day <= x[0] < day + DAY]
        assert s.transactions == len(mine)
        for direction, attr in (("credit", "inflow"), ("debit", "outflow")):
            want = sum(x[3] for x in mine if x[2] == direction) / 100
            got = getattr(s.totals["CNY"], attr) if s.totals else 0.0
            assert got == pytest.approx(want)
            want_custody = sum(x[3] for x in mine if x[2] == direction and x[4] == "custody") / 100
            got_custody = getattr(s.custody["CNY"], attr) if "CNY" in s.custody else 0.0
            assert got_custody == pytest.approx(want_custody)


def test_latest_keeps_the_newest_version_per_window_and_render_reads_well() -> None:
    book = DisclosureBook(utc_offset_minutes=480)
    t = FlowTotals(source="t0", hour=int(DAY_START.timestamp()))
    add(t, DAY_START.timestamp() + 60, 1234567.891, "deposit", kind="custody", offset=1)
    book.apply(t)
    start = int(DAY_START.timestamp())
    old, new = book.summary("day", start, now=1), book.summary("day", start, now=2)
    hour = book.summary("hour", start, now=2)
    got = latest([new, old, hour])
    assert [s.period for s in got] == ["day", "hour"] and got[0].generated_at == new.generated_at
    text = render(got)
    assert "day     2026-11-02 +0800" in text and "1,234,567.89" in text and "custody funds" in text
    assert parse_since("2026-11-02T00:00+08:00") == DAY_START


def test_a_bucket_counted_while_a_flush_is_sending_goes_out_with_the_next_flush(
        tmp_path: Path, make_txn: Callable[..., dict[str, Any]]) -> None:
    """Stage 1 sends partials one await at a time; the transaction agent runs in between.

    A bucket it changes during a flush must not be forgotten when that flush ends: after a restart
    the first flush re-sends every bucket, and the last ones counted were lost (CI, 2026-11-27).
    """
    rt = create_app(Settings(topic_prefix="unit.", app_id="unit", data_dir=tmp_path / "data",
                             disclosure_utc_offset_minutes=480))
    d = Disclosure(rt, Sink(rt))
    d.flows = {}  # the table's mapping; its changelog is the engine's business, not this test's
    d.txn_owned = lambda: {0}

    def txn(hours: float) -> Transaction:
        return Transaction.model_validate(make_txn(ts=(DAY_START + timedelta(hours=hours)).isoformat()))

    def counted(t: Transaction, partition: int, offset: int) -> tuple[Transaction, int, int, float]:
        return t, partition, offset, t.ts.timestamp()

    sent: list[FlowTotals] = []

    async def partial(blob: bytes) -> None:
        sent.append(FlowTotals.model_validate_json(blob))
        if len(sent) == 1:
            d.add_batch([counted(txn(2.5), 0, 2)])  # the agent's next batch, while this flush awaits the broker

    d._partial = partial  # type: ignore[method-assign]
    d.add_batch([counted(txn(0.5), 0, 0), counted(txn(1.5), 0, 1)])
    asyncio.run(d.flush_flows())
    asyncio.run(d.flush_flows())
    newest = {t.hour: t for t in sent}
    assert sum(t.transactions for t in newest.values()) == 3, [(t.hour, t.transactions) for t in sent]
    asyncio.run(d.flush_flows())
    assert len(sent) == 3, "nothing changed since: nothing is sent again"


# --------------------------------------------------------------------------- a known day, end to end
def settled(quiet: float = 4.0) -> Callable[[list[dict[str, Any]]], bool]:
    """A consume() condition: nothing new arrived for `quiet` seconds (monitors may raise from timers)."""
    seen = {"n": -1, "since": time.monotonic()}

    def until(msgs: list[dict[str, Any]]) -> bool:
        if len(msgs) != seen["n"]:
            seen["n"], seen["since"] = len(msgs), time.monotonic()
        return time.monotonic() - seen["since"] >= quiet

    return until


@pytest.mark.kafka
@pytest.mark.slow
def test_daily_disclosure_totals_equal_independent_sums_across_a_kill(settings: Settings, start_worker: Any,
                                                                    make_txn: Callable[..., dict[str, Any]]) -> None:
    s = settings.model_copy(update={"disclosure_utc_offset_minutes": 480, "disclosure_publish_seconds": 1.0,
                                    "disclosure_grace_seconds": 0.0, "kafka_session_timeout": 6.0})
    rnd = random.Random(20261102)
    day: list[dict[str, Any]] = []
    for i in range(300):
        at = DAY_START + timedelta(seconds=rnd.uniform(0, DAY - 1))
        kind = rnd.choice(["customer"] * 4 + ["custody"])
        cp_kind = "platform_own" if kind == "custody" and rnd.random() < 0.05 else "customer"
        day.append(make_txn(account_id=f"acct-{rnd.randrange(40)}", amount=round(rnd.uniform(1, 80_000), 2),
                            currency=rnd.choice(["CNY", "CNY", "USD"]), txn_type=rnd.choice(TYPES),
                            direction=rnd.choice(["debit", "credit"]), account_kind=kind, counterparty_kind=cp_kind,
                            ts=at.isoformat(), event_id=f"day-{i}"))
    # One event the next morning moves event time past the day: its summary becomes final.
    closer = make_txn(account_id="acct-0", ts=(DAY_START + timedelta(days=1, hours=1)).isoformat(), event_id="next")
    day.sort(key=lambda t: t["ts"])
    day_id = f"day:{DAY_START.isoformat()}"
    msgs = [(t["account_id"].encode(), json.dumps(t).encode()) for t in [*day, closer]]
    # Half the day, then kill -9 as soon as its first counts are out: whatever was counted but not
    # committed is read again after the restart, and must not be counted twice.
    worker = start_worker(s)
    produce(s, TRANSACTIONS, msgs[:150])
    consume(s, DISCLOSURE, lambda got: any(m["summary_id"] == day_id and m["transactions"] > 0 for m in got))
    worker.kill()
    produce(s, TRANSACTIONS, msgs[150:])
    worker = start_worker(s)
    got = consume(s, DISCLOSURE, lambda msgs: any(m["summary_id"] == day_id and m["complete"]
                                                  and m["transactions"] == len(day) for m in msgs), timeout=120)
    summary = latest(DisclosureSummary.model_validate(m) for m in got if m["summary_id"] == day_id)[0]

    want: dict[str, dict[str, list[float]]] = defaultdict(lambda: defaultdict(lambda: [0.0, 0.0, 0]))
    custody: dict[str, list[float]] = defaultdict(lambda: [0.0, 0.0, 0.0])
    for t in day:
        w = want[t["currency"]][t["txn_type"]]
        w[0 if t["direction"] == "credit" else 1] += t["amount"]
        w[2] += 1
        if t["account_kind"] == "custody":
            c = custody[t["currency"]]
            c[0 if t["direction"] == "credit" else 1] += t["amount"]
            if t["direction"] == "debit" and t["counterparty_kind"] == "platform_own":
                c[2] += t["amount"]
    assert set(summary.money) == set(want)
    for cur, types in want.items():
        assert set(summary.money[cur]) == set(types)
        for txn_type, (inflow, outflow, n) in types.items():
            f = summary.money[cur][txn_type]
            assert (f.inflow, f.outflow, f.n) == (pytest.approx(inflow), pytest.approx(outflow), n), (cur, txn_type)
        assert summary.totals[cur].inflow == pytest.approx(sum(v[0] for v in types.values()))
    for cur, (inflow, outflow, to_own) in custody.items():
        c = summary.custody[cur]
        assert (c.inflow, c.outflow, c.to_platform_own) == (pytest.approx(inflow), pytest.approx(outflow),
                                                            pytest.approx(to_own))

    # Warnings and plans: whatever the detectors raised about that day, counted as the alert and
    # contingency topics show them.
    every = consume(s, ALERTS, settled(), timeout=60)
    alerts = {a["alert_id"]: a for a in every
              if DAY_START <= datetime.fromisoformat(a["created_at"]) < DAY_START + timedelta(days=1)}
    assert alerts, "the day holds large transactions, so it must have warnings"
    plans = consume(s, CONTINGENCY, lambda msgs: {m["alert_id"] for m in msgs} >= set(alerts), timeout=60)
    final = consume(s, DISCLOSURE, lambda msgs: any(
        m["summary_id"] == day_id and m["warnings"]["total"] == len(alerts)
        and m["plans"]["opened"] == sum(p["kind"] == "plan" and p["alert_id"] in alerts for p in plans)
        for m in msgs), timeout=60)
    summary = latest(DisclosureSummary.model_validate(m) for m in final if m["summary_id"] == day_id)[0]
    by_category: dict[str, int] = defaultdict(int)
    for a in alerts.values():
        by_category[a["category"]] += 1
    assert summary.warnings.by_category == by_category
    hours = latest(DisclosureSummary.model_validate(m) for m in final if m["period"] == "hour")
    assert sum(h.transactions for h in hours if h.start < DAY_START + timedelta(days=1)) == len(day)

    # And as a person reads it.
    out = subprocess.run([sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())",
                          "disclosure", "--since", "2026-11-02T00:00+08:00", "--period", "day"],
                         cwd=ROOT, env=settings_env(s), capture_output=True, text=True, timeout=60, check=False)
    assert out.returncode == 0, out.stderr
    row = next(line.split() for line in out.stdout.splitlines() if line.startswith("day") and "2026-11-02" in line)
    assert row[:5] == ["day", "2026-11-02", "+0800", "final", str(len(day))]
    total_cny = f"{sum(v[0] for v in want['CNY'].values()):,.2f}"
    assert total_cny in out.stdout
    assert worker.proc.poll() is None
