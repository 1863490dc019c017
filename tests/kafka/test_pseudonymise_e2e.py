"""Pseudonymisation end to end: no raw account, counterparty, device or IP id leaves ingest.

A worker with RISKWATCH_PSEUDONYMISE_KEY set is fed transactions that carry every kind of id and
raise every kind of output (rule and model warnings, plan triggers, scores, flow partials,
disclosure totals, account state, detector snapshots, lifecycle records); then every topic the
deployment wrote besides its input (prefixed topics, changelogs and Faust's internal topics), the worker's
log at DEBUG, /metrics and the warnings page are searched for the raw ids. The one place they may
appear is risk.deadletter: it keeps input it could not read verbatim (so it can be fixed and
replayed), which is as sensitive as risk.transactions itself and is access-controlled like it.
"""

from __future__ import annotations

import json
import time
import urllib.request
from typing import Any

import pytest
from pydantic import SecretStr

from app.faust_app import ALERTS, CONTINGENCY, DEADLETTER, SCORES, TRANSACTIONS
from app.security import Pseudonymiser
from tests.conftest import consume, produce
from tests.kafka.test_warnings_page import add_users

pytestmark = pytest.mark.kafka

KEY = "e2e-pseudonym-key-0123456789abcdef"
RAW = {
    "account": "acct-rawid-4711",
    "custody": "custody-rawid-4712",
    "payee": "payee-rawid-4713",
    "new_payee": "payee-rawid-4714",
    "device": "device-rawid-4715",
    "new_device": "device-rawid-4716",
    "ip": "203.0.113.77",
    "new_ip": "198.51.100.23",
}


def _stream(make_txn: Any) -> list[dict[str, Any]]:
    ids = {"ip": RAW["ip"], "device_id": RAW["device"], "counterparty_id": RAW["payee"]}
    events = [make_txn(account_id=RAW["account"], amount=100.0 + 7 * i, minutes=30.0 * i, **ids) for i in range(40)]
    # A large transfer from a new device and IP to a new payee: a rule warning, a model warning, a plan.
    events.append(make_txn(account_id=RAW["account"], amount=90_000.0, minutes=30.0 * 40 + 1, txn_type="transfer",
                           counterparty_id=RAW["new_payee"], device_id=RAW["new_device"], ip=RAW["new_ip"]))
    # Customer money moved into the platform's own account: fund isolation (critical).
    events.append(make_txn(account_id=RAW["custody"], account_kind="custody", counterparty_kind="platform_own",
                           counterparty_id=RAW["payee"], amount=5_000.0, minutes=30.0 * 40 + 2, txn_type="transfer",
                           device_id=RAW["device"], ip=RAW["ip"]))
    return events


def _everything_written(s: Any) -> dict[str, list[tuple[bytes, bytes]]]:
    """Every record of every topic this deployment wrote: its prefixed topics, changelogs and Faust's own."""
    from app.admin import admin, consumer

    a = admin(s)
    try:
        names = [t for t in a.list_topics() if s.topic_prefix in t or t.startswith(s.app_id)]
    finally:
        a.close()
    out: dict[str, list[tuple[bytes, bytes]]] = {}
    for name in names:
        c = consumer(s, name, consumer_timeout_ms=1500)
        try:
            out[name] = [(r.key or b"", r.value or b"") for r in c]
        finally:
            c.close()
    return out


def test_no_raw_identifier_reaches_any_topic_log_or_page(settings, start_worker, make_txn):
    s = settings.model_copy(update={"pseudonymise_key": SecretStr(KEY), "publish_scores": True})
    token = add_users(s, {"vera": ("viewer", "viewer-password-1")})  # the page's API needs a sign-in or token
    worker = start_worker(s, RISKWATCH_LOG_LEVEL="DEBUG")
    events = _stream(make_txn)
    broken = {**events[0], "event_id": "broken-1", "amount": -1}  # dead-lettered, verbatim
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in [*events, broken]])

    p = Pseudonymiser(KEY)
    alerts = consume(s, ALERTS, lambda got: {"large_transaction", "fund_isolation"} <= {a["category"] for a in got})
    assert {a["entity_id"] for a in alerts} <= {p.pseudonym(RAW["account"]), p.pseudonym(RAW["custody"])}
    consume(s, CONTINGENCY, lambda got: len(got) >= 2)
    consume(s, SCORES, lambda got: len(got) >= len(events))
    consume(s, DEADLETTER, lambda got: len(got) >= 1)
    time.sleep(3.0)  # the engine writes account states and commits about once a second; Faust's tables too

    written = _everything_written(s)
    assert any("changelog" in name for name in written), sorted(written)
    leaks = {}
    for name, records in written.items():
        if name in (s.topic(TRANSACTIONS), s.topic(DEADLETTER)):  # the input, and input kept verbatim
            continue
        for kind, raw in RAW.items():
            if any(raw.encode() in k or raw.encode() in v for k, v in records):
                leaks.setdefault(name, []).append(kind)
    assert not leaks, f"raw identifiers in topics: {leaks}"

    page = worker.metrics()
    page_api = urllib.request.Request(f"http://127.0.0.1:{s.web_port}/api/alerts",
                                      headers={"Authorization": f"Bearer {token}"})
    with urllib.request.urlopen(page_api, timeout=5) as r:
        warnings_page = r.read().decode()
    assert p.pseudonym(RAW["account"]) in warnings_page, warnings_page[:500]
    log = worker.log_path.read_text(errors="replace")
    for kind, raw in RAW.items():
        assert raw not in page, f"raw {kind} id on /metrics"
        assert raw not in warnings_page, f"raw {kind} id on the warnings page"
        assert raw not in log, f"raw {kind} id in the worker's log"
    print(f"searched {sum(len(r) for r in written.values()):,} records in {len(written)} topics, the log "
          f"({len(log):,} bytes), /metrics and the warnings page: no raw id outside risk.deadletter")
