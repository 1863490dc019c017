"""One bad stored value must not stop the platform (issue 17): it is set aside, the worker goes on.

Without a broker: the quarantine helper, the detector snapshot codec, the Faust table class that
checks changelog values on recovery, and the transaction engine's fallbacks. With a broker: garbage
written under one key of every changelog topic, then a restart; every other key scores normally.
"""

from __future__ import annotations

import asyncio
import base64
import json
import logging
import pickle
import time
import zlib
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from prometheus_client import CollectorRegistry

from app.changelog import ChangelogStore
from app.faust_app import load_shifts
from app.metrics import Metrics
from app.quarantine import Quarantine
from app.settings import Settings
from tests.conftest import build_engine

GARBAGE = b"\x00not a snapshot\xff"


def _quarantined(m: Metrics, table: str) -> float:
    return m.registry.get_sample_value("riskwatch_state_quarantined_total", {"table": table}) or 0.0


# --------------------------------------------------------------------------- the helper
def test_a_value_set_aside_is_counted_once_dead_lettered_each_time_and_logged_once_per_partition(
        caplog: pytest.LogCaptureFixture) -> None:
    m = Metrics(CollectorRegistry())
    sent: list[tuple[bytes, bytes]] = []

    async def send(key: bytes, value: bytes) -> None:
        sent.append((key, value))

    q = Quarantine(m, send)
    q.set_aside("models", "rw-models-changelog", 3, b"txn:p3", GARBAGE, ValueError("bad header"), offset=17)
    q.set_aside("models", "rw-models-changelog", 3, b"txn:p3", GARBAGE, ValueError("bad header"))  # read again
    q.set_aside("accounts", "rw-accounts-changelog", 3, b"acct-\xff", b"x", "not an AccountState blob")
    q.set_aside("accounts", "rw-accounts-changelog", 3, b"acct-2", b"y", "not an AccountState blob")
    assert _quarantined(m, "models") == 1, "the same value read again is not counted again"
    assert _quarantined(m, "accounts") == 2
    with caplog.at_level(logging.WARNING, logger="riskwatch.quarantine"):
        assert asyncio.run(q.flush()) == 4, "every reading is dead-lettered: the first may not have been delivered"
    lines = [r.getMessage() for r in caplog.records if r.name == "riskwatch.quarantine"]
    assert len(lines) == 2, lines
    assert "table accounts partition 3: 2 stored value(s)" in lines[0]
    assert "table models partition 3: 1 stored value(s)" in lines[1]
    keys = [k for k, _ in sent]
    assert keys[0] == b"models:3:txn:p3" and keys[2] == b"accounts:3:acct-\\xff"
    letter = json.loads(sent[0][1])
    assert letter["source_topic"] == "rw-models-changelog" and letter["partition"] == 3 and letter["offset"] == 17
    assert letter["reason"] == ("stored value of table models, partition 3, key 'txn:p3' set aside: "
                                "ValueError: bad header")
    assert letter["payload"].startswith("base64:") and letter["payload_size"] == len(GARBAGE)
    caplog.clear()
    asyncio.run(q.flush())
    assert not caplog.records and not q.outbox, "nothing new: no line"


def test_a_failed_send_keeps_the_dead_letters_for_the_next_flush() -> None:
    calls = 0

    async def send(key: bytes, value: bytes) -> None:
        nonlocal calls
        calls += 1
        if calls == 2:
            raise ConnectionError("broker gone")

    q = Quarantine(Metrics(CollectorRegistry()), send)
    for k in (b"a", b"b", b"c"):
        q.set_aside("lifecycle", "t", 0, k, b"{", "invalid JSON")
    with pytest.raises(ConnectionError):
        asyncio.run(q.flush())
    assert [k for k, _ in q.outbox] == [b"lifecycle:0:b", b"lifecycle:0:c"]
    assert asyncio.run(q.flush()) == 2 and not q.outbox


