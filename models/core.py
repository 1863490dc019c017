"""The per-partition steps the worker and replay both run, over one small state-store interface.

Replay (models.pipeline.Pipeline) and the worker (agents.transactions, agents.market) differ only
in where records come from, where outputs go and which `StateStore` backend holds the states: a
dict here (`MemoryStore`), a changelog table in the worker. Everything between is a step:
`TxnCore.step` (the account's state, the offset-based redelivery check, scoring with the scorer's
event-id dedup, idle tracking for eviction, the partition's flow totals for the liquidity monitor)
and `TickCore.step` (the instrument's state, the redelivery check, scoring, the partition's
market-stress totals).

>>> from models.rules import load_catalogue
>>> from models.schemas import Transaction
>>> from models.scoring import TransactionScorer
>>> from models.aggregates import FlowAccumulator
>>> core = TxnCore(TransactionScorer(load_catalogue()), MemoryStore(), IdleEviction(86400.0),
...                {0: FlowAccumulator("p0")}.__getitem__)
>>> txn = Transaction.model_validate({"event_id": "e1", "event_type": "transaction", "ts": "2026-11-01T10:00:00Z",
...     "account_id": "A1", "counterparty_id": "M1", "amount": 12.5, "currency": "CNY", "txn_type": "payment",
...     "direction": "debit", "channel": "app"})
>>> out, closed = core.step(txn, txn.ts.timestamp(), 0, 41)
>>> out.duplicate, closed, core.store.get(0, b"A1").offset
(False, [], 41)
>>> core.step(txn, txn.ts.timestamp(), 0, 41)[0] is None  # the same offset again: a redelivery
True
"""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator
from typing import Any, Generic, Protocol, TypeVar

from models.aggregates import (
    INFLOW_TYPES,
    OUTFLOW_TYPES,
    FlowAccumulator,
    FlowTotals,
    LiquidityParams,
    MarketAccumulator,
    MarketPartial,
)
from models.features import AccountState
from models.findings import Finding, Raised, track
from models.market import InstrumentState, MarketOutcome, MarketParams, score_tick
from models.rules import Catalogue
from models.schemas import MarketTick, TransactionFields
from models.scoring import TransactionScorer, TxnOutcome

S = TypeVar("S")
log = logging.getLogger(__name__)


class StateStore(Protocol[S]):
    """Where per-entity states (accounts, instruments) live, by (partition, key): get, put, delete, iterate, flush.

    `get` hands out the live state object: the step changes it in place, and the store writes
    whatever it handed out when flushed. `rollback` drops one key's changes since the last flush
    (a step that failed half-way must not be written).
    """

    def get(self, partition: int, key: bytes) -> S | None:
        """The entity's state, or None when the store has none."""

    def put(self, partition: int, key: bytes, state: S) -> None:
        """Keep `state` as the entity's state (written at the next flush, or at once if the backend has none)."""

    def delete(self, partition: int, key: bytes) -> None:
        """Forget the entity (an idle account evicted)."""

    def iterate(self, partition: int) -> Iterator[tuple[bytes, S]]:
        """Every (key, state) of a partition."""

    def flush(self) -> None:
        """Write the states changed since the last flush to the backend."""

    def rollback(self, partition: int, key: bytes) -> None:
        """Drop the entity's changes since the last flush."""


class MemoryStore(Generic[S]):
    """The in-memory StateStore replay, evaluation and benchmarks use: states by key, nothing to write.

    A key lives in one partition only (partitioning is by key), so one dict holds every partition.
    """

    def __init__(self) -> None:
        self.states: dict[bytes, S] = {}

    def __len__(self) -> int:
        return len(self.states)

    # Read by account id, as a dict of them: what analysts and tests inspect after a replay.
    def __getitem__(self, entity_id: str) -> S:
        return self.states[entity_id.encode()]

    def __contains__(self, entity_id: object) -> bool:
        return isinstance(entity_id, str) and entity_id.encode() in self.states

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in self.states)

    def get(self, partition: int, key: bytes) -> S | None:
        """The entity's state, or None."""
        return self.states.get(key)

    def put(self, partition: int, key: bytes, state: S) -> None:
        """Keep the entity's state."""
        self.states[key] = state

    def delete(self, partition: int, key: bytes) -> None:
        """Forget the entity."""
        self.states.pop(key, None)

    def iterate(self, partition: int) -> Iterator[tuple[bytes, S]]:
        """Every (key, state) held (partitions are not told apart in memory)."""
        return iter(list(self.states.items()))

    def flush(self) -> None:
        """Nothing to write: the states are the store."""

    def rollback(self, partition: int, key: bytes) -> None:
        """In memory the changes are the state: the entity starts again, as a set-aside value would."""
        self.states.pop(key, None)


