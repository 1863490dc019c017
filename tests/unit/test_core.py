"""The processing core: one per-transaction step, run by the worker's processor and by replay's Pipeline alike."""

from __future__ import annotations

import asyncio
import itertools
import json
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest

from models.aggregates import FlowAccumulator
from models.core import IdleEviction, MemoryStore, TxnCore
from models.pipeline import Pipeline
from models.rules import load_catalogue
from models.schemas import Transaction
from models.scoring import TransactionScorer
from models.synth import generate
from tests.conftest import build_engine


def _txn(event_id: str, ts: str, account: str = "A1", amount: float = 20.0) -> Transaction:
    return Transaction.model_validate({
        "event_id": event_id, "event_type": "transaction", "ts": ts, "account_id": account,
        "counterparty_id": "M1", "amount": amount, "currency": "CNY", "txn_type": "withdrawal",
        "direction": "debit", "channel": "app"})


def _core(ttl: float = 3600.0) -> TxnCore:
    flows = FlowAccumulator("p0")
    return TxnCore(TransactionScorer(load_catalogue()), MemoryStore(), IdleEviction(ttl), lambda p: flows)


def test_a_redelivered_offset_is_not_scored_or_counted_again() -> None:
    core = _core()
    a = _txn("e1", "2026-11-01T10:00:00Z")
    b = _txn("e2", "2026-11-01T10:02:00Z")  # the next minute's bucket: closes the first
    assert core.step(a, a.ts.timestamp(), 0, 10)[0] is not None
    out, closed = core.step(b, b.ts.timestamp(), 0, 11)
    assert out is not None and [(n, outflow) for _, outflow, _, n, _, _ in closed] == [(1, 20.0)]
    assert core.step(a, a.ts.timestamp(), 0, 10) == (None, [])  # redelivered: no score, no second count
    assert core.store.get(0, b"A1").n == 2


def test_an_event_id_seen_again_under_a_new_offset_is_a_duplicate_and_not_counted() -> None:
    core = _core()
    a = _txn("e1", "2026-11-01T10:00:00Z")
    core.step(a, a.ts.timestamp(), 0, 1)
    out, closed = core.step(a, a.ts.timestamp(), 0, 2)
    assert out is not None and out.duplicate and closed == []
    assert core.store.get(0, b"A1").n == 1


