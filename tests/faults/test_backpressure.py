"""A slow consumer under a flood: the backlog stays in Kafka, the worker's memory stays bounded."""

from __future__ import annotations

import asyncio
import json
import threading
import time
from datetime import UTC, datetime, timedelta

import pytest

from app.faust_app import TRANSACTIONS
from tests.faults.conftest import Accounting, counters, report, rss_mb

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FLOOD = 200_000
PADDING = 1000  # bytes per event of an unknown field: accepted, ignored, and heavy if buffered
# Buffering the backlog would cost well over FLOOD * PADDING = 200 MB; Faust's bounded stream
# buffers (stream_buffer_maxsize per partition) and fetch sizes keep growth to a few tens of MB.
MAX_GROWTH_MB = 150.0


def _flood(s, stop: threading.Event, sent: list[int]) -> None:
    # aiokafka: several times kafka-python's rate on a busy machine, so the flood outruns the worker.
    from aiokafka import AIOKafkaProducer

    from agents.control import client_kwargs

    async def run() -> None:
        p = AIOKafkaProducer(**client_kwargs(s), acks="all", linger_ms=20, max_batch_size=512 * 1024)
        await p.start()
        start = datetime.now(UTC) - timedelta(days=2)
        pad = "x" * PADDING
        try:
            for k in range(FLOOD):
                if stop.is_set():
                    break
                account = f"acct-{k % 2000:04d}"
                e = {"event_type": "transaction", "event_id": f"fl-{k:07d}",
                     "ts": (start + timedelta(seconds=k)).isoformat(), "account_id": account,
                     "counterparty_id": "cp-1", "amount": 100.0 + k % 50, "currency": "CNY",
                     "direction": "debit", "txn_type": "payment", "channel": "app", "padding": pad}
                await p.send(s.topic(TRANSACTIONS), key=account.encode(), value=json.dumps(e).encode())
                sent[0] = k + 1
            await p.flush()
        finally:
            await p.stop()

    asyncio.run(run())


def test_slow_consumer_keeps_memory_bounded(fault_settings, start_worker):
    s = fault_settings
    topic = s.topic(TRANSACTIONS)
    worker = start_worker(s)
    time.sleep(2.0)  # let start-up allocations settle before the baseline
    baseline = rss_mb(worker.proc.pid)

    stop = threading.Event()
    sent = [0]
    flood = threading.Thread(target=_flood, args=(s, stop, sent), name="flood", daemon=True)
    flood.start()
    peak, peak_backlog, max_backlog = baseline, 0.0, 0.0
    try:
        deadline = time.monotonic() + 120
        settle: float | None = None  # keep sampling a few seconds after the flood is in
        while time.monotonic() < deadline and (settle is None or time.monotonic() < settle):
            if settle is None and not flood.is_alive():
                settle = time.monotonic() + 5.0
            assert worker.proc.poll() is None, worker.tail()
            consumed = worker.metric("riskwatch_events_consumed_total", topic=topic)
            backlog = sent[0] - consumed
            max_backlog = max(max_backlog, backlog)
            rss = rss_mb(worker.proc.pid)
            if rss > peak:
                peak, peak_backlog = rss, backlog
            time.sleep(0.5)
        flood_done = not flood.is_alive()
    finally:
        stop.set()
        flood.join(60)
    # The worker is still busy with the backlog, so the counters move while they are scraped: the
    # exact identity is checked by the fault tests that drain; this one is about memory.
    c = counters(worker, topic)
    acc = Accounting(events_in=sent[0], scored=int(c["events_scored"]), dead_lettered=int(c["deadletters"]),
                     duplicates=int(c["duplicates"]), warnings=0, warning_messages=0,
                     notes={"consumed": int(c["events_consumed"]),
                            "left_in_kafka": sent[0] - int(c["events_consumed"]),
                            "max_backlog": int(max_backlog), "rss_baseline_mb": round(baseline),
                            "rss_peak_mb": round(peak), "backlog_at_peak": int(peak_backlog)})
    report("slow consumer", acc)
    assert flood_done and sent[0] == FLOOD, "the flood must be fully produced"
    assert max_backlog > FLOOD / 2, "the consumer must have fallen far behind for this test to mean anything"
    assert peak - baseline < MAX_GROWTH_MB, f"worker memory grew {peak - baseline:.0f} MiB under a backlog"
