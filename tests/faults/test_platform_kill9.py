"""kill -9 a worker inside a market crash and a liquidity run: the market and platform paths come back as they were.

The market agent's instrument states, its stage-one stress buckets, the transaction engine's flow
buckets, both stage-two monitors (the liquidity run's window and hourly baseline, market stress's
window) and the rule catalogue published at run time must survive the kill: the warnings on
risk.alerts after the restart, market_stress and liquidity_run included, are those of an
uninterrupted in-process run of the same input under the same rules (models.pipeline.Pipeline), and
every tick is learned exactly once, read back from the changelog.
"""

from __future__ import annotations

import json
import threading
import time
from collections import Counter
from datetime import UTC, datetime
from typing import Any

import pytest
import yaml

from app.faust_app import AGGREGATES, ALERTS, DEADLETTER, MARKET, RULES, TRANSACTIONS, load_instrument
from app.settings import Settings
from models.pipeline import Pipeline
from models.rules import parse_catalogue
from models.schemas import Alert, DeadLetter, MarketTick, Transaction
from models.synth import generate
from tests.conftest import produce
from tests.faults.conftest import Accounting, read_topic, report, wait_drained

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

MARKET_CATEGORIES = ("market_crash",)
PLATFORM_CATEGORIES = ("liquidity_run", "market_stress")
# Inside the market crash (stress raised from 06:19) and the second liquidity run (06:35 to 07:33).
KILL_BEFORE = datetime(2026, 11, 1, 6, 40, tzinfo=UTC).timestamp()
KILL_AFTER_TICKS_UP_TO = datetime(2026, 11, 1, 6, 27, tzinfo=UTC).timestamp()


def _send(s: Settings, events: list[dict[str, Any]], rate: float) -> None:
    """Produce events in order (transactions keyed by account, ticks by instrument), `rate` a second."""
    from app.admin import producer

    p = producer(s, linger_ms=5)
    t0 = time.monotonic()
    try:
        for i, e in enumerate(events):
            if e["event_type"] == "transaction":
                p.send(s.topic(TRANSACTIONS), key=e["account_id"].encode(), value=json.dumps(e).encode())
            else:
                p.send(s.topic(MARKET), key=e["instrument"].encode(), value=json.dumps(e).encode())
            if i % 100 == 0 and (ahead := i / rate - (time.monotonic() - t0)) > 0:
                time.sleep(ahead)
        p.flush(60)
    finally:
        p.close(10)


def _published_rules(s: Settings) -> bytes:
    """The shipped catalogue as version 2 with a liquidity run critical from 4x the usual (6x shipped).

    Published before the feed: the worker restarted after the kill must take it again from
    risk.rules, or the liquidity run spanning the kill stays at "high" (a version is missing).
    """
    doc = yaml.safe_load(s.rules_file.read_text())
    doc["version"] = 2
    doc["rules"]["liquidity_run"]["params"] = {"critical_ratio": 4.0}
    return yaml.safe_dump(doc).encode()


def _uninterrupted(s: Settings, events: list[dict[str, Any]], rules: bytes) -> set[tuple[str, str, str]]:
    """(category, alert_id, level) of every market and platform warning version an uninterrupted run raises."""
    pipe = Pipeline(parse_catalogue(rules), partitions=s.topic_partitions, storm_cap=s.storm_cap_per_minute)
    out: set[tuple[str, str, str]] = set()
    for e in events:
        model = Transaction if e["event_type"] == "transaction" else MarketTick
        for a in pipe.process(model.model_validate(e)).alerts:
            if a.category in MARKET_CATEGORIES + PLATFORM_CATEGORIES:
                out.add((a.category, a.alert_id, a.level))
    return out  # not pipe.finish(): a live worker never closes the last buckets of a stream that stops


