"""The transaction engine's tables and its handling of records fetched across a rebalance (no broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition

from app.changelog import ChangelogStore, PartitionView, gather_all
from tests.conftest import build_engine


def test_store_keeps_the_last_write_per_key_until_taken_and_tombstones_deletes() -> None:
    st = ChangelogStore("accounts", "x-accounts-changelog")
    st.put(0, b"a", b"1")
    st.put(0, b"a", b"2")
    st.put(1, b"b", b"3")
    assert st.get(0, b"a") == b"2" and st.get(1, b"a") is None and len(st) == 2
    assert st.take_pending() == {(0, b"a"): b"2", (1, b"b"): b"3"}
    assert st.take_pending() == {}
    assert st.delete(1, b"b") and not st.delete(1, b"b")
    assert st.take_pending() == {(1, b"b"): None}, "a delete is a tombstone in the changelog"


def test_dropping_a_partition_forgets_its_data_and_its_unwritten_changes() -> None:
    st = ChangelogStore("accounts", "t")
    st.put(0, b"a", b"1")
    st.put(1, b"b", b"2")
    st.drop({1})
    assert st.keys() == [b"a"] and st.take_pending() == {(0, b"a"): b"1"}
    st.restore(2, b"c", b"3")
    st.restore(2, b"c", None)
    st.restore(2, b"d", b"4")
    assert st.keys(2) == [b"d"] and st.take_pending() == {}, "reading back writes nothing"


def test_partition_view_routes_keys_to_the_partition_they_name() -> None:
    st = ChangelogStore("disclosure-flows", "t")
    view = PartitionView(st, lambda k: int(k.split(b":")[0][1:]))
    view[b"t3:3600"] = b"x"
    assert st.get(3, b"t3:3600") == b"x" and view.get(b"t3:3600") == b"x" and list(view) == [b"t3:3600"]
    del view[b"t3:3600"]
    assert view.get(b"t3:3600") is None and st.take_pending() == {(3, b"t3:3600"): None}
    with pytest.raises(KeyError):
        del view[b"t3:3600"]


def test_gather_all_waits_for_every_delivery_before_raising() -> None:
    async def run() -> list[bool]:
        loop = asyncio.get_running_loop()
        ok, bad, late = loop.create_future(), loop.create_future(), loop.create_future()
        ok.set_result(None)
        bad.set_exception(RuntimeError("broker gone"))
        loop.call_later(0.05, late.set_result, None)
        with pytest.raises(RuntimeError, match="broker gone"):
            await gather_all([ok, bad, late])
        return [f.done() for f in (ok, bad, late)]

    assert asyncio.run(run()) == [True, True, True]


class _Consumer:
    """What the engine asks of aiokafka when it gives records back."""

    def __init__(self, assigned: set[TopicPartition]) -> None:
        self.assigned = assigned
        self.seeks: list[tuple[TopicPartition, int]] = []

    def assignment(self) -> set[TopicPartition]:
        return self.assigned

    def seek(self, tp: TopicPartition, offset: int) -> None:
        self.seeks.append((tp, offset))


def _engine(tmp_path: Path) -> Any:
    return build_engine(tmp_path)


def _records(tp: TopicPartition, offsets: range) -> list[Any]:
    return [SimpleNamespace(topic=tp.topic, partition=tp.partition, offset=o, value=b"{}") for o in offsets]


def test_records_fetched_across_a_rebalance_are_read_again(tmp_path: Path) -> None:
    """The client's position is past a fetched batch: dropping it without a seek would skip it."""
    engine = _engine(tmp_path)
    t = engine.topic
    kept, gone = TopicPartition(t, 0), TopicPartition(t, 1)
    engine.consumer = _Consumer({kept})
    engine._unread({kept: _records(kept, range(40, 45)), gone: _records(gone, range(7, 9))})
    assert engine.consumer.seeks == [(kept, 40)], "only partitions still assigned are sought"
    # A partition the assignment moved on purpose (to where Faust's group stopped) keeps that position.
    engine.consumer.seeks.clear()
    engine.repositioned = {kept}
    engine._unread({kept: _records(kept, range(0, 10))})
    assert engine.consumer.seeks == []


def test_a_batch_of_a_partition_not_owned_is_given_back_not_processed(tmp_path: Path) -> None:
    engine = _engine(tmp_path)
    t = engine.topic
    mine, other = TopicPartition(t, 0), TopicPartition(t, 2)
    engine.consumer = _Consumer({mine, other})
    engine.owned = {0}
    engine.producer = SimpleNamespace()  # the stand-in processor stages nothing, so nothing is sent
    seen: list[int] = []

    async def process(records: list[Any]) -> None:
        seen.extend(r.partition for r in records)

    engine.processor.process = process
    asyncio.run(engine._batch({mine: _records(mine, range(3)), other: _records(other, range(10, 12))}))
    assert seen == [0, 0, 0] and engine.consumer.seeks == [(other, 10)]
    assert engine.read == {mine: 3}


