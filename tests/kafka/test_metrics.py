"""Every metric the worker exports moves when the thing it measures happens.

One worker runs a scripted stream on a real broker (module fixture `run`): each test then checks
one metric against what that stream must have caused, supervision metrics included (a plan
catalogue with second-long deadlines, acknowledgements on risk.acks, an Alertmanager that does
not answer). The same worker logs JSON, so the structured-log test reads its log. Pure pieces
(label priming, the lag arithmetic, the lag gauge's bookkeeping, event-time lag growing between
scrapes) are tested without a broker.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Iterator
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from types import SimpleNamespace
from typing import Any, NamedTuple

import pytest
from prometheus_client import CollectorRegistry
from prometheus_client.parser import text_string_to_metric_families

from agents.health import LagProbe, lag_per_partition
from app.admin import ensure_topics, producer
from app.faust_app import ACKS, AGGREGATES, ALERTS, DEADLETTER, MARKET, RULES, TRANSACTIONS
from app.metrics import Metrics
from app.settings import Settings
from models.pipeline import partition_for
from tests.conftest import ROOT, WorkerProcess, consume, free_port, produce

PARTITIONS = 4
STORM_CAP = 1
TTL = 7200.0
# Fund isolation must be acknowledged within a second and resolved within two: it escalates and goes
# overdue while the test runs. Large transactions have all the time they need.
FAST_PLANS = """
version: 1
plans:
  fund-fast:
    title: Freeze and report
    category: fund_isolation
    actions: [freeze_account, page_oncall]
    owner_team: compliance
    ack_within: 1s
    resolve_within: 2s
    runbook: docs/disposal.md#fund-isolation
  large-report:
    title: File the report
    category: large_transaction
    actions: [file_large_transaction_report]
    owner_team: compliance
    ack_within: 1h
    resolve_within: 1d
    runbook: docs/disposal.md#large-transaction
"""


def _on_partition(partition: int, base: str) -> str:
    """An account id derived from `base` that the default partitioner puts on `partition`."""
    return next(f"{base}-{i}" for i in range(1000) if partition_for(f"{base}-{i}", PARTITIONS) == partition)


Sample = tuple[str, dict[str, str], float]


def _samples(text: str) -> list[Sample]:
    return [(s.name, s.labels, s.value) for fam in text_string_to_metric_families(text) for s in fam.samples]


def _value(samples: list[Sample], name: str, **labels: str) -> float:
    """Sum of the samples of `name` whose labels include `labels`; 0 when there are none."""
    return sum(v for n, lab, v in samples if n == name and all(lab.get(k) == x for k, x in labels.items()))


# The scripted stream's accounts, all on partition 0 so the worker sees them in the order sent.
ACCOUNTS = tuple(_on_partition(0, name) for name in ("acct-big", "acct-drop", "acct-custody", "acct-late", "acct-idle"))


@dataclass
class Run:
    """What the scripted stream sent and what the worker's /metrics said afterwards."""

    settings: Settings
    worker: WorkerProcess
    samples: list[Sample]
    txn_topic: str
    market_topic: str
    sent_txns: int
    valid_txns: int
    ticks: int
    partition: int
    negative: dict[str, Any]
    negative_offset: int
    lag_seen: list[float] = field(default_factory=list)
    lag_after: list[Sample] = field(default_factory=list)
    supervised: list[Sample] = field(default_factory=list)

    def value(self, name: str, **labels: str) -> float:
        """A metric as it stood right after the scripted stream."""
        return _value(self.samples, name, **labels)


def _txn(event_id: str, account: str, ts: float, amount: float, **over: Any) -> dict[str, Any]:
    txn = {"event_type": "transaction", "event_id": event_id, "ts": datetime.fromtimestamp(ts, UTC).isoformat(),
           "account_id": account, "counterparty_id": "merchant-1", "amount": amount, "currency": "CNY",
           "direction": "debit", "txn_type": "payment", "channel": "app", "device_id": "dev-1"}
    txn.update(over)
    return txn


def _lag_series(samples: list[Sample], topic: str) -> set[str]:
    return {lab["partition"] for n, lab, _ in samples
            if n == "riskwatch_consumer_lag_messages" and lab["topic"] == topic}