# --------------------------------------------------------------------------- detector snapshots
def test_detector_snapshots_carry_a_format_and_are_refused_per_value() -> None:
    from app.faust_app import DETECTOR_MAGIC, dump_detector, dumps, load_detector
    from models.detector import SurpriseDetector
    from models.features import StateCodecError

    det = SurpriseDetector()
    for i in range(300):
        det.learn_one({"amount": (i % 10) / 10})
        det.learn_shift("card", True, (i % 3) - 1.0)  # a detector in use has type shifts and operating points
        det.learn_shift("deposit", False, 0.5)
    det.refresh({"default": 0.002, "card_testing": 0.001}, warmup=0.0)
    blob = dump_detector(det)
    assert load_detector(blob).shifts == det.shifts and load_detector(blob).points == det.points
    assert blob[:4] == DETECTOR_MAGIC + b"\x01"
    assert load_detector(blob).score_one({"amount": 0.3}) == det.score_one({"amount": 0.3})
    legacy = zlib.compress(dumps(det), 1)  # format 0, written before formats existed
    assert load_detector(legacy).score_one({"amount": 0.9}) == det.score_one({"amount": 0.9})
    broken = SurpriseDetector()
    del broken.__dict__["calibrator"]
    wrong_size = SurpriseDetector()
    wrong_size.calibrator.counts = wrong_size.calibrator.counts[:10]
    refused = {
        "format 2": (DETECTOR_MAGIC + b"\x02" + zlib.compress(dumps(det)), "format 2; this release reads"),
        "garbage": (GARBAGE, "not a detector snapshot"),
        "truncated": (blob[:40], "not a detector snapshot"),
        "an int": (zlib.compress(pickle.dumps(1)), "holds a int, not a SurpriseDetector"),
        "a foreign class": (zlib.compress(pickle.dumps(ValueError("x"))), "not a detector snapshot"),
        "older layout": (dump_detector(broken), "lacks calibrator"),
        "wrong sizes": (dump_detector(wrong_size), "wrong type or size"),
    }
    layouts = {"shifts": {("card", True): [0.1, 3.0]}, "points": {"default": [0.0, float("nan"), 0.0, 0.1]}}
    for attr, bad_value in layouts.items():
        odd = SurpriseDetector()
        setattr(odd, attr, bad_value)
        refused[f"{attr} of another layout"] = (dump_detector(odd), "wrong type or size")
    for name, (bad, why) in refused.items():
        with pytest.raises(StateCodecError, match=why):
            load_detector(bad)
        assert name


# --------------------------------------------------------------------------- the engine's stores
def _processor(tmp_path: Path) -> Any:
    return build_engine(tmp_path).processor


def _txn(k: int, account: str) -> bytes:
    return (f'{{"event_id":"q-{k}","ts":"2026-11-02T09:00:{k % 60:02d}+08:00","account_id":"{account}",'
            f'"counterparty_id":"cp","amount":12.5,"currency":"CNY","direction":"debit","txn_type":"payment",'
            f'"channel":"app"}}').encode()


