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
