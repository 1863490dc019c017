"""Hostile input: nothing crashes, every invalid input is dead-lettered with a reason, no valid one is lost.

Three layers, about 130,000 generated inputs per run:

- hypothesis properties of the decoder (random bytes, hostile JSON values in every field, every
  proper prefix of an event, valid events round-tripping): 12,000 examples;
- the real transaction processor in-process (the engine's work without Kafka, outputs captured): a
  hypothesis property over batches (about 3,000 inputs) and a seeded fuzzer (20,000 inputs)
  mixing valid, duplicate, out-of-order, late and mutated events, with an independent model of
  the duplicate and lateness rules as the oracle, and memory checked after a warm-up;
- the seeded fuzzer's 100,000 inputs against decoder and ingest checks alone;

plus the corpus in tests/data/fuzz replayed through a real worker on a real broker.
"""

from __future__ import annotations

import asyncio
import json
import logging
import math
import random
import time
from collections import deque
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from prometheus_client import CollectorRegistry

from app.faust_app import DEADLETTER, TRANSACTIONS
from app.metrics import Metrics
from app.security import Ingest
from app.settings import Settings
from models.errors import EventError
from models.schemas import MAX_PAYLOAD_BYTES, DeadLetter, MarketTick, Transaction, decode_event
from models.scoring import RECENT_IDS
from tests.conftest import consume

CORPUS = Path(__file__).parents[1] / "data" / "fuzz"
FIELDS = set(Transaction.model_fields) | set(MarketTick.model_fields)
LATENESS = 3600.0  # TransactionScorer's allowed_lateness
NOW = datetime.now(UTC)
FUZZ = settings(deadline=None, database=None, suppress_health_check=list(HealthCheck))


def _rss_mb() -> float:
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0


def check_decoded(raw: bytes, kind: type[Transaction] | type[MarketTick] | None = Transaction) -> Any:
    """Decode; an accepted event must honour the contract, a rejected one must say why. Returns the event or None."""
    try:
        e = decode_event(raw, kind)
    except EventError as exc:
        assert exc.reason and len(exc.reason) < 600, exc.reason
        assert exc.field is None or exc.field.split(".")[0] in FIELDS, exc.field
        return None
    assert 1 <= len(e.event_id) <= 128
    assert e.ts.tzinfo is not None and 2000 <= e.ts.year < 2100
    if isinstance(e, Transaction):
        assert math.isfinite(e.amount) and 0 < e.amount < 1e15
        assert len(e.currency) == 3 and e.currency.isupper()
        assert e.direction in ("debit", "credit")
        assert 1 <= len(e.account_id) <= 128 and 1 <= len(e.counterparty_id) <= 128
    else:
        assert math.isfinite(e.price) and 0 < e.price < 1e15
    return e


# --- hypothesis: the decoder ----------------------------------------------------------------------

json_scalars = (st.none() | st.booleans() | st.integers(min_value=-(2**70), max_value=2**70)
                | st.floats(allow_nan=True, allow_infinity=True) | st.text(max_size=40))
json_values = st.recursive(json_scalars, lambda inner: st.lists(inner, max_size=4)
                           | st.dictionaries(st.text(max_size=8), inner, max_size=4), max_leaves=12)