def test_a_bad_account_state_or_detector_snapshot_starts_afresh_and_the_partition_scores_on(
        tmp_path: Path) -> None:
    from models.detector import SurpriseDetector

    proc = _processor(tmp_path)
    proc.accounts.put(0, b"acct-bad", GARBAGE)
    proc.models_store.put(0, b"txn:p0", GARBAGE)
    proc.accounts.take_pending()
    proc.models_store.take_pending()
    recs = [SimpleNamespace(topic="t", partition=0, offset=o, value=_txn(o, a))
            for o, a in enumerate(["acct-bad", "acct-good", "acct-bad"])]
    asyncio.run(proc.process(recs))
    m = proc.m
    topic = proc.topic_name
    assert m.registry.get_sample_value("riskwatch_events_scored_total", {"topic": topic}) == 3
    assert m.registry.get_sample_value("riskwatch_deadletters_total", {"topic": topic, "reason": "invalid_event"}) \
        is None, "no input is dead-lettered for a bad stored value"
    assert _quarantined(m, "accounts") == 1 and _quarantined(m, "models") == 1
    assert proc.live[(0, b"acct-bad")].n == 2, "the account started again and learned both its events"
    assert type(proc.models.detectors[0]) is SurpriseDetector
    assert proc.models_store.take_pending()[(0, b"txn:p0")] is None, "the bad snapshot is deleted"
    asyncio.run(proc.quarantine.flush())
    letters = {k: json.loads(v) for t, k, v, _ in proc.sink.take() if t == "u.risk.deadletter"}
    assert set(letters) == {b"accounts:0:acct-bad", b"models:0:txn:p0"}
    assert "table accounts, partition 0, key 'acct-bad'" in letters[b"accounts:0:acct-bad"]["reason"]
    assert letters[b"models:0:txn:p0"]["source_topic"] == "u.u-models-changelog"


def test_type_shifts_move_with_every_batch_so_a_redelivered_event_is_judged_as_the_first_time(
        tmp_path: Path) -> None:
    """The full detector snapshot lags; the shifts the typology rules read do not, and a bad one is set aside."""
    first = _processor(tmp_path / "a")
    recs = [SimpleNamespace(topic="t", partition=0, offset=o, value=_txn(o, f"acct-{o % 3}")) for o in range(15)]
    asyncio.run(first.process(recs))
    first.write_state()
    written = first.models_store.take_pending()
    assert (0, b"txn:p0") not in written, "the full snapshot waits for model_checkpoint_every events"
    assert load_shifts(written[(0, b"txn:p0:shifts")]) == [(14, first.models.detectors[0].shifts)], \
        "dated by the last offset read"
    shifts = first.models.detectors[0].shifts
    assert shifts is not None and shifts[1]["payment"][1] == 6.0, "learned once an account has 3 debits"
    # The partition's next owner reads the table: it starts from the batch's shifts, not from zero.
    nxt = _processor(tmp_path / "b")
    for (p, k), v in written.items():
        nxt.models_store.put(p, k, v)
    nxt.models_store.take_pending()
    assert nxt.models.get(0, 15).shifts == shifts and nxt.models.through[0] == 14
    # An earlier release's undated snapshot still loads: its shifts, with no steps taken again.
    old = _processor(tmp_path / "d")
    old.models_store.put(0, b"txn:p0:shifts", json.dumps({"credit": shifts[0], "debit": shifts[1]}).encode())
    old.models_store.take_pending()
    assert old.models.get(0, 15).shifts == shifts and old.models.through[0] is None
    # A shifts value that does not decode is set aside and deleted; the detector keeps its own.
    bad = _processor(tmp_path / "c")
    bad.models_store.put(0, b"txn:p0:shifts", b'{"credit": {}, "debit": {"payment": ["x"]}}')
    bad.models_store.take_pending()
    assert bad.models.get(0).shifts is None
    assert _quarantined(bad.m, "models") == 1
    assert bad.models_store.take_pending() == {(0, b"txn:p0:shifts"): None}


def test_disclosure_totals_that_do_not_decode_are_set_aside_when_read_back() -> None:
    from agents.disclosure import check_flow

    q = Quarantine(Metrics(CollectorRegistry()))
    st = ChangelogStore("disclosure-flows", "u-disclosure-flows-changelog", check=check_flow)
    st.quarantine = q
    good = b'{"source":"t2","hour":1793581200}'
    st.restore(2, b"t2:1793581200", good, 5)
    st.restore(2, b"t2:1793584800", b"{garbage", 6)
    st.restore(2, b"t3:1793581200", good, 7)  # names another partition: PartitionView could never find it
    st.restore(2, b"nonsense", good, 8)
    assert st.keys(2) == [b"t2:1793581200"]
    assert [k for k, _ in q.outbox] == [b"disclosure-flows:2:t2:1793584800", b"disclosure-flows:2:t3:1793581200",
                                        b"disclosure-flows:2:nonsense"]


