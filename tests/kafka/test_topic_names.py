"""Topics named by the platform's own conventions (RISKWATCH_TOPIC_NAMES): read and written under those names only.

A payments platform's transactions are already on a topic of its own (`payments.txn.v1`, say), and
its operations name output topics their way too; before, riskwatch read and wrote only
`<prefix>risk.*`, so an existing topic had to be mirrored into one of those first.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest
from kafka import TopicPartition
from kafka.admin import NewTopic

from app.admin import admin, consumer
from app.faust_app import ALERTS, TRANSACTIONS
from models.synth import generate
from tests.conftest import ROOT, consume, produce, settings_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LABELS = ("label", "scenario", "scenario_instance")


def test_a_worker_reads_and_writes_the_topics_it_is_told_to(settings, start_worker, make_txn, tmp_path):
    ns = settings.topic_prefix.rstrip(".")
    names = {TRANSACTIONS: f"payments.{ns}.txn.v1", ALERTS: f"risk-ops.{ns}.warnings"}
    s = settings.model_copy(update={"topic_names": names})
    events = [{k: v for k, v in e.items() if k not in LABELS}
              for e in generate(seed=53, accounts=150, days=1.0, instruments=0, scenarios=["card_testing", "takeover"])
              if "account_id" in e]
    # The platform's transactions topic is its own: named wrong, the worker says so and does not start.
    typo = s.model_copy(update={"topic_names": {**names, TRANSACTIONS: f"payments.{ns}.txn.v2"}})
    refused = subprocess.run([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=settings_env(typo),
                             capture_output=True, text=True, timeout=120)
    said = refused.stderr.strip().splitlines()
    assert refused.returncode == 2 and len(said) == 1, refused.stderr[-2000:]
    assert said[0] == (f"riskwatch worker: payments.{ns}.txn.v2 (risk.transactions) named in RISKWATCH_TOPIC_NAMES "
                       f"does not exist on {s.kafka_bootstrap}: riskwatch creates no input topic it was given by "
                       "name; check the name, or create the topic first")
    client = admin(s)
    try:
        client.create_topics([NewTopic(names[TRANSACTIONS], s.topic_partitions, 1)], timeout_ms=30_000)
    finally:
        client.close()

    since = datetime.now(UTC) - timedelta(minutes=1)
    worker = start_worker(s)
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in events])
    deadline = time.monotonic() + 60
    while worker.metric("riskwatch_events_scored_total", topic=names[TRANSACTIONS]) < len(events):
        assert time.monotonic() < deadline, f"events on {names[TRANSACTIONS]} not scored:\n{worker.tail()}"
        time.sleep(0.3)
    alerts = consume(s, ALERTS, lambda got: {a["category"] for a in got} >= {"card_testing"}, timeout=30)
    assert all(a["entity_type"] == "account" for a in alerts)

    # Unkeyed records on the platform's own topic are scored where they are, not written back to it
    # (its other readers would see them twice); counted, and told once.
    unkeyed = [make_txn(minutes=i, account_id=f"acct-unkeyed-{i % 12}") for i in range(60)]
    produce(s, TRANSACTIONS, [(None, json.dumps(e).encode()) for e in unkeyed])
    topic = names[TRANSACTIONS]
    deadline = time.monotonic() + 60
    while worker.metric("riskwatch_events_scored_total", topic=topic) < len(events) + len(unkeyed):
        assert time.monotonic() < deadline, f"unkeyed events not scored:\n{worker.tail()}"
        time.sleep(0.3)
    assert worker.metric("riskwatch_rekeyed_total", topic=topic) == 0
    assert 0 < worker.metric("riskwatch_unkeyed_in_place_total", topic=topic) < len(unkeyed)
    assert worker.tail(400).count("scored where it is") == 1
    reader = consumer(s, enable_auto_commit=False)
    try:
        tps = [TopicPartition(topic, p) for p in reader.partitions_for_topic(topic)]
        assert sum(reader.end_offsets(tps).values()) == len(events) + len(unkeyed), "written back to it"
    finally:
        reader.close()

    a = admin(s)
    try:
        topics = set(a.list_topics())
    finally:
        a.close()
    assert set(names.values()) <= topics
    assert not {settings.topic(TRANSACTIONS), settings.topic(ALERTS)} & topics, "the default names were created"
    assert settings.topic("risk.deadletter") in topics, "topics not named keep the prefixed name"

    # Replay reads where the worker reads.
    subprocess.run([sys.executable, "-m", "app.cli", "replay", "--from-kafka", "--since", since.isoformat(),
                    "--run-id", "names", "--alerts", str(tmp_path / "alerts.jsonl"), "--report",
                    str(tmp_path / "report")], cwd=ROOT, env=settings_env(s), check=True, capture_output=True,
                   timeout=300)
    read = json.loads((tmp_path / "report" / "report.json").read_text())["events"]
    assert read["transactions"] == len(events) + len(unkeyed), read