hostile_values = st.one_of(
    json_values,
    st.text(min_size=120, max_size=3000),
    st.sampled_from(["", "NaN", "Infinity", "-1", "0", "1e400", "DEBIT", "teleport", "offshore", "cny",
                     "0001-01-01T00:00:00+00:00", "9999-12-31T23:59:59+14:00", "2026-13-45T99:99:99Z",
                     "2025-06-01T10:00:00", "2099-01-01T00:00:00+00:00", "\u0000", "\u202e", "' OR 1=1 --"]),
    st.floats(max_value=0.0) | st.floats(min_value=1e15),
)
offsets = st.integers(min_value=-14 * 60, max_value=14 * 60).map(lambda m: timezone(timedelta(minutes=m)))
past_times = st.datetimes(min_value=datetime(2000, 1, 2), max_value=datetime(2026, 1, 1), timezones=offsets)
ids = st.text(st.characters(codec="utf-8", exclude_categories=("Cs",)), min_size=1, max_size=64)
valid_txns = st.fixed_dictionaries({
    "event_type": st.just("transaction"), "event_id": ids, "ts": past_times.map(datetime.isoformat),
    "account_id": ids, "counterparty_id": ids,
    "amount": st.floats(min_value=1e-9, max_value=1e14, allow_nan=False, allow_infinity=False),
    "currency": st.sampled_from(["CNY", "USD", "EUR", "HKD"]), "direction": st.sampled_from(["debit", "credit"]),
    "txn_type": st.sampled_from(["payment", "transfer", "withdrawal", "deposit", "loan_disbursement",
                                 "loan_repayment", "investment", "redemption"]),
    "channel": st.sampled_from(["app", "web", "api", "pos", "branch"]),
}, optional={"account_kind": st.sampled_from(["customer", "custody", "platform_own"]),
             "device_id": ids, "ip": st.ip_addresses().map(str), "label": st.sampled_from([0, 1])})


@settings(FUZZ, max_examples=3000)
@given(st.binary(max_size=2048))
def test_decoder_survives_random_bytes(raw: bytes) -> None:
    check_decoded(raw, None)
    check_decoded(raw, Transaction)


@settings(FUZZ, max_examples=2000)
@given(valid_txns, st.dictionaries(st.sampled_from([*sorted(Transaction.model_fields), "extra", "x"]),
                                   hostile_values, min_size=1, max_size=3),
       st.sets(st.sampled_from(sorted(Transaction.model_fields)), max_size=2))
def test_decoder_judges_hostile_fields(event: dict[str, Any], hostile: dict[str, Any], dropped: set[str]) -> None:
    e = {k: v for k, v in {**event, **hostile}.items() if k not in dropped}
    check_decoded(json.dumps(e, allow_nan=True).encode(), Transaction)
    check_decoded(json.dumps(e, allow_nan=True, ensure_ascii=False).encode(), None)


@settings(FUZZ, max_examples=1500)
@given(valid_txns, st.data())
def test_valid_events_pass_and_every_proper_prefix_fails(event: dict[str, Any], data: st.DataObject) -> None:
    raw = json.dumps(event, ensure_ascii=False).encode()
    txn = check_decoded(raw)
    assert txn is not None and txn.event_id == event["event_id"] and txn.amount == event["amount"]
    cut = data.draw(st.integers(min_value=0, max_value=len(raw) - 1))
    assert check_decoded(raw[:cut]) is None


@settings(FUZZ, max_examples=1500)
@given(st.fixed_dictionaries({"event_type": st.just("market"), "event_id": ids,
                              "ts": past_times.map(datetime.isoformat), "instrument": ids,
                              "price": st.floats(min_value=1e-9, max_value=1e14)}),
       st.dictionaries(st.sampled_from(sorted(MarketTick.model_fields)), hostile_values, max_size=2))
def test_market_decoder_judges_hostile_fields(tick: dict[str, Any], hostile: dict[str, Any]) -> None:
    check_decoded(json.dumps({**tick, **hostile}, allow_nan=True).encode(), MarketTick)


def test_decoder_rejects_oversized_and_deep_input_unread() -> None:
    big = b'{"event_id": "' + b"x" * MAX_PAYLOAD_BYTES + b'"}'
    with pytest.raises(EventError, match="byte limit"):
        decode_event(big, Transaction)
    for depth in (1_000, 100_000, 500_000):
        with pytest.raises(EventError, match="not valid JSON"):
            decode_event(b"[" * depth + b"]" * depth)


def test_future_events_are_rejected_with_a_reason() -> None:
    ingest = Ingest(Settings(), clock=lambda: datetime(2026, 11, 2, tzinfo=UTC).timestamp())
    ok = decode_event(json.dumps(_event(1, ts="2026-11-02T23:00:00+00:00")).encode(), Transaction)
    assert ingest.transaction(ok) is ok
    ahead = decode_event(json.dumps(_event(2, ts="2026-11-03T00:00:01+00:00")).encode(), Transaction)
    with pytest.raises(EventError, match=r"ahead of this worker's clock \(limit 24 h\)") as err:
        ingest.transaction(ahead)
    assert err.value.field == "ts"


