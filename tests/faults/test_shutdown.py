"""Bounded shutdown (issue 17): SIGTERM exits within 15 s whatever the broker's state, saying what was not committed.

Measured before the change: with the broker gone a worker took 92 s to exit and wrote about 11,000
log lines of connection errors. The broker-down test crashes this module's own broker under a
running worker, so the other fault tests' broker is never disturbed.
"""

from __future__ import annotations

import asyncio
import logging
import os
import re
import signal
import threading
import time
from typing import Any

import mode
import pytest

from app import kafka_local
from app.faust_app import TRANSACTIONS
from app.worker import EXIT_FORCED, ShutdownWatchdog, Worker
from tests.faults.conftest import Broker, Feed, broker_of_its_own, committed_offsets, wait_drained

EXIT_WITHIN = 15.0
MAX_LINES = 100
UNCOMMITTED = re.compile(r"partition \d+: offsets (\d+ to \d+|up to \d+) not committed")


fault_broker, kafka_bootstrap = broker_of_its_own("the broker-down test crashes it")


@pytest.fixture
def broker(fault_broker: Broker) -> Broker:
    """The module's broker, started again if an earlier test crashed it."""
    if kafka_local.status(fault_broker.port) is None:
        fault_broker.start()
    return fault_broker


def sigterm(worker: Any, timeout: float = 60.0) -> float:
    """SIGTERM the worker; the seconds until it exited."""
    t0 = time.monotonic()
    os.killpg(worker.proc.pid, signal.SIGTERM)
    worker.proc.wait(timeout)
    return time.monotonic() - t0


def lines_from(worker: Any, start: int) -> list[str]:
    """The worker's log lines from line `start` on."""
    return worker.log_path.read_text(errors="replace").splitlines()[start:]


@pytest.mark.kafka
@pytest.mark.slow
def test_sigterm_with_the_broker_up_exits_cleanly_and_quickly(broker, fault_settings, start_worker, feed_producer):
    s = fault_settings
    worker = start_worker(s)
    feed_producer().send(Feed(accounts=50, seed=5).make(500))
    wait_drained(s, timeout=60, alive=lambda: worker.proc.poll() is None or pytest.fail(worker.tail()))
    took = sigterm(worker)
    log = worker.log_path.read_text(errors="replace")
    assert worker.proc.returncode == 0, worker.tail()
    assert took < 5.0, f"took {took:.1f} s"
    assert "every offset processed was committed" in log, worker.tail()
    print(f"broker up: SIGTERM to exit {took:.1f} s")


@pytest.mark.kafka
@pytest.mark.slow
def test_sigterm_with_the_broker_gone_exits_within_15_s_quietly(broker, fault_settings, start_worker):
    from app.admin import producer

    s = fault_settings
    topic = s.topic(TRANSACTIONS)
    worker = start_worker(s)
    # A steady feed, so records are read and not yet committed when the broker dies.
    stop = threading.Event()
    items = Feed(accounts=200, seed=9).make(40_000)
    p = producer(s, linger_ms=5)

    def feed() -> None:
        t0 = time.monotonic()
        for i, item in enumerate(items):
            if stop.is_set():
                break
            p.send(topic, key=item.account.encode(), value=item.raw)
            if i % 50 == 0:
                time.sleep(max(i / 1000 - (time.monotonic() - t0), 0))  # 1,000 a second
        p.flush(30)

    thread = threading.Thread(target=feed, name="feed", daemon=True)
    thread.start()
    try:
        deadline = time.monotonic() + 90
        while (worker.metric("riskwatch_events_consumed_total", topic=topic) < 1500
               or not sum(committed_offsets(s).values())):
            assert time.monotonic() < deadline, worker.tail()
            time.sleep(0.2)
    finally:
        stop.set()
        thread.join(60)
        p.close(5)
    start = len(lines_from(worker, 0))
    broker.crash()
    time.sleep(3.0)  # every client has noticed, and the connection errors are flowing
    assert worker.proc.poll() is None, worker.tail()

    took = sigterm(worker, timeout=120)
    after = lines_from(worker, start)
    text = "\n".join(after)
    print(f"broker gone: SIGTERM to exit {took:.1f} s, {len(after)} log lines from the crash to the exit, "
          f"exit status {worker.proc.returncode}")
    assert took < EXIT_WITHIN, f"took {took:.1f} s:\n{worker.tail()}"
    assert len(after) < MAX_LINES, f"{len(after)} lines after the broker stopped:\n" + "\n".join(after[-40:])
    assert worker.proc.returncode in (0, EXIT_FORCED), worker.tail()
    assert UNCOMMITTED.search(text) and "redelivered" in text, worker.tail()
    assert "repeated" in text or len(after) < 40, "connection errors are summarised"


