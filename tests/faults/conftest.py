"""Fault-suite fixtures: a restartable broker per module, a mixed input feed, and accounting read back from Kafka.

Counters reset when a worker dies, so the fault tests account from Kafka itself:

- every invalid input must be on risk.deadletter, found by its source partition and offset
  (the dead-letter key), with a reason;
- every distinct valid transaction must have been learned exactly once: the account's state in
  the table's changelog topic counts its events (`AccountState.n`) and remembers the hashes of the
  last 16 (`recent_ids`), which must be the account's last 16 distinct event ids, in order;
- every duplicate (the same event_id again) is then the difference, and was not learned;
- every rule warning the in-process Pipeline raises on the same input must be on risk.alerts,
  and all versions of one alert_id must agree on what the id stands for.

Each test prints one accounting line, and the terminal summary repeats them all.
"""

from __future__ import annotations

import json
import math
import os
import random
import signal
import threading
import time
from collections import defaultdict
from collections.abc import Callable, Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import pytest

from app import kafka_local
from app.faust_app import ALERTS, DEADLETTER, TRANSACTIONS, load_account
from app.settings import Settings
from models.features import AccountState, stable_hash
from models.findings import alert_id_for
from models.pipeline import Pipeline
from models.rules import load_catalogue
from models.schemas import Alert, DeadLetter, Transaction
from models.scoring import RECENT_IDS
from tests.conftest import free_port

# Account-level categories decided by rules alone: the same input gives the same warnings, whatever
# the model learned, so the worker's set must equal the in-process replay's set exactly.
RULE_CATEGORIES = ("fund_isolation", "large_transaction", "structuring", "velocity")
_LINES: list[str] = []


class Broker:
    """A local single-node broker this module owns, so a test may stop and restart it."""

    def __init__(self, data_dir: Path) -> None:
        self.port = free_port()
        self.data_dir = data_dir
        self.bootstrap = f"127.0.0.1:{self.port}"

    def start(self) -> None:
        """Start (or restart) the broker on the same port and data, and wait until it serves metadata."""
        kafka_local.start(self.port, data_dir=self.data_dir, timeout=120)

    def stop(self) -> None:
        """Stop the broker (SIGTERM, then SIGKILL)."""
        kafka_local.stop(self.port)

    def crash(self) -> None:
        """kill -9 the broker: no shutdown, no goodbye to its clients."""
        info = kafka_local.status(self.port)
        assert info is not None, "the broker is not running"
        os.kill(info.pid, signal.SIGKILL)
        deadline = time.monotonic() + 30
        while kafka_local.status(self.port) is not None:
            assert time.monotonic() < deadline, "the broker survived SIGKILL"
            time.sleep(0.1)
        kafka_local.stop(self.port)  # forgets the dead broker's pid file


@contextmanager
def own_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """Start a broker in a fresh data dir; stop and wipe it afterwards."""
    broker = Broker(tmp_path_factory.mktemp("kafka"))
    broker.start()
    try:
        yield broker
    finally:
        broker.stop()
        kafka_local.wipe(broker.port, broker.data_dir)


def broker_of_its_own(why: str) -> tuple[Any, Any]:
    """Module-scoped `fault_broker` and `kafka_bootstrap` fixtures for a module whose tests crash the broker.

    Use as `fault_broker, kafka_bootstrap = broker_of_its_own("...")`: the package's broker stays up.
    """

    @pytest.fixture(scope="module", name="fault_broker")
    def _broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
        with own_broker(tmp_path_factory) as broker:
            yield broker

    @pytest.fixture(scope="module", name="kafka_bootstrap")
    def _bootstrap(fault_broker: Broker) -> str:
        return fault_broker.bootstrap

    _broker.__doc__ = f"A broker of this module's own: {why}."
    _bootstrap.__doc__ = "This module's tests talk to its own broker."
    return _broker, _bootstrap


