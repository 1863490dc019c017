"""Shared fixtures: one real Kafka broker per session, a fresh topic namespace per test, worker processes."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import tempfile
import time
import urllib.request
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime, timedelta, timezone
from pathlib import Path
from typing import Any

import pytest

from app.settings import Settings

ROOT = Path(__file__).resolve().parent.parent


def free_port() -> int:
    """A TCP port nobody listens on right now."""
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return int(s.getsockname()[1])


def _docker_available() -> bool:
    try:
        import docker  # type: ignore[import-untyped]

        docker.from_env(timeout=3).ping()
        return True
    except Exception:  # noqa: BLE001 - any failure means: no engine to use
        return False


@pytest.fixture(scope="session")
def kafka_bootstrap() -> Iterator[str]:
    """A real broker: RISKWATCH_KAFKA_BOOTSTRAP if set, else testcontainers with Docker, else local jars."""
    configured = os.environ.get("RISKWATCH_KAFKA_BOOTSTRAP")
    if configured:
        yield configured
        return
    if _docker_available():
        from testcontainers.kafka import KafkaContainer

        with KafkaContainer("apache/kafka:4.1.1").with_kraft() as kc:
            yield kc.get_bootstrap_server()
        return
    from app import kafka_local

    port = free_port()
    data = Path(tempfile.mkdtemp(prefix="riskwatch-kafka-"))
    info = kafka_local.start(port, data_dir=data, timeout=120)
    try:
        yield info.bootstrap
    finally:
        kafka_local.stop(port)
        kafka_local.wipe(port, data)


@pytest.fixture
def namespace() -> str:
    """A topic prefix and consumer group unique to this test."""
    return f"t{uuid.uuid4().hex[:10]}."


@pytest.fixture
def settings(kafka_bootstrap: str, namespace: str, tmp_path: Path) -> Settings:
    """Settings for a worker isolated in this test's namespace."""
    return Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=namespace, app_id=f"rw-{namespace[:-1]}",
                    data_dir=tmp_path / "data", metrics_port=free_port(), web_port=free_port())


def settings_env(s: Settings, **extra: str) -> dict[str, str]:
    """The environment a worker subprocess needs to run with settings `s`."""
    env = dict(os.environ)
    for name, value in s.model_dump().items():
        if value is None:
            continue
        if hasattr(value, "get_secret_value"):
            value = value.get_secret_value()
        env[f"RISKWATCH_{name.upper()}"] = json.dumps(value) if isinstance(value, dict) else str(value)
    env.update(extra)
    return env