def test_the_watchdog_says_what_was_not_committed_then_exits():
    said: list[str] = []
    exited = threading.Event()
    codes: list[int] = []

    def exit(code: int) -> None:
        codes.append(code)
        exited.set()

    dog = ShutdownWatchdog(0.05, last_words=lambda: said.append("partition 0: offsets 5 to 9"), exit=exit)
    dog.start()
    assert exited.wait(5)
    assert said == ["partition 0: offsets 5 to 9"] and codes == [EXIT_FORCED]


def test_the_watchdog_exits_even_when_the_last_words_fail():
    codes: list[int] = []
    done = threading.Event()

    def fail() -> None:
        raise RuntimeError("offsets changed under us")

    dog = ShutdownWatchdog(0.01, last_words=fail, exit=lambda code: (codes.append(code), done.set()))
    dog.start()
    assert done.wait(5) and codes == [EXIT_FORCED]


def test_modes_signal_hooks_are_still_there():
    # Worker overrides mode's private _schedule_shutdown and _stop_on_signal (mode-streaming 0.7):
    # if a release renames them the watchdog would never start; this fails first.
    for name in ("_schedule_shutdown", "_stop_on_signal", "_signal_stop_time"):
        assert hasattr(mode.Worker, name) or name in mode.Worker.__annotations__, name
    assert Worker._schedule_shutdown is not mode.Worker._schedule_shutdown


class _Client:
    """A Kafka client whose stop() returns at once, or never (the broker is gone)."""

    def __init__(self, hangs: bool = False) -> None:
        self.hangs = hangs
        self.stopping = False

    async def stop(self) -> None:
        self.stopping = True
        if self.hangs:
            await asyncio.Event().wait()


def test_the_engines_stop_keeps_to_its_budget_and_names_what_was_not_committed(caplog):
    from aiokafka import TopicPartition

    from agents.transactions import Phase, Phases, TransactionEngine

    engine = TransactionEngine.__new__(TransactionEngine)  # only the stop path's attributes
    engine.topic = "risk.transactions"
    engine.stopped, engine.reported = None, False
    engine.lock, engine.phases = asyncio.Lock(), Phases()
    engine.phases.go(Phase.RUNNING)
    engine.read = {TopicPartition(engine.topic, 0): 120, TopicPartition(engine.topic, 1): 50,
                   TopicPartition(engine.topic, 2): 7}
    engine.committed = {TopicPartition(engine.topic, 0): 100, TopicPartition(engine.topic, 1): 50}
    engine.consumer, engine.producer = _Client(hangs=True), _Client()
    engine.state_producer, engine.restorer = _Client(hangs=True), None

    async def flush_forever(wait: bool = False) -> None:
        await asyncio.Event().wait()  # acks that never come

    async def loop() -> None:
        while engine.phases.now is Phase.RUNNING:
            await asyncio.sleep(0.01)

    engine._flush = flush_forever  # type: ignore[method-assign]

    async def main() -> float:
        engine.task = asyncio.create_task(loop())
        t0 = time.monotonic()
        await engine.stop(budget=1.0)
        await engine.stop()  # Faust's own call later: the same stop, not a second one
        return time.monotonic() - t0

    with caplog.at_level(logging.INFO, logger="riskwatch.agents.transactions"):
        took = asyncio.run(main())
    assert took < 2.5, took
    assert engine.consumer.stopping and engine.producer.stopping
    assert engine.phases.now is Phase.STOPPED
    warned = [r.getMessage() for r in caplog.records if "not committed" in r.getMessage()]
    assert warned == ["risk.transactions: partition 0: offsets 100 to 119 not committed; partition 2: offsets up "
                      "to 6 not committed since the group's last commit; they will be redelivered to the "
                      "partition's next owner"], warned
