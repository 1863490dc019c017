"""Run-time rule changes: every worker reads the compacted risk.rules topic and applies the newest valid version."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from agents.sink import Sink
from app.admin import aiokafka_config
from app.faust_app import RULES, Runtime
from app.logs import Retries
from models.errors import ConfigError
from models.rules import Catalogue, parse_catalogue

log = logging.getLogger("riskwatch.agents.control")
CLOSE_SECONDS = 2.0  # longest the follower's consumer may take to close when the worker stops


client_kwargs = aiokafka_config  # aiokafka connection arguments (bootstrap and security) from settings


class RuleControl:
    """Keeps the catalogue in force: starts from the file, then follows risk.rules from its beginning."""

    def __init__(self, rt: Runtime, sink: Sink, initial: Catalogue,
                 apply: Callable[[Catalogue], None]) -> None:
        self.rt = rt
        self.sink = sink
        self.current = initial
        self.apply = apply
        rt.metrics.rules_version.set(initial.version)

    async def handle(self, raw: bytes | None, partition: int, offset: int) -> None:
        """Validate one published catalogue; apply it if newer, dead-letter it if invalid."""
        topic = self.rt.settings.topic(RULES)
        if raw is None:
            return
        try:
            cat = parse_catalogue(raw, f"{topic}@{offset}")
        except ConfigError as exc:
            self.rt.metrics.rules_rejected.inc()
            await self.sink.dead_letter(raw, topic, partition, offset, str(exc), "rules")
            return
        if cat.version <= self.current.version:
            return
        self.current = cat
        self.apply(cat)
        self.rt.metrics.rules_version.set(cat.version)
        log.info("rule catalogue version %s in force", cat.version)

    async def run(self) -> None:
        """Follow the control topic for the life of the worker (no consumer group: every worker reads all)."""
        await follow(self.rt, RULES, lambda msg: self.handle(msg.value, msg.partition, msg.offset), "rules")


async def follow(rt: Runtime, name: str, handle: Callable[[Any], Awaitable[None]], what: str,
                 caught_up: Callable[[], None] | None = None) -> None:
    """Read a single-partition control topic from its beginning and hand every record to `handle`, for ever.

    No consumer group: every worker must read every record. `caught_up` is called once, when the
    records that were there at the start have all been handled.
    """
    topic = rt.settings.topic(name)
    consumer = AIOKafkaConsumer(**client_kwargs(rt.settings), enable_auto_commit=False, group_id=None)
    await consumer.start()
    try:
        tp = TopicPartition(topic, 0)
        consumer.assign([tp])
        await consumer.seek_to_beginning(tp)
        end = (await consumer.end_offsets([tp]))[tp] if caught_up is not None else 0
        while True:
            batch = await consumer.getmany(timeout_ms=500, max_records=10_000)
            for msgs in batch.values():
                for msg in msgs:
                    await handle(msg)
            # By position, not by the last record's offset: compaction may have removed the records before the end.
            if caught_up is not None and await consumer.position(tp) >= end:
                caught_up()
                caught_up = None
    except asyncio.CancelledError:
        raise
    finally:
        # Bounded: with the broker gone the close waits for it, and the worker must exit (issue 17).
        try:
            await asyncio.wait_for(consumer.stop(), CLOSE_SECONDS)
        except TimeoutError:
            log.warning("the %s follower's consumer did not close within %.0f s; left to the process exit",
                        what, CLOSE_SECONDS)


def keep_running(rt: Runtime, name: str, run: Callable[[], Awaitable[None]]) -> None:
    """Run a follower as a task of the app for the life of the worker, restarting it 2 s after a failure."""

    async def follower() -> None:
        retries = Retries(log, f"{name} follower")
        while True:
            try:
                await run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is told (Retries) and retried
                retries.failed(exc, "retrying in 2 s")
                await asyncio.sleep(2.0)

    follower.__name__ = follower.__qualname__ = f"follow_{name}"  # Faust names the task after the function
    rt.app.task(follower)


def attach(rt: Runtime, control: RuleControl) -> None:
    """Run the control-topic follower as a task of the app."""
    keep_running(rt, "rules", control.run)


__all__ = ["RuleControl", "attach", "client_kwargs", "follow", "keep_running"]
