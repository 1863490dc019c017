"""The events behind a case, read back from the real broker (agents/case.py): found, bounded, and said when not.

The target account's events sit in its partition of risk.transactions among 20,000 records of
other accounts on the same partition; one id never existed. The lookup reads backwards from the
warning's publication, finds the three real events, says which one it could not, and with a
smaller budget stops early and says so. Prints the time taken (the cost of opening a case).
"""

from __future__ import annotations

import asyncio
import json
import time
from collections.abc import Callable
from typing import Any

import pytest
from kafka.partitioner.default import murmur2
from pydantic import SecretStr

from agents.case import EventLookup
from app.admin import ensure_topics
from app.faust_app import TRANSACTIONS
from app.settings import Settings
from tests.conftest import produce

FILLER = 20_000


def _partition(key: str, partitions: int) -> int:
    return (murmur2(key.encode()) & 0x7FFFFFFF) % partitions


@pytest.mark.kafka
def test_events_behind_a_warning_are_read_back_from_its_partition_within_a_bounded_scan(
        settings: Settings, make_txn: Callable[..., dict[str, Any]]) -> None:
    ensure_topics(settings)
    target = "acct-target"
    p = _partition(target, settings.topic_partitions)
    neighbours = [k for k in (f"acct-{i}" for i in range(2_000)) if _partition(k, settings.topic_partitions) == p]
    first = [make_txn(account_id=target, amount=10.0 + i, counterparty_id=f"cp-{i}", device_id="dev-x")
             for i in range(2)]
    filler = [make_txn(account_id=neighbours[i % len(neighbours)]) for i in range(FILLER)]
    last = make_txn(account_id=target, amount=99.0, counterparty_id="cp-last", channel="web")
    produce(settings, TRANSACTIONS, [(t["account_id"].encode(), json.dumps(t).encode()) for t in
                                     [*first, *filler, last]])
    alert = {"alert_id": "ab" * 12, "entity_type": "account", "entity_id": target, "published_at": time.time() + 1,
             "event_ids": [first[0]["event_id"], first[1]["event_id"], last["event_id"], "never-sent"]}

    started = time.monotonic()
    got = asyncio.run(EventLookup(settings).events(alert))
    seconds = time.monotonic() - started
    assert [e["event_id"] for e in got["events"]] == alert["event_ids"][:3], "in the warning's order"
    assert got["events"][2] == {**dict.fromkeys(("counterparty_kind", "ip")), "event_id": last["event_id"],
                                "ts": last["ts"], "amount": 99.0, "currency": "CNY", "direction": "debit",
                                "txn_type": "payment", "counterparty_id": "cp-last", "device_id": "dev-1",
                                "channel": "web"}
    assert got["scanned"] == FILLER + 3 and got["note"].startswith("1 of 4 events not found")

    short = asyncio.run(EventLookup(settings, max_scan=5_000).events(alert))
    assert [e["event_id"] for e in short["events"]] == [last["event_id"]]
    assert short["scanned"] <= 6_000 and short["note"].startswith("3 of 4 events not found")

    assert "not listed" in asyncio.run(EventLookup(settings).events({**alert, "entity_type": "platform"}))["note"]
    hidden = settings.model_copy(update={"pseudonymise_key": SecretStr("k" * 32)})
    assert "pseudonymised" in asyncio.run(EventLookup(hidden).events(alert))["note"]
    print(f"\ncase events: {got['scanned']:,} records read back in {seconds:.2f} s "
          f"({got['scanned'] / seconds:,.0f} records/s)")