@pytest.fixture(scope="package")
def fault_broker(tmp_path_factory: pytest.TempPathFactory) -> Iterator[Broker]:
    """A broker for the fault suite: the faults here must not disturb other tests' broker.

    The broker-restart test overrides this with one of its own, so a restart cannot disturb the rest.
    """
    with own_broker(tmp_path_factory) as broker:
        yield broker


@pytest.fixture(scope="package")
def kafka_bootstrap(fault_broker: Broker) -> str:
    """Every fault test talks to the fault suite's broker."""
    return fault_broker.bootstrap


@pytest.fixture
def fault_settings(settings: Settings) -> Settings:
    """Settings with a short session timeout (10 s), so a killed worker's partitions move on quickly."""
    return settings.model_copy(update={"kafka_session_timeout": 10.0})


def worker_settings(s: Settings, name: str) -> Settings:
    """The same app (group, topics) on other ports and another data dir: a second worker process."""
    return s.model_copy(update={"metrics_port": free_port(), "web_port": free_port(),
                                "data_dir": s.data_dir.parent / f"data-{name}"})


# --- the input ---------------------------------------------------------------------------------

@dataclass
class Sent:
    """One message the feed produced: what it was meant to be and where it landed."""

    kind: str  # "valid", "duplicate" or "invalid"
    account: str
    event_id: str | None
    raw: bytes
    partition: int = -1
    offset: int = -1


_INVALID = (
    lambda e: json.dumps(e).encode()[:40],  # truncated JSON
    lambda e: json.dumps({**e, "amount": -abs(e["amount"])}).encode(),
    lambda e: json.dumps({**e, "txn_type": "teleport"}).encode(),
    lambda e: json.dumps({**e, "ts": (datetime.now(UTC) + timedelta(days=10)).isoformat()}).encode(),
    lambda e: json.dumps(e).replace(json.dumps(e["amount"]), "NaN").encode(),
    lambda e: json.dumps({k: v for k, v in e.items() if k != "account_id"}).encode(),
)