# --------------------------------------------------------------------------- Faust tables
def test_faust_tables_set_aside_changelog_values_that_do_not_decode_on_recovery(tmp_path: Path) -> None:
    from app.faust_app import StateTable, create_app, dumps
    from models.market import InstrumentState

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        rt = create_app(Settings(topic_prefix="u.", app_id="u", data_dir=tmp_path), Metrics(CollectorRegistry()))
        table = rt.instruments
        assert isinstance(table, StateTable)

        def event(key: bytes, value: bytes | None, offset: int) -> Any:
            msg = SimpleNamespace(topic="u-instruments-changelog", partition=1, offset=offset, value=value)
            return SimpleNamespace(key=key, value=value, message=msg)

        good = dumps(InstrumentState())
        table.apply_changelog_batch([event(b"A", good, 0), event(b"B", GARBAGE, 1), event(b"C", good, 2),
                                     event(b"C", dumps(7), 3), event(b"D", good, 4)])
        assert set(table.data.keys()) == {b"A", b"D"}, "a bad value leaves its key absent, even over a good one"
        assert _quarantined(rt.metrics, "instruments") == 2
        assert [k for k, _ in rt.quarantine.outbox] == [b"instruments:1:B", b"instruments:1:C"]
        assert "not an InstrumentState" in json.loads(rt.quarantine.outbox[1][1])["reason"]
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_a_lifecycle_value_that_got_past_recovery_is_set_aside_when_read(tmp_path: Path) -> None:
    """The deadline timer reads every owned state: one bad value used to fail it and the worker exited."""
    rt = _processor(tmp_path).rt
    disposal = rt.extras["disposal"]
    disposal.table.data.data[b"ab" * 12] = GARBAGE  # as if recovered before its check existed
    assert disposal.get(b"ab" * 12) is None
    assert _quarantined(rt.metrics, "lifecycle") == 1
    assert "table lifecycle" in json.loads(rt.quarantine.outbox[0][1])["reason"]


