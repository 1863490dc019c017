"""The transaction engine's tables and its handling of records fetched across a rebalance (no broker)."""

from __future__ import annotations

import asyncio
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiokafka import TopicPartition
from prometheus_client import CollectorRegistry

from app.changelog import ChangelogStore, PartitionView, gather_all
from app.metrics import Metrics
from app.settings import Settings


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
    from app.worker import build

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        rt = build(Settings(topic_prefix="u.", app_id="u", data_dir=tmp_path), Metrics(CollectorRegistry()))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return rt.extras["transactions"]


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
