"""The platform aggregates' state (stage-one accumulators, stage-two monitors) survives being written and read back."""

from __future__ import annotations

import pytest

from app.schemas import MarketTick, Transaction
from models.aggregates import FlowAccumulator, MarketAccumulator
from models.features import StateCodecError
from models.pipeline import Pipeline
from models.platform_state import (
    META_KEY,
    check_value,
    dump_accumulator,
    dump_meta,
    load_accumulator,
    load_meta,
    load_part,
    restore,
    take_changes,
)
from models.rules import load_catalogue
from models.synth import generate

CATEGORIES = ("liquidity_run", "market_stress")


def _monitors(pipe: Pipeline) -> dict:
    return {"liquidity": pipe.monitors.liquidity, "market_stress": pipe.monitors.stress}


def _run(events, restart_at: int | None) -> list[tuple[str, str, str]]:
    """Platform warnings of a replay, rebuilt from its written state after `restart_at` events when given."""
    pipe = Pipeline(load_catalogue("deploy/rules.yaml"))
    table: dict[bytes, bytes] = {}
    take_changes(_monitors(pipe))
    got = []
    for i, e in enumerate(events):
        model = Transaction if e["event_type"] == "transaction" else MarketTick
        for a in pipe.process(model.model_validate(e)).alerts:
            if a.category in CATEGORIES:
                got.append((a.category, a.alert_id, a.level))
        for key, value in take_changes(_monitors(pipe)):
            if value is None:
                table.pop(key, None)
            else:
                table[key] = value
        table[META_KEY] = dump_meta(_monitors(pipe), i)
        if i == restart_at:
            flows, stress = dump_accumulator(pipe.flows), dump_accumulator(pipe.stress)
            fresh = Pipeline(load_catalogue("deploy/rules.yaml"))
            fresh.flows, fresh.stress = load_accumulator(flows), load_accumulator(stress)  # type: ignore[assignment]
            parts = [load_part(k, v) for k, v in table.items() if k != META_KEY]
            assert restore(_monitors(fresh), load_meta(table[META_KEY]), parts) == i
            fresh.instruments, fresh.accounts, fresh.detectors = pipe.instruments, pipe.accounts, pipe.detectors
            fresh._detector_of = pipe._detector_of
            pipe = fresh
    return got


def test_monitors_restored_mid_run_warn_as_an_uninterrupted_run():
    events = generate(seed=3, accounts=100, days=1.0, instruments=12, scenarios=["liquidity_run", "market_crash"])
    # Inside the market crash and the second liquidity run (see tests/faults/test_platform_kill9.py).
    cut = next(i for i, e in enumerate(events) if e["ts"] >= "2026-11-01T14:30")
    want = _run(events, None)
    assert {c for c, _, _ in want} == set(CATEGORIES)
    assert _run(events, cut) == want


def test_accumulators_round_trip_and_resend_their_buckets():
    flows = FlowAccumulator("p1")
    for k in range(5):
        flows.add(60.0 * k + 1, "withdrawal", "debit", 100.0 + k, f"e{k}", offset=k)
    flows.flush()
    back = load_accumulator(dump_accumulator(flows))
    assert isinstance(back, FlowAccumulator)
    assert (back.buckets, back.last_offset, back.max_bucket) == (flows.buckets, 4, flows.max_bucket)
    assert back.add(1.0, "withdrawal", "debit", 1.0, "e0", offset=0) == []  # redelivered: recognised by offset
    assert [p.bucket for p in back.flush()] == sorted(flows.buckets)  # every kept bucket sent again
    stress = MarketAccumulator("p2")
    stress.add(5.0, "A", True, "t1", move=-1, spacing=60.0, offset=7)
    again = load_accumulator(dump_accumulator(stress))
    assert isinstance(again, MarketAccumulator) and again.buckets == stress.buckets and again.last_offset == 7


@pytest.mark.parametrize("blob", [b"", b"garbage", b'{"v": 2, "kind": "flow"}', b"[1, 2]"])
def test_a_value_that_is_not_state_is_refused(blob):
    with pytest.raises(StateCodecError):
        load_accumulator(blob)
    with pytest.raises(StateCodecError):
        check_value(blob)
    with pytest.raises(StateCodecError):
        load_part(b"liquidity:60:p0", blob)


def test_storm_cap_admissions_come_back_per_partition():
    from models.scoring import StormCap

    cap = StormCap(3, by_source=True)
    cap.source = 1
    assert [cap.admit("velocity", 60.0) for _ in range(2)] == [True, True]
    cap.source = 2
    assert cap.admit("velocity", 61.0)
    assert cap.changed == {1, 2}
    one, two = cap.dump(1), cap.dump(2)
    assert not cap.changed
    after = StormCap(3, by_source=True)  # a restarted worker, partitions 1 and 2 read back
    after.load(1, one)
    after.load(2, two)
    assert not after.admit("velocity", 62.0), "the minute's cap was used up before the crash"
    assert after.admit("velocity", 120.0)
    after.drop(2)  # partition 2 moved on: its admission no longer counts here
    after.source = 1
    assert after.admit("velocity", 63.0) and not after.admit("velocity", 64.0)
    with pytest.raises(StateCodecError):
        after.load(1, b'{"v": 1, "counts": [["velocity", 1, -4]]}')
