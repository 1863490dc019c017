"""A transactional producer's aborted records are never scored, its open ones not before they commit.

Upstream payment systems and stream jobs (Kafka Streams, Flink) often write exactly-once, in
transactions: a batch they abort was rolled back and never happened. Reading read_uncommitted, the
worker scored it anyway: a card test nobody made, warned.
"""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta

import pytest

from app.admin import ensure_topics, producer
from app.faust_app import ALERTS, MARKET, TRANSACTIONS
from models.synth import generate
from tests.conftest import ROOT, consume, last_versions, settings_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LABELS = ("label", "scenario", "scenario_instance")


def test_aborted_and_open_transactions_are_not_scored(settings, start_worker, make_tick, tmp_path):
    s = settings
    events = [e for e in generate(seed=47, accounts=200, days=1.0, instruments=0,
                                  scenarios=["card_testing", "takeover"]) if "account_id" in e]
    phantom = [e for e in events if e.get("scenario") == "card_testing"]  # rolled back upstream
    real = [e for e in events if e.get("scenario") != "card_testing"]
    assert len(phantom) >= 10
    plain = tmp_path / "real.jsonl"
    plain.write_text("".join(json.dumps({k: v for k, v in e.items() if k not in LABELS}) + "\n" for e in real))

    # The analyst's prediction: a replay of what was committed, with the worker's partitions.
    replayed = tmp_path / "replayed.jsonl"
    subprocess.run([sys.executable, "-m", "app.cli", "replay", str(plain), "--alerts", str(replayed),
                    "--partitions", str(s.topic_partitions)], cwd=ROOT, env=settings_env(s), check=True,
                   capture_output=True, timeout=300)
    expected = last_versions([json.loads(line) for line in replayed.read_text().splitlines()])
    assert expected and "card_testing" not in {v[0] for v in expected.values()}

    ensure_topics(s)
    worker = start_worker(s)
    topic = s.topic(TRANSACTIONS)
    since = datetime.now(UTC) - timedelta(minutes=1)
    committing = producer(s, transactional_id=f"{topic}-upstream")
    aborting = producer(s, transactional_id=f"{topic}-rolled-back")
    committing.init_transactions()
    aborting.init_transactions()

    def send(p, batch):
        for e in batch:
            body = {k: v for k, v in e.items() if k not in LABELS}
            p.send(topic, key=body["account_id"].encode(), value=json.dumps(body).encode())

    # In time order (as generated), slice by slice: the real events commit, the card tests among them
    # are aborted, so the two interleave in each partition as an upstream's rolled-back batches would.
    slices = [events[i:i + 300] for i in range(0, len(events), 300)]
    for k, part in enumerate(slices):
        committing.begin_transaction()
        aborting.begin_transaction()
        send(committing, [e for e in part if e.get("scenario") != "card_testing"])
        send(aborting, [e for e in part if e.get("scenario") == "card_testing"])
        committing.flush()
        aborting.flush()
        aborting.abort_transaction()
        if k < len(slices) - 1:
            committing.commit_transaction()
    held = sum(1 for e in slices[-1] if e.get("scenario") != "card_testing")
    # The last slice is on the broker, its transaction open: nothing of it is scored yet.
    deadline = time.monotonic() + 60
    while worker.metric("riskwatch_events_scored_total", topic=topic) < len(real) - held:
        assert time.monotonic() < deadline, f"committed events not scored:\n{worker.tail()}"
        time.sleep(0.3)
    time.sleep(3.0)
    assert worker.metric("riskwatch_events_scored_total", topic=topic) == len(real) - held, "open ones read"
    committing.commit_transaction()
    deadline = time.monotonic() + 60
    while worker.metric("riskwatch_events_scored_total", topic=topic) < len(real):
        assert time.monotonic() < deadline, f"the committed last slice was not scored:\n{worker.tail()}"
        time.sleep(0.3)
    # Market ticks are read by Faust's consumer, which must read committed records only too.
    market = s.topic(MARKET)
    ticks = [make_tick(minutes=i, instrument=f"FUND-{i % 2}", price=100.0 + i % 3) for i in range(20)]
    for p, part in ((committing, ticks[:10]), (aborting, ticks[10:])):
        p.begin_transaction()
        for tick in part:
            p.send(market, key=tick["instrument"].encode(), value=json.dumps(tick).encode())
        p.flush()
        if p is committing:
            p.commit_transaction()
        else:
            p.abort_transaction()
    committing.close()
    aborting.close()
    deadline = time.monotonic() + 60
    while worker.metric("riskwatch_events_scored_total", topic=market) < 10:
        assert time.monotonic() < deadline, f"committed ticks not scored:\n{worker.tail()}"
        time.sleep(0.3)

    got = consume(s, ALERTS, lambda msgs: set(expected) <= {m["alert_id"] for m in msgs}, timeout=60)
    time.sleep(2.0)  # later versions of the same warnings, if any, are on the topic by now
    actual = last_versions(consume(s, ALERTS, lambda msgs: len(msgs) >= len(got), timeout=30))
    differ = {k: (expected.get(k), actual.get(k)) for k in expected.keys() | actual.keys()
              if expected.get(k) != actual.get(k)}
    assert not differ, f"replay's and the worker's warnings differ: {differ}"
    assert worker.metric("riskwatch_events_scored_total", topic=topic) == len(real), "aborted ones scored"
    assert worker.metric("riskwatch_duplicates_total", topic=topic) == 0
    assert worker.metric("riskwatch_events_scored_total", topic=market) == 10, "aborted ticks scored"
    # Commit markers sit after the last record: caught up, the lag is nothing, not one per partition.
    deadline = time.monotonic() + 30
    while worker.metric("riskwatch_consumer_lag_messages", topic=topic) != 0:
        assert time.monotonic() < deadline, "lag never reached 0 past the transactions' commit markers"
        time.sleep(0.5)

    # A Kafka replay reads as the worker does: the committed records only (ten of them ticks).
    subprocess.run([sys.executable, "-m", "app.cli", "replay", "--from-kafka", "--since", since.isoformat(),
                    "--run-id", "txn", "--alerts", str(tmp_path / "alerts.jsonl"), "--report",
                    str(tmp_path / "report")], cwd=ROOT, env=settings_env(s), check=True, capture_output=True,
                   timeout=300)
    read = json.loads((tmp_path / "report" / "report.json").read_text())["events"]
    assert (read["records"], read["transactions"]) == (len(real) + 10, len(real)), read