# --- the real agent in-process --------------------------------------------------------------------

def _event(k: int, **over: Any) -> dict[str, Any]:
    e = {"event_type": "transaction", "event_id": f"fz-{k}", "ts": (NOW - timedelta(days=5, seconds=-k)).isoformat(),
         "account_id": f"acct-{k % 300}", "counterparty_id": f"cp-{k % 7}", "amount": 100.0 + k % 97,
         "currency": "CNY", "direction": "debit" if k % 3 else "credit", "txn_type": "payment", "channel": "app",
         "device_id": f"dev-{k % 300}"}
    e.update(over)
    return e


class Oracle:
    """An independent model of the agent's accounting: what each input must become."""

    def __init__(self, ingest: Ingest) -> None:
        self.ingest = ingest
        self.recent: dict[str, deque[str]] = {}
        self.last: dict[str, tuple[int, float]] = {}
        self.counts = {"consumed": 0, "invalid": 0, "duplicate": 0, "scored": 0, "late": 0, "learned": 0}

    def see(self, raw: bytes) -> str:
        """Classify one input as the agent must: invalid, duplicate, late or scored."""
        self.counts["consumed"] += 1
        try:
            txn = self.ingest.transaction(decode_event(raw, Transaction))
        except EventError:
            self.counts["invalid"] += 1
            return "invalid"
        recent = self.recent.setdefault(txn.account_id, deque(maxlen=RECENT_IDS))
        if txn.event_id in recent:
            self.counts["duplicate"] += 1
            return "duplicate"
        recent.append(txn.event_id)
        n, last = self.last.get(txn.account_id, (0, 0.0))
        ts = txn.ts.timestamp()
        self.counts["scored"] += 1
        if n > 0 and ts < last - LATENESS:
            self.counts["late"] += 1
            return "late"
        self.counts["learned"] += 1
        self.last[txn.account_id] = (n + 1, max(last, ts))
        return "scored"


class AgentHarness:
    """The worker's real transaction processor in-process (the engine's work without Kafka); outputs captured."""

    def __init__(self, s: Settings) -> None:
        from app.worker import build

        self.loop = asyncio.new_event_loop()
        asyncio.set_event_loop(self.loop)
        self.rt = build(s, Metrics(CollectorRegistry()))
        self.processor = self.rt.extras["transactions"].processor
        # Only dead letters are kept, and only what the checks need: the harness must not be
        # what grows when the test measures the agent's memory.
        self.letters: list[tuple[int | None, str]] = []
        self._deadletter_topic = s.topic(DEADLETTER)
        self.topic = s.topic(TRANSACTIONS)
        self.fed = 0
        self.batch_size = s.batch_size

    def metric(self, name: str) -> float:
        """A transaction-topic counter of the agent."""
        return self.rt.metrics.registry.get_sample_value(name, {"topic": self.topic}) or 0.0

    def counts(self) -> dict[str, float]:
        """The agent's own accounting counters."""
        dl = sum(s.value for s in self.rt.metrics.deadletters.collect()[0].samples
                 if s.name.endswith("_total") and s.labels["topic"] == self.topic)
        return {"consumed": self.metric("riskwatch_events_consumed_total"),
                "scored": self.metric("riskwatch_events_scored_total"), "invalid": dl,
                "duplicate": self.metric("riskwatch_duplicates_total"),
                "late": self.metric("riskwatch_late_events_total")}

    def feed(self, raws: Iterable[bytes]) -> None:
        """Put inputs through the processor in the engine's batch sizes, as records of partition 0."""
        records = []
        for raw in raws:
            records.append(SimpleNamespace(partition=0, offset=self.fed, value=raw))
            self.fed += 1

        async def run() -> None:
            for i in range(0, len(records), self.batch_size):
                await self.processor.process(records[i:i + self.batch_size])
                for topic, _key, value, _partition in self.processor.sink.take():
                    if topic == self._deadletter_topic:
                        d = DeadLetter.model_validate_json(value)
                        self.letters.append((d.offset, d.reason))
                for store in self.processor.stores:
                    store.take_pending()  # what the engine would write to the changelogs

        self.loop.run_until_complete(run())

    def state_keys(self) -> list[bytes]:
        """Every key the accounts table holds."""
        return self.processor.accounts.keys()

    def close(self) -> None:
        """Close the loop."""
        self.loop.close()
        asyncio.set_event_loop(None)


