"""Deployments sharing a broker and an app id but not a prefix keep their own state; old-name state is migrated."""

from __future__ import annotations

import json
import subprocess
import sys
import time
import uuid
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from app.faust_app import SCORES, TRANSACTIONS, load_account
from app.migration import current_names, legacy_names, migrate
from app.settings import Settings
from models.pipeline import Pipeline
from models.rules import load_catalogue
from models.schemas import Transaction
from tests.conftest import ROOT, consume, free_port, produce, settings_env

pytestmark = pytest.mark.kafka


def _accounts(s: Settings) -> set[str]:
    """Accounts the deployment's accounts changelog holds (latest value per key not a tombstone)."""
    from app.admin import consumer

    c = consumer(s, enable_auto_commit=False)
    try:
        topic = s.changelog("accounts")
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        latest: dict[bytes, bytes | None] = {}
        deadline = time.monotonic() + 60
        while any(c.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic}"
            for records in c.poll(timeout_ms=500).values():
                latest.update((r.key, r.value) for r in records)
    finally:
        c.close()
    return {k.decode() for k, v in latest.items() if v is not None and load_account(v)}


def _drained(s: Settings, timeout: float = 90.0) -> None:
    """Wait until the transaction engine's group committed every record of risk.transactions."""
    from app.admin import admin, consumer

    c = consumer(s)
    topic = s.topic(TRANSACTIONS)
    try:
        end = {tp: o for tp, o in c.end_offsets([TopicPartition(topic, p) for p in range(s.topic_partitions)]).items()
               if o > 0}
    finally:
        c.close()
    client = admin(s)
    try:
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            got = client.list_group_offsets(s.transactions_group).get(s.transactions_group, {})
            if all(tp in got and got[tp].offset >= o for tp, o in end.items()):
                return
            time.sleep(0.5)
    finally:
        client.close()
    raise AssertionError(f"{s.transactions_group} did not commit up to {end}")


def _send(s: Settings, events: list[dict[str, Any]]) -> None:
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in events])


def _topics(s: Settings) -> set[str]:
    from app.admin import admin

    client = admin(s)
    try:
        return set(client.list_topics())
    finally:
        client.close()


def test_two_deployments_sharing_an_app_id_keep_their_own_state(kafka_bootstrap: str, tmp_path: Path,
                                                                start_worker: Any, make_txn: Any) -> None:
    tag = uuid.uuid4().hex[:8]

    def deployment(name: str) -> Settings:
        return Settings(kafka_bootstrap=kafka_bootstrap, topic_prefix=f"t{tag}-{name}.", app_id=f"rw-{tag}",
                        data_dir=tmp_path / name, metrics_port=free_port(), web_port=free_port())

    staging, production = deployment("staging"), deployment("production")
    mine = {"staging": {f"s-{i}" for i in range(12)}, "production": {f"p-{i}" for i in range(5)}}
    workers = {}
    for s, name in ((staging, "staging"), (production, "production")):
        workers[name] = start_worker(s)
        _send(s, [make_txn(account_id=a, minutes=i) for i, a in enumerate(sorted(mine[name]) * 3)])
        _drained(s)
    time.sleep(1.5)  # account states are written about once a second

    topics = _topics(staging)
    for s in (staging, production):
        assert {s.changelog(t) for t in ("accounts", "models", "instruments", "lifecycle")} <= topics
    assert not {t for t in topics if t.startswith(f"rw-{tag}")}, "a changelog or leader topic without the prefix"
    assert _accounts(staging) == mine["staging"]
    assert _accounts(production) == mine["production"]

    # A restart of staging while production runs reads back its own accounts only.
    workers["staging"].stop()
    again = start_worker(staging)
    deadline = time.monotonic() + 30
    while (held := again.metric("riskwatch_entities", table="accounts")) != len(mine["staging"]):
        assert time.monotonic() < deadline, f"staging holds {held} accounts after its restart, not 12"
        time.sleep(0.5)
    assert workers["production"].metric("riskwatch_entities", table="accounts") == len(mine["production"])


def _history(make_txn: Any) -> list[dict[str, Any]]:
    return [make_txn(account_id=f"acct-{i % 12}", amount=50.0 + (i * 37) % 400, minutes=i * 13.0,
                     counterparty_id=f"shop-{i % 5}", device_id=f"dev-acct-{i % 12}") for i in range(240)]


