"""Fast decoding of transactions for the worker (msgspec), agreeing with the pydantic contract in models.schemas.

Parsing and validating a transaction with pydantic cost the worker about a quarter of its time
per event (far more inside the busy loop than in a microbenchmark); msgspec decodes the same
contract into a plain struct several times faster. pydantic stays the authority: msgspec is only
trusted with what it accepts, and everything it refuses (broken JSON, a missing field, but also
lax forms pydantic allows, such as an amount sent as a string or an epoch-number time) is decoded
again by `decode_event`, which accepts it or words the dead-letter reason exactly as before.
tests/unit/test_wire.py checks that whatever this module accepts, pydantic accepts with equal values.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

import msgspec

from models.errors import EventError
from models.schemas import (
    MAX_JSON_DEPTH,
    MAX_PAYLOAD_BYTES,
    MAX_TS,
    MIN_TS,
    AccountKind,
    Transaction,
    TransactionFields,
    TxnType,
    decode_event,
    unframe,
)

_Id = Annotated[str, msgspec.Meta(min_length=1, max_length=128)]
_MIN_EPOCH = MIN_TS.timestamp()  # the contract's range (models.schemas), as epoch seconds
_MAX_EPOCH = MAX_TS.timestamp()


class TransactionRecord(msgspec.Struct, frozen=True, gc=False):
    """A validated transaction as the worker scores it: Transaction's fields, limits and defaults, without pydantic.

    gc=False: it holds only strings, numbers and a datetime, so the cyclic collector need not track it.
    """

    event_id: _Id
    ts: Annotated[datetime, msgspec.Meta(tz=True)]
    account_id: _Id
    counterparty_id: _Id
    amount: Annotated[float, msgspec.Meta(gt=0, lt=1e15)]
    # \Z, not $: Python's $ also matches before a final newline, pydantic's (Rust) regex does not.
    currency: Annotated[str, msgspec.Meta(pattern=r"^[A-Z]{3}\Z")]
    direction: Literal["debit", "credit"]
    txn_type: TxnType
    channel: Annotated[str, msgspec.Meta(min_length=1, max_length=32)]
    event_type: Literal["transaction"] = "transaction"
    label: Literal[0, 1] | None = None
    account_kind: AccountKind = "customer"
    counterparty_kind: AccountKind = "customer"
    device_id: Annotated[str, msgspec.Meta(max_length=128)] | None = None
    ip: Annotated[str, msgspec.Meta(max_length=64)] | None = None
    country: Annotated[str, msgspec.Meta(max_length=8)] | None = None
    merchant_category: Annotated[str, msgspec.Meta(max_length=16)] | None = None


_decode = msgspec.json.Decoder(TransactionRecord).decode
# Nesting deeper than MAX_JSON_DEPTH needs more than this many bytes (an opening and a closing
# bracket per level). msgspec skips an unknown field nested 201 to 997 levels deep, pydantic refuses
# it: input that long with more brackets than the limit (also counting those in strings, which only
# sends more to the slow path) is left to pydantic. Shorter input, nearly every transaction (about
# 250 bytes), skips the count: it costs about 1 us on 560 bytes here, where the decode takes ~6 us.
_MAY_NEST_TOO_DEEP = 2 * MAX_JSON_DEPTH + 2


def decode_transaction(raw: bytes) -> tuple[TransactionFields, float]:
    """Parse and validate one transaction, with its epoch time; EventError (pydantic's wording) if it is not one."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise EventError(f"payload is {len(raw)} bytes, above the {MAX_PAYLOAD_BYTES} byte limit", None)
    try:
        if not raw.isascii():
            # msgspec skips unknown fields without checking their UTF-8; pydantic refuses such input.
            raw.decode()
        if len(raw) >= _MAY_NEST_TOO_DEEP and raw.count(b"[") + raw.count(b"{") > MAX_JSON_DEPTH:
            raise ValueError("may nest deeper than the contract allows")
        txn = _decode(raw)
    except Exception:  # noqa: BLE001 - whatever msgspec refuses (bad UTF-8, nesting, ...), pydantic decides
        # Schema Registry's header (unframe): no cost to plain JSON, and framed JSON keeps the fast path.
        if raw[:1] == b"\x00" and (inner := unframe(raw)) is not raw:
            return decode_transaction(inner)
        slow = decode_event(raw, Transaction)
        return slow, slow.ts.timestamp()
    ts = txn.ts.timestamp()
    # msgspec has no bounds for datetimes: the contract's 2000-2100 range is checked here (on the
    # epoch time the caller needs anyway: comparing aware datetimes costs two utcoffset calls).
    if _MIN_EPOCH <= ts < _MAX_EPOCH:
        return txn, ts
    slow = decode_event(raw, Transaction)
    return slow, slow.ts.timestamp()


def replace(txn: TransactionFields, **changes: str) -> TransactionFields:
    """A copy of `txn` with some string fields replaced, whichever decoder made it."""
    if isinstance(txn, TransactionRecord):
        return msgspec.structs.replace(txn, **changes)
    if isinstance(txn, Transaction):
        return txn.model_copy(update=changes)
    raise TypeError(f"not a transaction: {type(txn).__name__}")


__all__ = ["TransactionRecord", "decode_transaction", "replace"]
