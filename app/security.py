"""Ingest guards for untrusted input: keyed pseudonyms for personal identifiers and a check on event time.

Every decoded input passes `Ingest` before it touches state. With `RISKWATCH_PSEUDONYMISE_KEY`
set, `account_id`, `counterparty_id`, `device_id` and `ip` are replaced by keyed HMAC-SHA256
pseudonyms, so tables, models, warnings and logs never hold the raw identifiers. The same key
always gives the same pseudonym, so per-entity state and warnings still line up; without the key
nobody can reverse them or test a guess. `python -m app.security ID...` prints the pseudonym of
an identifier, so an analyst can find the warnings about a known account.
"""

from __future__ import annotations

import hmac
import sys
import time
from collections.abc import Callable, Sequence
from typing import TypeVar

from app.settings import Settings, get_settings
from app.wire import replace
from models.errors import ConfigError, EventError
from models.schemas import MarketTick, TransactionFields

T = TypeVar("T", bound=TransactionFields)

PSEUDONYMISED_FIELDS = ("account_id", "counterparty_id", "device_id", "ip")
PSEUDONYM_PREFIX = "ps-"
MIN_KEY_LENGTH = 16
# 128 bits of the HMAC: collisions between real identifiers are out of reach, ids stay short.
_HEX_CHARS = 32


class Pseudonymiser:
    """Replaces identifiers with keyed HMAC-SHA256 pseudonyms, stable for a given key.

    >>> p = Pseudonymiser("0123456789abcdef-test-key")
    >>> p.pseudonym("acct-42") == p.pseudonym("acct-42"), p.pseudonym("acct-42").startswith("ps-")
    (True, True)
    >>> p.pseudonym("acct-42") == Pseudonymiser("another-key-0123456789").pseudonym("acct-42")
    False
    """

    __slots__ = ("_key",)

    def __init__(self, key: str) -> None:
        if len(key) < MIN_KEY_LENGTH:
            raise ConfigError(
                f"RISKWATCH_PSEUDONYMISE_KEY is {len(key)} characters long; use at least {MIN_KEY_LENGTH} "
                "random characters (for example the output of `openssl rand -hex 32`)")
        self._key = key.encode()

    def __repr__(self) -> str:
        return "Pseudonymiser(key=**********)"

    def pseudonym(self, value: str) -> str:
        """The pseudonym of one identifier."""
        return PSEUDONYM_PREFIX + hmac.digest(self._key, value.encode(), "sha256").hex()[:_HEX_CHARS]

    def transaction(self, txn: T) -> T:
        """A copy of the transaction with every identifier field replaced by its pseudonym."""
        update = {name: self.pseudonym(value) for name in PSEUDONYMISED_FIELDS
                  if (value := getattr(txn, name)) is not None}
        return replace(txn, **update)  # type: ignore[return-value]  # the same type in, the same out


def _span(seconds: float) -> str:
    if seconds >= 2 * 86400:
        return f"{seconds / 86400:,.0f} days"
    if seconds >= 2 * 3600:
        return f"{seconds / 3600:,.0f} h"
    return f"{seconds:,.0f} s"


class Ingest:
    """What every decoded input goes through before scoring: a clock check, then pseudonymisation."""

    def __init__(self, settings: Settings, clock: Callable[[], float] = time.time) -> None:
        key = settings.pseudonymise_key.get_secret_value()
        self.pseudonyms = Pseudonymiser(key) if key else None
        self.max_ahead = settings.max_future_seconds
        self.clock = clock

    def check_time(self, event: TransactionFields | MarketTick, ts: float | None = None) -> None:
        """Raise EventError when the event claims a time too far ahead of this worker's clock (ts: its epoch time)."""
        ahead = (event.ts.timestamp() if ts is None else ts) - self.clock()
        if ahead > self.max_ahead:
            # A future time would stall eviction and lateness for its entity until the clock catches up.
            raise EventError(
                f"ts: {event.ts.isoformat()} is {_span(ahead)} ahead of this worker's clock (limit "
                f"{_span(self.max_ahead)}); fix the producer's clock or the event's time", "ts")

    def transaction(self, txn: T, ts: float | None = None) -> T:
        """Check a decoded transaction and pseudonymise it when a key is configured (ts: its epoch time)."""
        self.check_time(txn, ts)
        return self.pseudonyms.transaction(txn) if self.pseudonyms is not None else txn

    def tick(self, tick: MarketTick) -> MarketTick:
        """Check a decoded market tick (instruments are public: nothing to pseudonymise)."""
        self.check_time(tick)
        return tick


def main(argv: Sequence[str] | None = None) -> int:
    """Print the pseudonym of each identifier given, with the key from RISKWATCH_PSEUDONYMISE_KEY."""
    ids = list(sys.argv[1:] if argv is None else argv)
    key = get_settings().pseudonymise_key.get_secret_value()
    if not key or not ids:
        print("usage: RISKWATCH_PSEUDONYMISE_KEY=... python -m app.security ID [ID ...]", file=sys.stderr)
        return 2
    try:
        p = Pseudonymiser(key)
    except ConfigError as exc:
        print(exc, file=sys.stderr)
        return 2
    for value in ids:
        print(f"{value}\t{p.pseudonym(value)}")
    return 0


__all__ = ["PSEUDONYMISED_FIELDS", "Ingest", "Pseudonymiser", "main"]


if __name__ == "__main__":
    sys.exit(main())