def _harness_settings(tmp_path: Path) -> Settings:
    # Pseudonymisation on: hostile identifiers go through the HMAC path too.
    return Settings(topic_prefix="fuzz.", app_id="fuzz", data_dir=tmp_path / "data",
                    pseudonymise_key="fuzz-key-0123456789abcdef")  # type: ignore[arg-type]


@pytest.fixture
def harness(tmp_path: Path, caplog: pytest.LogCaptureFixture):
    # Thousands of dead-letter warnings would pile up in pytest's log capture; errors still show.
    caplog.set_level(logging.ERROR, logger="riskwatch")
    h = AgentHarness(_harness_settings(tmp_path))
    yield h
    h.close()


def _assert_accounted(h: AgentHarness, oracle: Oracle) -> None:
    got, want = h.counts(), oracle.counts
    assert got["consumed"] == want["consumed"]
    assert got["invalid"] == want["invalid"], (got, want)
    assert got["duplicate"] == want["duplicate"], (got, want)
    assert got["scored"] == want["scored"], (got, want)
    assert got["late"] == want["late"], (got, want)
    assert len(h.letters) == want["invalid"] and all(reason for _, reason in h.letters)
    assert len({offset for offset, _ in h.letters}) == len(h.letters), "one dead letter per invalid input"


class Mutator:
    """A seeded generator of valid, duplicate, out-of-order, late and broken transactions."""

    VALUES: tuple[Any, ...] = (None, True, False, 0, -1, -0.0, 1e308, float("nan"), float("inf"), -float("inf"),
                               "", [], {}, [[[[]]]], {"a": {"b": []}}, "NaN", "DEBIT", "teleport", "\u0000",
                               "2026-13-01T00:00:00Z", "0001-01-01T00:00:00+00:00", "2025-06-01T10:00:00",
                               1748743200, "🙂" * 70, "' OR 1=1 --")

    def __init__(self, seed: int) -> None:
        self.rng = random.Random(seed)
        self.k = 0
        self.recent: list[bytes] = []

    def _valid(self) -> dict[str, Any]:
        self.k += 1
        e = _event(self.k)
        r = self.rng.random()
        if r < 0.05:  # out of order, within the allowed lateness
            e["ts"] = (datetime.fromisoformat(e["ts"]) - timedelta(seconds=self.rng.uniform(1, 3000))).isoformat()
        elif r < 0.08:  # late: beyond it
            e["ts"] = (datetime.fromisoformat(e["ts"]) - timedelta(hours=self.rng.uniform(1.1, 2000))).isoformat()
        elif r < 0.09:  # in the future: a little (accepted) or a lot (rejected)
            e["ts"] = (NOW + timedelta(hours=self.rng.choice([1, 23, 25, 24 * 400]))).isoformat()
        return e

    def _field_mutation(self) -> bytes:
        e = self._valid()
        for _ in range(self.rng.randint(1, 3)):
            name = self.rng.choice([*e.keys(), "extra"])
            r = self.rng.random()
            if r < 0.15:
                e.pop(name, None)
            elif r < 0.25:
                e[name] = "x" * self.rng.choice([129, 257, 5_000, 300_000])
            else:
                e[name] = self.rng.choice(self.VALUES)
        raw = json.dumps(e, allow_nan=True)
        if self.rng.random() < 0.05:  # deep nesting in an extra field, at any depth up to 2,000 or far beyond
            # 201 to 997 levels: the worker's fast decoder accepted what the contract refuses (issue 17).
            d = self.rng.choice([100, 5_000, 60_000, self.rng.randint(1, 2_000), self.rng.randint(190, 1_000)])
            raw = raw[:-1] + ', "deep": ' + "[" * d + "]" * d + "}"
        return raw.encode()

    def _byte_mutation(self) -> bytes:
        raw = bytearray(json.dumps(self._valid()).encode())
        r = self.rng.random()
        if r < 0.3:
            return bytes(raw[: self.rng.randrange(len(raw))])
        if r < 0.6:
            for _ in range(self.rng.randint(1, 8)):
                raw[self.rng.randrange(len(raw))] = self.rng.randrange(256)
            return bytes(raw)
        if r < 0.75:
            i = self.rng.randrange(len(raw))
            return bytes(raw[:i] + self.rng.randbytes(self.rng.randint(1, 64)) + raw[i:])
        if r < 0.9:
            return self.rng.randbytes(self.rng.randint(0, 512))
        return self.rng.choice([b"\xef\xbb\xbf" + raw, b"[" + raw + b"]", raw + raw, b"null", b"{}", b"42"])

    def next(self) -> bytes:
        """The next input."""
        r = self.rng.random()
        if r < 0.5:
            raw = json.dumps(self._valid()).encode()
            self.recent = [*self.recent[-50:], raw]
            return raw
        if r < 0.58 and self.recent:
            return self.rng.choice(self.recent[-20:])  # a redelivery or a producer retry
        if r < 0.8:
            return self._field_mutation()
        return self._byte_mutation()