class WorkerProcess:
    """A `riskwatch worker` subprocess with its log file; stop() or kill() ends it."""

    def __init__(self, s: Settings, log_path: Path, **env: str) -> None:
        self.settings = s
        self.log_path = log_path
        self.log = open(log_path, "ab")
        self.proc = subprocess.Popen([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT,
                                     env=settings_env(s, **env), stdout=self.log, stderr=subprocess.STDOUT,
                                     start_new_session=True)

    def metrics(self) -> str:
        """The raw /metrics page."""
        url = f"http://127.0.0.1:{self.settings.metrics_port}/metrics"
        with urllib.request.urlopen(url, timeout=5) as r:
            return str(r.read().decode())

    def metric(self, name: str, **labels: str) -> float:
        """Sum of a metric's samples matching the labels (0 when absent)."""
        from prometheus_client.parser import text_string_to_metric_families

        total = 0.0
        for fam in text_string_to_metric_families(self.metrics()):
            for sample in fam.samples:
                if sample.name == name and all(sample.labels.get(k) == v for k, v in labels.items()):
                    total += sample.value
        return total

    def wait_ready(self, timeout: float = 90.0) -> None:
        """Wait until the worker has joined its group and serves /metrics."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise AssertionError(f"worker exited with {self.proc.returncode}:\n{self.tail()}")
            try:
                self.metrics()
                if b"Worker ready" in self.log_path.read_bytes():
                    return
            except OSError:
                pass
            time.sleep(0.3)
        raise AssertionError(f"worker not ready after {timeout}s:\n{self.tail()}")

    def tail(self, n: int = 60) -> str:
        """The end of the worker's log."""
        return "\n".join(self.log_path.read_text(errors="replace").splitlines()[-n:])

    def stop(self, timeout: float = 30.0) -> None:
        """SIGTERM, then SIGKILL if it does not exit."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGTERM)
            try:
                self.proc.wait(timeout)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(10)
        self.log.close()

    def kill(self) -> None:
        """kill -9: no chance to flush or commit anything."""
        if self.proc.poll() is None:
            os.killpg(self.proc.pid, signal.SIGKILL)
            self.proc.wait(10)


@pytest.fixture
def start_worker(tmp_path: Path) -> Iterator[Callable[..., WorkerProcess]]:
    """Start workers for a test; every one is stopped at teardown."""
    started: list[WorkerProcess] = []

    def start(s: Settings, ready: bool = True, **env: str) -> WorkerProcess:
        w = WorkerProcess(s, tmp_path / f"worker-{len(started)}.log", **env)
        started.append(w)
        if ready:
            w.wait_ready()
        return w

    yield start
    for w in started:
        w.stop()


def build_engine(tmp_path: Path) -> Any:
    """A worker's transaction engine built in-process (no broker contacted), over stores in memory."""
    import asyncio

    from prometheus_client import CollectorRegistry

    from app.metrics import Metrics
    from app.worker import build

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        rt = build(Settings(topic_prefix="u.", app_id="u", data_dir=tmp_path), Metrics(CollectorRegistry()))
    finally:
        asyncio.set_event_loop(None)
        loop.close()
    return rt.extras["transactions"]


def produce(s: Settings, topic: str, items: list[tuple[bytes | None, bytes]]) -> None:
    """Send (key, value) pairs to a logical topic and wait for the broker to take them all."""
    from app.admin import producer

    p = producer(s)
    try:
        for key, value in items:
            p.send(s.topic(topic), key=key, value=value)
        p.flush(30)
    finally:
        p.close()


def consume(s: Settings, topic: str, until: Callable[[list[dict[str, Any]]], bool], timeout: float = 60.0
            ) -> list[dict[str, Any]]:
    """Read a logical topic from the start until `until(messages)` holds; fail after `timeout`."""
    from app.admin import consumer

    c = consumer(s, s.topic(topic))
    got: list[dict[str, Any]] = []
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for records in c.poll(timeout_ms=500).values():
                got.extend(json.loads(r.value) for r in records)
            if until(got):
                return got
    finally:
        c.close()
    raise AssertionError(f"timed out after {timeout}s on {s.topic(topic)}; got {len(got)} messages: {got[-5:]}")


def last_versions(alerts: list[dict[str, Any]]) -> dict[str, tuple[Any, ...]]:
    """alert_id -> what a reader acts on in its latest version (to compare a worker's warnings with replay's)."""
    out = {}
    for a in alerts:
        out[a["alert_id"]] = (a["category"], a["level"], a["entity_type"], a["entity_id"], tuple(a["event_ids"]),
                              a["detector"], round(a["score"], 6),
                              tuple((r["code"], r["message"]) for r in a["reasons"]))
    return out


_START = datetime(2026, 11, 2, 9, 0, tzinfo=timezone(timedelta(hours=8)))


@pytest.fixture
def make_txn() -> Callable[..., dict[str, Any]]:
    """Factory for contract transactions; keyword overrides, `minutes` shifts the time."""
    counter = iter(range(10**9))

    def make(minutes: float = 0.0, **over: Any) -> dict[str, Any]:
        n = next(counter)
        txn = {
            "event_type": "transaction",
            "event_id": f"tx-{uuid.uuid4().hex[:8]}-{n}",
            "ts": (_START + timedelta(minutes=minutes)).isoformat(),
            "account_id": "acct-1",
            "counterparty_id": "merchant-1",
            "amount": 120.0,
            "currency": "CNY",
            "direction": "debit",
            "txn_type": "payment",
            "channel": "app",
            "device_id": "dev-1",
        }
        txn.update(over)
        return txn

    return make


@pytest.fixture
def make_tick() -> Callable[..., dict[str, Any]]:
    """Factory for contract market ticks."""
    counter = iter(range(10**9))

    def make(minutes: float = 0.0, **over: Any) -> dict[str, Any]:
        tick = {"event_type": "market", "event_id": f"mk-{uuid.uuid4().hex[:8]}-{next(counter)}",
                "ts": (_START + timedelta(minutes=minutes)).isoformat(), "instrument": "FUND-A", "price": 100.0}
        tick.update(over)
        return tick

    return make