def _wait(worker: WorkerProcess, ready: Any, timeout: float = 60.0) -> list[Sample]:
    deadline = time.monotonic() + timeout
    while True:
        samples = _samples(worker.metrics())
        if ready(samples):
            return samples
        if time.monotonic() > deadline:
            raise AssertionError(f"metrics never reached the expected state:\n{worker.tail()}")
        time.sleep(0.3)


@pytest.fixture(scope="module")
def run(kafka_bootstrap: str, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Run]:
    """Start one worker (JSON logs, storm cap 1/min, 2 h TTL), feed it the scripted stream, record /metrics."""
    tmp = tmp_path_factory.mktemp("metrics")
    ns = f"t{uuid.uuid4().hex[:10]}."
    plans = tmp / "plans.yaml"
    plans.write_text(FAST_PLANS)
    s = Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=ns, app_id=f"rw-{ns[:-1]}", data_dir=tmp / "data",
                 metrics_port=free_port(), web_port=free_port(), topic_partitions=PARTITIONS,
                 storm_cap_per_minute=STORM_CAP, state_ttl_seconds=TTL, log_json=True, plans_file=plans,
                 escalation_check_seconds=0.5, alertmanager_url=f"http://127.0.0.1:{free_port()}")
    ensure_topics(s)
    worker = WorkerProcess(s, tmp / "worker.log")
    try:
        worker.wait_ready()
        yield _script(s, worker)
    finally:
        worker.stop()


def _script(s: Settings, worker: WorkerProcess) -> Run:
    p = 0  # the partition of ACCOUNTS
    big, drop, custody, late, idle = ACCOUNTS
    # Ten minutes ago, at the start of a minute: the storm cap counts per event-time minute.
    t = (time.time() - 600) // 60 * 60 + 5
    eid = f"m{uuid.uuid4().hex[:6]}"
    fund = _txn(f"{eid}-fund", custody, t + 2, 1000.0, account_kind="custody", counterparty_kind="platform_own")
    negative = _txn(f"{eid}-neg", big, t + 3, -5.0)
    stream: list[tuple[str, bytes]] = [
        (idle, json.dumps(_txn(f"{eid}-idle", idle, t - 3 * 3600, 80.0)).encode()),   # idle past the TTL: evicted
        (big, json.dumps(_txn(f"{eid}-big1", big, t, 60000.0)).encode()),            # new large_transaction
        (drop, json.dumps(_txn(f"{eid}-drop", drop, t + 1, 65000.0)).encode()),      # same minute: storm-capped
        (big, json.dumps(_txn(f"{eid}-big2", big, t + 60, 70000.0)).encode()),       # update of the first warning
        (custody, json.dumps(fund).encode()),                                          # new fund_isolation, critical
        (custody, json.dumps(fund).encode()),                                          # duplicate
        (late, json.dumps(_txn(f"{eid}-late1", late, t, 90.0)).encode()),
        (late, json.dumps(_txn(f"{eid}-late2", late, t - 3700, 90.0)).encode()),      # over an hour behind: late
        (big, b'{"event_id": "broken", "amount": '),                                  # dead letter: invalid_json
        (big, json.dumps(negative).encode()),                                          # dead letter: amount
    ]
    negative_offset = len(stream) - 1
    prod = producer(s)
    try:
        for key, value in stream:
            prod.send(s.topic(TRANSACTIONS), key=key.encode(), value=value, partition=p)
        ticks = [{"event_type": "market", "event_id": f"{eid}-k{i}", "instrument": "FUND-X", "price": 100.0 + i % 2,
                  "ts": datetime.fromtimestamp(t + 30 * i, UTC).isoformat()} for i in range(3)]
        for tick in ticks:
            prod.send(s.topic(MARKET), key=b"FUND-X", value=json.dumps(tick).encode())
        rules = (ROOT / "deploy" / "rules.yaml").read_text().replace("version: 1\n", "version: 2\n", 1)
        prod.send(s.topic(RULES), key=b"catalogue", value=rules.encode(), partition=0)
        prod.send(s.topic(RULES), key=b"catalogue", value=b"version: 3\nrules: {bogus: {category: x, level: high}}\n",
                  partition=0)
        prod.flush(30)
    finally:
        prod.close()

    txn_topic, market_topic = s.topic(TRANSACTIONS), s.topic(MARKET)
    accounts_after_eviction = 4  # big, drop, custody, late: idle is evicted by the 2-second timer

    def settled(samples: list[Sample]) -> bool:
        return (_value(samples, "riskwatch_events_consumed_total", topic=txn_topic) == len(stream)
                and _value(samples, "riskwatch_score_count", detector="market") == len(ticks)
                and _value(samples, "riskwatch_rules_version") == 2
                and _value(samples, "riskwatch_rules_rejected_total") == 1
                and _value(samples, "riskwatch_evictions_total", table="accounts") >= 1
                and _value(samples, "riskwatch_entities", table="accounts") == accounts_after_eviction
                and _value(samples, "riskwatch_entities", table="instruments") == 1
                and _value(samples, "riskwatch_events_published_total", topic=s.topic(AGGREGATES)) > 0
                and _value(samples, "riskwatch_top_entity_warnings") == 2
                and _value(samples, "riskwatch_consumer_lag_messages", topic=txn_topic) == 0
                and len(_lag_series(samples, txn_topic)) == PARTITIONS)

    samples = _wait(worker, settled)
    r = Run(s, worker, samples, txn_topic, market_topic, sent_txns=len(stream), valid_txns=len(stream) - 2,
            ticks=len(ticks), partition=p, negative=negative, negative_offset=negative_offset)
    _supervise(r)
    _burst(r)
    return r