def test_seeded_fuzz_against_decoder_and_ingest() -> None:
    gen, ingest = Mutator(seed=11), Ingest(Settings())
    n, accepted = 100_000, 0
    for _ in range(n):
        e = check_decoded(gen.next())
        if e is not None:
            try:
                ingest.transaction(e)
                accepted += 1
            except EventError as exc:
                assert exc.field == "ts"
    assert 0.3 * n < accepted < 0.8 * n, accepted  # the mix must keep exercising both sides


def test_seeded_fuzz_through_the_agent(harness: AgentHarness, capsys: pytest.CaptureFixture[str]) -> None:
    gen, oracle = Mutator(seed=12), Oracle(Ingest(harness.rt.settings))
    batch = [gen.next() for _ in range(4_000)]
    for raw in batch:
        oracle.see(raw)
    harness.feed(batch)
    warm = _rss_mb()
    t0 = time.monotonic()
    for _ in range(4):
        batch = [gen.next() for _ in range(4_000)]
        for raw in batch:
            oracle.see(raw)
        harness.feed(batch)
    grew = _rss_mb() - warm
    _assert_accounted(harness, oracle)
    assert all(k.startswith(b"ps-") for k in harness.state_keys()), "state must hold pseudonyms only"
    assert grew < 64, f"memory grew {grew:.0f} MiB over 16,000 inputs after warm-up"
    with capsys.disabled():
        print(f"\nfuzz through the agent: {oracle.counts} in {time.monotonic() - t0:.1f}s after warm-up, "
              f"RSS +{grew:.1f} MiB")


@pytest.fixture(scope="module")
def shared_harness(tmp_path_factory: pytest.TempPathFactory):
    h = AgentHarness(_harness_settings(tmp_path_factory.mktemp("agent")))
    h.oracle = Oracle(Ingest(h.rt.settings))  # type: ignore[attr-defined]
    yield h
    h.close()


inputs = st.one_of(
    valid_txns.map(lambda e: json.dumps(e, ensure_ascii=False).encode()),
    st.tuples(valid_txns, st.dictionaries(st.sampled_from(sorted(Transaction.model_fields)), hostile_values,
                                          min_size=1, max_size=2))
      .map(lambda p: json.dumps({**p[0], **p[1]}, allow_nan=True).encode()),
    st.binary(max_size=300),
)


@settings(FUZZ, max_examples=200)
@given(st.lists(inputs, min_size=1, max_size=20), st.data())
def test_agent_property_every_input_accounted(shared_harness: AgentHarness, batch: list[bytes],
                                              data: st.DataObject) -> None:
    # Redeliver some inputs of the batch: they must be counted once as scored, then as duplicates.
    again = data.draw(st.lists(st.sampled_from(batch), max_size=5))
    oracle: Oracle = shared_harness.oracle  # type: ignore[attr-defined]
    for raw in [*batch, *again]:
        oracle.see(raw)
    shared_harness.feed([*batch, *again])
    _assert_accounted(shared_harness, oracle)


