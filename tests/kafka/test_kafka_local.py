"""The local Kafka launcher really starts a broker that kafka-python can use, and stops it again."""

from __future__ import annotations

import socket
import uuid
from collections.abc import Iterator
from pathlib import Path

import pytest
from kafka import KafkaConsumer, KafkaProducer

from app import kafka_local
from models.errors import KafkaLocalError


def _free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


def _consume_one(bootstrap: str, topic: str) -> list[bytes]:
    consumer = KafkaConsumer(
        topic,
        bootstrap_servers=bootstrap,
        group_id=f"g-{uuid.uuid4().hex}",
        auto_offset_reset="earliest",
        consumer_timeout_ms=20000,
    )
    try:
        for message in consumer:
            return [message.value]
        return []
    finally:
        consumer.close()


@pytest.fixture
def port() -> Iterator[int]:
    chosen = _free_port()
    yield chosen
    kafka_local.stop(chosen)  # Runs even when the test failed, so no broker outlives it.


@pytest.mark.kafka
@pytest.mark.timeout(300)
def test_start_produce_consume_stop(port: int, tmp_path: Path) -> None:
    data_dir = tmp_path / "kafka"
    info = kafka_local.start(port, data_dir=data_dir, timeout=90)
    assert info.bootstrap == f"127.0.0.1:{port}"
    assert kafka_local.start(port, data_dir=data_dir) == info  # Idempotent: same broker, no second process.
    assert kafka_local.status(port) == info
    assert info.log_file.is_file() and (data_dir / "server.properties").is_file()

    producer = KafkaProducer(bootstrap_servers=info.bootstrap)
    try:
        producer.send("kafka-local-test", b"hello").get(timeout=30)
    finally:
        producer.close()
    assert _consume_one(info.bootstrap, "kafka-local-test") == [b"hello"]

    assert kafka_local.stop(port) is True
    assert kafka_local.status(port) is None
    assert kafka_local.stop(port) is False  # Idempotent: nothing left to stop.

    # A restart reuses the formatted data dir: the message survives.
    restarted = kafka_local.start(port, data_dir=data_dir, timeout=90)
    assert restarted.pid != info.pid
    assert _consume_one(restarted.bootstrap, "kafka-local-test") == [b"hello"]
    assert kafka_local.stop(port) is True


@pytest.mark.kafka
def test_start_refuses_a_port_taken_by_another_process(tmp_path: Path) -> None:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        sock.listen()
        taken = int(sock.getsockname()[1])
        with pytest.raises(KafkaLocalError, match="in use"):
            kafka_local.start(taken, data_dir=tmp_path / "kafka")
    assert kafka_local.status(taken) is None


@pytest.mark.kafka
@pytest.mark.timeout(120)
def test_a_broker_too_slow_to_start_is_stopped_with_advice(port: int, tmp_path: Path) -> None:
    # No JVM serves metadata within 0.5 s: the launcher must give up, stop what it started and say
    # what to do (wait longer, or wipe a data dir that is slow to recover).
    with pytest.raises(KafkaLocalError) as exc:
        kafka_local.start(port, data_dir=tmp_path / "kafka", timeout=0.5)
    message = str(exc.value)
    assert "did not serve metadata in time" in message
    assert "--timeout" in message and "--fresh" in message
    assert kafka_local.status(port) is None
