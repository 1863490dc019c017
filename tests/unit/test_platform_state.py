"""The platform aggregates' state (stage-one accumulators, stage-two monitors) survives being written and read back."""

from __future__ import annotations

import pytest

from models.aggregates import FlowAccumulator, MarketAccumulator
from models.features import StateCodecError
from models.pipeline import Pipeline
from models.platform_state import (
    META_KEY,
    check_value,
    dump_accumulator,
    dump_meta,
    dump_stress_head,
    load_accumulator,
    load_meta,
    load_part,
    load_stress,
    restore,
    take_changes,
)
from models.rules import load_catalogue
from models.schemas import MarketTick, Transaction
from models.synth import generate

CATEGORIES = ("liquidity_run", "market_stress")


def _monitors(pipe: Pipeline) -> dict:
    return {"liquidity": pipe.monitors.liquidity, "market_stress": pipe.monitors.stress}


def _stress_round_trip(acc: MarketAccumulator) -> MarketAccumulator:
    """A stress accumulator written per instrument entry, as the market agent does, and read back."""
    from agents.market import _write_stress

    table: dict[bytes, bytes] = {}
    sampled: dict = {b: {name: [e for e in ids] if name == min(active) else [] for name in active}
                     for b, (active, _, ids, _, _, _) in acc.buckets.items()}
    for b, (active, _, _, _, _, _) in acc.buckets.items():
        for name in sorted(active):
            _write_stress(table, 0, acc, sampled, b, name, "")
    entries = [(int(k.split(b":")[1]), k.split(b":", 2)[2].decode(), v) for k, v in table.items() if b":" in k]
    back, _ = load_stress(dump_stress_head(acc), entries)
    return back


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
            fresh = Pipeline(load_catalogue("deploy/rules.yaml"))
            fresh.flows = load_accumulator(dump_accumulator(pipe.flows))
            fresh.stress = _stress_round_trip(pipe.stress)
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


def test_flow_values_of_the_previous_version_still_read():
    # Written before buckets kept their largest outflows: (size, outflow, inflow, ids) and five-field buckets.
    _, b, source, (size, payload) = load_part(b"liquidity:60:p0", b'[3, 250.5, 10.0, ["e1"]]')
    assert (b, source, size, payload[:3], payload[5]) == (60, "p0", 3, (250.5, 10.0, ("e1",)), ())
    old = (b'{"kind":"flow","v":1,"source":"p1","bucket_seconds":60,"keep_buckets":5,"max_bucket":60,'
           b'"last_offset":7,"late_dropped":0,"buckets":[[60,250.5,10.0,2,["e1"]]]}')
    acc = load_accumulator(old)
    assert acc.buckets == {60: [250.5, 10.0, 2, ["e1"], []]}
    acc.add(61.0, "withdrawal", "debit", 99.0, "e2", offset=8)
    assert acc.buckets[60][4] == [99.0]


@pytest.mark.parametrize("largest", ["[-1.0]", "[1, 2, 3, 4, 5, 6]", '["x"]'])
def test_stored_largest_outflows_are_checked(largest):
    with pytest.raises(StateCodecError):
        load_part(b"liquidity:60:p0", f'[3, 250.5, 10.0, ["e1"], {largest}]'.encode())
    with pytest.raises(StateCodecError):
        load_accumulator(b'{"kind":"flow","v":1,"source":"p1","bucket_seconds":60,"keep_buckets":5,"max_bucket":60,'
                         b'"last_offset":7,"late_dropped":0,"buckets":[[60,250.5,10.0,2,["e1"],'
                         + largest.encode() + b"]]}")


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


def test_stress_buckets_stored_per_instrument_come_back_whole():
    """The market agent's per-instrument entries (agents.market._write_stress) rebuild the accumulator exactly."""
    import random

    from agents.market import _write_stress
    from models.aggregates import bucket_of
    from models.platform_state import load_stress

    rng = random.Random(5)
    acc = MarketAccumulator("p0")
    table: dict[bytes, bytes] = {}
    sampled: dict = {}
    for k in range(2000):  # 40 instruments, a tick every 20 s: buckets fill, close and are forgotten
        ts, name, event_id = 20.0 * k + rng.random(), f"I{rng.randrange(40):02d}", f"e{rng.randrange(10**6):07d}"
        before = acc.changes
        acc.add(ts, name, rng.random() < 0.2, event_id, move=rng.choice([-1, 0, 0, 1]), spacing=60.0, offset=k)
        if acc.changes != before:  # as the agent does
            _write_stress(table, 0, acc, sampled, bucket_of(ts, acc.bucket_seconds), name, event_id)
    entries = [(int(k.split(b":")[1]), k.split(b":", 2)[2].decode(), v) for k, v in table.items() if b":" in k]
    assert {b for b, _, _ in entries} == set(acc.buckets), "entries of forgotten buckets are deleted"
    back, _ = load_stress(table[b"p0"], entries)
    assert back.buckets == acc.buckets
    # The head is written when a bucket opens or closes: ticks after its offset are added again, harmlessly.
    assert back.max_bucket == acc.max_bucket and back.last_offset <= acc.last_offset
    with pytest.raises(StateCodecError):
        load_stress(b"garbage", [])