def _as_an_earlier_version_left_it(s: Settings) -> None:
    """Move a stopped deployment's state to the names earlier versions used, as if it had never run under the new."""
    from app.admin import admin

    new = current_names(s)
    migrate(s, src=new, dst=legacy_names(s))
    client = admin(s)
    try:
        client.delete_groups(list(new.groups))
        client.delete_topics([t for t in new.changelogs.values() if t in client.list_topics()], timeout_ms=30_000)
        deadline = time.monotonic() + 30
        while set(new.changelogs.values()) & set(client.list_topics()):
            assert time.monotonic() < deadline, "the new changelogs were not deleted"
            time.sleep(0.5)
    finally:
        client.close()


def test_state_under_the_old_names_is_refused_at_start_then_migrated(settings: Settings, start_worker: Any,
                                                                      make_txn: Any) -> None:
    s = settings.model_copy(update={"publish_scores": True, "model_checkpoint_every": 1})
    history = _history(make_txn)
    first = start_worker(s)
    _send(s, history)
    consume(s, SCORES, lambda got: len(got) >= len(history), timeout=90)
    _drained(s)
    time.sleep(1.5)  # the last account states leave about a second after their batch
    first.stop()
    _as_an_earlier_version_left_it(s)

    refused = start_worker(s, ready=False)
    assert refused.proc.wait(60) == 2, refused.tail()
    said = refused.tail()
    assert "riskwatch migrate-state" in said and s.changelog("accounts") in said, said

    out = subprocess.run([sys.executable, "-m", "app.cli", "migrate-state"], cwd=ROOT, env=settings_env(s),
                         capture_output=True, text=True, timeout=180)
    assert out.returncode == 0, out.stderr
    assert f"to {s.changelog('accounts')}" in out.stdout and f"group {s.transactions_group} starts" in out.stdout

    second = start_worker(s)
    probe = make_txn(account_id="acct-3", amount=300.0, minutes=240 * 13.0 + 5, counterparty_id="shop-1",
                     device_id="dev-acct-3")
    _send(s, [probe])
    scores = consume(s, SCORES, lambda got: any(x["event_id"] == probe["event_id"] for x in got), timeout=90)
    after = next(x["score"] for x in scores if x["event_id"] == probe["event_id"])
    pipe = Pipeline(load_catalogue(), partitions=s.topic_partitions)
    expected = [pipe.process(Transaction.model_validate(e)).score for e in [*history, probe]][-1]
    print(f"probe score after the migration {after:.6f}, uninterrupted {expected:.6f}")
    assert after == pytest.approx(expected, abs=1e-9), "the accounts and the detector came over"
    # The offsets came over too: the history was not read again.
    assert second.metric("riskwatch_events_consumed_total", topic=s.topic(TRANSACTIONS)) == 1


def test_the_migration_waits_for_every_worker_to_stop_and_fresh_moves_only_offsets(
        settings: Settings, start_worker: Any, make_txn: Any) -> None:
    from kafka import KafkaConsumer

    from app.admin import admin, client_config
    from app.migration import group_offsets, own_topics
    from models.errors import StateMigrationError

    s = settings
    first = start_worker(s)
    _send(s, [make_txn(account_id=f"acct-{i}", minutes=i) for i in range(20)])
    _drained(s)
    first.stop()
    _as_an_earlier_version_left_it(s)
    old = legacy_names(s)

    # A worker of the previous version still in its group: nothing is copied.
    running = KafkaConsumer(s.topic(TRANSACTIONS), **client_config(s), group_id=old.groups[1],
                            enable_auto_commit=False)
    try:
        deadline = time.monotonic() + 30
        while not running.assignment():
            assert time.monotonic() < deadline, "the stand-in for an old worker did not join its group"
            running.poll(timeout_ms=500)
        with pytest.raises(StateMigrationError, match="member"):
            migrate(s)
    finally:
        running.close()

    said: list[str] = []
    migrate(s, fresh=True, say=said.append)
    client = admin(s)
    try:
        assert s.changelog("accounts") not in client.list_topics(), said
        mine = own_topics(s)
        assert group_offsets(client, s.transactions_group, mine) == group_offsets(client, old.groups[1], mine) != {}
    finally:
        client.close()
    start_worker(s)  # not refused: the deployment now runs under its own names, its accounts afresh