def _warnings(s: Settings) -> list[Alert]:
    """Every market and platform warning message on risk.alerts."""
    alerts = [Alert.model_validate_json(r.value) for r in read_topic(s, s.topic(ALERTS))]
    return [a for a in alerts if a.category in MARKET_CATEGORIES + PLATFORM_CATEGORIES]


def _versions(alerts: list[Alert], categories: tuple[str, ...] = MARKET_CATEGORIES + PLATFORM_CATEGORIES
              ) -> set[tuple[str, str, str]]:
    return {(a.category, a.alert_id, a.level) for a in alerts if a.category in categories}


def _committed(s: Settings, topic: str) -> int:
    """What the Faust group committed of a topic (all partitions)."""
    from app.admin import admin

    client = admin(s)
    try:
        got = client.list_group_offsets(s.deployment_id).get(s.deployment_id, {})
    finally:
        client.close()
    return sum(om.offset for tp, om in got.items() if tp.topic == topic)


def _end(s: Settings, topic: str) -> int:
    from kafka import TopicPartition

    from app.admin import consumer

    c = consumer(s)
    try:
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        return sum(c.end_offsets(tps).values())
    finally:
        c.close()


def _learned(s: Settings) -> dict[str, int]:
    """Ticks learned per instrument, as the instruments table's changelog holds them."""
    latest: dict[bytes, bytes | None] = {}
    for r in read_topic(s, s.changelog("instruments")):
        latest[r.key] = r.value
    return {k.decode(): load_instrument(v).n for k, v in latest.items() if v is not None}


