"""Two-stage aggregates: partials from several sources add up once, whatever their order or repeats."""

from __future__ import annotations

import pickle
import random
from collections.abc import Iterator

import pytest
from pydantic import ValidationError

from models import aggregates
from models.aggregates import (
    MAX_BUCKETS_PER_MESSAGE,
    FlowAccumulator,
    FlowBuckets,
    FlowPartial,
    FlowTotals,
    LiquidityMonitor,
    LiquidityParams,
    MarketAccumulator,
    MarketPartial,
    MarketStressMonitor,
    MarketStressParams,
    flow_buckets_json,
)
from models.errors import ConfigError
from models.findings import Raised

T0 = 1_750_000_000 // 3600 * 3600  # an hour boundary, so baseline windows line up with the data
MIN = 60


def flows(hours: float, *, seed: int = 0, run_from: float | None = None, run_per_min: float = 150_000.0,
          ) -> Iterator[tuple[float, str, str, float, str]]:
    """Customer flows, ~4 a minute each way, balanced; from `run_from` hours, a withdrawal run."""
    rng = random.Random(seed)
    for m in range(int(hours * 60)):
        t = T0 + m * MIN
        for k in range(4):
            yield t + rng.uniform(0, 59), rng.choice(["deposit", "investment"]), "credit", \
                rng.uniform(10_000, 14_000), f"i{m:06d}-{k}"
            yield t + rng.uniform(0, 59), rng.choice(["withdrawal", "redemption"]), "debit", \
                rng.uniform(9_000, 13_000), f"o{m:06d}-{k}"
        yield t + 30, "payment", "debit", 99.0, f"p{m:06d}"  # not a platform flow
        if run_from is not None and m >= run_from * 60:
            yield t + 45, "withdrawal", "debit", run_per_min, f"r{m:06d}"


def partials(events: list[tuple[float, str, str, float, str]], n_sources: int,
             flush_every: int = 0) -> list[FlowPartial]:
    """Stage 1: events spread round-robin over `n_sources` accumulators, in time order per source."""
    accs = [FlowAccumulator(f"p{i}") for i in range(n_sources)] if n_sources > 1 else [FlowAccumulator("replay")]
    out: list[FlowPartial] = []
    for j, (ts, typ, direction, amount, eid) in enumerate(sorted(events)):
        out += accs[j % len(accs)].add(ts, typ, direction, amount, eid)
        if flush_every and j % flush_every == 0:
            out += accs[j % len(accs)].flush()
    for acc in accs:
        out += acc.flush()
    return out


def run_monitor(parts: list[FlowPartial], params: LiquidityParams | None = None) -> list[Raised]:
    mon = LiquidityMonitor(params or LiquidityParams())
    raised = [r for p in parts for r in mon.update(p)]
    return raised + mon.drain()


def summary(raised: list[Raised]) -> list[tuple[str, str, str, bool]]:
    return [(r.alert_id, r.finding.level, r.finding.reasons[0].message, r.is_new) for r in raised]


@pytest.fixture(scope="module")
def run_events() -> list[tuple[float, str, str, float, str]]:
    return list(flows(7, run_from=6, run_per_min=60_000.0))


def test_steady_flows_raise_nothing() -> None:
    assert run_monitor(partials(list(flows(9)), 1)) == []


def test_a_run_is_one_alert_updated_not_repeated(run_events: list) -> None:
    raised = run_monitor(partials(run_events, 1))
    assert raised, "a withdrawal run must be raised"
    assert len({r.alert_id for r in raised}) == 1
    assert [r.is_new for r in raised].count(True) == 1 and raised[0].is_new
    first, last = raised[0], raised[-1]
    assert first.finding.category == "liquidity_run" and first.finding.entity_id == "platform"
    assert first.event_ts >= T0 + 6 * 3600
    assert last.finding.level == "critical" and any(r.escalated for r in raised)
    msg = last.finding.reasons[0].message
    assert msg.startswith("net outflow CNY ") and "in the last 60 min" in msg
    assert "x the usual swing (CNY" in msg and "usually a net inflow of CNY 0.2M" in msg
    alert = last.to_alert()
    assert alert.alert_id == first.alert_id and alert.created_at.timestamp() == last.event_ts
    assert 0 < len(alert.event_ids) <= 50 and any(e.startswith("r") for e in alert.event_ids)


