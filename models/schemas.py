"""The wire contract: pydantic models for transactions, market ticks, warnings and dead letters."""

from __future__ import annotations

import json
import math
from datetime import UTC, datetime
from typing import Annotated, Any, Literal, Protocol, TypeVar, overload

import msgspec
from pydantic import (
    AwareDatetime,
    BaseModel,
    ConfigDict,
    Field,
    TypeAdapter,
    ValidationError,
    field_validator,
)

from models.errors import EventError

TxnType = Literal[
    "payment",
    "transfer",
    "withdrawal",
    "deposit",
    "loan_disbursement",
    "loan_repayment",
    "investment",
    "redemption",
]
AccountKind = Literal["customer", "custody", "platform_own"]
Level = Literal["low", "medium", "high", "critical"]
EntityType = Literal["account", "instrument", "market", "platform"]
LEVELS: tuple[str, ...] = ("low", "medium", "high", "critical")

# Event times outside this range are typos or clock faults, not history we can learn from.
MIN_TS = datetime(2000, 1, 1, tzinfo=UTC)
MAX_TS = datetime(2100, 1, 1, tzinfo=UTC)


_LABEL_WORDS = {"0": 0, "1": 1, "false": 0, "true": 1}


class _Event(BaseModel):
    """Fields every input event carries; unknown fields are accepted and ignored."""

    model_config = ConfigDict(extra="ignore", frozen=True, allow_inf_nan=False, str_max_length=256)

    event_id: str = Field(min_length=1, max_length=128)
    ts: AwareDatetime = Field(ge=MIN_TS, lt=MAX_TS, description="RFC 3339 with an offset, 2000-2100")
    label: Literal[0, 1] | None = None

    @field_validator("ts", mode="before")
    @classmethod
    def _round_sub_microseconds(cls, value: Any) -> Any:
        # Fractions beyond microseconds (Java's Instant prints nanoseconds) are rounded to the
        # nearest microsecond, as the worker's fast decoder (app.wire) does; pydantic alone would
        # truncate, and live and replay would then disagree by a microsecond.
        if type(value) is str and (dot := value.find(".")) > 0 and value[dot + 1:dot + 8].isdigit():
            try:
                return msgspec.convert(value, datetime)
            except msgspec.ValidationError:
                return value  # pydantic's own parser decides, and words the error
        return value

    @field_validator("label", mode="before")
    @classmethod
    def _label_as_written_by_other_tools(cls, value: Any) -> Any:
        # Labelled files come from pandas, Spark, spreadsheets: true/false, "1"/"0" and 1.0/0.0 are
        # the same labels, and refusing them would drop the whole event from a replay.
        if value is True or value is False:
            return int(value)
        if type(value) is str:
            return _LABEL_WORDS.get(value.strip().lower(), value)
        if type(value) is float and value in (0.0, 1.0):
            return int(value)
        return value


class Transaction(_Event):
    """A money movement on one account (topic risk.transactions, key account_id)."""

    event_type: Literal["transaction"] = "transaction"
    account_id: str = Field(min_length=1, max_length=128)
    counterparty_id: str = Field(min_length=1, max_length=128)
    amount: float = Field(gt=0, lt=1e15, description="Major units of `currency`")
    currency: str = Field(pattern=r"^[A-Z]{3}$")
    direction: Literal["debit", "credit"]
    txn_type: TxnType
    channel: str = Field(min_length=1, max_length=32)
    account_kind: AccountKind = "customer"
    counterparty_kind: AccountKind = "customer"
    device_id: str | None = Field(None, max_length=128)
    ip: str | None = Field(None, max_length=64)
    country: str | None = Field(None, max_length=8)
    merchant_category: str | None = Field(None, max_length=16)