def _txn(k: int, account: str, ts: str = "2026-11-02T09:00:00+08:00") -> bytes:
    return (f'{{"event_id":"w-{k}","ts":"{ts}","account_id":"{account}","counterparty_id":"cp","amount":12.5,'
            f'"currency":"CNY","direction":"debit","txn_type":"payment","channel":"app"}}').encode()


def _process(proc: Any, raws: list[tuple[int, int, bytes]]) -> None:
    recs = [SimpleNamespace(topic="t", partition=p, offset=o, value=v) for p, o, v in raws]
    asyncio.run(proc.process(recs))


def test_written_states_stay_decoded_equal_to_the_table_and_bounded(tmp_path: Path,
                                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    import agents.transactions as tx
    from models.features import AccountState

    proc = _engine(tmp_path).processor
    decoded: list[bytes] = []
    real_load = tx.load_account

    def counting_load(blob: bytes) -> Any:
        decoded.append(blob)
        return real_load(blob)

    monkeypatch.setattr(tx, "load_account", counting_load)
    monkeypatch.setattr(tx, "WARM_MAX", 3)
    _process(proc, [(0, k, _txn(k, f"a{k}")) for k in range(5)])
    proc.write_state()
    assert not proc.warm, "an account seen once is not cached"
    _process(proc, [(0, 5 + k, _txn(5 + k, f"a{k}")) for k in range(5)])
    proc.write_state()
    assert len(decoded) == 5
    decoded.clear()
    assert len(proc.warm) == 3 and not proc.live, "the oldest written states leave the cache first"
    for (p, key), state in proc.warm.items():
        assert AccountState.from_bytes(proc.accounts.get(p, key)).__getstate__() == state.__getstate__()
    # a4 is warm: its next event decodes nothing; a0 was pushed out: read from the table.
    _process(proc, [(0, 10, _txn(10, "a4")), (0, 11, _txn(11, "a0"))])
    assert len(decoded) == 1 and proc.live[(0, b"a4")].n == 3 and proc.live[(0, b"a0")].n == 3
    proc.write_state()
    # Tables read back from their changelogs (a reassignment, a failed write) replace what is cached.
    proc.reset({0})
    assert not proc.warm
    proc.accounts.put(0, b"a4", tx.dump_account(AccountState()))
    _process(proc, [(0, 12, _txn(12, "a4"))])
    assert proc.live[(0, b"a4")].n == 1, "a state read back must not be shadowed by the cached one"
    proc.write_state()
    _process(proc, [(0, 13, _txn(13, "a4"))])
    proc.write_state()
    assert (0, b"a4") in proc.warm
    # Eviction deletes the cached state with the stored one.
    proc.eviction.now = 1e12
    asyncio.run(proc.housekeeping())
    assert (0, b"a4") not in proc.warm and proc.accounts.get(0, b"a4") is None


def test_send_batched_delivers_in_order_and_routes_keys_as_send_does(kafka_bootstrap: str, namespace: str) -> None:
    """Real broker: records filled into batches arrive complete, in order per partition, where send() puts keys."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewTopic

    import agents.transactions as tx
    from models.pipeline import partition_of

    topic = f"{namespace}.batched"

    async def run() -> tuple[list[tuple[int, bytes, bytes]], dict[bytes, int]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, num_partitions=3, replication_factor=1)])
        await admin.close()
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap, max_batch_size=16_384)
        await producer.start()
        try:
            parts = sorted(await producer.partitions_for(topic))
            keys = [f"k{i % 7}".encode() for i in range(300)]
            # Values large enough that each partition needs several batches, and one above the batch size.
            values = [(b"%04d-" % i) + b"x" * (5_000 if i != 150 else 40_000) for i in range(300)]
            msgs = [(topic, parts[partition_of(k, len(parts))], k, v) for k, v in zip(keys, values, strict=True)]
            await tx.gather_all(await tx.send_batched(producer, msgs))
            # Where the producer's own send() puts each key.
            by_send = {k: (await (await producer.send(topic, b"probe", key=k))).partition for k in set(keys)}
        finally:
            await producer.stop()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False, fetch_max_bytes=10_000_000)
        await consumer.start()
        got: list[tuple[int, bytes, bytes]] = []
        try:
            while len(got) < 300 + len(by_send):
                for recs in (await consumer.getmany(timeout_ms=1000)).values():
                    got.extend((r.partition, r.key, r.value) for r in recs)
        finally:
            await consumer.stop()
        return [g for g in got if g[2] != b"probe"], by_send

    got, by_send = asyncio.run(asyncio.wait_for(run(), 60))
    assert len(got) == 300 and sorted(len(v) for _, _, v in got)[-2:] == [5_005, 40_005]
    assert {v[:4] for _, _, v in got} == {b"%04d" % i for i in range(300)}
    for p in {p for p, _, _ in got}:
        seq = [int(v[:4]) for q, _, v in got if q == p]
        assert seq == sorted(seq), f"partition {p} out of order"
    assert all(by_send[k] == p for p, k, _ in got), "a key must land where the producer's send() puts it"


def test_keyed_outputs_follow_partitions_added_while_running(kafka_bootstrap: str, namespace: str,
                                                            tmp_path: Path) -> None:
    """Real broker: after partitions are added, the engine routes each key where the producer's send() now does."""
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer
    from aiokafka.admin import AIOKafkaAdminClient, NewPartitions, NewTopic

    engine = _engine(tmp_path)
    topic = f"{namespace}.routed"
    keys = [f"k{i}".encode() for i in range(40)]

    async def run() -> tuple[dict[bytes, int], dict[bytes, int], list[tuple[int, bytes, bytes]]]:
        admin = AIOKafkaAdminClient(bootstrap_servers=kafka_bootstrap)
        await admin.start()
        await admin.create_topics([NewTopic(topic, num_partitions=2, replication_factor=1)])
        producer = AIOKafkaProducer(bootstrap_servers=kafka_bootstrap)
        await producer.start()
        engine.producer = producer

        async def send_round(tag: bytes) -> dict[bytes, int]:
            engine.sink.out.extend((topic, k, tag, None) for k in keys)
            await engine._send_outputs()
            await gather_all(engine.outstanding)
            engine.outstanding.clear()
            return {k: (await (await producer.send(topic, b"probe", key=k))).partition for k in keys}

        try:
            before = await send_round(b"r1")
            await admin.create_partitions({topic: NewPartitions(total_count=6)})
            for _ in range(100):
                await producer.client.force_metadata_update()
                if len(await producer.partitions_for(topic)) == 6:
                    break
                await asyncio.sleep(0.1)
            after = await send_round(b"r2")
        finally:
            await producer.stop()
            await admin.close()
        consumer = AIOKafkaConsumer(topic, bootstrap_servers=kafka_bootstrap, auto_offset_reset="earliest",
                                    enable_auto_commit=False)
        await consumer.start()
        got: list[tuple[int, bytes, bytes]] = []
        try:
            while len(got) < 4 * len(keys):
                for recs in (await consumer.getmany(timeout_ms=1000)).values():
                    got.extend((r.partition, r.key, r.value) for r in recs)
        finally:
            await consumer.stop()
        return before, after, got

    before, after, got = asyncio.run(asyncio.wait_for(run(), 90))
    assert before != after, "adding partitions moves some keys"
    for partition, key, value in got:
        if value == b"r1":
            assert partition == before[key]
        elif value == b"r2":
            assert partition == after[key], "a key must land where send() puts it after the partitions were added"


def test_a_caught_up_engine_writes_and_commits_at_once_not_at_the_next_tick(tmp_path: Path) -> None:
    """An empty poll after a burst snapshots at once (at most every IDLE_FLUSH_SECONDS), once per burst."""
    import time

    from agents import transactions

    engine = _engine(tmp_path)
    tp = TopicPartition(engine.topic, 0)
    written: list[dict[TopicPartition, int]] = []

    async def write(previous: Any, outstanding: Any, pending: Any, offsets: dict[TopicPartition, int]) -> None:
        written.append(offsets)

    engine._write = write
    engine.phases.go(transactions.Phase.RUNNING)

    async def run() -> None:
        now = time.monotonic()
        engine.last_chores = engine.last_flush = now  # the 1-second tick is far off
        engine.read = {tp: 5}
        await engine._chores(idle=False)
        assert written == [], "records keep coming: the tick decides"
        await engine._chores(idle=True)
        assert written == [], f"within {transactions.IDLE_FLUSH_SECONDS} s of the last write"
        engine.last_flush = now - 2 * transactions.IDLE_FLUSH_SECONDS
        await engine._chores(idle=True)
        await asyncio.sleep(0)
        assert written == [{tp: 5}]
        engine.last_flush = now - 2 * transactions.IDLE_FLUSH_SECONDS
        await engine._chores(idle=True)
        assert len(written) == 1, "nothing new read since: no second write"
        engine.read = {tp: 9}
        engine.writing = asyncio.get_running_loop().create_future()  # a write still in flight
        await engine._chores(idle=True)
        assert len(written) == 1, "one write at a time"
        engine.writing.set_result(None)
        await engine._chores(idle=True)
        await asyncio.sleep(0)
        assert written[1:] == [{tp: 9}]

    asyncio.run(run())


def test_buffered_outputs_are_counted_when_taken_and_not_when_discarded(tmp_path: Path) -> None:
    """riskwatch_events_published_total counts what the engine sends, not what a failed batch dropped."""
    engine = _engine(tmp_path)
    sink, published = engine.sink, engine.rt.metrics.events_published
    alerts, aggregates = sink.names["risk.alerts"], sink.names["risk.aggregates"]

    def count(topic: str) -> float:
        return published.labels(topic)._value.get()

    asyncio.run(sink.partial("flow", b"{}"))
    sink.discard()  # a rewind: these events are read again and their outputs made again
    assert sink.take() == [] and count(aggregates) == 0
    for _ in range(3):
        asyncio.run(sink.partial("flow", b"{}"))
    asyncio.run(sink._send("risk.alerts", b"k", b"{}"))
    assert len(sink.take()) == 4
    assert (count(aggregates), count(alerts)) == (3, 1)