def _supervise(r: Run) -> None:
    """Acknowledge, then resolve the large-transaction warning; leave fund isolation to escalate and go overdue."""
    alerts = consume(r.settings, ALERTS, lambda got: len(got) >= 3)
    large = next(a["alert_id"] for a in alerts if a["category"] == "large_transaction")
    now = datetime.now(UTC).isoformat()
    acts = [{"alert_id": large, "action": "ack", "by": "lin", "ts": now},
            {"alert_id": large, "action": "resolve", "by": "lin", "verdict": "false_positive", "ts": now}]
    produce(r.settings, ACKS, [(large.encode(), json.dumps(a).encode()) for a in acts])
    r.supervised = _wait(r.worker, lambda s: (
        _value(s, "riskwatch_verdicts_total", verdict="false_positive") == 1
        and _value(s, "riskwatch_overdue_plans") == 1
        and _value(s, "riskwatch_escalations_total", plan="fund-fast") == 1
        # The open-alert gauges are refreshed by the deadline timer, a moment after the acts land.
        and _value(s, "riskwatch_open_alerts", level="medium") == 0
        and _value(s, "riskwatch_cases", status="resolved") == 1
        and _value(s, "riskwatch_pages_total", result="retry") > 0))


def _burst(r: Run) -> None:
    """Send more than the worker can take at once, watching consumer lag rise and fall back to zero.

    The burst is loaded with hand-filled aiokafka batches: the worker reads faster than
    kafka-python's producer writes, so a burst sent message by message never builds a lag.
    """
    from bench.kafka import produce

    base = time.time() - 300
    for chunk in range(4):
        keys, values = [], []
        for i in range(40_000):
            acct = f"burst-{i % 64}"
            txn = _txn(f"b{chunk}-{i}-{uuid.uuid4().hex[:6]}", acct, base + i * 0.01, 50.0 + i % 9)
            keys.append(acct.encode())
            values.append(json.dumps(txn).encode())
        produce(r.settings.kafka_bootstrap, r.settings.topic(TRANSACTIONS), keys, values, batched=True)
        deadline = time.monotonic() + 5
        while time.monotonic() < deadline:
            r.lag_seen.append(r.worker.metric("riskwatch_consumer_lag_messages", topic=r.txn_topic))
            if max(r.lag_seen) > 0:
                break
            time.sleep(0.2)
        if max(r.lag_seen) > 0:
            break
    r.lag_after = _wait(r.worker, lambda s: _value(s, "riskwatch_consumer_lag_messages", topic=r.txn_topic) == 0,
                        timeout=120)


# --------------------------------------------------------------------------- input and output counts
@pytest.mark.kafka
def test_events_consumed_counts_every_input_including_bad_ones(run: Run) -> None:
    assert run.value("riskwatch_events_consumed_total", topic=run.txn_topic) == run.sent_txns
    assert run.value("riskwatch_events_consumed_total", topic=run.market_topic) == run.ticks


