"""app.admin's fix to kafka-python 3.0's read loop: bytes that arrive with the peer's close are delivered."""

import socket
import time

import pytest

import app.admin  # noqa: F401  (applies the fix on import)

transport = pytest.importorskip("kafka.net.transport")
selector = pytest.importorskip("kafka.net.selector")


class _Protocol:
    _sensors = None

    def __init__(self) -> None:
        self.received: list[bytes] = []
        self.lost: BaseException | None = None

    def data_received(self, data: bytes) -> None:
        self.received.append(bytes(data))

    def connection_lost(self, exc: BaseException | None) -> None:
        self.lost = exc or ConnectionError("closed")


def test_a_reply_sent_just_before_the_close_reaches_the_protocol():
    """A broker's SASL refusal is its last reply before it closes; kafka-python 3.0.11-3.0.12 dropped it."""
    ours, broker = socket.socketpair()
    ours.setblocking(False)
    broker.sendall(b"\x00\x00\x00\x04nope")
    broker.close()  # reply and close both wait in the buffer before the first read
    net = selector.NetworkSelector()
    tcp = transport.KafkaTCPTransport(net, ours)
    proto = _Protocol()
    tcp.set_protocol(proto)
    tcp.resume_reading()
    deadline = time.monotonic() + 5
    while proto.lost is None and time.monotonic() < deadline:
        net.poll(timeout_ms=50)
    assert proto.lost is not None, "the close was never noticed"
    assert b"".join(proto.received) == b"\x00\x00\x00\x04nope"
    assert "disconnected" in str(proto.lost)
