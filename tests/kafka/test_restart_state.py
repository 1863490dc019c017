"""A killed worker restarts with its per-account state and models: same event, same score."""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from app.faust_app import SCORES, TRANSACTIONS
from models.pipeline import Pipeline
from models.rules import load_catalogue
from models.schemas import Transaction
from tests.conftest import consume, produce

pytestmark = pytest.mark.kafka


def _history(make_txn: Any) -> list[dict[str, Any]]:
    events = []
    for i in range(240):
        acct = f"acct-{i % 12}"
        events.append(make_txn(account_id=acct, amount=50.0 + (i * 37) % 400, minutes=i * 13.0,
                               counterparty_id=f"shop-{i % 5}", device_id=f"dev-{acct}"))
    return events


def _reference(events: list[dict[str, Any]], partitions: int) -> dict[str, float]:
    pipe = Pipeline(load_catalogue(), partitions=partitions)
    return {e["event_id"]: pipe.process(Transaction.model_validate(e)).score for e in events}


def test_killed_worker_resumes_with_state_and_model(settings, start_worker, make_txn):
    s = settings.model_copy(update={"publish_scores": True, "model_checkpoint_every": 1})
    history = _history(make_txn)
    probe = make_txn(account_id="acct-3", amount=300.0, minutes=240 * 13.0 + 5, counterparty_id="shop-1",
                     device_id="dev-acct-3")

    first = start_worker(s)
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in history])
    consume(s, SCORES, lambda got: len(got) >= len(history), timeout=90)
    time.sleep(2.0)  # let the last changelog writes leave the producer before the crash
    first.kill()

    second = start_worker(s)
    produce(s, TRANSACTIONS, [(b"acct-3", json.dumps(probe).encode())])
    scores = consume(s, SCORES, lambda got: any(x["event_id"] == probe["event_id"] for x in got), timeout=90)
    after = next(x["score"] for x in scores if x["event_id"] == probe["event_id"])

    expected = _reference([*history, probe], s.topic_partitions)[probe["event_id"]]
    amnesiac = _reference([probe], s.topic_partitions)[probe["event_id"]]
    print(f"probe score after restart {after:.6f}, uninterrupted {expected:.6f}, without state {amnesiac:.6f}")
    assert after == pytest.approx(expected, abs=1e-9)
    assert abs(amnesiac - expected) > 1e-3, "the probe must depend on learned state for this test to mean anything"
    assert second.metric("riskwatch_events_scored_total", topic=s.topic(TRANSACTIONS)) >= 1


def test_accounts_read_back_after_a_restart_are_evicted_when_idle_without_coming_back(
        settings, start_worker, make_txn):
    """Eviction knows the accounts a restarted worker reads back, not only those it scores again.

    Before, an account idle at a restart that never transacted again stayed in the table for good,
    and every rolling restart added the accounts idle at that moment.
    """
    s = settings.model_copy(update={"state_ttl_seconds": 3600.0})
    # Forty accounts active in the first hour, then only acct-live, for two hours more.
    early = [make_txn(account_id=f"acct-{i}", minutes=float(i)) for i in range(40)]
    live = [make_txn(account_id="acct-live", minutes=60.0 + 10 * i) for i in range(12)]
    first = start_worker(s)
    # The first worker sees only the early hour: nothing is idle past the TTL yet.
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in early])
    topic = s.topic(TRANSACTIONS)
    deadline = time.monotonic() + 60
    while first.metric("riskwatch_events_scored_total", topic=topic) < len(early):
        assert time.monotonic() < deadline, first.tail()
        time.sleep(0.3)
    first.stop()  # a clean stop: state written and committed
    assert first.proc.returncode == 0

    second = start_worker(s)
    produce(s, TRANSACTIONS, [(b"acct-live", json.dumps(e).encode()) for e in live])
    deadline = time.monotonic() + 60
    while second.metric("riskwatch_evictions_total", table="accounts") < len(early):
        assert time.monotonic() < deadline, (
            f"evicted {second.metric('riskwatch_evictions_total', table='accounts')} of the {len(early)} accounts "
            f"idle for over an hour of event time:\n{second.tail()}")
        time.sleep(0.5)
    while second.metric("riskwatch_entities", table="accounts") != 1:  # the gauge moves at the next tick
        assert time.monotonic() < deadline, "only acct-live should be left"
        time.sleep(0.5)