def test_a_few_large_withdrawals_are_not_a_run_and_many_are() -> None:
    # The same 600,000 out in the ninth hour: three customers' withdrawals, or 120 customers'.
    steady = list(flows(9))
    few = steady + [(T0 + 8 * 3600 + 600 * k, "withdrawal", "debit", 200_000.0, f"big{k}") for k in range(3)]
    many = steady + [(T0 + 8 * 3600 + 15 * k, "withdrawal", "debit", 5_000.0, f"run{k:03d}") for k in range(120)]
    assert run_monitor(partials(few, 4)) == []
    raised = run_monitor(partials(many, 4))
    assert raised and {r.finding.category for r in raised} == {"liquidity_run"}
    msg = raised[-1].finding.reasons[0].message
    assert "of it in the 3 largest outflows" in msg and raised[-1].finding.level == "critical"
    # Without the exclusion the three withdrawals alone are a critical run, as they were before.
    assert run_monitor(partials(few, 4), LiquidityParams(exclude_largest=0))[-1].finding.level == "critical"


def test_buckets_of_the_previous_version_count_their_outflow_whole(run_events: list) -> None:
    # A partial without `largest` (a worker not yet upgraded) leaves nothing to exclude: the run is
    # judged on its whole net outflow, as the previous version judged it.
    old = [p.model_copy(update={"largest": []}) for p in partials(run_events, 1)]
    whole = LiquidityParams(exclude_largest=0)
    assert summary(run_monitor(old)) == summary(run_monitor(partials(run_events, 1), whole))


def test_a_run_that_eases_keeps_the_level_it_reached() -> None:
    # Critical for an hour, then a slower outflow that alone is only high: every later version of the
    # same warning still says critical (the contract: an update never lowers the level).
    steady = list(flows(10))
    run = [(T0 + m * MIN + 45, "withdrawal", "debit", 60_000.0 if m < 7 * 60 else 12_000.0, f"r{m:05d}")
           for m in range(6 * 60, 9 * 60)]
    raised = run_monitor(partials(steady + run, 1))
    assert len({r.alert_id for r in raised}) == 1
    levels = [r.finding.level for r in raised]
    first_critical = levels.index("critical")
    assert levels[first_critical:] == ["critical"] * (len(levels) - first_critical)
    assert [r.to_alert().level for r in raised][first_critical:] == levels[first_critical:]
    # The eased hour did publish versions: without them the test would prove nothing.
    assert any(r.event_ts >= T0 + 8 * 3600 for r in raised[first_critical:])


def test_four_sources_sum_like_one(run_events: list) -> None:
    one, four = summary(run_monitor(partials(run_events, 1))), summary(run_monitor(partials(run_events, 4)))
    # Same buckets judged, same levels, same wording, same ids (samples keep the smallest ids).
    assert one == four


def test_redelivered_partials_do_not_double_count(run_events: list) -> None:
    parts = partials(run_events, 4, flush_every=29)
    rng = random.Random(5)
    doubled = [q for p in parts for q in ([p, p] if rng.random() < 0.5 else [p])]
    # A stale copy (fewer events) arriving after the newer one must not win either.
    stale = [q for p in parts for q in ([p, p.model_copy(update={"n": 0, "outflow": 0.0})] if p.n else [p])]
    base = summary(run_monitor(parts))
    assert summary(run_monitor(doubled)) == base
    assert summary(run_monitor(stale)) == base
    assert summary(run_monitor([FlowPartial.model_validate_json(p.model_dump_json()) for p in parts])) == base


def test_out_of_order_within_lateness_gives_the_same_alerts(run_events: list) -> None:
    parts, params = partials(run_events, 4, flush_every=31), LiquidityParams()
    rng = random.Random(9)
    slack = params.lateness_buckets * params.bucket_seconds
    # Any order in which no partial trails a newer bucket by more than the lateness allowance.
    shuffled = sorted(parts, key=lambda p: p.bucket + rng.uniform(0, slack))
    assert shuffled != parts
    assert summary(run_monitor(shuffled)) == summary(run_monitor(parts))


