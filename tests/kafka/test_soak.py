"""Soak: a stream of ever-new accounts; TTL eviction keeps the accounts table and the worker's memory bounded.

Every event opens a new account and event time moves `STEP` seconds per event, so with an idle
TTL of `TTL` seconds at most TTL / STEP accounts are live at any moment; everything older must be
evicted. The number of accounts comes from RISKWATCH_SOAK_ACCOUNTS: 50,000 by default (one to
three minutes on two cores, depending on what else runs), millions by hand, e.g.

    RISKWATCH_SOAK_ACCOUNTS=3000000 .venv/bin/python -m pytest tests/kafka/test_soak.py -s
"""

from __future__ import annotations

import asyncio
import json
import os
import threading
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app.faust_app import TRANSACTIONS

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ACCOUNTS = int(os.environ.get("RISKWATCH_SOAK_ACCOUNTS", "50000"))
TTL = 200.0  # seconds of event time an idle account is kept
STEP = 0.02  # seconds of event time between events: TTL / STEP = 10,000 live accounts
LIVE = TTL / STEP
# Eviction runs every 2 s of wall time and evicts up to 10,000 accounts a tick: the table may
# hold what arrived since the last tick on top of the live ones.
MAX_ENTITIES = int(LIVE + 10_000)


def _rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def _produce(s, sent: list[int], error: list[BaseException]) -> None:
    from aiokafka import AIOKafkaProducer

    from agents.control import client_kwargs

    async def run() -> None:
        p = AIOKafkaProducer(**client_kwargs(s), acks="all", linger_ms=20, max_batch_size=256 * 1024)
        await p.start()
        start = datetime.now(UTC) - timedelta(days=30)
        try:
            for k in range(ACCOUNTS):
                account = f"soak-{k:08d}"
                e = {"event_type": "transaction", "event_id": f"sk-{k}",
                     "ts": (start + timedelta(seconds=k * STEP)).isoformat(), "account_id": account,
                     "counterparty_id": f"cp-{k % 50}", "amount": 50.0 + k % 200, "currency": "CNY",
                     "direction": "debit", "txn_type": "payment", "channel": "app", "device_id": f"d-{k}"}
                await p.send(s.topic(TRANSACTIONS), key=account.encode(), value=json.dumps(e).encode())
                sent[0] = k + 1
            await p.flush()
        finally:
            await p.stop()

    try:
        asyncio.run(run())
    except BaseException as exc:  # noqa: BLE001 - reported by the test thread
        error.append(exc)


def test_state_stays_bounded_with_ttl_eviction(settings, start_worker, capsys):
    s = settings.model_copy(update={"state_ttl_seconds": TTL})
    topic = s.topic(TRANSACTIONS)
    worker = start_worker(s)
    baseline = _rss_mb(worker.proc.pid)
    sent, error = [0], []
    producer = threading.Thread(target=_produce, args=(s, sent, error), name="soak-producer", daemon=True)
    producer.start()
    t0 = time.monotonic()
    samples: list[tuple[float, float, float]] = []  # consumed, entities, RSS
    deadline = t0 + max(600.0, ACCOUNTS / 200)
    consumed = 0.0
    while consumed < ACCOUNTS:
        assert worker.proc.poll() is None, worker.tail()
        assert not error, error
        assert time.monotonic() < deadline, f"soak consumed only {consumed} of {ACCOUNTS} events"
        consumed = worker.metric("riskwatch_events_consumed_total", topic=topic)
        samples.append((consumed, worker.metric("riskwatch_entities", table="accounts"), _rss_mb(worker.proc.pid)))
        time.sleep(1.0)
    time.sleep(2.5)  # one more eviction tick
    producer.join(60)
    elapsed = time.monotonic() - t0
    evicted = worker.metric("riskwatch_evictions_total", table="accounts")
    entities = worker.metric("riskwatch_entities", table="accounts")
    peak_entities = max(e for _, e, _ in samples)
    # Memory once the table is full (past 2 * LIVE events) against the end: a plateau, not a slope.
    settled = [r for c, _, r in samples if c >= 2 * LIVE]
    rss_settled, rss_end = (settled[0], max(settled)) if settled else (baseline, max(r for *_, r in samples))
    with capsys.disabled():
        print(f"\nsoak: {ACCOUNTS:,} accounts in {elapsed:.0f}s ({ACCOUNTS / elapsed:,.0f} events/s); "
              f"accounts held peak {peak_entities:,.0f} (bound {MAX_ENTITIES:,}), end {entities:,.0f}; "
              f"evicted {evicted:,.0f}; RSS baseline {baseline:.0f} MiB, when full {rss_settled:.0f} MiB, "
              f"max after {rss_end:.0f} MiB")
    assert peak_entities <= MAX_ENTITIES
    assert evicted >= ACCOUNTS - MAX_ENTITIES
    if ACCOUNTS >= 4 * LIVE:
        assert rss_end - rss_settled < 64, "memory kept growing after the table reached its bound"