class TransactionFields(Protocol):
    """What scoring reads of a transaction: a Transaction, or the worker's faster app.wire.TransactionRecord."""

    @property
    def event_id(self) -> str: ...
    @property
    def ts(self) -> datetime: ...
    @property
    def label(self) -> Literal[0, 1] | None: ...
    @property
    def account_id(self) -> str: ...
    @property
    def counterparty_id(self) -> str: ...
    @property
    def amount(self) -> float: ...
    @property
    def currency(self) -> str: ...
    @property
    def direction(self) -> Literal["debit", "credit"]: ...
    @property
    def txn_type(self) -> TxnType: ...
    @property
    def channel(self) -> str: ...
    @property
    def account_kind(self) -> AccountKind: ...
    @property
    def counterparty_kind(self) -> AccountKind: ...
    @property
    def device_id(self) -> str | None: ...
    @property
    def ip(self) -> str | None: ...
    @property
    def country(self) -> str | None: ...
    @property
    def merchant_category(self) -> str | None: ...


class MarketTick(_Event):
    """A price observation for one instrument (topic risk.market, key instrument)."""

    event_type: Literal["market"] = "market"
    instrument: str = Field(min_length=1, max_length=64)
    price: float = Field(gt=0, lt=1e15)
    volume: float | None = Field(None, ge=0)
    bid: float | None = Field(None, gt=0)
    ask: float | None = Field(None, gt=0)
    venue: str | None = Field(None, max_length=64)


class Reason(BaseModel):
    """One readable cause of a warning, with the measured value and the threshold it crossed."""

    model_config = ConfigDict(extra="ignore")

    code: str
    message: str
    value: float | None = None
    threshold: float | None = None


class Alert(BaseModel):
    """A warning on risk.alerts (key entity_id); the same events always give the same alert_id."""

    model_config = ConfigDict(extra="ignore")

    alert_id: str
    created_at: AwareDatetime
    event_ts: AwareDatetime
    entity_type: EntityType
    entity_id: str
    category: str
    level: Level
    score: float = Field(ge=0.0, le=1.0)
    reasons: list[Reason]
    event_ids: list[str]
    detector: str
    # Came later: consumers that ignore unknown fields are unaffected, and a warning written before
    # it (or a platform or market one) has none.
    txn_type: TxnType | None = Field(None, description="An account warning's transaction type, of the event that "
                                                       "produced this version")


class DeadLetter(BaseModel):
    """An input that could not be processed, with where it came from and why (risk.deadletter)."""

    payload: str
    payload_size: int
    payload_truncated: bool = False
    source_topic: str
    partition: int | None = None
    offset: int | None = None
    reason: str
    field: str | None = None
    event_id: str | None = None
    received_at: AwareDatetime


E = TypeVar("E", "Transaction", "MarketTick")
Event = Annotated[Transaction | MarketTick, Field(discriminator="event_type")]
_ANY_EVENT: TypeAdapter[Transaction | MarketTick] = TypeAdapter(Event)
MAX_PAYLOAD_BYTES = 1_048_576
# JSON nested deeper than this (the outer object counts as one level) is refused: pydantic-core's
# parser (jiter) stops there, wherever the nesting is, also in a field the contract ignores.
# app.wire holds the worker's fast decoder (msgspec, whose own limit is about 1,000) to the same.
MAX_JSON_DEPTH = 200
DEADLETTER_PAYLOAD_BYTES = 65_536


def _reason(exc: ValidationError) -> EventError:
    err = exc.errors(include_url=False)[0]
    loc = ".".join(str(p) for p in err["loc"] if not isinstance(p, int) or len(err["loc"]) == 1)
    # The discriminated union puts the tag first in loc; it is noise for a person.
    loc = loc.removeprefix("transaction.").removeprefix("market.")
    if err["type"] == "json_invalid":
        return EventError(f"not valid JSON: {err['msg']}", None)
    if err["type"] == "union_tag_invalid" or err["type"] == "union_tag_not_found":
        return EventError("event_type must be 'transaction' or 'market'", "event_type")
    field = loc or None
    hint = _HINTS.get((field, err["type"])) or _HINTS.get((None, err["type"]), "")
    return EventError(f"{field or 'event'}: {err['msg']}{hint}", field)