def test_kill9_mid_crash_and_run_then_restart(fault_settings, start_worker):
    s = fault_settings
    events = generate(seed=3, accounts=100, days=1.0, instruments=12, scenarios=["liquidity_run", "market_crash"])
    ts = [datetime.fromisoformat(e["ts"]).timestamp() for e in events]
    before = [e for e, t in zip(events, ts, strict=True) if t < KILL_BEFORE]
    after = events[len(before):]
    ticks = Counter(e["instrument"] for e in events if e["event_type"] == "market")
    market_topic = s.topic(MARKET)
    kill_ticks = sum(1 for e, t in zip(before, ts, strict=False)
                     if e["event_type"] == "market" and t < KILL_AFTER_TICKS_UP_TO)
    rules = _published_rules(s)
    want = _uninterrupted(s, events, rules)
    assert {c for c, _, _ in want} == {"market_crash", "market_stress", "liquidity_run"}, "the input raises all three"

    first = start_worker(s)
    produce(s, RULES, [(b"catalogue", rules)])
    deadline = time.monotonic() + 60
    while first.metric("riskwatch_rules_version") != 2:
        assert time.monotonic() < deadline, f"the published rules were not applied:\n{first.tail()}"
        time.sleep(0.2)
    feed = threading.Thread(target=_send, args=(s, before, 1500.0), daemon=True)
    feed.start()
    deadline = time.monotonic() + 120
    consumed = 0.0
    while consumed < kill_ticks:  # mid-stream: the feed is still sending, the crash and the run are open
        assert time.monotonic() < deadline, f"worker consumed only {consumed} ticks:\n{first.tail()}"
        consumed = first.metric("riskwatch_events_consumed_total", topic=market_topic)
        time.sleep(0.1)
    # Stage two must have committed what it read: otherwise the restart reads every partial again
    # and rebuilds the monitors from the topic, which hides a monitor state that did not survive.
    while _committed(s, s.topic(AGGREGATES)) < _end(s, s.topic(AGGREGATES)) - 5:
        assert time.monotonic() < deadline, f"stage two never committed its partials:\n{first.tail()}"
        time.sleep(0.2)
    first.kill()
    feed.join(120)
    raised_before = _versions(_warnings(s), PLATFORM_CATEGORIES)

    second = start_worker(s)
    rules_after_restart = second.metric("riskwatch_rules_version")
    _send(s, after, 5000.0)
    wait_drained(s, alive=lambda: second.proc.poll() is None or pytest.fail(second.tail()))
    # Every tick learned (the changelog), then whatever stage two still had to judge.
    deadline = time.monotonic() + 120
    learned: dict[str, int] = {}
    while sum(learned.values()) < ticks.total() or not want <= _versions(_warnings(s)):
        if time.monotonic() > deadline:
            break
        assert second.proc.poll() is None, second.tail()
        time.sleep(2.0)
        learned = _learned(s)
    time.sleep(3.0)  # anything later than this would be an extra version
    alerts = _warnings(s)
    got = _versions(alerts)
    learned = _learned(s)

    letters = [DeadLetter.model_validate_json(r.value) for r in read_topic(s, s.topic(DEADLETTER))]
    market_letters = sum(1 for d in letters if d.source_topic == market_topic)
    partial_letters = sum(1 for d in letters if d.source_topic == s.topic(AGGREGATES))
    partials = len(read_topic(s, s.topic(AGGREGATES)))
    redelivered = second.metric("riskwatch_redelivered_total", topic=market_topic)
    market = [a for a in alerts if a.category in MARKET_CATEGORIES]
    platform = [a for a in alerts if a.category in PLATFORM_CATEGORIES]
    lost, extra = sorted(want - got), sorted(got - want)
    report("kill -9 market path", Accounting(
        events_in=ticks.total(), scored=sum(learned.values()), dead_lettered=market_letters,
        duplicates=ticks.total() - sum(learned.values()) - market_letters,
        warnings=len({a.alert_id for a in market}), warning_messages=len(market),
        notes={"consumed_before_kill": int(consumed), "redelivered_suppressed": int(redelivered),
               # The state's cost: records written to the stress buckets' changelog, against ticks.
               "stress_state_writes": len(read_topic(s, s.changelog("market-stress"))),
               "versions_lost": sum(1 for x in lost if x[0] in MARKET_CATEGORIES),
               "versions_extra": sum(1 for x in extra if x[0] in MARKET_CATEGORIES)}))
    report("kill -9 platform path", Accounting(
        events_in=partials, scored=partials - partial_letters, dead_lettered=partial_letters, duplicates=0,
        warnings=len({a.alert_id for a in platform}), warning_messages=len(platform),
        notes={"raised_before_kill": len(raised_before), "rules_version_after_restart": int(rules_after_restart),
               "monitor_state_writes": len(read_topic(s, s.changelog("platform"))),
               "versions": f"{len(_versions(platform))} of {sum(1 for x in want if x[0] in PLATFORM_CATEGORIES)}",
               "versions_lost": sum(1 for x in lost if x[0] in PLATFORM_CATEGORIES),
               "versions_extra": sum(1 for x in extra if x[0] in PLATFORM_CATEGORIES)}))

    problems = []
    if second.metric("riskwatch_rules_version") != 2:
        problems.append("the restarted worker does not run the rules published before the kill")
    if market_letters or partial_letters:
        problems.append(f"dead letters: {market_letters} ticks, {partial_letters} partials")
    if learned != dict(ticks):
        twice = {k: (learned.get(k), n) for k, n in ticks.items() if learned.get(k) != n}
        problems.append(f"ticks not learned exactly once (learned, sent): {twice}")
    if lost or extra:
        problems.append(f"warnings vs an uninterrupted run: lost {lost[:8]}, extra {extra[:8]}")
    assert not problems, "\n".join(problems)