class Feed:
    """A seeded stream of transactions over many accounts, with duplicates and invalid inputs mixed in.

    Event time rises one second per event, so every account's events are in time order and none is
    late. Every `large_every`-th valid event is a large transaction (a rule warning); duplicates
    repeat the account's previous event (what a redelivering producer does).
    """

    def __init__(self, accounts: int = 400, seed: int = 7, invalid_every: int = 97, duplicate_every: int = 89,
                 large_every: int = 61) -> None:
        self.rng = random.Random(seed)
        self.accounts = [f"acct-{i:05d}" for i in range(accounts)]
        self.invalid_every = invalid_every
        self.duplicate_every = duplicate_every
        self.large_every = large_every
        self.start = datetime.now(UTC).replace(microsecond=0) - timedelta(days=3)
        self.k = 0
        self.last: dict[str, Sent] = {}

    def _event(self, account: str) -> dict[str, Any]:
        self.k += 1
        rng = self.rng
        large = self.k % self.large_every == 0
        return {"event_type": "transaction", "event_id": f"ev-{self.k:07d}",
                "ts": (self.start + timedelta(seconds=self.k)).isoformat(), "account_id": account,
                "counterparty_id": f"cp-{rng.randrange(8)}", "currency": "CNY",
                "amount": 60000.0 if large else round(math.exp(rng.gauss(5.0, 1.0)), 2),
                "direction": "debit" if rng.random() < 0.7 else "credit", "txn_type": "payment",
                "channel": "app", "device_id": f"dev-{account[-3:]}"}

    def make(self, n: int) -> list[Sent]:
        """The next n messages."""
        out: list[Sent] = []
        for _ in range(n):
            account = self.rng.choice(self.accounts)
            i = self.k + 1
            if i % self.duplicate_every == 0 and account in self.last:
                prev = self.last[account]
                self.k += 1
                out.append(Sent("duplicate", account, prev.event_id, prev.raw))
                continue
            e = self._event(account)
            if i % self.invalid_every == 0:
                bad = _INVALID[(i // self.invalid_every) % len(_INVALID)]
                out.append(Sent("invalid", account, e["event_id"], bad(e)))
                continue
            sent = Sent("valid", account, e["event_id"], json.dumps(e).encode())
            self.last[account] = sent
            out.append(sent)
        return out


class Producer:
    """Sends a feed to risk.transactions, optionally paced, in a background thread; records offsets."""

    def __init__(self, s: Settings, **kw: Any) -> None:
        from app.admin import producer

        kw.setdefault("linger_ms", 5)
        self.producer = producer(s, **kw)
        self.topic = s.topic(TRANSACTIONS)
        self.sent: list[Sent] = []
        self.done = threading.Event()
        self.error: BaseException | None = None
        self._thread: threading.Thread | None = None

    def send(self, items: list[Sent], rate: float | None = None) -> None:
        """Send items at `rate` per second (as fast as possible when None) and wait for acks."""
        futures = []
        t0 = time.monotonic()
        for i, item in enumerate(items):
            futures.append(self.producer.send(self.topic, key=item.account.encode(), value=item.raw))
            if rate and i % 50 == 0:
                ahead = i / rate - (time.monotonic() - t0)
                if ahead > 0:
                    time.sleep(ahead)
        self.producer.flush(120)
        for item, fut in zip(items, futures, strict=True):
            md = fut.get(timeout=120)
            item.partition, item.offset = md.partition, md.offset
        self.sent.extend(items)

    def start(self, items: list[Sent], rate: float | None = None) -> None:
        """Send in a background thread; join() waits for it."""

        def run() -> None:
            try:
                self.send(items, rate)
            except BaseException as exc:  # noqa: BLE001 - re-raised in the test thread by join()
                self.error = exc
            finally:
                self.done.set()

        self._thread = threading.Thread(target=run, name="feed", daemon=True)
        self._thread.start()

    def join(self, timeout: float = 300.0) -> None:
        """Wait for the background send; raise what it raised."""
        if self._thread is not None:
            self._thread.join(timeout)
            assert not self._thread.is_alive(), "the feed did not finish sending"
        if self.error is not None:
            raise self.error

    def close(self) -> None:
        """Close the producer."""
        self.producer.close(10)


@pytest.fixture
def feed_producer(fault_settings: Settings) -> Iterator[Callable[..., Producer]]:
    """Producers for a test, closed at teardown."""
    made: list[Producer] = []

    def make(s: Settings | None = None, **kw: Any) -> Producer:
        p = Producer(s or fault_settings, **kw)
        made.append(p)
        return p

    yield make
    for p in made:
        p.join(60)
        p.close()


# --- reading Kafka back -------------------------------------------------------------------------

def read_topic(s: Settings, topic: str, timeout: float = 60.0) -> list[Any]:
    """Every record of a full topic name, from the beginning to the end offsets at call time."""
    from kafka import TopicPartition

    from app.admin import consumer

    c = consumer(s, enable_auto_commit=False)
    try:
        parts = c.partitions_for_topic(topic) or set()
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        if not tps:
            return []
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        out: list[Any] = []
        deadline = time.monotonic() + timeout
        while any(c.position(tp) < end[tp] for tp in tps):
            assert time.monotonic() < deadline, f"could not read {topic} to its end in {timeout}s"
            for records in c.poll(timeout_ms=500, max_records=5000).values():
                out.extend(records)
        return out
    finally:
        c.close()


def committed_offsets(s: Settings) -> dict[int, int]:
    """The worker group's committed offsets on risk.transactions, by partition."""
    from app.admin import admin

    client = admin(s)
    try:
        got = client.list_group_offsets(s.transactions_group).get(s.transactions_group, {})
    finally:
        client.close()
    topic = s.topic(TRANSACTIONS)
    return {tp.partition: om.offset for tp, om in got.items() if tp.topic == topic}


def end_offsets(s: Settings) -> dict[int, int]:
    """The end offsets of risk.transactions, by partition."""
    from kafka import TopicPartition

    from app.admin import consumer

    c = consumer(s)
    try:
        topic = s.topic(TRANSACTIONS)
        tps = [TopicPartition(topic, p) for p in sorted(c.partitions_for_topic(topic) or ())]
        return {tp.partition: off for tp, off in c.end_offsets(tps).items()}
    finally:
        c.close()


def wait_drained(s: Settings, timeout: float = 180.0, alive: Callable[[], None] | None = None) -> None:
    """Wait until the group has committed every message of risk.transactions (all processed)."""
    deadline = time.monotonic() + timeout
    end = end_offsets(s)
    last: dict[int, int] = {}
    while time.monotonic() < deadline:
        if alive is not None:
            alive()
        try:
            last = committed_offsets(s)
        except Exception:  # noqa: BLE001 - the coordinator may be moving; ask again
            last = {}
        if last and all(last.get(p, -1) >= off for p, off in end.items()):
            return
        time.sleep(0.5)
    raise AssertionError(f"not drained after {timeout}s: committed {last}, end {end}")


def account_states(s: Settings) -> dict[str, AccountState]:
    """The latest state of every account, as the accounts table's changelog holds it."""
    latest: dict[bytes, bytes | None] = {}
    for r in read_topic(s, s.changelog("accounts")):
        latest[r.key] = r.value
    return {k.decode(): load_account(v) for k, v in latest.items() if v is not None}


def rss_mb(pid: int) -> float:
    """Resident memory of a process, in MiB."""
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    raise AssertionError(f"no VmRSS for pid {pid}")


# --- accounting ---------------------------------------------------------------------------------

@dataclass
class Accounting:
    """What became of every input, read back from Kafka."""

    events_in: int
    scored: int
    dead_lettered: int
    duplicates: int
    warnings: int
    warning_messages: int
    notes: dict[str, Any] = field(default_factory=dict)

    def line(self, name: str) -> str:
        """One line for the log: the identity in = scored + dead-lettered + duplicates, and the warnings."""
        extra = "".join(f" {k}={v}" for k, v in self.notes.items())
        return (f"{name}: events in={self.events_in} scored={self.scored} dead-lettered={self.dead_lettered} "
                f"duplicates suppressed={self.duplicates} warnings={self.warnings} "
                f"(messages {self.warning_messages}){extra}")


def expected_rule_alerts(s: Settings, sent: list[Sent]) -> set[str]:
    """Alert ids of rule warnings the in-process Pipeline raises on the valid inputs, in partition order."""
    pipe = Pipeline(load_catalogue(s.rules_file), partitions=s.topic_partitions,
                    storm_cap=s.storm_cap_per_minute)
    ids: set[str] = set()
    for item in sorted((x for x in sent if x.kind != "invalid"), key=lambda x: (x.partition, x.offset)):
        for a in pipe.process(Transaction.model_validate_json(item.raw)).alerts:
            if a.category in RULE_CATEGORIES:
                ids.add(a.alert_id)
    return ids


def check_alerts(alerts: list[Alert]) -> None:
    """Every version of an alert_id names the same thing; versions with the same evidence are the same warning."""
    by_id: dict[str, list[Alert]] = defaultdict(list)
    for a in alerts:
        by_id[a.alert_id].append(a)
    for aid, versions in by_id.items():
        first = versions[0]
        assert aid == alert_id_for(first.entity_type, first.entity_id, first.category, first.event_ids[0])
        by_evidence: dict[tuple[str, ...], Alert] = {}
        for v in versions:
            assert (v.entity_type, v.entity_id, v.category, v.event_ids[0]) == \
                (first.entity_type, first.entity_id, first.category, first.event_ids[0]), \
                f"alert {aid} changed what it is about: {first} vs {v}"
            same = by_evidence.setdefault(tuple(v.event_ids), v)
            assert (v.created_at, v.event_ts, v.detector) == (same.created_at, same.event_ts, same.detector), \
                f"alert {aid} republished with the same events but other content: {same} vs {v}"
            if v.detector.startswith("rule:"):
                # Rules are deterministic; only the model's score may differ after a crash (snapshot lag).
                assert (v.level, v.score, v.reasons) == (same.level, same.score, same.reasons), \
                    f"rule alert {aid} republished with the same events but other content: {same} vs {v}"


def check_accounting(s: Settings, sent: list[Sent], name: str, **notes: Any) -> Accounting:
    """Assert that every input is accounted for, from Kafka alone; print and return the accounting."""
    topic = s.topic(TRANSACTIONS)
    invalid = {(x.partition, x.offset) for x in sent if x.kind == "invalid"}
    letters = {}
    for r in read_topic(s, s.topic(DEADLETTER)):
        dl = DeadLetter.model_validate_json(r.value)
        if dl.source_topic == topic:
            assert dl.reason, f"dead letter without a reason: {dl}"
            letters[(dl.partition, dl.offset)] = dl  # redelivered dead letters share their key
    missing, unexpected = sorted(invalid - set(letters)), sorted(set(letters) - invalid)
    assert not missing and not unexpected, f"dead letters: missing {missing[:5]}, unexpected {unexpected[:5]}"

    order: dict[str, list[str]] = defaultdict(list)
    seen: set[str] = set()
    for x in sorted(sent, key=lambda x: (x.partition, x.offset)):
        if x.kind == "valid" and x.event_id not in seen:
            seen.add(x.event_id)  # type: ignore[arg-type]
            order[x.account].append(x.event_id)  # type: ignore[arg-type]
    states = account_states(s)
    assert set(states) == set(order), f"accounts without state: {sorted(set(order) - set(states))[:5]}"
    for acct, ids in order.items():
        st = states[acct]
        assert st.n == len(ids), f"{acct}: learned {st.n} events, sent {len(ids)} distinct ones"
        assert list(st.recent_ids) == [stable_hash(e) for e in ids[-RECENT_IDS:]], \
            f"{acct}: the state's last event ids are not the account's last events"
    scored = sum(st.n for st in states.values())

    alerts = [Alert.model_validate_json(r.value) for r in read_topic(s, s.topic(ALERTS))]
    check_alerts(alerts)
    got_rules = {a.alert_id for a in alerts if a.category in RULE_CATEGORIES}
    want_rules = expected_rule_alerts(s, sent)
    lost, extra = sorted(want_rules - got_rules), sorted(got_rules - want_rules)
    assert not lost and not extra, f"rule warnings vs the in-process replay: lost {lost[:5]}, extra {extra[:5]}"
    acc = Accounting(events_in=len(sent), scored=scored, dead_lettered=len(letters),
                     duplicates=len(sent) - scored - len(letters), warnings=len({a.alert_id for a in alerts}),
                     warning_messages=len(alerts), notes=notes)
    assert acc.duplicates == sum(1 for x in sent if x.kind == "duplicate")
    report(name, acc)
    return acc


def report(name: str, acc: Accounting) -> None:
    """Print the accounting line now and keep it for the terminal summary."""
    line = acc.line(name)
    print(line)
    _LINES.append(line)


def counters(w: Any, topic: str) -> dict[str, float]:
    """A worker's own accounting counters for one input topic, from one scrape of /metrics."""
    from prometheus_client.parser import text_string_to_metric_families

    names = ("events_consumed", "events_scored", "deadletters", "duplicates")
    out = dict.fromkeys(names, 0.0)
    for fam in text_string_to_metric_families(w.metrics()):
        for sample in fam.samples:
            name = sample.name.removeprefix("riskwatch_").removesuffix("_total")
            if name in out and sample.labels.get("topic") == topic:
                out[name] += sample.value
    return out


def assert_counter_identity(c: dict[str, float]) -> None:
    """consumed = scored + dead-lettered + duplicates, within one worker's life."""
    assert c["events_consumed"] == c["events_scored"] + c["deadletters"] + c["duplicates"], c


def pytest_terminal_summary(terminalreporter: Any) -> None:
    """Repeat every fault test's accounting line at the end of the run."""
    if _LINES:
        terminalreporter.section("fault-suite accounting")
        for line in _LINES:
            terminalreporter.write_line(line)
