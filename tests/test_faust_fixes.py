"""The producer-flush fix: a commit must not follow a flush that left changelog writes behind."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.transport.producer import ProducerBuffer
from faust.types import TP

from app import faust_fixes


def test_the_buffer_flush_waits_for_sends_slower_than_a_tenth_of_a_second() -> None:
    assert faust_fixes.install()
    sent: list[Any] = []

    class SlowChannel:
        """Stands in for the topic: the client takes 0.3 s to accept each message (a loaded broker)."""

        async def publish_message(self, fut: Any, wait: bool = True) -> None:
            await asyncio.sleep(0.3)
            sent.append(fut)

    async def run() -> None:
        buffer = ProducerBuffer()
        buffer.app = faust.App("unit-flush", broker="kafka://127.0.0.1:1")
        await buffer.start()
        try:
            for _ in range(3):
                buffer.put(SimpleNamespace(message=SimpleNamespace(channel=SlowChannel())))
            await buffer.flush()
            # Faust's own flush returned after 0.1 s with all three still pending.
            assert len(sent) == 3, f"flush returned with {3 - len(sent)} changelog writes not handed over"
        finally:
            await buffer.stop()

    asyncio.run(run())


def test_a_partition_whose_commits_stall_behind_a_hole_is_read_again_from_its_committed_offset() -> None:
    tp, busy = TP("t", 1), TP("t", 2)
    sought: list[dict[Any, int]] = []

    async def seek_wait(targets: dict[Any, int]) -> None:
        sought.append(dict(targets))

    consumer = SimpleNamespace(
        app=SimpleNamespace(rebalancing=False),
        # Partition 1: committed 100, offsets 103-105 acked, 100-102 never reached the agent.
        # Partition 2: the same hole, but offset 100 is still being processed: not a stall.
        _acked={tp: [103, 104, 105], busy: [103]},
        _committed_offset={tp: 100, busy: 100},
        _unacked_messages=[SimpleNamespace(tp=busy, offset=100)],
        seek_wait=seek_wait,
    )
    asyncio.run(faust_fixes._heal_stalled_commits(consumer))
    assert sought == [], "one look is not a stall: the hole may be filled by the next batch"
    asyncio.run(faust_fixes._heal_stalled_commits(consumer))
    assert sought == [{tp: 100}]
    consumer._acked[tp] = [100, 101]  # read again: the commits go on, nothing more to heal
    asyncio.run(faust_fixes._heal_stalled_commits(consumer))
    asyncio.run(faust_fixes._heal_stalled_commits(consumer))
    assert sought == [{tp: 100}]


def test_a_commit_never_moves_past_a_single_missing_record() -> None:
    from collections import defaultdict

    from intervaltree import IntervalTree

    tp = TP("t", 0)
    consumer = SimpleNamespace(_acked={tp: [101, 102]}, _gap=defaultdict(IntervalTree), _committed_offset={tp: 100},
                               _acked_index={tp: {101, 102}})
    assert faust_fixes._new_offset(consumer, tp) is None, "Faust's own returned 103, skipping offset 100"
    consumer._acked[tp] = [100, 101, 102]
    assert faust_fixes._new_offset(consumer, tp) == 103


def test_lz4_is_used_only_when_both_kafka_clients_can_handle_it(monkeypatch: pytest.MonkeyPatch) -> None:
    """The lz4 module alone once made a worker that aiokafka refused to produce with (it needs cramjam)."""
    import aiokafka.codec
    import kafka.codec

    from app.faust_app import has_lz4

    monkeypatch.setattr(aiokafka.codec, "cramjam", None)
    monkeypatch.setattr(kafka.codec, "has_lz4", lambda: True)
    assert not has_lz4(), "aiokafka cannot write lz4 without cramjam"
    monkeypatch.setattr(aiokafka.codec, "cramjam", object())
    monkeypatch.setattr(kafka.codec, "has_lz4", lambda: False)
    assert not has_lz4(), "kafka-python tools could not read what the worker writes"
    monkeypatch.setattr(kafka.codec, "has_lz4", lambda: True)
    assert has_lz4()
