"""The per-partition transaction step the worker and replay both run, over one small account-state store.

Replay (models.pipeline.Pipeline) and the worker (agents.transactions.TransactionProcessor) differ only
in where records come from, where outputs go and which `StateStore` backend holds the accounts: a
dict here (`MemoryStore`), a changelog table in the worker. Everything between, in this order, is
`TxnCore.step`: the account's state, the offset-based redelivery check, scoring (with the scorer's
event-id dedup), idle tracking for eviction, and the partition's flow totals for the liquidity
monitor.

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

from collections.abc import Callable, Iterator
from typing import Any, Protocol

from models.aggregates import FlowAccumulator, FlowTotals
from models.features import AccountState
from models.schemas import TransactionFields
from models.scoring import TransactionScorer, TxnOutcome


class StateStore(Protocol):
    """Where account states live, by (partition, key): get, put, delete, iterate, flush.

    `get` hands out the live state object: the step changes it in place, and the store writes
    whatever it handed out when flushed. `rollback` drops one key's changes since the last flush
    (a step that failed half-way must not be written).
    """

    def get(self, partition: int, key: bytes) -> AccountState | None:
        """The account's state, or None when the store has none."""

    def put(self, partition: int, key: bytes, state: AccountState) -> None:
        """Keep `state` as the account's state (written at the next flush)."""

    def delete(self, partition: int, key: bytes) -> None:
        """Forget the account (an idle one evicted)."""

    def iterate(self, partition: int) -> Iterator[tuple[bytes, AccountState]]:
        """Every (key, state) of a partition."""

    def flush(self) -> None:
        """Write the states changed since the last flush to the backend."""

    def rollback(self, partition: int, key: bytes) -> None:
        """Drop the account's changes since the last flush."""


class MemoryStore:
    """The in-memory StateStore replay, evaluation and benchmarks use: states by key, nothing to write.

    A key lives in one partition only (partitioning is by key), so one dict holds every partition.
    """

    def __init__(self) -> None:
        self.states: dict[bytes, AccountState] = {}

    def __len__(self) -> int:
        return len(self.states)

    # Read by account id, as a dict of them: what analysts and tests inspect after a replay.
    def __getitem__(self, account_id: str) -> AccountState:
        return self.states[account_id.encode()]

    def __contains__(self, account_id: object) -> bool:
        return isinstance(account_id, str) and account_id.encode() in self.states

    def __iter__(self) -> Iterator[str]:
        return (key.decode() for key in self.states)

    def get(self, partition: int, key: bytes) -> AccountState | None:
        """The account's state, or None."""
        return self.states.get(key)

    def put(self, partition: int, key: bytes, state: AccountState) -> None:
        """Keep the account's state."""
        self.states[key] = state

    def delete(self, partition: int, key: bytes) -> None:
        """Forget the account."""
        self.states.pop(key, None)

    def iterate(self, partition: int) -> Iterator[tuple[bytes, AccountState]]:
        """Every (key, state) held (partitions are not told apart in memory)."""
        return iter(list(self.states.items()))

    def flush(self) -> None:
        """Nothing to write: the states are the store."""

    def rollback(self, partition: int, key: bytes) -> None:
        """In memory the changes are the state: the account starts again, as a set-aside value would."""
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

    def __init__(self, scorer: TransactionScorer, store: StateStore, eviction: IdleEviction,
                 flows_of: Callable[[int], FlowAccumulator]) -> None:
        self.scorer = scorer
        self.store = store
        self.eviction = eviction
        self.flows_of = flows_of

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
        if offset >= 0:
            if offset <= state.offset:
                return None, flows.add_counted(ts, txn.txn_type, txn.amount, txn.event_id, txn.account_kind, offset)
            state.offset = offset  # before scoring: the shift step it takes is logged under it
        out = self.scorer.process(txn, state, ts)
        if out.duplicate:
            return out, []
        self.eviction.touch(key, ts, partition)
        return out, flows.add_counted(ts, txn.txn_type, txn.amount, txn.event_id, txn.account_kind,
                                      offset if offset >= 0 else None)

    def evict(self, budget: int = 10_000) -> list[tuple[bytes, int]]:
        """Delete the accounts idle past the TTL from the store (at most `budget`); return their (key, partition)."""
        stale = self.eviction.stale(budget)
        delete = self.store.delete
        for key, partition in stale:
            delete(partition, key)
        return stale


__all__ = ["IdleEviction", "MemoryStore", "StateStore", "TxnCore"]