class IdleEviction:
    """Remembers when each account was last seen (in event time), per partition, and evicts those idle past the TTL.

    TxnCore touches it for every scored event, so replay keeps and drops the same accounts the worker
    does. A plain dict per partition kept in order of last touch (a touched key is re-inserted at the
    end): about half the memory per account of an OrderedDict, which mattered at millions of accounts.
    """

    def __init__(self, ttl: float) -> None:
        self.ttl = ttl
        self.seen: dict[int, dict[Any, float]] = {}
        self.now = 0.0

    def touch(self, key: Any, ts: float, partition: int = 0) -> None:
        """Mark a key of `partition` active at event time ts."""
        seen = self.seen.get(partition)
        if seen is None:
            seen = self.seen[partition] = {}
        old = seen.pop(key, None)
        # A late event must not make an active account look idle: keep its newest time.
        seen[key] = ts if old is None or ts > old else old
        if ts > self.now:
            self.now = ts

    def stale(self, budget: int = 10_000) -> list[tuple[Any, int]]:
        """(key, partition) of keys idle longer than the TTL, oldest first per partition, at most `budget`."""
        out: list[tuple[Any, int]] = []
        horizon = self.now - self.ttl
        for partition, seen in self.seen.items():
            # One pass from the oldest, then the deletions: no rescans of the dict's freed slots.
            victims: list[Any] = []
            for key, ts in seen.items():
                if ts >= horizon or len(out) + len(victims) >= budget:
                    break
                victims.append(key)
            for key in victims:
                del seen[key]
            out.extend((key, partition) for key in victims)
        return out

    def keep_only(self, partitions: set[int]) -> None:
        """Stop tracking partitions this worker no longer owns: their new owner evicts them."""
        for p in set(self.seen) - partitions:
            del self.seen[p]


class TxnCore:
    """One transaction of one partition, start to finish: state, redelivery, scoring, eviction, flow totals.

    `flows_of(partition)` gives the partition's flow accumulator (the worker reads it back from its
    models table at first use; replay keeps one per emulated partition).
    """

    def __init__(self, scorer: TransactionScorer, store: StateStore[AccountState], eviction: IdleEviction,
                 flows_of: Callable[[int], FlowAccumulator]) -> None:
        self.scorer = scorer
        self.store = store
        self.eviction = eviction
        self.flows_of = flows_of
        # The liquidity monitor's currency and rates (models.aggregates.LiquidityParams), taken from the
        # catalogue they came with; the currencies without a rate already logged.
        self._fx_of: Catalogue | None = None
        self._fx_label = ""
        self._fx: dict[str, float] = {}
        self._fx_missing: set[str] = set()

    def step(self, txn: TransactionFields, ts: float, partition: int,
             offset: int = -1) -> tuple[TxnOutcome | None, list[FlowTotals]]:
        """Apply one decoded transaction (`offset` -1: none, as in replay); return its outcome and closed flow buckets.

        The outcome is None for a redelivered record (offset at or below the one its account's state
        already applied) and `duplicate` for an event id the account saw; neither is scored again.
        A redelivery still reaches the flow totals, which judge it by their own offset (a crash in
        the middle of a state write may have stored the account but not them).
        """
        key = txn.account_id.encode()
        store = self.store
        state = store.get(partition, key)
        if state is None:
            state = AccountState()
            store.put(partition, key, state)
        flows = self.flows_of(partition)
        if self.scorer.catalogue is not self._fx_of:
            self._fx_from(self.scorer.catalogue)
        amount = txn.amount
        if txn.currency != self._fx_label and (txn.txn_type in OUTFLOW_TYPES or txn.txn_type in INFLOW_TYPES):
            amount = self._converted(txn)
        if offset >= 0:
            if offset <= state.offset:
                return None, flows.add_counted(ts, txn.txn_type, amount, txn.event_id, txn.account_kind, offset)
            state.offset = offset  # before scoring: the shift step it takes is logged under it
        out = self.scorer.process(txn, state, ts)
        if out.duplicate:
            return out, []
        self.eviction.touch(key, ts, partition)
        return out, flows.add_counted(ts, txn.txn_type, amount, txn.event_id, txn.account_kind,
                                      offset if offset >= 0 else None)

    def _fx_from(self, catalogue: Catalogue) -> None:
        p = catalogue.params("liquidity_run", LiquidityParams)
        self._fx_of, self._fx_label, self._fx = catalogue, p.currency, dict(p.fx_rates)

    def _converted(self, txn: TransactionFields) -> float:
        # A platform flow in another currency than the liquidity monitor's, in the monitor's currency.
        rate = self._fx.get(txn.currency)
        if rate is not None:
            return txn.amount * rate
        if txn.currency not in self._fx_missing:
            self._fx_missing.add(txn.currency)
            label = self._fx_label
            log.warning("liquidity_run has no rate for %s: its deposits, withdrawals, investments and redemptions are "
                        "added to the platform's net outflow as if they were %s. Set rules.liquidity_run.params."
                        "fx_rates.%s (%s per %s), or currency: %s if the platform settles in %s",
                        txn.currency, label, txn.currency, label, txn.currency, txn.currency, txn.currency)
        return txn.amount

    def evict(self, budget: int = 10_000) -> list[tuple[bytes, int]]:
        """Delete the accounts idle past the TTL from the store (at most `budget`); return their (key, partition)."""
        stale = self.eviction.stale(budget)
        delete = self.store.delete
        for key, partition in stale:
            delete(partition, key)
        return stale


