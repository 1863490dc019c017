"""An input topic created beforehand with its own partition count: the worker says what to set, then runs with it.

Operations teams often create topics themselves. Before, a risk.transactions of six partitions
beside the default setting of four left the worker reading back changelog partitions that do not
exist, retrying forever, scoring nothing, with only a stack trace about offsets to go on.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time

import pytest
from kafka.admin import NewPartitions, NewTopic

from app.admin import admin, ensure_topics
from app.faust_app import ALERTS, TRANSACTIONS
from tests.conftest import ROOT, consume, produce, settings_env

pytestmark = pytest.mark.kafka


def test_a_worker_refuses_a_foreign_partition_count_once_and_runs_when_told_it(settings, start_worker, make_txn):
    s = settings
    client = admin(s)
    try:
        client.create_topics([NewTopic(s.topic(TRANSACTIONS), 6, 1)], timeout_ms=30_000)
    finally:
        client.close()

    t0 = time.monotonic()
    refused = subprocess.run([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=settings_env(s),
                             capture_output=True, text=True, timeout=120)
    took = time.monotonic() - t0
    assert refused.returncode == 2, refused.stderr[-2000:]
    said = refused.stderr.strip().splitlines()
    assert said == [said[-1]] and said[0].startswith("riskwatch worker: partition counts differ"), said
    assert f"{s.topic(TRANSACTIONS)} has 6 partitions" in said[0] and "RISKWATCH_TOPIC_PARTITIONS is 4" in said[0]
    assert "set RISKWATCH_TOPIC_PARTITIONS=6." in said[0]
    client = admin(s)
    try:
        mine = sorted(t for t in client.list_topics() if t.startswith(s.topic_prefix))
    finally:
        client.close()
    assert mine == [s.topic(TRANSACTIONS)], f"nothing is created with a count that would not fit: {mine}"

    six = s.model_copy(update={"topic_partitions": 6})
    worker = start_worker(six)
    big = make_txn(amount=60000)
    events = [make_txn(minutes=i, account_id=f"acct-{i % 9}") for i in range(30)] + [big]
    produce(six, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in events])
    topic = six.topic(TRANSACTIONS)
    deadline = time.monotonic() + 60
    while worker.metric("riskwatch_events_scored_total", topic=topic) < len(events):
        assert time.monotonic() < deadline, f"scored only part of the events:\n{worker.tail()}"
        time.sleep(0.3)
    alerts = consume(six, ALERTS, lambda got: any(a["category"] == "large_transaction" for a in got))
    assert [a["event_ids"] for a in alerts if a["category"] == "large_transaction"] == [[big["event_id"]]]
    assert worker.metric("riskwatch_engine_phase", phase="running") == 1
    print(f"refused in {took:.1f} s; with RISKWATCH_TOPIC_PARTITIONS=6, {len(events)} events scored")


def test_partitions_added_to_a_running_deployments_input_are_named_at_the_next_start(settings):
    """The runbooks' advice: after partitions were added to risk.transactions, a restarted worker says what differs."""
    s = settings
    ensure_topics(s)  # a deployment that ran with 4
    client = admin(s)
    try:
        client.create_partitions({s.topic(TRANSACTIONS): NewPartitions(total_count=6)})
    finally:
        client.close()
    refused = subprocess.run([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=settings_env(s),
                             capture_output=True, text=True, timeout=120)
    assert refused.returncode == 2, refused.stderr[-2000:]
    said = refused.stderr.strip().splitlines()
    assert len(said) == 1 and f"{s.topic(TRANSACTIONS)} has 6 partitions" in said[0], said
    # The topics it made with 4 are named: their state cannot follow to 6.
    assert "set RISKWATCH_TOPIC_PARTITIONS=6 and delete first" in said[0], said
    assert all(s.topic(t) in said[0] for t in ("risk.acks", "risk.alerts.by-id", "risk.market")), said