def test_monitor_state_is_bounded_and_picklable(run_events: list) -> None:
    mon = LiquidityMonitor()
    parts = partials(run_events, 4)
    half = len(parts) // 2
    for p in parts[:half]:
        mon.update(p)
    clone = pickle.loads(pickle.dumps(mon))
    rest = [r for p in parts[half:] for r in mon.update(p)]
    assert summary(rest) == summary([r for p in parts[half:] for r in clone.update(p)])
    assert len(mon.parts) <= 60 + 3 and len(mon.baseline) <= 24


def test_accumulator_classifies_flows_skips_redelivery_and_late_events() -> None:
    acc = FlowAccumulator("p0", bucket_seconds=60)
    assert acc.add(T0 + 1, "withdrawal", "debit", 100.0, "a", offset=1) == []
    acc.add(T0 + 2, "investment", "debit", 40.0, "b", offset=2)  # money into a product: inflow
    acc.add(T0 + 3, "redemption", "credit", 30.0, "c", offset=3)  # money out of a product: outflow
    acc.add(T0 + 4, "deposit", "credit", 5.0, "d", offset=4)
    acc.add(T0 + 5, "withdrawal", "debit", 7.0, "e", account_kind="custody", offset=5)  # not a customer leg
    assert acc.add(T0 + 6, "withdrawal", "debit", 100.0, "a", offset=1) == []  # redelivered
    [closed] = acc.add(T0 + 61, "payment", "debit", 1.0, "f", offset=6)
    assert (closed.bucket, closed.outflow, closed.inflow, closed.n) == (T0, 130.0, 45.0, 4)
    assert closed.event_ids == ["a", "c"]
    [revised] = acc.add(T0 + 30, "withdrawal", "debit", 10.0, "g", offset=7)  # late, still kept
    assert (revised.bucket, revised.outflow, revised.n) == (T0, 140.0, 5)
    acc.add(T0 + 3600, "deposit", "credit", 1.0, "h", offset=8)
    assert acc.add(T0 + 10, "withdrawal", "debit", 10.0, "i", offset=9) == [] and acc.late_dropped == 1
    assert [p.bucket for p in acc.flush()] == [T0 + 3600] and acc.flush() == []
    assert pickle.loads(pickle.dumps(acc)).buckets == acc.buckets


def market_parts(n_instruments: int, n_abnormal: int, *, sources: int = 2, minutes: int = 20) -> list[MarketPartial]:
    accs = [MarketAccumulator(f"p{i}") for i in range(sources)]
    out: list[MarketPartial] = []
    for m in range(minutes):
        for k in range(n_instruments):
            ts = T0 + m * MIN + k
            # The abnormal moves come at different minutes: stress is about a window, not one bucket.
            abnormal = k < n_abnormal and m == 5 + 2 * k
            out += accs[k % sources].add(ts, f"FUND-{k:02d}", abnormal, f"t{m}-{k}")
    for acc in accs:
        out += acc.flush()
    return out


def run_stress(parts: list[MarketPartial]) -> list[Raised]:
    mon = MarketStressMonitor(MarketStressParams())
    return [r for p in parts for r in mon.update(p)] + mon.drain()


def test_market_stress_five_of_ten_raises() -> None:
    raised = run_stress(market_parts(10, 5))
    assert raised and len({r.alert_id for r in raised}) == 1 and raised[0].is_new
    f = raised[0].finding
    assert (f.category, f.level, f.entity_type, f.entity_id) == ("market_stress", "high", "market", "market")
    # Raised once the third abnormal instrument meets the floors, then updated as more join.
    assert f.reasons[0].message.startswith("3 of 10 instruments moved abnormally within 15 minutes")
    assert any(r.finding.reasons[0].message.startswith("5 of 10 instruments") for r in raised)
    assert raised[0].to_alert().event_ids  # the abnormal ticks are the evidence


def test_market_stress_one_of_ten_is_quiet() -> None:
    assert run_stress(market_parts(10, 1)) == []