@pytest.mark.kafka
def test_events_scored_counts_valid_inputs_scored_once(run: Run) -> None:
    # valid_txns includes the duplicate, which is not scored again
    assert run.value("riskwatch_events_scored_total", topic=run.txn_topic) == run.valid_txns - 1
    assert run.value("riskwatch_events_scored_total", topic=run.market_topic) == run.ticks


@pytest.mark.kafka
def test_events_published_by_output_topic(run: Run) -> None:
    s = run.settings
    assert run.value("riskwatch_events_published_total", topic=s.topic(ALERTS)) == 3  # new, update, fund isolation
    assert run.value("riskwatch_events_published_total", topic=s.topic(DEADLETTER)) == 3  # 2 inputs, 1 catalogue
    assert run.value("riskwatch_events_published_total", topic=s.topic(AGGREGATES)) > 0


@pytest.mark.kafka
def test_dead_letters_by_topic_and_reason(run: Run) -> None:
    assert run.value("riskwatch_deadletters_total", topic=run.txn_topic, reason="invalid_json") == 1
    assert run.value("riskwatch_deadletters_total", topic=run.txn_topic, reason="amount") == 1
    assert run.value("riskwatch_deadletters_total", topic=run.settings.topic(RULES), reason="rules") == 1


@pytest.mark.kafka
def test_duplicates_and_late_events(run: Run) -> None:
    assert run.value("riskwatch_duplicates_total", topic=run.txn_topic) == 1
    assert run.value("riskwatch_late_events_total", topic=run.txn_topic) == 1


# --------------------------------------------------------------------------- warnings
@pytest.mark.kafka
def test_warnings_by_category_and_level(run: Run) -> None:
    assert run.value("riskwatch_warnings_total", category="large_transaction", level="medium") == 1
    assert run.value("riskwatch_warnings_total", category="fund_isolation", level="critical") == 1
    assert run.value("riskwatch_warnings_total") == 2


@pytest.mark.kafka
def test_warning_updates_by_category(run: Run) -> None:
    assert run.value("riskwatch_warning_updates_total", category="large_transaction") == 1


@pytest.mark.kafka
def test_storm_cap_drops_by_category(run: Run) -> None:
    assert run.value("riskwatch_storm_dropped_total", category="large_transaction") == 1


@pytest.mark.kafka
def test_rule_hits_count_findings_per_rule_before_dedup(run: Run) -> None:
    assert run.value("riskwatch_rule_hits_total", rule="rule:large_transaction") == 3
    assert run.value("riskwatch_rule_hits_total", rule="rule:fund_isolation") == 1


@pytest.mark.kafka
def test_event_to_warning_latency_histogram(run: Run) -> None:
    count = run.value("riskwatch_event_to_warning_seconds_count")
    assert count == 3
    # The events are about ten minutes old, so each warning is published ten minutes after its event.
    assert 500 < run.value("riskwatch_event_to_warning_seconds_sum") / count < 1800
    assert run.value("riskwatch_event_to_warning_seconds_bucket", le="60.0") == 0


# --------------------------------------------------------------------------- processing and detectors
@pytest.mark.kafka
def test_processing_time_per_stage(run: Run) -> None:
    decoded = run.valid_txns  # the duplicate is decoded, then recognised
    assert run.value("riskwatch_processing_seconds_count", stage="decode") == decoded
    assert run.value("riskwatch_processing_seconds_count", stage="score") == decoded - 1
    assert run.value("riskwatch_processing_seconds_count", stage="publish") == decoded - 1
    assert run.value("riskwatch_processing_seconds_count", stage="score_market") == run.ticks
    assert run.value("riskwatch_processing_seconds_sum", stage="score") > 0
    # The transaction engine's batches: every record went through one, and each batch was written.
    assert run.value("riskwatch_batch_records_sum") == run.sent_txns
    assert 1 <= run.value("riskwatch_batch_records_count") <= run.sent_txns
    assert run.value("riskwatch_batch_seconds_count", phase="process") == run.value("riskwatch_batch_records_count")
    assert run.value("riskwatch_batch_seconds_count", phase="write") >= 1


