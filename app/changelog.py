"""In-memory tables of the transaction engine, one dict per partition, backed by compacted changelog topics.

The engine owns these tables outright: a partition's state is read back from its changelog only
when the partition is newly assigned (or after a failed write), and every change is written to
the changelog in record batches before the offsets of the events that made it are committed.
Faust's tables instead update the local store first and send each change through its producer
buffer one message at a time, which cost more than the scoring itself (issue 8).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable, Iterable, Iterator, MutableMapping
from typing import Any

from aiokafka import AIOKafkaConsumer, TopicPartition

from app.quarantine import Quarantine

log = logging.getLogger("riskwatch.changelog")


class ChangelogStore:
    """Bytes keyed by bytes, per partition; changes wait in `pending` until the engine writes them.

    With `check` (raises on a record it refuses: `check(partition, key, value)`) and `quarantine`,
    each record read back is checked and a refused one set aside, its key left absent. Stores whose
    values are costly to decode (account states, detector snapshots) check them when first used instead.
    """

    def __init__(self, name: str, topic: str, check: Callable[[int, bytes, bytes], object] | None = None) -> None:
        self.name = name
        self.topic = topic
        self.check = check
        self.quarantine: Quarantine | None = None
        self.parts: dict[int, dict[bytes, bytes]] = {}
        self.pending: dict[tuple[int, bytes], bytes | None] = {}

    def get(self, partition: int, key: bytes) -> bytes | None:
        """The value of `key` in `partition`, or None."""
        part = self.parts.get(partition)
        return None if part is None else part.get(key)

    def put(self, partition: int, key: bytes, value: bytes) -> None:
        """Set a value; its changelog record goes out with the current batch."""
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = {}
        part[key] = value
        self.pending[(partition, key)] = value

    def delete(self, partition: int, key: bytes) -> bool:
        """Remove a key (a tombstone in the changelog); False if it was not there."""
        part = self.parts.get(partition)
        if part is None or part.pop(key, None) is None:
            return False
        self.pending[(partition, key)] = None
        return True

    def items(self, partition: int) -> list[tuple[bytes, bytes]]:
        """(key, value) pairs of one partition."""
        return list(self.parts.get(partition, {}).items())

    def keys(self, partition: int | None = None) -> list[bytes]:
        """Keys of one partition, or of all."""
        if partition is not None:
            return list(self.parts.get(partition, ()))
        return [k for part in self.parts.values() for k in part]

    def __len__(self) -> int:
        return sum(len(part) for part in self.parts.values())

    def partitions(self) -> set[int]:
        """Partitions holding data here."""
        return set(self.parts)

    def drop(self, partitions: Iterable[int]) -> None:
        """Forget partitions (no longer owned, or about to be read back): no changelog records."""
        gone = set(partitions)
        for p in gone:
            self.parts.pop(p, None)
        if self.pending and gone:
            self.pending = {k: v for k, v in self.pending.items() if k[0] not in gone}

    def restore(self, partition: int, key: bytes, value: bytes | None, offset: int | None = None) -> None:
        """Apply one changelog record while reading a partition back (no new record)."""
        if value is not None and self.check is not None and self.quarantine is not None:
            try:
                self.check(partition, key, value)
            except Exception as exc:  # noqa: BLE001 - whatever the check raises, the record is set aside
                self.quarantine.set_aside(self.name, self.topic, partition, key, value, exc, offset)
                value = None
        part = self.parts.get(partition)
        if part is None:
            part = self.parts[partition] = {}
        if value is None:
            part.pop(key, None)
        else:
            part[key] = value

    def take_pending(self) -> dict[tuple[int, bytes], bytes | None]:
        """The changes since the last call, last write per key (the caller writes them)."""
        out, self.pending = self.pending, {}
        return out


class PartitionView(MutableMapping[bytes, bytes]):
    """A store seen as one mapping, for keys that name their own partition (e.g. `t<partition>:<hour>`)."""

    def __init__(self, store: ChangelogStore, partition_of: Callable[[bytes], int]) -> None:
        self.store = store
        self.partition_of = partition_of

    def __getitem__(self, key: bytes) -> bytes:
        value = self.store.get(self.partition_of(key), key)
        if value is None:
            raise KeyError(key)
        return value

    def __setitem__(self, key: bytes, value: bytes) -> None:
        self.store.put(self.partition_of(key), key, value)

    def __delitem__(self, key: bytes) -> None:
        if not self.store.delete(self.partition_of(key), key):
            raise KeyError(key)

    def __iter__(self) -> Iterator[bytes]:
        return iter(self.store.keys())

    def __len__(self) -> int:
        return len(self.store)


async def read_back(consumer: AIOKafkaConsumer, stores: list[ChangelogStore], partitions: set[int],
                    timeout: float = 300.0) -> int:
    """Replace the stores' data of `partitions` with what their changelogs hold; return the records read.

    `consumer` is a group-less consumer kept for this; it is left assigned to nothing.
    """
    if not partitions or not stores:
        return 0
    for store in stores:
        store.drop(partitions)
    owner = {TopicPartition(st.topic, p): st for st in stores for p in sorted(partitions)}
    tps = list(owner)
    consumer.assign(tps)
    try:
        await consumer.seek_to_beginning(*tps)
        end = await consumer.end_offsets(tps)
        todo = {tp for tp in tps if await consumer.position(tp) < end[tp]}
        n = 0
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise TimeoutError(f"reading back {sorted(f'{tp.topic}[{tp.partition}]' for tp in todo)} "
                                   f"took over {timeout:.0f} s")
            got = await consumer.getmany(*todo, timeout_ms=200, max_records=50_000)
            for tp, records in got.items():
                store = owner[tp]
                for r in records:
                    if r.key is not None and r.offset < end[tp]:
                        store.restore(tp.partition, r.key, r.value, r.offset)
                        n += 1
            for tp in list(todo):
                if await consumer.position(tp) >= end[tp]:
                    todo.discard(tp)
        return n
    finally:
        consumer.assign([])


async def gather_all(futures: list[asyncio.Future[Any]]) -> None:
    """Wait for every delivery; raise the first failure only after all have settled."""
    if not futures:
        return
    results = await asyncio.gather(*futures, return_exceptions=True)
    for r in results:
        if isinstance(r, BaseException):
            raise r


__all__ = ["ChangelogStore", "PartitionView", "gather_all", "read_back"]
