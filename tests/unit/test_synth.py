"""Tests for the synthetic stream generator: determinism, contract validity and the shape of each scenario."""

from __future__ import annotations

import gzip
import itertools
import json
import statistics
from collections import defaultdict
from datetime import datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from models.schemas import decode_object
from models.synth import ALL_SCENARIOS, REPORTING_THRESHOLD, generate, write_jsonl

SMALL: dict[str, Any] = {"accounts": 100, "days": 1.0, "instruments": 3}


@pytest.fixture(scope="module")
def events() -> list[dict[str, Any]]:
    return generate(seed=3, **SMALL)


def by_instance(events: list[dict[str, Any]], scenario: str) -> dict[str, list[dict[str, Any]]]:
    groups: dict[str, list[dict[str, Any]]] = defaultdict(list)
    for ev in events:
        if ev.get("scenario") == scenario:
            groups[ev["scenario_instance"]].append(ev)
    return groups


def ts(ev: dict[str, Any]) -> datetime:
    return datetime.fromisoformat(ev["ts"])


def test_same_seed_same_stream_other_seed_other_stream(events: list[dict[str, Any]]) -> None:
    assert generate(seed=3, **SMALL) == events
    assert generate(seed=4, **SMALL) != events


def test_every_event_follows_the_contract(events: list[dict[str, Any]]) -> None:
    for ev in events:
        decoded = decode_object(ev)
        assert decoded.ts.utcoffset() is not None
        assert ev["ts"][-6] in "+-" and ev["ts"][-3] == ":"  # RFC 3339 offset such as +08:00
    assert {ev["event_type"] for ev in events} == {"transaction", "market"}
    assert {ev["currency"] for ev in events if ev["event_type"] == "transaction"} == {"CNY", "USD"}


def test_sorted_by_time_with_unique_deterministic_ids(events: list[dict[str, Any]]) -> None:
    times = [ts(ev) for ev in events]
    assert times == sorted(times)
    assert [ev["event_id"] for ev in events] == [f"3-{n:08d}" for n in range(len(events))]


def test_every_scenario_is_present_labelled_and_tagged(events: list[dict[str, Any]]) -> None:
    for ev in events:
        assert ev["label"] in (0, 1)
        assert ("scenario" in ev) == (ev["label"] == 1) == ("scenario_instance" in ev)
    for name in ALL_SCENARIOS:
        instances = by_instance(events, name)
        assert len(instances) >= 3, name
        assert all(key.startswith(f"{name}:") for key in instances)


def test_structuring_stays_just_under_the_reporting_threshold(events: list[dict[str, Any]]) -> None:
    for group in by_instance(events, "structuring").values():
        assert 3 <= len(group) <= 5
        assert len({ev["account_id"] for ev in group}) == 1
        assert ts(group[-1]) - ts(group[0]) < timedelta(hours=24)
        for ev in group:
            assert ev["currency"] == "CNY" and ev["direction"] == "debit"
            assert 0.9 * REPORTING_THRESHOLD <= ev["amount"] <= 0.999 * REPORTING_THRESHOLD


def test_card_testing_is_a_burst_of_tiny_debits_then_larger_ones(events: list[dict[str, Any]]) -> None:
    for group in by_instance(events, "card_testing").values():
        tiny = [ev for ev in group if ev["amount"] <= 3.0]
        assert 5 <= len(tiny) <= 15 and 1 <= len(group) - len(tiny) <= 2
        assert all(ev["amount"] >= 0.5 for ev in tiny)
        assert group[: len(tiny)] == tiny  # the probes come first
        assert ts(tiny[-1]) - ts(tiny[0]) < timedelta(minutes=15)


def test_fund_isolation_is_the_only_custody_to_platform_debit(events: list[dict[str, Any]]) -> None:
    misuse = [ev for ev in events if ev.get("account_kind") == "custody"
              and ev.get("counterparty_kind") == "platform_own" and ev.get("direction") == "debit"]
    assert misuse and all(ev.get("scenario") == "fund_isolation" for ev in misuse)
    assert len(by_instance(events, "fund_isolation")) >= 3


def test_takeover_uses_a_new_device_and_large_debits(events: list[dict[str, Any]]) -> None:
    for group in by_instance(events, "takeover").values():
        account = group[0]["account_id"]
        normal = [ev for ev in events if ev.get("account_id") == account and ev["label"] == 0]
        known = {ev.get("device_id") for ev in normal if ts(ev) < ts(group[0])}
        assert {ev["device_id"] for ev in group}.isdisjoint(known)
        debits = [ev["amount"] for ev in normal if ev["direction"] == "debit"] or [1.0]
        assert min(ev["amount"] for ev in group) > statistics.median(debits)


def test_spike_is_one_large_debit(events: list[dict[str, Any]]) -> None:
    for group in by_instance(events, "spike").values():
        (ev,) = group
        normal = [e["amount"] for e in events if e.get("account_id") == ev["account_id"]
                  and e["label"] == 0 and e["direction"] == "debit"]
        assert ev["direction"] == "debit" and ev["amount"] > 5 * statistics.median(normal)


def test_liquidity_run_is_outflow_across_many_accounts(events: list[dict[str, Any]]) -> None:
    for group in by_instance(events, "liquidity_run").values():
        assert {ev["txn_type"] for ev in group} <= {"withdrawal", "redemption"}
        assert len({ev["account_id"] for ev in group}) >= 10
        assert ts(group[-1]) - ts(group[0]) <= timedelta(hours=2, minutes=10)