@pytest.mark.kafka
def test_score_distribution_per_detector(run: Run) -> None:
    assert run.value("riskwatch_score_count", detector="surprise") == run.valid_txns - 1
    assert run.value("riskwatch_score_count", detector="market") == run.ticks
    assert run.value("riskwatch_score_bucket", detector="surprise", le="1.0") == run.valid_txns - 1


@pytest.mark.kafka
def test_table_sizes_and_evictions(run: Run) -> None:
    assert run.value("riskwatch_entities", table="accounts") == 4
    assert run.value("riskwatch_entities", table="instruments") == 1
    assert run.value("riskwatch_evictions_total", table="accounts") == 1


@pytest.mark.kafka
def test_rules_version_in_force_and_rejected_versions(run: Run) -> None:
    assert run.value("riskwatch_rules_version") == 2
    assert run.value("riskwatch_rules_rejected_total") == 1


@pytest.mark.kafka
def test_top_entities_count_distinct_published_warnings(run: Run) -> None:
    big, drop, custody = ACCOUNTS[:3]
    assert run.value("riskwatch_top_entity_warnings", entity_type="account", entity_id=big) == 1  # new + update
    assert run.value("riskwatch_top_entity_warnings", entity_type="account", entity_id=custody) == 1
    assert not any(lab.get("entity_id") == drop for _, lab, _ in run.samples)  # storm-capped: never published


# --------------------------------------------------------------------------- lag
@pytest.mark.kafka
def test_event_time_lag_is_wall_clock_minus_newest_event_time(run: Run) -> None:
    # Read before the burst: the script's newest transaction is nine to ten minutes old.
    lag = run.value("riskwatch_event_time_lag_seconds", topic=run.txn_topic)
    assert 500 < lag < 1800
    assert run.value("riskwatch_event_time_lag_seconds", topic=run.market_topic) > 400


@pytest.mark.kafka
def test_consumer_lag_per_partition_rises_under_a_burst_and_returns_to_zero(run: Run) -> None:
    assert _lag_series(run.samples, run.txn_topic) == {str(i) for i in range(PARTITIONS)}
    assert max(run.lag_seen) > 0, f"lag never rose above zero during the burst: {run.lag_seen}"
    print(f"\nconsumer lag during the burst: max {max(run.lag_seen):.0f} messages over {len(run.lag_seen)} reads")
    assert _value(run.lag_after, "riskwatch_consumer_lag_messages", topic=run.txn_topic) == 0


# --------------------------------------------------------------------------- supervision
@pytest.mark.kafka
def test_contingency_triggers_by_plan(run: Run) -> None:
    assert _value(run.supervised, "riskwatch_contingency_triggers_total", plan="fund-fast") == 1
    assert _value(run.supervised, "riskwatch_contingency_triggers_total", plan="large-report") == 1


@pytest.mark.kafka
def test_acknowledgements_and_time_to_ack(run: Run) -> None:
    assert _value(run.supervised, "riskwatch_acks_total", action="ack", outcome="applied") == 1
    assert _value(run.supervised, "riskwatch_acks_total", action="resolve", outcome="applied") == 1
    assert _value(run.supervised, "riskwatch_time_to_ack_seconds_count") == 1
    # By the team answerable: the large-transaction plan's owner.
    [team] = {lab["team"] for n, lab, v in run.supervised if n == "riskwatch_case_time_to_ack_seconds_count" and v}
    assert _value(run.supervised, "riskwatch_case_time_to_ack_seconds_count", team=team) == 1
    assert _value(run.supervised, "riskwatch_case_time_to_resolve_seconds_count", team=team) == 1
    assert _value(run.supervised, "riskwatch_cases", status="resolved", team=team) == 1
    assert _value(run.supervised, "riskwatch_cases", status="escalated") == 1  # fund isolation, left alone


@pytest.mark.kafka
def test_verdicts_by_detector(run: Run) -> None:
    assert _value(run.supervised, "riskwatch_verdicts_total", detector="rule:large_transaction",
                  verdict="false_positive") == 1


@pytest.mark.kafka
def test_escalation_overdue_and_open_alerts(run: Run) -> None:
    assert _value(run.supervised, "riskwatch_escalations_total", plan="fund-fast") == 1
    assert _value(run.supervised, "riskwatch_overdue_plans") == 1
    assert _value(run.supervised, "riskwatch_open_alerts", level="critical") == 1
    assert _value(run.supervised, "riskwatch_open_alerts", level="medium") == 0  # resolved


