"""Kafka plumbing for the benchmarks: a private topic namespace, fast producers, worker processes, offsets."""

from __future__ import annotations

import asyncio
import logging
import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from app.faust_app import TRANSACTIONS
from app.settings import Settings
from bench.common import ROOT
from models.errors import RiskwatchError

log = logging.getLogger("riskwatch.bench")
PARTITIONS = 4


class BenchError(RiskwatchError):
    """A benchmark could not run: broker unreachable, worker failed to start or never caught up."""


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


@dataclass
class Namespace:
    """A fresh topic prefix and consumer group on the broker, so a benchmark never sees another's data."""

    bootstrap: str
    work: Path
    prefix: str = ""
    app_id: str = ""

    def __post_init__(self) -> None:
        tag = uuid.uuid4().hex[:10]
        self.prefix = self.prefix or f"bench-{tag}."
        self.app_id = self.app_id or f"rw-bench-{tag}"

    @property
    def settings(self) -> Settings:
        """riskwatch settings pointing at this namespace (plaintext broker, 4 partitions)."""
        return Settings(kafka_bootstrap=self.bootstrap, topic_prefix=self.prefix, app_id=self.app_id,
                        topic_partitions=PARTITIONS, data_dir=self.work / f"data-{self.app_id}")

    @property
    def transactions(self) -> str:
        """Full name of this namespace's transactions topic."""
        return self.prefix + TRANSACTIONS

    def create(self) -> None:
        """Create riskwatch's topics in this namespace (as the worker would), failing with advice if Kafka is down."""
        from app.admin import ensure_topics

        ensure_topics(self.settings)

    def delete(self) -> None:
        """Remove every topic of this namespace and its worker's changelogs: the broker is shared."""
        from app.admin import admin

        try:
            client = admin(self.settings, timeout=10)
        except RiskwatchError:
            return
        try:
            # Changelogs and groups start with the prefix too (Settings.deployment_id).
            mine = [t for t in client.list_topics() if t.startswith(self.prefix)]
            if mine:
                client.delete_topics(mine, timeout_ms=30_000)
            # kafka-python 3 lists groups as dicts, 2.x as tuples.
            groups = [gid for g in client.list_groups()
                      if (gid := g["group_id"] if isinstance(g, dict) else g[0]).startswith(self.prefix)]
            if groups:
                client.delete_groups(groups)
        except Exception as exc:  # noqa: BLE001 - cleanup is best effort; the run's figures are already taken
            log.warning("could not delete benchmark topics and groups %s*: %s", self.prefix, exc)
        finally:
            client.close()


async def _produce(bootstrap: str, topic: str, keys: Sequence[bytes], values: Sequence[bytes]) -> float:
    from aiokafka import AIOKafkaProducer

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1, linger_ms=20, max_batch_size=256 * 1024)
    await producer.start()
    try:
        t0 = time.perf_counter()
        futures = [await producer.send(topic, v, key=k) for k, v in zip(keys, values, strict=True)]
        await producer.flush()
        await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


async def _produce_batched(bootstrap: str, topic: str, keys: Sequence[bytes], values: Sequence[bytes]) -> float:
    from aiokafka import AIOKafkaProducer

    from models.pipeline import partition_of

    producer = AIOKafkaProducer(bootstrap_servers=bootstrap, acks=1)
    await producer.start()
    try:
        parts = sorted(await producer.partitions_for(topic))
        t0 = time.perf_counter()
        batches = {p: producer.create_batch() for p in parts}
        futures = []
        for k, v in zip(keys, values, strict=True):
            # The default partitioner's choice, so per-account state lands where a keyed send would put it.
            p = parts[partition_of(k, len(parts))]
            if batches[p].append(key=k, value=v, timestamp=None) is None:
                futures.append(await producer.send_batch(batches[p], topic, partition=p))
                batches[p] = producer.create_batch()
                batches[p].append(key=k, value=v, timestamp=None)
        for p, batch in batches.items():
            if batch.record_count():
                futures.append(await producer.send_batch(batch, topic, partition=p))
        await asyncio.gather(*futures)
        return time.perf_counter() - t0
    finally:
        await producer.stop()


def produce(bootstrap: str, topic: str, keys: Sequence[bytes], values: Sequence[bytes], *,
            batched: bool = False) -> float:
    """Send pre-serialised keyed records and wait for every acknowledgement; return the seconds taken.

    `batched` fills aiokafka record batches by hand (one await per batch, not per record): the
    fastest way Python can load a topic, used to prepare the worker benchmarks.
    """
    run = _produce_batched if batched else _produce
    return asyncio.run(run(bootstrap, topic, keys, values))


async def _consume(bootstrap: str, topic: str, n: int, timeout: float) -> float:
    from aiokafka import AIOKafkaConsumer, TopicPartition

    consumer = AIOKafkaConsumer(bootstrap_servers=bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="earliest")
    await consumer.start()
    try:
        parts = consumer.partitions_for_topic(topic) or await _partitions(consumer, topic)
        consumer.assign([TopicPartition(topic, p) for p in parts])
        await consumer.seek_to_beginning()
        got = 0
        t0 = time.perf_counter()
        while got < n:
            batches = await consumer.getmany(timeout_ms=1000, max_records=10_000)
            got += sum(len(records) for records in batches.values())
            if time.perf_counter() - t0 > timeout:
                raise BenchError(f"bare consumer read {got} of {n} records from {topic} in {timeout:.0f}s")
        return time.perf_counter() - t0
    finally:
        await consumer.stop()


async def _partitions(consumer: Any, topic: str) -> set[int]:
    for _ in range(50):
        parts = await consumer._client.fetch_all_metadata()
        found = parts.partitions_for_topic(topic)
        if found:
            return set(found)
        await asyncio.sleep(0.1)
    raise BenchError(f"topic {topic} has no partitions on the broker")