def test_market_stress_is_order_and_redelivery_independent() -> None:
    parts = market_parts(10, 5, sources=3)
    rng = random.Random(2)
    shuffled = sorted(parts + parts[::3], key=lambda p: p.bucket + rng.uniform(0, 120))
    assert summary(run_stress(shuffled)) == summary(run_stress(parts))
    assert summary(run_stress(market_parts(10, 5, sources=1))) == summary(run_stress(parts))
    mon, acc = MarketStressMonitor(), MarketAccumulator("p0")
    for p in parts[:40]:
        mon.update(p)
    acc.add(T0, "FUND-A", True, "x")
    clone, acc2 = pickle.loads(pickle.dumps(mon)), pickle.loads(pickle.dumps(acc))
    assert summary([r for p in parts[40:] for r in clone.update(p)]) == summary(
        [r for p in parts[40:] for r in mon.update(p)])
    assert acc2.flush() == acc.flush()


def test_params_are_validated_and_buckets_must_agree() -> None:
    with pytest.raises(ValidationError):
        LiquidityParams(window_seconds=3601)
    with pytest.raises(ValidationError):
        LiquidityParams(high_ratio=5, critical_ratio=4)
    with pytest.raises(ValidationError):
        MarketStressParams(min_share=1.5)
    with pytest.raises(ConfigError):
        LiquidityMonitor().update(FlowPartial(source="p0", bucket=T0 + 30, bucket_seconds=30))