@pytest.mark.kafka
def test_pages_retried_while_alertmanager_does_not_answer(run: Run) -> None:
    assert _value(run.supervised, "riskwatch_pages_total", result="retry") > 0
    assert _value(run.supervised, "riskwatch_pages_total", result="sent") == 0


# --------------------------------------------------------------------------- structured logs
@pytest.mark.kafka
def test_dead_lettered_event_logs_one_json_line_with_its_origin(run: Run) -> None:
    lines = [line for line in run.worker.log_path.read_text().splitlines() if line.strip()]
    records = [json.loads(line) for line in lines]  # every line, Faust's own included, is JSON
    assert any(r["logger"].startswith("faust.") for r in records)
    mine = [r for r in records if r.get("event_id") == run.negative["event_id"]]
    assert len(mine) == 1
    assert mine[0]["level"] == "WARNING"
    assert mine[0]["topic"] == run.txn_topic
    assert mine[0]["partition"] == run.partition
    assert mine[0]["offset"] == run.negative_offset
    assert "amount" in mine[0]["reason"]


# --------------------------------------------------------------------------- without a broker
def test_every_metric_has_a_test_here() -> None:
    tested = {"riskwatch_events_consumed", "riskwatch_events_scored", "riskwatch_events_published",
              "riskwatch_deadletters", "riskwatch_duplicates", "riskwatch_late_events", "riskwatch_warnings",
              "riskwatch_warning_updates", "riskwatch_storm_dropped", "riskwatch_rule_hits",
              "riskwatch_processing_seconds", "riskwatch_event_to_warning_seconds",
              "riskwatch_event_time_lag_seconds", "riskwatch_consumer_lag_messages", "riskwatch_score",
              "riskwatch_entities", "riskwatch_evictions", "riskwatch_rules_version", "riskwatch_rules_rejected",
              "riskwatch_contingency_triggers", "riskwatch_acks", "riskwatch_time_to_ack_seconds",
              "riskwatch_verdicts", "riskwatch_escalations", "riskwatch_overdue_plans", "riskwatch_open_alerts",
              "riskwatch_pages", "riskwatch_top_entity_warnings", "riskwatch_batch_seconds",
              "riskwatch_batch_records", "riskwatch_feedback_factor", "riskwatch_feedback_adaptations",
              "riskwatch_feedback_verdicts",
              "riskwatch_state_quarantined",  # moved on a real worker in tests/kafka/test_quarantine.py
              "riskwatch_redelivered",  # moved on a real worker in tests/faults/test_kill9.py
              "riskwatch_rekeyed",  # moved on a real worker in tests/kafka/test_unkeyed_producer.py
              "riskwatch_unkeyed_in_place",  # moved on a real worker in tests/kafka/test_topic_names.py
              # moved on a real worker in tests/kafka/test_feedback_e2e.py (needs a few thousand events)
              "riskwatch_model_budget_per_1000", "riskwatch_model_operating_per_1000",
              # moved in tests/unit/test_lists.py (the follower) and on a real worker in tests/kafka/test_lists_e2e.py
              "riskwatch_list_entries", "riskwatch_list_hits", "riskwatch_list_changes", "riskwatch_list_rejected",
              "riskwatch_list_suppressed",
              "riskwatch_cases", "riskwatch_case_time_to_ack_seconds", "riskwatch_case_time_to_resolve_seconds",
              "riskwatch_console_signins",  # moved in tests/kafka/test_console.py and test_console_browser.py
              # moved in tests/unit/test_checkpoint.py, read on a real worker in tests/kafka/test_console_producer.py
              "riskwatch_engine_phase"}
    families = {fam.name for fam in Metrics(CollectorRegistry()).registry.collect()}
    assert families - tested == set(), "a new metric needs a test here that makes it move"
    assert tested <= families