def test_kill9_mid_minute_does_not_reopen_the_storm_cap(fault_settings, start_worker, feed_producer):
    """A warning storm across a kill: the restarted worker admits no more than the cap left of each minute.

    Every event is a large transaction of an account not seen before (a new large_transaction
    warning), 240 to an event-time minute against a cap of 100: each minute's cap is used up. Which
    warnings fill a minute depends on how partitions interleave, so the restarted worker may pick
    others than the killed one did; what it may not do is forget the minute's admissions it stored.
    The only excess allowed over the cap is the killed worker's warnings from events it had not
    committed (sent, then not raised again after the restart). Without stored admissions the restart
    admits a fresh 100 in the minute it resumes in.
    """
    from kafka import TopicPartition

    from app.admin import consumer
    from tests.faults.conftest import Sent, committed_offsets

    cap = 100
    s = fault_settings.model_copy(update={"storm_cap_per_minute": cap})
    start = datetime(2026, 11, 2, 1, 0, tzinfo=UTC).timestamp()
    items = []
    for k in range(3_000):
        e = {"event_type": "transaction", "event_id": f"st-{k:06d}",
             "ts": datetime.fromtimestamp(start + k * 0.25, UTC).isoformat(), "account_id": f"storm-{k:05d}",
             "counterparty_id": "cp-1", "currency": "CNY", "amount": 60000.0, "direction": "debit",
             "txn_type": "payment", "channel": "app"}
        items.append(Sent("valid", e["account_id"], e["event_id"], json.dumps(e).encode()))
    first = start_worker(s)
    feed = feed_producer(s)
    # Slow enough that the engine commits every few events: little is left uncommitted at the kill.
    feed.start(items, rate=200)
    deadline = time.monotonic() + 120
    while not 800 < sum(committed_offsets(s).values()) < 2_200:
        assert time.monotonic() < deadline, f"no commit mid-stream:\n{first.tail()}"
        time.sleep(0.1)
    first.kill()
    at_kill = committed_offsets(s)
    c = consumer(s)
    try:
        tps = [TopicPartition(s.topic(ALERTS), p) for p in sorted(c.partitions_for_topic(s.topic(ALERTS)) or ())]
        alerts_at_kill = {tp.partition: off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()
    second = start_worker(s)
    feed.join()
    wait_drained(s, alive=lambda: second.proc.poll() is None or pytest.fail(second.tail()))
    time.sleep(1.0)

    where = {x.event_id: (x.partition, x.offset) for x in feed.sent}
    killed: dict[int, set[str]] = {}  # minute -> the killed worker's warnings
    uncommitted: dict[int, set[str]] = {}  # ... of those, from events it had not committed
    restarted: dict[int, set[str]] = {}
    records = read_topic(s, s.topic(ALERTS))
    for r in records:
        a = Alert.model_validate_json(r.value)
        if a.category != "large_transaction":
            continue
        minute = int(a.created_at.timestamp() // 60)
        if r.offset < alerts_at_kill.get(r.partition, 0):
            killed.setdefault(minute, set()).add(a.alert_id)
            p, off = where[a.event_ids[0]]
            if off >= at_kill.get(p, 0):
                uncommitted.setdefault(minute, set()).add(a.alert_id)
        else:
            restarted.setdefault(minute, set()).add(a.alert_id)
    minutes = sorted(set(killed) | set(restarted))
    admitted = {m: killed.get(m, set()) | restarted.get(m, set()) for m in minutes}
    allowed = {m: cap + len(uncommitted.get(m, set()) - restarted.get(m, set())) for m in minutes}
    report("kill -9 storm cap", Accounting(
        events_in=len(items), scored=len(items), dead_lettered=0, duplicates=0,
        warnings=sum(map(len, admitted.values())), warning_messages=len(records),
        notes={"minutes": len(minutes), "cap": cap, "most_in_a_minute": max(map(len, admitted.values())),
               "sent_uncommitted_not_raised_again": sum(allowed.values()) - cap * len(minutes)}))
    over = {m: (len(admitted[m]), allowed[m]) for m in minutes if len(admitted[m]) > allowed[m]}
    assert not over, f"minutes admitting more than their cap (admitted, allowed): {over}"
    # Every minute but the last (cut short by the end of the feed) had more candidates than the cap.
    assert all(len(admitted[m]) >= cap for m in minutes[:-1]), {m: len(v) for m, v in admitted.items()}
