"""A worker far behind: the backlog stays in Kafka, the worker's memory stays bounded."""

from __future__ import annotations

import json
import time
from datetime import UTC, datetime, timedelta

import pytest

from app.faust_app import TRANSACTIONS
from tests.faults.conftest import (
    Accounting,
    account_states,
    committed_offsets,
    counters,
    report,
    rss_mb,
    wait_drained,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

FLOOD = 200_000
PADDING = 1000  # bytes per event of an unknown field: accepted, ignored, and heavy if buffered
# Buffering the backlog would cost well over FLOOD * PADDING = 200 MB; the transaction engine takes
# batches of RISKWATCH_BATCH_SIZE and aiokafka's fetch sizes bound what is prefetched.
MAX_GROWTH_MB = 150.0
CHUNK = 50_000
ACCOUNTS = 2000


def _events() -> tuple[list[bytes], list[bytes]]:
    """The flood, serialised in one go before it is sent."""
    start = datetime.now(UTC) - timedelta(days=2)
    pad = "x" * PADDING
    keys, values = [], []
    for k in range(FLOOD):
        account = f"acct-{k % ACCOUNTS:04d}"
        e = {"event_type": "transaction", "event_id": f"fl-{k:07d}",
             "ts": (start + timedelta(seconds=k)).isoformat(), "account_id": account,
             "counterparty_id": "cp-1", "amount": 100.0 + k % 50, "currency": "CNY",
             "direction": "debit", "txn_type": "payment", "channel": "app", "padding": pad}
        keys.append(account.encode())
        values.append(json.dumps(e).encode())
    return keys, values


def test_slow_consumer_keeps_memory_bounded(fault_settings, start_worker):
    """A 200,000-event backlog (about 200 MB) waits in Kafka; the worker draining it stays near an idle worker's RSS.

    The backlog is loaded before the worker starts: the transaction engine reads faster than Python
    produces, so a flood sent while it runs never falls this far behind. The baseline is an idle
    worker of the same app, measured and stopped before the flood.
    """
    from bench.kafka import produce

    s = fault_settings
    topic = s.topic(TRANSACTIONS)
    idle = start_worker(s)
    time.sleep(2.0)  # let start-up allocations settle before the baseline
    baseline = rss_mb(idle.proc.pid)
    idle.stop()
    keys, values = _events()
    for first in range(0, FLOOD, CHUNK):
        produce(s.kafka_bootstrap, topic, keys[first:first + CHUNK], values[first:first + CHUNK], batched=True)
    del keys, values

    worker = start_worker(s)
    peak, peak_backlog, max_backlog = baseline, 0.0, 0.0
    deadline = time.monotonic() + 120
    while time.monotonic() < deadline:
        assert worker.proc.poll() is None, worker.tail()
        consumed = worker.metric("riskwatch_events_consumed_total", topic=topic)
        backlog = FLOOD - consumed
        max_backlog = max(max_backlog, backlog)
        rss = rss_mb(worker.proc.pid)
        if rss > peak:
            peak, peak_backlog = rss, backlog
        if consumed >= FLOOD:
            break
        time.sleep(0.5)
    c = counters(worker, topic)
    acc = Accounting(events_in=FLOOD, scored=int(c["events_scored"]), dead_lettered=int(c["deadletters"]),
                     duplicates=int(c["duplicates"]), warnings=0, warning_messages=0,
                     notes={"consumed": int(c["events_consumed"]),
                            "left_in_kafka": FLOOD - int(c["events_consumed"]),
                            "max_backlog": int(max_backlog), "rss_baseline_mb": round(baseline),
                            "rss_peak_mb": round(peak), "backlog_at_peak": int(peak_backlog)})
    report("backlog drain", acc)
    assert max_backlog > FLOOD / 2, "the worker must have started far behind for this test to mean anything"
    assert peak - baseline < MAX_GROWTH_MB, f"worker memory grew {peak - baseline:.0f} MiB under a backlog"
    # Drained, and accounted for from Kafka rather than the worker's counters: the group committed
    # every offset, and each account's state in its changelog learned each of its events once.
    assert c["events_consumed"] >= FLOOD, f"the backlog did not drain in 120 s: {FLOOD - c['events_consumed']:.0f} left"
    wait_drained(s, timeout=60, alive=lambda: worker.proc.poll() is None or pytest.fail(worker.tail()))
    assert sum(committed_offsets(s).values()) == FLOOD
    states = account_states(s)
    assert len(states) == ACCOUNTS and all(st.n == FLOOD // ACCOUNTS for st in states.values()), \
        sorted((st.n, a) for a, st in states.items())[:5]