def test_platform_flows_count_in_the_liquidity_monitors_currency(caplog: pytest.LogCaptureFixture) -> None:
    core = _core()  # the shipped catalogue: CNY, with a rate for USD and none for KRW
    flows = core.flows_of(0)
    offsets = itertools.count()

    def outflow(event_id: str, minute: int, currency: str) -> float:
        txn = _txn(event_id, f"2026-11-01T10:{minute:02d}:00Z", amount=100.0).model_copy(update={"currency": currency})
        core.step(txn, txn.ts.timestamp(), 0, next(offsets))
        return flows.buckets[int(txn.ts.timestamp()) // 60 * 60][0]

    assert outflow("c1", 0, "CNY") == 100.0
    assert outflow("u1", 1, "USD") == pytest.approx(710.0)  # 7.1 CNY per USD
    assert outflow("k1", 2, "KRW") == outflow("k2", 2, "KRW") / 2 == 100.0  # no rate: as it is, said once
    said = [r.getMessage() for r in caplog.records if "liquidity_run has no rate" in r.getMessage()]
    assert len(said) == 1 and "no rate for KRW" in said[0] and "fx_rates.KRW (CNY per KRW)" in said[0]


def test_idle_accounts_leave_the_store() -> None:
    core = _core(ttl=3600.0)
    old, new = _txn("e1", "2026-11-01T10:00:00Z", "old"), _txn("e2", "2026-11-01T12:00:00Z", "new")
    core.step(old, old.ts.timestamp(), 0)
    core.step(new, new.ts.timestamp(), 1)
    assert core.evict() == [(b"old", 0)]
    assert "old" not in core.store and "new" in core.store


def test_the_worker_and_replay_raise_the_same_warnings_from_the_same_events(tmp_path: Path) -> None:
    events = [e for e in generate(seed=5, accounts=60, days=1.0, instruments=0,
                                  scenarios=["takeover", "card_testing", "spike", "structuring"])
              if e["event_type"] == "transaction"]
    proc = build_engine(tmp_path).processor
    worker: dict[tuple[str, tuple[str, ...]], Any] = {}
    for lo in range(0, len(events), 500):
        recs = [SimpleNamespace(topic="t", partition=0, offset=o, value=json.dumps(events[o]).encode())
                for o in range(lo, min(lo + 500, len(events)))]
        asyncio.run(proc.process(recs))
        proc.write_state()  # as the engine does before each commit: states encoded, read back decoded
        for topic, _, value, _ in proc.sink.take():
            if topic.endswith("risk.alerts"):
                a = json.loads(value)
                worker[(a["alert_id"], tuple(a["event_ids"]))] = (a["level"], a["score"], a["reasons"])
    pipe = Pipeline(load_catalogue(), partitions=1)
    replay: dict[tuple[str, tuple[str, ...]], Any] = {}
    for e in events:
        for a in pipe.process(Transaction.model_validate(e)).alerts:
            d = json.loads(a.model_dump_json())
            replay[(d["alert_id"], tuple(d["event_ids"]))] = (d["level"], d["score"], d["reasons"])
    assert len(replay) > 20
    assert worker == replay


def test_a_redelivered_tick_is_not_scored_again_and_the_caller_stores_the_state() -> None:
    from models.aggregates import MarketAccumulator
    from models.core import MarketScorer, TickCore
    from models.schemas import MarketTick

    stress = MarketAccumulator("p0")
    core = TickCore(MarketScorer(load_catalogue()), MemoryStore(), lambda p: stress)
    ticks = [MarketTick.model_validate({"event_id": f"t{i}", "event_type": "market", "instrument": "INS01",
                                        "ts": f"2026-11-01T10:{i:02d}:00Z", "price": 100.0 + i, "venue": "SSE"})
             for i in range(3)]
    for i, t in enumerate(ticks[:2]):
        stepped = core.step(t, t.ts.timestamp(), 0, i)
        assert stepped is not None
        core.store.put(0, b"INS01", stepped[0])
    assert core.store.get(0, b"INS01").offset == 1
    assert core.step(ticks[1], ticks[1].ts.timestamp(), 0, 1) is None  # redelivered
    stepped = core.step(ticks[2], ticks[2].ts.timestamp(), 0, 2)
    assert stepped is not None and [p.bucket for p in stepped[3]] == [ticks[1].ts.timestamp()]


def test_the_workers_account_table_iterates_stored_and_new_states_without_marking_them_changed(
        tmp_path: Path) -> None:
    proc = build_engine(tmp_path).processor
    events = [_txn(f"e{i}", f"2026-11-01T10:0{i}:00Z", f"A{i}") for i in range(3)]
    asyncio.run(proc.process([SimpleNamespace(topic="t", partition=0, offset=i, value=e.model_dump_json().encode())
                              for i, e in enumerate(events[:2])]))
    proc.write_state()  # A0 and A1 stored
    asyncio.run(proc.process([SimpleNamespace(topic="t", partition=0, offset=2,
                                              value=events[2].model_dump_json().encode())]))
    assert set(proc.live) == {(0, b"A2")}
    got = dict(proc.states.iterate(0))
    assert sorted(got) == [b"A0", b"A1", b"A2"] and all(st.n == 1 for st in got.values())
    assert set(proc.live) == {(0, b"A2")}, "reading the table does not make its states changed"


def test_iterating_the_account_table_leaves_an_undecodable_value_to_the_accounts_next_read(tmp_path: Path) -> None:
    proc = build_engine(tmp_path).processor
    good = _txn("e0", "2026-11-01T10:00:00Z", "A0")
    asyncio.run(proc.process([SimpleNamespace(topic="t", partition=0, offset=0,
                                              value=good.model_dump_json().encode())]))
    proc.write_state()
    proc.warm.clear()  # read from the table, not from the cache
    proc.accounts.put(0, b"bad", b"not an account state")
    counter = proc.m.state_quarantined.labels("accounts")
    before = counter._value.get()
    assert [k for k, _ in proc.states.iterate(0)] == [b"A0"]
    assert [k for k, _ in proc.states.iterate(0)] == [b"A0"]
    assert counter._value.get() == before, "iterating sets nothing aside"
    assert proc.states.get(0, b"bad").n == 0 and counter._value.get() == before + 1, "the read sets it aside once"


def test_a_transaction_not_keyed_by_its_account_is_sent_on_to_the_accounts_partition_and_told_once(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    from models.pipeline import partition_of

    proc = build_engine(tmp_path).processor
    proc.input_partitions = 4
    home = partition_of(b"A1", 4)
    away = (home + 1) % 4
    raw = [_txn(f"e{i}", f"2026-11-01T10:0{i}:00Z").model_dump_json().encode() for i in range(5)]
    recs = [SimpleNamespace(topic="t", partition=away, offset=0, key=None, value=raw[0]),          # no key
            SimpleNamespace(topic="t", partition=away, offset=1, key=b"evt-9f2", value=raw[1]),    # another key
            SimpleNamespace(topic="t", partition=away, offset=2, key=b'"A1"', value=raw[2]),       # JSON-quoted id
            SimpleNamespace(topic="t", partition=home, offset=0, key=None, value=raw[3]),          # no key, at home
            SimpleNamespace(topic="t", partition=away, offset=3, key=b"A1", value=raw[4])]         # its own key
    asyncio.run(proc.process(recs))
    sent = [m for m in proc.sink.take() if m[0] == proc.topic_name]
    assert sent == [(proc.topic_name, b"A1", raw[0], home), (proc.topic_name, b"A1", raw[1], home)]
    assert proc.m.rekeyed.labels(proc.topic_name)._value.get() == 2
    # The rest are scored where they are: keyed by the account (whatever partition its producer's
    # hash chose) or unkeyed but already home.
    assert proc.states.get(away, b"A1").n == 2 and proc.states.get(home, b"A1").n == 1
    told = [r.getMessage() for r in caplog.records if "not by its account_id" in r.getMessage()]
    assert len(told) == 1 and "with no key" in told[0] and "Key the producer's records by account_id" in told[0]
    assert "A1" not in told[0].replace(proc.topic_name, ""), "no account id in the log"