# --------------------------------------------------------------------------- end to end
def _hour(s: Settings, ts: str) -> int:
    from datetime import datetime

    off = s.disclosure_utc_offset_minutes * 60
    return int((datetime.fromisoformat(ts).timestamp() + off) // 3600) * 3600 - off


@pytest.mark.kafka
def test_garbage_under_one_key_of_every_changelog_is_set_aside_and_every_other_key_goes_on(
        settings: Settings, start_worker: Any, make_txn: Any, make_tick: Any) -> None:
    """Garbage under one key of each of the eight changelogs, then a restart: the worker runs, the rest scores.

    The accounts, models and disclosure-flows changelogs are the transaction engine's; lifecycle,
    disclosure-book, instruments, market-stress and platform are Faust tables. Before values were
    checked, the engine's three stopped transaction scoring in a read-back loop and lifecycle,
    disclosure-book and instruments made the worker exit at start.
    """
    from agents.disposal import partition_of
    from app.admin import producer
    from app.faust_app import ACKS, DEADLETTER, MARKET, SCORES, TRANSACTIONS
    from tests.conftest import consume, produce

    s = settings.model_copy(update={"publish_scores": True, "model_checkpoint_every": 1})
    n = s.topic_partitions
    good = "acct-good"
    p = partition_of(good.encode(), n)
    bad = next(f"acct-bad-{i}" for i in range(1000) if partition_of(f"acct-bad-{i}".encode(), n) == p)
    first = start_worker(s)
    before = [make_txn(account_id=good, minutes=i) for i in range(5)]
    produce(s, TRANSACTIONS, [(good.encode(), json.dumps(e).encode()) for e in before])
    produce(s, MARKET, [(b"FUND-A", json.dumps(make_tick()).encode())])
    consume(s, SCORES, lambda got: len(got) >= 6, timeout=90)
    time.sleep(1.5)  # the last changelog writes
    first.stop()

    after = [make_txn(account_id=a, minutes=10 + i) for i, a in enumerate([good, bad, good, bad, good])]
    alert_id = "ab" * 12
    planted = {  # table -> (changelog topic, partition, key)
        "accounts": (s.changelog("accounts"), p, bad.encode()),
        "models": (s.changelog("models"), p, f"txn:p{p}".encode()),
        "disclosure-flows": (s.changelog("disclosure-flows"), p, f"t{p}:{_hour(s, after[0]['ts'])}".encode()),
        "instruments": (s.changelog("instruments"), partition_of(b"FUND-BAD", n), b"FUND-BAD"),
        "lifecycle": (s.changelog("lifecycle"), partition_of(alert_id.encode(), n), alert_id.encode()),
        "disclosure-book": (s.changelog("disclosure-book"), 0, b"f:t0:1793581200"),
        # The market path's stage-one buckets and the platform monitors' state (tests/faults/test_platform_kill9.py).
        "market-stress": (s.changelog("market-stress"), partition_of(b"FUND-A", n),
                          f"p{partition_of(b'FUND-A', n)}".encode()),
        "platform": (s.changelog("platform"), 0, b"meta"),
    }
    prod = producer(s)
    try:
        for topic, partition, key in planted.values():
            prod.send(topic, key=key, value=GARBAGE, partition=partition)
        prod.flush(30)
    finally:
        prod.close()

    t0 = time.monotonic()
    second = start_worker(s)
    ticks = [make_tick(minutes=20, instrument="FUND-A"), make_tick(minutes=20, instrument="FUND-BAD")]
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in after])
    produce(s, MARKET, [(t["instrument"].encode(), json.dumps(t).encode()) for t in ticks])
    act = {"alert_id": "cd" * 12, "action": "ack", "by": "desk", "ts": "2026-11-02T09:30:00+00:00"}
    produce(s, ACKS, [(act["alert_id"].encode(), json.dumps(act).encode())])
    wanted = {e["event_id"] for e in [*after, *ticks]}
    scores = consume(s, SCORES, lambda got: wanted <= {x["event_id"] for x in got}, timeout=90)
    print(f"every new event scored {time.monotonic() - t0:.1f} s after the restart began")
    assert len({x["event_id"] for x in scores} & wanted) == len(wanted)

    letters = consume(s, DEADLETTER, lambda got: len({x["source_topic"] for x in got}) >= len(planted), timeout=60)
    by_topic = {x["source_topic"]: x for x in letters}
    assert len(letters) == len(planted), [x["reason"] for x in letters]
    for table, (topic, partition, key) in planted.items():
        letter = by_topic[topic]
        assert letter["partition"] == partition
        assert f"table {table}, partition {partition}, key {key.decode()!r}" in letter["reason"], letter["reason"]
        assert letter["payload"] == "base64:" + base64.b64encode(GARBAGE).decode()
        assert second.metric("riskwatch_state_quarantined_total", table=table) == 1, table
    assert second.metric("riskwatch_events_scored_total", topic=s.topic(TRANSACTIONS)) == len(after)
    assert second.metric("riskwatch_deadletters_total") == 0, "no input was dead-lettered for a bad stored value"
    deadline = time.monotonic() + 30
    while second.metric("riskwatch_acks_total", action="ack", outcome="held") < 1:
        assert time.monotonic() < deadline, "the disposal agent never took an act after the restart"
        time.sleep(0.5)
    log = second.log_path.read_text(errors="replace")
    assert second.proc.poll() is None and "Crashed" not in log and "We experienced a crash" not in log, second.tail()
    lines = [line for line in log.splitlines() if "did not decode and were set aside" in line]
    assert len(lines) == len(planted), lines