def test_feedback_factor_adaptations_and_verdict_records() -> None:
    """The follower sets the factor and counts records; the disposal agent counts the adaptations it audits.

    (On a real worker and broker: tests/kafka/test_feedback_e2e.py.)
    """
    import asyncio
    from unittest.mock import AsyncMock

    from agents.disposal import Disposal
    from agents.feedback import FeedbackFollower
    from app.faust_app import AUDIT, FEEDBACK
    from models.feedback import note_for

    m = Metrics(CollectorRegistry())
    topics = {AUDIT: SimpleNamespace(send=AsyncMock(), get_topic_name=lambda: "audit"),
              FEEDBACK: SimpleNamespace(send=AsyncMock(), get_topic_name=lambda: "feedback")}
    rt = SimpleNamespace(metrics=m, settings=SimpleNamespace(topic=lambda name: name), topics=topics)
    follower = FeedbackFollower(rt, None)  # type: ignore[arg-type]
    follower.ready.set()
    disposal = SimpleNamespace(feedback=follower, rt=rt, m=m, _published=lambda logical: None)
    notes = [note_for(f"a{i}", "surprise", ["hour"], "false_positive", 1.79e9 + i, by="alice") for i in range(6)]
    for n in notes:
        assert n is not None
        asyncio.run(Disposal.feed_back(disposal, n, 1.79e9 + 100))  # type: ignore[arg-type]
    get = m.registry.get_sample_value
    assert get("riskwatch_feedback_factor", {"detector": "surprise", "code": "hour"}) == 0.4
    assert get("riskwatch_feedback_adaptations_total", {"detector": "surprise", "code": "hour",
                                                        "direction": "down"}) == 2
    assert topics[FEEDBACK].send.await_count == 6 and topics[AUDIT].send.await_count == 2
    follower.handle(notes[0].model_dump_json().encode(), 0)  # the disposal agent's own record, read back
    follower.handle(b"{}", 1)
    assert get("riskwatch_feedback_verdicts_total", {"result": "repeated"}) == 1
    assert get("riskwatch_feedback_verdicts_total", {"result": "invalid"}) == 1


def test_prime_creates_series_at_zero_so_the_first_increment_is_a_rate() -> None:
    m = Metrics(CollectorRegistry())
    m.prime(inputs=["in"], outputs=["out"], categories=["velocity"], levels=["high", "low"], stages=["score"],
            detectors=["surprise"], tables=["accounts"])
    get = m.registry.get_sample_value
    assert get("riskwatch_warnings_total", {"category": "velocity", "level": "low"}) == 0
    assert get("riskwatch_events_consumed_total", {"topic": "in"}) == 0
    assert get("riskwatch_events_published_total", {"topic": "out"}) == 0
    assert get("riskwatch_storm_dropped_total", {"category": "velocity"}) == 0
    assert get("riskwatch_processing_seconds_count", {"stage": "score"}) == 0
    assert get("riskwatch_score_count", {"detector": "surprise"}) == 0
    assert get("riskwatch_entities", {"table": "accounts"}) == 0
    assert get("riskwatch_warnings_total", {"category": "velocity", "level": "medium"}) is None


def test_event_time_lag_keeps_growing_while_a_topic_is_silent() -> None:
    m = Metrics(CollectorRegistry())
    m.saw_event_time("in", time.time() - 60)
    m.saw_event_time("in", time.time() - 3600)  # an older event does not make the topic look staler
    first = m.registry.get_sample_value("riskwatch_event_time_lag_seconds", {"topic": "in"})
    time.sleep(0.05)
    second = m.registry.get_sample_value("riskwatch_event_time_lag_seconds", {"topic": "in"})
    assert first is not None and second is not None
    assert 59 < first < second < 120


class _TP(NamedTuple):
    topic: str
    partition: int


def _tp(topic: str, partition: int) -> _TP:
    return _TP(topic, partition)


def test_lag_is_end_minus_committed_or_minus_earliest_when_never_committed() -> None:
    a0, a1, a2 = _tp("in", 0), _tp("in", 1), _tp("in", 2)
    lag = lag_per_partition([a0, a1, a2], end={a0: 100, a1: 50}, committed={a0: 90, a1: None},
                            earliest={a1: 20})
    assert lag == {("in", 0): 10, ("in", 1): 30}  # a2 has no end offset yet: not reported


class _Consumer:
    def __init__(self) -> None:
        self.tps = {_tp("in", 0): 10, _tp("in", 1): 4, _tp("rw-test-accounts-changelog", 0): 99}
        self._committed_offset: dict[Any, int | None] = {}

    def assignment(self) -> set[Any]:
        return set(self.tps)

    def highwater(self, tp: Any) -> int:
        return self.tps[tp]

    async def earliest_offsets(self, *tps: Any) -> dict[Any, int]:
        return dict.fromkeys(tps, 0)