def test_market_crash_drops_enough_instruments_far_enough_fast_enough(events: list[dict[str, Any]]) -> None:
    instruments = {ev["instrument"] for ev in events if ev["event_type"] == "market"}
    crashes = by_instance(events, "market_crash")
    assert len({g[0]["instrument"] for g in crashes.values()}) >= 0.4 * len(instruments)
    ticks = defaultdict(list)
    for ev in events:
        if ev["event_type"] == "market":
            ticks[ev["instrument"]].append(ev)
    for group in crashes.values():
        series = ticks[group[0]["instrument"]]
        before = series[series.index(group[0]) - 1]["price"]
        drop = 1 - group[-1]["price"] / before
        assert 0.08 <= drop <= 0.27, drop  # 10-25% planned, plus the instrument's own noise
        assert ts(group[-1]) - ts(group[0]) <= timedelta(minutes=15)


def test_normal_behaviour_is_heterogeneous_with_legitimate_large_purchases(events: list[dict[str, Any]]) -> None:
    debits: dict[str, list[float]] = defaultdict(list)
    for ev in events:
        if ev["event_type"] == "transaction" and ev["label"] == 0 and ev["direction"] == "debit":
            debits[ev["account_id"]].append(ev["amount"])
    medians = sorted(statistics.median(v) for k, v in debits.items() if k.startswith("A"))
    assert medians[-1] / medians[0] > 50
    assert any(max(v) > 5 * statistics.median(v) for v in debits.values() if len(v) >= 5)


def test_a_scenario_subset_leaves_normal_events_unchanged(events: list[dict[str, Any]]) -> None:
    def normal(evs: list[dict[str, Any]]) -> list[tuple[Any, ...]]:
        return [(e["ts"], e["account_id"], e["amount"]) for e in evs if e["label"] == 0 and "account_id" in e]

    only = generate(seed=3, scenarios=("spike",), **SMALL)
    assert {ev["scenario"] for ev in only if ev["label"]} == {"spike"}
    assert normal(only) == normal(events)
    # Without the crash, prices after it differ, but the ticks arrive at the same moments.
    assert [e["ts"] for e in only if "price" in e] == [e["ts"] for e in events if "price" in e]


def test_write_jsonl_round_trips_and_gzip_output_is_reproducible(events: list[dict[str, Any]], tmp_path: Path) -> None:
    head = events[:500]
    assert write_jsonl(head, tmp_path / "a.jsonl") == 500
    assert [json.loads(line) for line in (tmp_path / "a.jsonl").read_text().splitlines()] == head
    write_jsonl(head, tmp_path / "a.jsonl.gz")
    write_jsonl(head, tmp_path / "b.jsonl.gz")
    assert (tmp_path / "a.jsonl.gz").read_bytes() == (tmp_path / "b.jsonl.gz").read_bytes()
    with gzip.open(tmp_path / "a.jsonl.gz", "rt") as f:
        assert [json.loads(line) for line in f] == head


@pytest.mark.parametrize("kwargs", [{"scenarios": ("meteor",)}, {"days": 0}, {"accounts": 0}, {"seed": -1},
                                    {"start": datetime(2026, 11, 1)}])
def test_bad_arguments_say_what_is_wrong(kwargs: dict[str, Any]) -> None:
    with pytest.raises(ValueError):
        generate(**kwargs)


def test_a_mule_sends_on_most_of_what_it_received_from_new_payers_within_hours(events: list[dict[str, Any]]) -> None:
    for key, evs in by_instance(events, "mule").items():
        ins = [e for e in evs if e["direction"] == "credit"]
        outs = [e for e in evs if e["direction"] == "debit"]
        assert len(ins) >= 3 and 1 <= len(outs) <= 2, key
        assert all(e["txn_type"] == "transfer" for e in ins), key
        assert 0.85 <= sum(e["amount"] for e in outs) / sum(e["amount"] for e in ins) <= 0.97, key
        first, last = (datetime.fromisoformat(evs[i]["ts"]) for i in (0, -1))
        assert (last - first).total_seconds() < 8 * 3600, key
        payers = {e["counterparty_id"] for e in ins}
        before = {e["counterparty_id"] for e in events if e.get("account_id") == ins[0]["account_id"]
                  and e["ts"] < ins[0]["ts"]}
        assert not payers & before, "the payers are new to the account"


def test_a_dormant_account_was_active_then_silent_before_its_run(events: list[dict[str, Any]]) -> None:
    span = SMALL["days"] * 86400.0
    for key, evs in by_instance(events, "dormant").items():
        acct = evs[0]["account_id"]
        first = datetime.fromisoformat(evs[0]["ts"])
        own = [datetime.fromisoformat(e["ts"]) for e in events if e.get("account_id") == acct and e["label"] == 0
               and datetime.fromisoformat(e["ts"]) < first]
        assert own, f"{key}: an account with a history"
        assert (first - max(own)).total_seconds() >= 0.5 * span, f"{key}: silent for most of the stream first"
        assert all(e["direction"] == "debit" for e in evs)


def test_some_ordinary_accounts_go_quiet_and_come_back_unlabelled() -> None:
    evs = generate(seed=5, accounts=400, days=4.0, instruments=0, scenarios=())
    by_acct: dict[str, list[datetime]] = defaultdict(list)
    for e in evs:
        by_acct[e["account_id"]].append(datetime.fromisoformat(e["ts"]))
    gaps = [max((b - a).total_seconds() for a, b in itertools.pairwise(ts)) for ts in by_acct.values()
            if len(ts) > 10]
    assert sum(g > 1.5 * 86400 for g in gaps) >= 2, "vacations: days of silence, then back"
    assert all(e["label"] == 0 for e in evs)
