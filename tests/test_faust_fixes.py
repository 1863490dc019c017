"""The producer-flush fix: a commit must not follow a flush that left changelog writes behind."""

from __future__ import annotations

import asyncio
from types import SimpleNamespace
from typing import Any

import faust
from faust.transport.producer import ProducerBuffer

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
