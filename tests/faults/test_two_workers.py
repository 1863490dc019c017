"""Two workers in one group on four partitions: kill one, the other takes over its partitions and tables."""

from __future__ import annotations

import re
import time

import pytest

from app.faust_app import TRANSACTIONS
from tests.conftest import WorkerProcess
from tests.faults.conftest import (
    Feed,
    assert_counter_identity,
    check_accounting,
    counters,
    wait_drained,
    worker_settings,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def _wait_log(w: WorkerProcess, pattern: bytes, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not re.search(pattern, w.log_path.read_bytes()):
        assert w.proc.poll() is None, f"worker died:\n{w.tail()}"
        assert time.monotonic() < deadline, f"no {pattern!r} in the worker's log:\n{w.tail()}"
        time.sleep(0.3)


def _wait_consuming(w: WorkerProcess, topic: str, at_least: float, timeout: float = 120.0) -> float:
    deadline = time.monotonic() + timeout
    while (n := w.metric("riskwatch_events_consumed_total", topic=topic)) < at_least:
        assert w.proc.poll() is None, f"worker died:\n{w.tail()}"
        assert time.monotonic() < deadline, f"worker consumed {n} < {at_least} events:\n{w.tail()}"
        time.sleep(0.2)
    return n


def test_one_of_two_workers_dies_the_other_takes_over_then_it_returns(fault_settings, start_worker, feed_producer):
    s = fault_settings
    assert s.topic_partitions >= 4
    topic = s.topic(TRANSACTIONS)
    feed = Feed(accounts=400, seed=2)
    a = start_worker(worker_settings(s, "a"))
    b = start_worker(worker_settings(s, "b"))
    producer = feed_producer()
    producer.start(feed.make(8000), rate=2500)
    # Both must own partitions before one dies, or nothing is taken over.
    _wait_consuming(a, topic, 300)
    b_before = _wait_consuming(b, topic, 300)
    b.kill()
    producer.join()
    a_before = a.metric("riskwatch_events_consumed_total", topic=topic)

    # With b gone, only a can drain all four partitions, and b's accounts must go on from b's state.
    producer.send(feed.make(6000))
    wait_drained(s, alive=lambda: a.proc.poll() is None or pytest.fail(a.tail()))
    assert_counter_identity(counters(a, topic))
    took_over = a.metric("riskwatch_events_consumed_total", topic=topic) - a_before
    check_accounting(s, producer.sent, "two workers, one killed", b_consumed_before_kill=int(b_before),
                     a_consumed_after_kill=int(took_over))

    back = start_worker(worker_settings(s, "b2"))
    # Faust is ready before the transaction engine's group has given b2 its partitions; events sent
    # before that can all be drained by a, and b2 would have nothing to show.
    _wait_log(back, rb"transaction partitions \[\d")
    producer.send(feed.make(6000))
    wait_drained(s, alive=lambda: a.proc.poll() is None or pytest.fail(a.tail()))
    back_consumed = _wait_consuming(back, topic, 1)
    assert_counter_identity(counters(back, topic))
    assert_counter_identity(counters(a, topic))
    check_accounting(s, producer.sent, "two workers, killed one back", returned_consumed=int(back_consumed))