# --- the corpus through a real worker -------------------------------------------------------------

def _generated() -> list[tuple[str, bytes]]:
    base = _event(500, account_id="fz-big")
    one_mb = {**base, "event_id": "fz-1mb", "padding": "p" * 1_000_000}
    return [
        ("900-invalid@counterparty_id-huge-string", json.dumps({**base, "counterparty_id": "c" * 300_000}).encode()),
        ("901-valid-one-megabyte-unknown-field", json.dumps(one_mb).encode()),
        ("902-invalid@event_id-one-megabyte-known-field",
         json.dumps({**base, "event_id": "e" * 1_000_000}).encode()),
        ("903-invalid-nesting-100k", b"[" * 100_000 + b"]" * 100_000),
    ]


def _key(raw: bytes) -> bytes:
    try:
        value = json.loads(raw)
        account = value.get("account_id") if isinstance(value, dict) else None
    except (ValueError, RecursionError):
        account = None
    return str(account).encode() if isinstance(account, str) else b"fuzz"


def _produce_recorded(s: Settings, items: list[tuple[str, bytes]]) -> list[tuple[int, int]]:
    from app.admin import producer

    p = producer(s)
    try:
        futures = [p.send(s.topic(TRANSACTIONS), key=_key(raw), value=raw) for _, raw in items]
        p.flush(60)
        return [(md.partition, md.offset) for md in (f.get(timeout=60) for f in futures)]
    finally:
        p.close()


@pytest.mark.kafka
def test_corpus_through_the_worker(settings, start_worker) -> None:
    items = [(p.name, p.read_bytes()) for p in sorted(CORPUS.iterdir()) if p.name[:3].isdigit()]
    items += _generated()
    kinds = [name.split("-")[1] for name, _ in items]
    worker = start_worker(settings)
    rss_before = _worker_rss(worker.proc.pid)
    where = _produce_recorded(settings, items)
    topic = settings.topic(TRANSACTIONS)
    deadline = time.monotonic() + 90
    while worker.metric("riskwatch_events_consumed_total", topic=topic) < len(items):
        assert worker.proc.poll() is None, f"the worker must survive hostile input:\n{worker.tail()}"
        assert time.monotonic() < deadline, worker.tail()
        time.sleep(0.3)
    c = {k: worker.metric(f"riskwatch_{k}_total", topic=topic)
         for k in ("events_consumed", "events_scored", "deadletters", "duplicates", "late_events")}

    letters = {(d.partition, d.offset): d for d in (
        DeadLetter.model_validate(x) for x in
        consume(settings, DEADLETTER, lambda got: len(got) >= c["deadletters"], timeout=60))}
    for (name, raw), kind, pos in zip(items, kinds, where, strict=True):
        if kind.startswith("invalid"):
            assert pos in letters, f"{name} was not dead-lettered"
            d = letters[pos]
            assert d.reason and d.payload_size == len(raw) and d.source_topic == topic
            if "@" in kind:
                assert d.field == kind.split("@")[1], (name, d.reason)
        elif kind != "coerced":
            assert pos not in letters, f"{name} was dead-lettered: {letters[pos].reason}"
    coerced_rejected = sum(1 for k, pos in zip(kinds, where, strict=True) if k == "coerced" and pos in letters)
    scored = sum(k in ("valid", "ooo", "late", "coerced") for k in kinds) - coerced_rejected
    assert c == {"events_consumed": len(items), "events_scored": scored, "deadletters": len(letters),
                 "duplicates": sum(k == "dup" for k in kinds), "late_events": sum(k == "late" for k in kinds)}
    grew = _worker_rss(worker.proc.pid) - rss_before
    assert grew < 100, f"the worker's memory grew {grew:.0f} MiB on {len(items)} inputs"
    print(f"corpus: {len(items)} inputs, {scored} scored, {len(letters)} dead-lettered, "
          f"{int(c['duplicates'])} duplicates, {int(c['late_events'])} late; RSS +{grew:.0f} MiB")


def _worker_rss(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmRSS:"):
            return int(line.split()[1]) / 1024
    return 0.0