def test_time_jumps_neither_swallow_data_nor_stall(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(aggregates, "_now", lambda: clock[0])
    acc = FlowAccumulator("p0")
    acc.add(T0 + 1, "withdrawal", "debit", 50.0, "a")
    [sent] = acc.add(T0 + 86_400, "deposit", "credit", 1.0, "b")  # the unsent bucket still goes out
    assert (sent.bucket, sent.outflow) == (T0, 50.0) and len(acc.buckets) == 1
    parts = market_parts(10, 5)
    before = summary(run_stress(parts))
    mon = MarketStressMonitor()
    after = [r for p in parts for r in mon.update(p)]
    clock[0] += mon.params.idle_source_seconds + 1  # p1 has gone quiet: it no longer holds the watermark back
    # A year of silence: the old data is judged to the end of its windows, the gap is skipped.
    after += mon.update(MarketPartial(source="p0", bucket=T0 + 365 * 86_400, active=["FUND-00"]))
    assert summary(after)[: len(before)] == before
    assert len(mon.parts) == 1 and mon.next_eval == T0 + 365 * 86_400 - 60


def test_market_accumulator_is_quiet_when_nothing_changes() -> None:
    acc = MarketAccumulator("p0")
    acc.add(T0 + 1, "FUND-A", False, "t1")
    assert [p.active for p in acc.flush()] == [["FUND-A"]]
    for i in range(10):
        acc.add(T0 + 2 + i, "FUND-A", False, f"t{i}")
    assert acc.flush() == []  # repeats of a known instrument add nothing
    acc.add(T0 + 20, "FUND-B", True, "t20")
    [p] = acc.flush()
    assert (p.active, p.abnormal, p.event_ids) == (["FUND-A", "FUND-B"], ["FUND-B"], ["t20"])


def full(raised: list[Raised]) -> list[str]:
    return [r.to_alert().model_dump_json() + repr((r.is_new, r.escalated, r.event_ts)) for r in raised]


def test_plain_totals_give_the_same_alerts_as_partials(run_events: list) -> None:
    # The replay's path (no FlowPartial built) against the worker's, on the same events.
    acc, mon, raised = FlowAccumulator("replay"), LiquidityMonitor(), []
    for ts, typ, _, amount, eid in sorted(run_events):
        for t in acc.add_counted(ts, typ, amount, eid):
            raised += mon.add_totals(acc.source, *t)
    raised += [r for p in acc.flush() for r in mon.update(p)] + mon.drain()
    assert raised and full(raised) == full(run_monitor(partials(run_events, 1)))


@pytest.mark.parametrize("sources", [1, 4])
def test_skipping_quiet_buckets_changes_nothing(run_events: list, sources: int,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    # Runs whose net outflow, less the window's 3 largest outflows (as judged), hovers around the
    # floor, so many buckets come close to it.
    near = list(flows(7, seed=3, run_from=5, run_per_min=6_200.0))
    params = LiquidityParams(min_net_outflow=100_000.0, lateness_buckets=1)
    parts = partials(near, sources, flush_every=37)
    skipping = full(run_monitor(parts, params))
    monkeypatch.setattr(aggregates, "_FINITE", 0)  # no bound is finite: every bucket judged in full
    assert skipping and skipping == full(run_monitor(parts, params))


def test_buckets_stay_in_order_when_partials_come_late() -> None:
    mon = LiquidityMonitor(LiquidityParams(lateness_buckets=3))
    for b in (T0 + 120, T0 + 60, T0 + 180, T0, T0 + 240):
        mon.update(FlowPartial(source="p1", bucket=b, outflow=1.0))
    mon.update(FlowPartial(source="p0", bucket=T0 + 60, outflow=2.0))
    assert list(mon.parts) == sorted(mon.parts) and list(mon.parts[T0 + 60]) == ["p0", "p1"]


def _worker_batches(events: list[tuple[float, str, str, float, str]], n_sources: int, batch: int,
                    batched: bool) -> list[bytes]:
    """What the worker sends: per batch, the newest totals of each (source, bucket), one message each or per source."""
    accs = [FlowAccumulator(f"p{i}") for i in range(n_sources)]
    ordered = sorted(events)
    out: list[bytes] = []
    for start in range(0, len(ordered), batch):
        newest: dict[tuple[int, int], FlowTotals] = {}
        for j in range(start, min(start + batch, len(ordered))):
            ts, typ, _, amount, eid = ordered[j]
            for t in accs[j % n_sources].add_counted(ts, typ, amount, eid, "customer", j):
                newest[(j % n_sources, t[0])] = t
        by_source: dict[int, list[FlowTotals]] = {}
        for (i, _), t in newest.items():
            by_source.setdefault(i, []).append(t)
        for i, closed in by_source.items():
            if batched:
                out += flow_buckets_json(accs[i].source, accs[i].bucket_seconds, closed)
            else:
                out += [accs[i].partial(t).model_dump_json().encode() for t in closed]
    for acc in accs:
        out += [p.model_dump_json().encode() for p in acc.flush()]
    return out


def test_flow_buckets_messages_give_the_same_alerts_as_one_partial_per_bucket(run_events: list) -> None:
    from models.pipeline import PARTIAL, PlatformMonitors
    from models.rules import load_catalogue

    def stage2(messages: list[bytes]) -> list[str]:
        mon = PlatformMonitors(load_catalogue())
        raised = [r for m in messages for r in mon.update(PARTIAL.validate_json(m))]
        return full(raised + mon.liquidity.drain())

    single = _worker_batches(run_events, 4, 97, batched=False)
    batched = _worker_batches(run_events, 4, 97, batched=True)
    assert len(batched) < len(single) / 5, (len(batched), len(single))
    expected = stage2(single)
    assert expected and stage2(batched) == expected


def test_flow_buckets_are_split_to_fit_a_kafka_message_and_validated() -> None:
    from models.pipeline import PARTIAL

    worst = [(T0 + i * MIN, 1e12, 0.5, 10**6, tuple(f"{i:03d}-{k:02d}".ljust(128, "x") for k in range(20)))
             for i in range(2 * MAX_BUCKETS_PER_MESSAGE + 1)]
    messages = flow_buckets_json("p3", 60, worst)
    assert [len(PARTIAL.validate_json(m).buckets) for m in messages] == [MAX_BUCKETS_PER_MESSAGE] * 2 + [1]
    assert max(map(len, messages)) < 1_000_000, "above Kafka's default message.max.bytes"
    back = [tuple(b) for m in messages for b in FlowBuckets.model_validate_json(m).buckets]
    assert back == [(b, o, i, n, list(ids)) for b, o, i, n, ids in worst]
    for bad in ('{"kind":"flows","source":"p0","buckets":[[60,-1.0,0.0,1,[]]]}',
                '{"kind":"flows","source":"p0","buckets":[]}',
                '{"kind":"flows","source":"p0","buckets":[[60,1.0,0.0,1,' + str([f"e{k}" for k in range(21)])
                .replace("'", '"') + ']]}'):
        with pytest.raises(ValidationError):
            PARTIAL.validate_json(bad)


def test_a_buckets_largest_outflows_travel_in_both_message_forms() -> None:
    # What stage two excludes must reach it: one partial per bucket, or a batched FlowBuckets message.
    from models.pipeline import PARTIAL

    acc = FlowAccumulator("p2")
    amounts = [120.0, 9_000.0, 35.0, 4_000.0, 77.0, 15_000.0, 800.0]
    closed = [t for k, a in enumerate(amounts) for t in acc.add_counted(T0 + k, "withdrawal", a, f"e{k}")]
    closed += acc.add_counted(T0 + 61, "deposit", 1.0, "next")  # closes the first bucket
    [totals] = closed
    assert totals[5] == (120.0, 800.0, 4_000.0, 9_000.0, 15_000.0)  # the 5 largest of 7, smallest first
    [message] = flow_buckets_json("p2", 60, closed)
    assert list(PARTIAL.validate_json(message).buckets[0][5]) == list(totals[5])
    single = PARTIAL.validate_json(acc.partial(totals).model_dump_json())
    assert single.largest == list(totals[5])


def test_a_source_behind_the_others_holds_the_watermark_back(run_events: list) -> None:
    # A backlog read by one worker: a batch carries one partition's hours before the next one's.
    parts = partials(run_events, 4)
    by_source = sorted(parts, key=lambda p: p.source)  # stable: each source's own order kept
    expected = full(run_monitor(parts))
    mon = LiquidityMonitor()
    mon.expect(["p0", "p1", "p2", "p3"])  # as the stage-two agent does when it starts
    raised = [r for p in by_source for r in mon.update(p)]
    assert expected and full(raised + mon.drain()) == expected
    assert mon.late_dropped == 0


def test_an_idle_source_stops_holding_the_watermark_back(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(aggregates, "_now", lambda: clock[0])
    mon = LiquidityMonitor(LiquidityParams(lateness_buckets=0, idle_source_seconds=30.0))
    mon.update(FlowPartial(source="p1", bucket=T0, inflow=1.0))
    for m in range(1, 6):
        mon.update(FlowPartial(source="p0", bucket=T0 + m * MIN, outflow=1.0))
    assert mon.next_eval == T0 + MIN, "p1 was heard just now: nothing after its bucket may be judged"
    clock[0] += 30.5
    mon.update(FlowPartial(source="p0", bucket=T0 + 6 * MIN, outflow=1.0))
    assert mon.next_eval == T0 + 7 * MIN, "p1 silent for longer than idle_source_seconds: p0 alone decides"
    clock[0] += 1.0
    mon.update(FlowPartial(source="p1", bucket=T0 + 7 * MIN, inflow=1.0))  # back, and caught up
    mon.update(FlowPartial(source="p0", bucket=T0 + 8 * MIN, outflow=1.0))
    assert mon.next_eval == T0 + 8 * MIN and mon.late_dropped == 0, "p1 holds the watermark again"
    mon.update(FlowPartial(source="p1", bucket=T0 + 8 * MIN, inflow=1.0))
    assert mon.next_eval == T0 + 9 * MIN


def test_an_expected_source_is_waited_for_until_it_speaks_or_idles(monkeypatch: pytest.MonkeyPatch) -> None:
    clock = [1000.0]
    monkeypatch.setattr(aggregates, "_now", lambda: clock[0])
    mon = LiquidityMonitor(LiquidityParams(lateness_buckets=0, idle_source_seconds=30.0))
    mon.expect(["p0", "p9"])
    for m in range(5):
        mon.update(FlowPartial(source="p0", bucket=T0 + m * MIN, outflow=1.0))
    assert mon.next_eval is None, "p9 has not spoken since the start: nothing is judged yet"
    clock[0] += 30.5
    mon.update(FlowPartial(source="p0", bucket=T0 + 5 * MIN, outflow=1.0))
    assert mon.next_eval == T0 + 6 * MIN


DAY = 86_400


def daily_parts(days: list[dict[str, int]], *, n: int = 10, spacing: float = DAY) -> list[MarketPartial]:
    """Stage 1 on daily closes of `n` instruments: days[k] maps an instrument index to its move that day."""
    acc, out = MarketAccumulator("p0"), []
    for k, moves in enumerate(days):
        ts = T0 + k * DAY + 3600
        for i in range(n):
            out += acc.add(ts + i, f"S{i:02d}", False, f"d{k}-{i}", move=moves.get(i, 0), spacing=spacing)
    return out + acc.flush()


def test_breadth_of_same_way_moves_is_market_stress() -> None:
    calm: dict[int, int] = {}
    raised = run_stress(daily_parts([calm, calm, {i: -1 for i in range(6)}, calm]))
    assert raised and raised[0].is_new
    f = raised[0].finding
    assert f.category == "market_stress" and [r.code for r in f.reasons] == ["market_breadth"]
    assert f.reasons[0].message.startswith("6 of 10 instruments fell together within one bar (1.0 days apart)")
    assert f.reasons[0].value == 0.6 and f.reasons[0].threshold == 0.5
    assert {e.split("-")[0] for e in raised[0].to_alert().event_ids} == {"d2"}


@pytest.mark.parametrize("day", [
    {i: -1 for i in range(4)},  # 40%: below the share
    {**{i: -1 for i in range(3)}, **{i: 1 for i in range(3, 6)}},  # six moves, but not the same way
])
def test_narrow_or_mixed_moves_are_quiet(day: dict[int, int]) -> None:
    assert run_stress(daily_parts([{}, day, {}])) == []


def test_daily_windows_do_not_add_up_consecutive_days() -> None:
    # 4 of 10 fell on Monday and 4 others on Tuesday: 40% each day, though 80% in two days.
    monday, tuesday = {i: -1 for i in range(4)}, {i: -1 for i in range(4, 8)}
    assert run_stress(daily_parts([{}, monday, tuesday, {}])) == []
    # The same days at a spacing estimate 5% long (after a weekend) still judge one day at a time.
    assert run_stress(daily_parts([{}, monday, tuesday, {}], spacing=1.05 * DAY)) == []
    # Two bars of breadth window do add them up.
    mon = MarketStressMonitor(MarketStressParams(breadth_bars=2))
    assert [r for p in daily_parts([{}, monday, tuesday, {}]) for r in mon.update(p)] + mon.drain()


def test_windows_follow_the_spacing() -> None:
    mon = MarketStressMonitor()
    assert mon.windows(0.0) == (900, 60)  # unknown spacing: the seconds forms
    assert mon.windows(5.0) == (900, 60)  # ticks seconds apart
    assert mon.windows(60.0) == (900, 60)  # minute bars
    assert mon.windows(3600.0) == (1800, 1800)  # hourly bars: half a bar back, one bar in all
    assert mon.windows(DAY) == (43_200, 43_200)
    assert mon.windows(365 * DAY) == (8 * DAY, 8 * DAY)  # capped: memory stays bounded
    assert MarketStressMonitor(MarketStressParams(window_bars=3)).windows(DAY)[0] == 2.5 * DAY


def test_partial_of_the_previous_version_still_parses_and_counts() -> None:
    from models.pipeline import PARTIAL

    old = (f'{{"kind":"market","source":"p0","bucket":{T0},"bucket_seconds":60,"active":["A","B","C","D"],'
           '"abnormal":["A","B","C"],"event_ids":["x"]}')
    part = PARTIAL.validate_json(old)
    assert isinstance(part, MarketPartial) and (part.down, part.up, part.spacing_seconds) == ([], [], 0.0)
    mon = MarketStressMonitor()
    raised = mon.update(part) + mon.drain()
    assert [r.finding.reasons[0].code for r in raised] == ["market_stress"]
    # Mixed in with new partials on daily closes, an old one leaves the windows at one day.
    mon = MarketStressMonitor()
    for p in daily_parts([{}, {}]):
        mon.update(p)
    mon.update(MarketPartial(source="p0", bucket=T0 + 2 * DAY + 3600, active=["S00"]))
    mon.drain()
    assert mon.spacing == DAY
    # A new partial carries the new fields; an old stage 2 would ignore them (extra="ignore").
    acc = MarketAccumulator("p0")
    acc.add(T0 + 1, "A", False, "a", move=-1, spacing=60.0)
    acc.add(T0 + 2, "B", True, "b", move=1, spacing=30.0)
    [new] = acc.flush()
    assert (new.down, new.up, new.abnormal, new.spacing_seconds, new.event_ids) == (["A"], ["B"], ["B"], 45.0,
                                                                                    ["a", "b"])
