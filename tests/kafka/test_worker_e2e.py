"""End to end on a real broker: transactions in, warnings and dead letters out, metrics moving."""

from __future__ import annotations

import json

import pytest

from app.faust_app import ALERTS, DEADLETTER, TRANSACTIONS
from models.schemas import Alert, DeadLetter
from tests.conftest import consume, produce

pytestmark = pytest.mark.kafka


def test_large_transaction_warns_and_bad_input_is_dead_lettered(settings, start_worker, make_txn):
    worker = start_worker(settings)
    big = make_txn(amount=60000)
    negative = make_txn(amount=-5, minutes=1)
    produce(settings, TRANSACTIONS, [
        (b"acct-1", json.dumps(big).encode()),
        (b"acct-1", b'{"event_id": "broken", "amount": '),
        (b"acct-1", json.dumps(negative).encode()),
        (b"acct-1", json.dumps(make_txn(minutes=2)).encode()),
    ])

    alerts = consume(settings, ALERTS, lambda got: any(a["category"] == "large_transaction" for a in got))
    alert = Alert.model_validate(next(a for a in alerts if a["category"] == "large_transaction"))
    assert alert.level == "medium"
    assert alert.entity_type == "account" and alert.entity_id == "acct-1"
    assert alert.event_ids == [big["event_id"]]
    assert "reporting threshold" in alert.reasons[0].message
    assert alert.reasons[0].threshold == 50000

    dead = consume(settings, DEADLETTER, lambda got: len(got) >= 2)
    letters = [DeadLetter.model_validate(d) for d in dead]
    by_reason = {d.field: d for d in letters}
    assert "JSON" in by_reason[None].reason and by_reason[None].offset == 1
    assert by_reason["amount"].reason == ("amount: Input should be greater than 0 "
                                          "(amounts are positive; `direction` says debit or credit)")
    assert by_reason["amount"].event_id == negative["event_id"]
    assert all(d.source_topic == settings.topic(TRANSACTIONS) for d in letters)

    assert worker.proc.poll() is None, "the worker must survive bad input"
    topic = settings.topic(TRANSACTIONS)
    consumed = worker.metric("riskwatch_events_consumed_total", topic=topic)
    assert consumed == 4, (f"consumed {consumed}: scored {worker.metric('riskwatch_events_scored_total', topic=topic)},"
                           f" duplicates {worker.metric('riskwatch_duplicates_total', topic=topic)}")
    assert worker.metric("riskwatch_events_scored_total", topic=topic) == 2
    assert worker.metric("riskwatch_deadletters_total", topic=topic) == 2
    assert worker.metric("riskwatch_warnings_total", category="large_transaction", level="medium") == 1
    assert worker.metric("riskwatch_processing_seconds_count", stage="score") == 2


@pytest.mark.kafka
def test_an_upgraded_worker_starts_where_fausts_group_stopped(settings, start_worker, make_txn):
    """Before the transaction engine, Faust's group (the app id) read risk.transactions: its commits are kept.

    With a prefix, as here, that group became `<prefix><app id>` and `riskwatch migrate-state` moves its offsets.
    """
    import time

    from kafka import KafkaConsumer, TopicPartition
    from kafka.structs import OffsetAndMetadata

    from app.admin import client_config, ensure_topics
    from app.migration import migrate

    s = settings
    ensure_topics(s)
    topic = s.topic(TRANSACTIONS)
    events = [make_txn(event_id=f"up-{i}", account_id="acct-up") for i in range(10)]
    produce(s, TRANSACTIONS, [(b"acct-up", json.dumps(e).encode()) for e in events])
    old = KafkaConsumer(**client_config(s), group_id=s.app_id, enable_auto_commit=False)
    try:
        partitions = old.partitions_for_topic(topic) or set()
        end = old.end_offsets([TopicPartition(topic, p) for p in partitions])
        tp = next(tp for tp, n in end.items() if n == len(events))
        old.commit({tp: OffsetAndMetadata(6, "", -1)})  # the old group had done 6 of the 10
    finally:
        old.close()
    migrate(s)
    worker = start_worker(s)
    deadline = time.monotonic() + 60
    while worker.metric("riskwatch_events_consumed_total", topic=topic) < 4:
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.3)
    time.sleep(3.0)  # anything more would be the old group's 6 read again
    consumed = worker.metric("riskwatch_events_consumed_total", topic=topic)
    assert consumed == 4, (f"consumed {consumed}: scored {worker.metric('riskwatch_events_scored_total', topic=topic)},"
                           f" duplicates {worker.metric('riskwatch_duplicates_total', topic=topic)}")


@pytest.mark.kafka
@pytest.mark.parametrize("flow_partials", ["batched", "single"])
def test_a_withdrawal_run_is_warned_through_both_stages(settings, start_worker, flow_partials):
    """Stage 1 (the engine's partials) through risk.aggregates to stage 2, in either form of the partials."""
    from app.faust_app import AGGREGATES
    from models.synth import generate

    s = settings.model_copy(update={"flow_partials": flow_partials})
    events = [e for e in generate(seed=3, accounts=100, days=1.0, instruments=0, scenarios=["liquidity_run"])
              if e["event_type"] == "transaction"]
    worker = start_worker(s)
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in events])
    alerts = consume(s, ALERTS, lambda got: any(a["category"] == "liquidity_run" for a in got), timeout=90)
    run = Alert.model_validate(next(a for a in alerts if a["category"] == "liquidity_run"))
    assert run.entity_type == "platform" and run.level in ("high", "critical")
    assert run.reasons[0].message.startswith("net outflow CNY ")
    labelled = {e["event_id"] for e in events if e.get("scenario") == "liquidity_run"}
    assert set(run.event_ids) & labelled, "the warning's sample must name some of the run's withdrawals"
    aggregates = s.topic(AGGREGATES)
    assert worker.metric("riskwatch_deadletters_total", topic=aggregates) == 0
    sent = worker.metric("riskwatch_events_published_total", topic=aggregates)
    # ~1,400 one-minute buckets over 4 partitions: one message each when single, a few per batch when batched.
    assert (sent < 200) if flow_partials == "batched" else (sent > 1000), sent