# What to do about the errors a producer most often makes, said once in the reason.
_HINTS = {
    (None, "timezone_aware"): " (write the time with its offset, e.g. 2026-11-01T08:00:00Z or "
                              "2026-11-01T16:00:00+08:00)",
    ("amount", "greater_than"): " (amounts are positive; `direction` says debit or credit)",
    ("currency", "string_pattern_mismatch"): " (an ISO 4217 code in capitals, e.g. USD)",
    # Ids that are numbers in the producer's database often leave it as JSON numbers.
    (None, "string_type"): ' (ids and codes are JSON strings: "12345", not 12345)',
}


# Confluent Schema Registry's wire format: a zero byte, then the schema id as 4 bytes big-endian.
_FRAME = 5


def unframe(raw: bytes) -> bytes:
    """The JSON inside Confluent Schema Registry's wire format (the JSON Schema serializer's), else `raw` unchanged.

    Platforms on Confluent's stack often produce with KafkaJsonSchemaSerializer: JSON behind a 5-byte
    header. The schema itself is not fetched: the contract is checked field by field as for any JSON.

    >>> unframe(b'\\x00\\x00\\x00\\x00\\x07{"a": 1}')
    b'{"a": 1}'
    >>> unframe(b'{"a": 1}')
    b'{"a": 1}'
    >>> unframe(b'\\x00\\x00\\x00\\x00\\x07\\x02\\x08acct')  # doctest: +ELLIPSIS
    Traceback (most recent call last):
    ...
    models.errors.EventError: Confluent Schema Registry framing (schema id 7) around a value that is not JSON (Avro...
    """
    if raw[:1] != b"\x00" or len(raw) <= _FRAME:
        return raw
    body = raw[_FRAME:].lstrip()
    if body[:1] in (b"{", b"["):
        return raw[_FRAME:]
    schema = int.from_bytes(raw[1:_FRAME], "big")
    raise EventError(f"Confluent Schema Registry framing (schema id {schema}) around a value that is not JSON "
                     "(Avro or Protobuf?): riskwatch reads JSON events; produce with the JSON Schema serializer "
                     "or plain JSON", None)


@overload
def decode_event(raw: bytes | str, kind: type[E]) -> E: ...


@overload
def decode_event(raw: bytes | str, kind: None = None) -> Transaction | MarketTick: ...


def decode_event(raw: bytes | str, kind: type[E] | None = None) -> Transaction | MarketTick | E:
    """Parse and validate one event; raise EventError naming the field and the problem."""
    if len(raw) > MAX_PAYLOAD_BYTES:
        raise EventError(f"payload is {len(raw)} bytes, above the {MAX_PAYLOAD_BYTES} byte limit", None)
    if isinstance(raw, bytes):
        raw = unframe(raw)
    try:
        if kind is None:
            return _ANY_EVENT.validate_json(raw)
        return kind.model_validate_json(raw)
    except ValidationError as exc:
        raise _reason(exc) from None
    except (ValueError, RecursionError) as exc:  # pydantic-core's own limits on hostile input
        raise EventError(f"not valid JSON: {exc}", None) from None


def event_id_of(raw: bytes | str) -> str | None:
    """Best-effort event_id of an input that failed validation, so an operator can find it upstream."""
    if len(raw) > DEADLETTER_PAYLOAD_BYTES:
        return None
    try:
        value = json.loads(unframe(raw) if isinstance(raw, bytes) else raw)
    except (ValueError, RecursionError, EventError):
        return None
    eid = value.get("event_id") if isinstance(value, dict) else None
    return eid[:128] if isinstance(eid, str) else None


def decode_object(obj: dict[str, Any]) -> Transaction | MarketTick:
    """Validate an already-parsed mapping (CSV or Parquet rows) as an event."""
    try:
        return _ANY_EVENT.validate_python(obj)
    except ValidationError as exc:
        raise _reason(exc) from None


def is_finite(x: float) -> bool:
    """Return True for real numbers, False for NaN and infinities."""
    return not (math.isnan(x) or math.isinf(x))


__all__ = [
    "LEVELS",
    "MAX_JSON_DEPTH",
    "MAX_TS",
    "MIN_TS",
    "Alert",
    "DeadLetter",
    "Event",
    "MarketTick",
    "Reason",
    "Transaction",
    "TransactionFields",
    "decode_event",
    "decode_object",
    "event_id_of",
    "unframe",
]
