"""Crash and restart the broker under load: the worker reconnects and carries on, every input accounted for."""

from __future__ import annotations

import time

import pytest

from app.faust_app import TRANSACTIONS
from tests.faults.conftest import (
    Feed,
    assert_counter_identity,
    broker_of_its_own,
    check_accounting,
    counters,
    wait_drained,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


fault_broker, kafka_bootstrap = broker_of_its_own("the restart must not disturb the other fault tests")


def test_broker_crash_and_restart_under_load(fault_broker, fault_settings, start_worker, feed_producer):
    s = fault_settings
    topic = s.topic(TRANSACTIONS)
    worker = start_worker(s)
    producer = feed_producer(reconnect_backoff_max_ms=1000)
    producer.start(Feed(accounts=400, seed=3).make(15_000), rate=1500)

    deadline = time.monotonic() + 120
    while (before := worker.metric("riskwatch_events_consumed_total", topic=topic)) < 2000:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.2)
    t0 = time.monotonic()
    fault_broker.crash()
    time.sleep(3.0)  # long enough for every client to notice the broker is gone
    fault_broker.start()
    outage = time.monotonic() - t0
    assert worker.proc.poll() is None, f"worker died while the broker was down:\n{worker.tail()}"

    producer.join()
    wait_drained(s, timeout=240, alive=lambda: worker.proc.poll() is None or pytest.fail(worker.tail()))
    c = counters(worker, topic)
    assert_counter_identity(c)
    assert c["events_consumed"] >= len(producer.sent), "one worker life saw every input at least once"
    check_accounting(s, producer.sent, "broker restart", consumed_before_outage=int(before),
                     outage_seconds=round(outage, 1), consumed_by_worker=int(c["events_consumed"]))