def consume(bootstrap: str, topic: str, n: int, timeout: float = 300.0) -> float:
    """Read n records from the start of a topic with a bare aiokafka getmany loop; return the seconds taken."""
    return asyncio.run(_consume(bootstrap, topic, n, timeout))


def end_offsets(s: Settings, topic: str) -> dict[int, int]:
    """The high watermark of every partition of a topic."""
    from kafka import TopicPartition

    from app.admin import consumer

    c = consumer(s)
    try:
        parts = c.partitions_for_topic(topic) or set()
        ends = c.end_offsets([TopicPartition(topic, p) for p in parts])
        return {tp.partition: int(off) for tp, off in ends.items()}
    finally:
        c.close()


class Committed:
    """Reads a consumer group's committed offsets on one topic (kafka-python admin client, kept open)."""

    def __init__(self, s: Settings, group: str, topic: str) -> None:
        from app.admin import admin

        self.client = admin(s)
        self.group = group
        self.topic = topic

    def offsets(self) -> dict[int, int]:
        """Committed offset per partition (partitions never committed are absent)."""
        if hasattr(self.client, "list_group_offsets"):  # kafka-python 3.x
            got = self.client.list_group_offsets({self.group: None}).get(self.group, {})
        else:
            got = self.client.list_consumer_group_offsets(self.group)
        return {tp.partition: int(om.offset) for tp, om in got.items() if tp.topic == self.topic and om.offset >= 0}

    def close(self) -> None:
        """Close the admin connection."""
        self.client.close()


class Worker:
    """A `python -m app.cli worker` process in a namespace, with its /metrics port and its log file."""

    def __init__(self, ns: Namespace, log_path: Path, **env: str) -> None:
        self.ns = ns
        self.metrics_port = free_port()
        self.log_path = log_path
        full = {k: v for k, v in os.environ.items() if not k.startswith("RISKWATCH_")}
        full.update({
            "RISKWATCH_KAFKA_BOOTSTRAP": ns.bootstrap,
            "RISKWATCH_TOPIC_PREFIX": ns.prefix,
            "RISKWATCH_APP_ID": ns.app_id,
            "RISKWATCH_TOPIC_PARTITIONS": str(PARTITIONS),
            "RISKWATCH_DATA_DIR": str(ns.work / f"data-{ns.app_id}-{self.metrics_port}"),
            "RISKWATCH_METRICS_PORT": str(self.metrics_port),
            "RISKWATCH_WEB_PORT": str(free_port()),
            "RISKWATCH_LOG_LEVEL": "INFO",
        })
        full.update(env)
        self._log = open(log_path, "ab")  # closed in stop()
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=full,
                                     stdout=self._log, stderr=subprocess.STDOUT, start_new_session=True)

    @property
    def pid(self) -> int:
        """The worker's process id (the Python interpreter itself, no shell in between)."""
        return self.proc.pid

    def _samples(self) -> Iterator[Any]:
        from prometheus_client.parser import text_string_to_metric_families

        url = f"http://127.0.0.1:{self.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            text = r.read().decode()
        for fam in text_string_to_metric_families(text):
            yield from fam.samples

    def scrape(self) -> dict[str, float]:
        """The worker's /metrics page summed by sample name (labels folded together)."""
        out: dict[str, float] = {}
        for sample in self._samples():
            out[sample.name] = out.get(sample.name, 0.0) + sample.value
        return out

    def metric(self, name: str, **labels: str) -> float:
        """Sum of one metric's samples whose labels match `labels`."""
        return sum(s.value for s in self._samples()
                   if s.name == name and all(s.labels.get(k) == v for k, v in labels.items()))

    def wait_ready(self, timeout: float = 180.0) -> float:
        """Wait until the worker joined its group and serves /metrics; return the wall time it took."""
        t0 = time.monotonic()
        while time.monotonic() - t0 < timeout:
            if self.proc.poll() is not None:
                raise BenchError(f"worker exited with code {self.proc.returncode}; its log:\n{self.tail()}")
            try:
                self.scrape()
                if b"Worker ready" in self.log_path.read_bytes():
                    return time.monotonic() - t0
            except OSError:
                pass
            time.sleep(0.2)
        raise BenchError(f"worker not ready after {timeout:.0f}s; its log:\n{self.tail()}")

    def status(self, field: str) -> int:
        """A size field of /proc/<pid>/status in bytes, e.g. VmHWM (peak RSS) or VmRSS."""
        for line in Path(f"/proc/{self.pid}/status").read_text().splitlines():
            if line.startswith(field + ":"):
                return int(line.split()[1]) * 1024
        raise BenchError(f"/proc/{self.pid}/status has no {field}")

    def cpu_seconds(self) -> float:
        """User plus system CPU seconds the worker has used so far."""
        fields = Path(f"/proc/{self.pid}/stat").read_text().rsplit(")", 1)[1].split()
        return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")

    def tail(self, n: int = 40) -> str:
        """The end of the worker's log."""
        try:
            return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])
        except OSError:
            return "(no log)"

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM the worker's process group, SIGKILL it if it does not exit in time."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self._log.close()


def wait_for(check: Callable[[], bool], timeout: float, what: str, every: float = 0.1) -> float:
    """Poll `check` until it holds; return the monotonic time it first did; raise BenchError after `timeout`."""
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if check():
            return time.monotonic()
        time.sleep(every)
    raise BenchError(f"timed out after {timeout:.0f}s waiting for {what}")


__all__ = ["BenchError", "Committed", "Namespace", "Worker", "consume", "end_offsets", "free_port", "produce",
           "wait_for"]