class MarketScorer:
    """Applies the catalogue to per-instrument scoring: only the findings of enabled rules warn."""

    def __init__(self, catalogue: Catalogue) -> None:
        self.set_catalogue(catalogue)

    def set_catalogue(self, catalogue: Catalogue) -> None:
        """Take a new catalogue into force."""
        self.catalogue = catalogue
        self.params = catalogue.params("market_crash", MarketParams)

    def process(self, tick: MarketTick, state: InstrumentState,
                ts: float | None = None) -> tuple[MarketOutcome, list[Any]]:
        """Score one tick (`ts`: its epoch seconds, when the caller has them); return the outcome and raised alerts."""
        if ts is None:
            ts = tick.ts.timestamp()
        out = score_tick(state, ts, tick.price, tick.event_id, tick.instrument, self.params)
        kept: list[Finding] = []
        for f in out.findings:
            rule = self.catalogue.rule(f.category)
            if rule is not None:
                kept.append(f)
        out.findings = kept
        return out, track(state.alerts, kept, ts, tick.event_id)


class TickCore:
    """One market tick of one partition: its instrument's state, redelivery, scoring, and stage one of market stress.

    `stress_of(partition)` gives the partition's stress accumulator. The step does not store the
    state: the caller puts it once the tick's warnings and partials are on their way (in the worker,
    a stored state marks the tick applied, so what it caused must be sent first).
    """

    def __init__(self, scorer: MarketScorer, store: StateStore[InstrumentState],
                 stress_of: Callable[[int], MarketAccumulator]) -> None:
        self.scorer = scorer
        self.store = store
        self.stress_of = stress_of

    def step(self, tick: MarketTick, ts: float, partition: int, offset: int = -1
             ) -> tuple[InstrumentState, MarketOutcome, list[Raised], list[MarketPartial]] | None:
        """Score one tick (`offset` -1: none, as in replay); None for a redelivered one.

        Returns its instrument's state (to put), the outcome, the warnings raised and the stress
        partials of buckets it closed or revised.
        """
        store = self.store
        key = tick.instrument.encode()
        state = store.get(partition, key)
        if state is None:
            state = InstrumentState()
        elif 0 <= offset <= state.offset:
            return None
        out, raised = self.scorer.process(tick, state, ts)
        if offset >= 0:
            state.offset = offset
        partials = self.stress_of(partition).add(ts, tick.instrument, out.stressed, tick.event_id, move=out.move,
                                                 spacing=out.spacing, offset=offset if offset >= 0 else None)
        return state, out, raised, partials


__all__ = ["IdleEviction", "MarketScorer", "MemoryStore", "StateStore", "TickCore", "TxnCore"]