def test_lag_probe_skips_faust_topics_and_drops_partitions_and_topics_no_longer_read(tmp_path: Path) -> None:
    import asyncio

    consumer = _Consumer()
    m = Metrics(CollectorRegistry())
    rt = SimpleNamespace(app=SimpleNamespace(consumer=consumer), metrics=m, extras={},
                         settings=Settings(app_id="rw-test", data_dir=tmp_path))
    probe = LagProbe(rt)  # type: ignore[arg-type]
    m.saw_event_time("in", time.time())
    m.saw_event_time("moved-away", time.time())  # a topic whose partitions all went to another worker
    asyncio.run(probe.measure())
    get = m.registry.get_sample_value
    assert get("riskwatch_consumer_lag_messages", {"topic": "in", "partition": "0"}) == 10
    assert get("riskwatch_event_time_lag_seconds", {"topic": "moved-away"}) is None
    assert get("riskwatch_event_time_lag_seconds", {"topic": "in"}) is not None
    assert get("riskwatch_consumer_lag_messages", {"topic": "rw-test-accounts-changelog", "partition": "0"}) is None
    del consumer.tps[_tp("in", 1)]
    asyncio.run(probe.measure())
    assert get("riskwatch_consumer_lag_messages", {"topic": "in", "partition": "1"}) is None


def test_top_entities_keep_the_n_most_warned_entities_of_the_last_hour() -> None:
    from agents.health import TopEntities
    from models.schemas import Alert

    now = [1000.0]
    m = Metrics(CollectorRegistry())
    top = TopEntities(m.top_entities, top=2, window=3600.0, clock=lambda: now[0])

    def warn(alert_id: str, entity: str) -> None:
        top.on_alert(Alert(alert_id=alert_id, created_at=datetime.now(UTC), event_ts=datetime.now(UTC),
                           entity_type="account", entity_id=entity, category="velocity", level="high", score=0.9,
                           reasons=[], event_ids=["e"], detector="rule:velocity"))

    warn("a1", "acct-1")
    warn("a1", "acct-1")  # an update of the same warning counts once
    now[0] += 1800
    warn("a2", "acct-2")
    warn("a3", "acct-2")
    warn("a4", "acct-3")
    assert top.refresh() == {("account", "acct-2"): 2, ("account", "acct-1"): 1}  # the top two; acct-3 ties
    now[0] += 1801  # acct-1's warning is now more than an hour old
    assert top.refresh() == {("account", "acct-2"): 2, ("account", "acct-3"): 1}
    get = m.registry.get_sample_value
    assert get("riskwatch_top_entity_warnings", {"entity_type": "account", "entity_id": "acct-1"}) is None
    assert get("riskwatch_top_entity_warnings", {"entity_type": "account", "entity_id": "acct-2"}) == 2


@pytest.mark.parametrize("values", [
    [0.0, 0.1, 0.1000001, 0.25, 0.5, 0.99, 0.995, 1.0, 1.5, -0.2],
    [0.0, 0.1, 0.1000001, 0.25, 0.5, 0.99, 0.995, 1.0, 1.5, -0.2, float("nan")],  # NaN: in the sum, in no bucket
    [0.3, float("inf"), 1e300],
])
def test_observe_many_matches_observe_value_by_value(values: list[float]) -> None:
    """The transaction engine's bulk observe must export exactly what one observe() per value does."""
    from app.metrics import observe_many

    one, many = Metrics(CollectorRegistry()), Metrics(CollectorRegistry())
    for v in values:
        one.scores.labels("surprise").observe(v)
    observe_many(many.scores.labels("surprise"), values)

    def samples(m: Metrics) -> list[tuple[str, dict[str, str], float]]:
        return [(s.name, s.labels, s.value) for s in m.scores.collect()[0].samples if not s.name.endswith("_created")]

    a, b = samples(one), samples(many)
    assert [x[:2] for x in a] == [x[:2] for x in b]
    for (name, labels, x), (_, _, y) in zip(a, b, strict=True):
        assert (math.isnan(x) and math.isnan(y)) or x == y, (name, labels, x, y)
