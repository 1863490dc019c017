"""The worker's fast transaction decoder (app.wire) agrees with the pydantic contract on every input."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import example, given, settings
from hypothesis import strategies as st

from app.wire import TransactionRecord, decode_transaction, replace
from models.errors import EventError
from models.schemas import MAX_JSON_DEPTH, Transaction, decode_event, event_id_of

BASE: dict[str, Any] = {
    "event_id": "e1", "ts": "2026-10-31T16:00:02.426+08:00", "account_id": "A1", "counterparty_id": "M1",
    "amount": 52.31, "currency": "CNY", "direction": "debit", "txn_type": "payment", "channel": "pos",
}
FIELDS = list(Transaction.model_fields)


def variant(**changes: Any) -> bytes:
    d = dict(BASE)
    for k, v in changes.items():
        if v is ...:
            d.pop(k)
        else:
            d[k] = v
    return json.dumps(d).encode()


def verdict(raw: bytes) -> tuple[str, Any]:
    """("ok", fields) or ("error", (reason, field)) from a decoder."""
    try:
        return "ok", decode_event(raw, Transaction)
    except EventError as exc:
        return "error", (exc.reason, exc.field)


def assert_agrees(raw: bytes) -> None:
    expected_kind, expected = verdict(raw)
    try:
        got, ts = decode_transaction(raw)
    except EventError as exc:
        assert expected_kind == "error", f"fast decoder refused what pydantic accepts: {raw!r}: {exc.reason}"
        assert (exc.reason, exc.field) == expected, "dead-letter reasons must read as pydantic's"
        return
    assert expected_kind == "ok", f"fast decoder accepted what pydantic refuses ({expected}): {raw!r}"
    for name in FIELDS:
        a, b = getattr(expected, name), getattr(got, name)
        assert a == b, f"{name}: pydantic {a!r}, fast decoder {b!r} for {raw!r}"
        assert type(a) is type(b) or isinstance(a, datetime), name
    assert got.ts.utcoffset() == expected.ts.utcoffset() and ts == expected.ts.timestamp()
    assert (got.ts.hour, got.ts.timestamp()) == (expected.ts.hour, expected.ts.timestamp())


EDGE_CASES = {
    "canonical": variant(),
    "all optional fields": variant(device_id="d1", ip="10.0.0.1", country="GB", merchant_category="dining",
                                   label=1, account_kind="custody", counterparty_kind="platform_own"),
    "currency with a newline": variant(currency="CNY\n"),
    "currency lower case": variant(currency="cny"),
    "seven fraction digits": variant(ts="2026-10-31T16:00:02.4261239+08:00"),
    "nine fraction digits rounding up": variant(ts="2026-10-31T16:00:02.999999999Z"),
    "lower-case t and z": variant(ts="2026-10-31t16:00:02z"),
    "space separator": variant(ts="2026-10-31 16:00:02Z"),
    "leap second": variant(ts="2026-12-31T23:59:60Z"),
    "no seconds": variant(ts="2026-10-31T16:00Z"),
    "naive time": variant(ts="2026-10-31T16:00:02"),
    "offset 24h": variant(ts="2026-10-31T16:00:02+24:00"),
    "offset without colon": variant(ts="2026-10-31T16:00:02+0800"),
    "decimal comma": variant(ts="2026-10-31T16:00:02,5Z"),
    "epoch number": variant(ts=1761926402),
    "before 2000 in UTC": variant(ts="2000-01-01T00:30:00+01:00"),
    "year 2100": variant(ts="2100-01-01T00:00:00Z"),
    "amount as string": variant(amount="52.31"),
    "amount as integer": variant(amount=52),
    "amount as bool": variant(amount=True),
    "amount zero": variant(amount=0),
    "amount negative": variant(amount=-5),
    "amount at 1e15": variant(amount=1e15),
    "amount overflowing": variant(ts="2026-10-31T16:00:02Z").replace(b"52.31", b"1e400"),
    "amount NaN": variant().replace(b"52.31", b"NaN"),
    "duplicate key, last valid": variant().replace(b'"amount": 52.31', b'"amount": -5, "amount": 5'),
    "duplicate key, last invalid": variant().replace(b'"amount": 52.31', b'"amount": 5, "amount": -5'),
    "label true": variant(label=True),
    "label 1.0": variant(label=1.0),
    "label as string": variant(label="1"),
    "lone surrogate": variant().replace(b'"e1"', b'"e\\ud800"'),
    "NUL in an id": variant(event_id="e\u0000"),
    "128 emoji": variant(event_id="\U0001f600" * 128),
    "129 emoji": variant(event_id="\U0001f600" * 129),
    "empty id": variant(account_id=""),
    "missing field": variant(channel=...),
    "wrong event type": variant(event_type="market"),
    "unknown txn type": variant(txn_type="bribe"),
    "deeply nested extra field": variant().replace(b"{", b'{"x": ' + b"[" * 1000 + b"]" * 1000 + b", ", 1),
    "trailing garbage": variant() + b" x",
    "byte-order mark": b"\xef\xbb\xbf" + variant(),
    "not an object": b"[1, 2]",
    "empty": b"",
    "invalid UTF-8": variant().replace(b"A1", b"A\xff\xfe"),
    "invalid UTF-8 in an unknown key": variant().replace(b"channel", b"ch\xf2annel", 1)[:-1] + b', "channel": "app"}',
    "invalid UTF-8 in an unknown value": variant(note="x").replace(b'"x"', b'"x\xb6"'),
    "Chinese merchant category": variant(merchant_category="餐饮"),
    "device null": variant(device_id=None),
    "device empty": variant(device_id=""),
    "channel 33 characters": variant(channel="c" * 33),
    "long unknown field": variant(note="x" * 300),
    "escaped time": variant().replace(b"16:00:02.426", b"16:00:02.\\u00342\\u00361"),
    "Schema Registry JSON": b"\x00\x00\x00\x00\x07" + variant(),
    "Schema Registry Avro": b"\x00\x00\x00\x00\x07\x02\x04A1",
    "Schema Registry header alone": b"\x00\x00\x00\x00\x07",
    "a zero byte": b"\x00",
}


@pytest.mark.parametrize("raw", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_fast_decoder_agrees_with_pydantic_on_edge_cases(raw: bytes) -> None:
    assert_agrees(raw)


@pytest.mark.parametrize(("change", "reason"), [
    ({"ts": "2026-10-31T16:00:02"}, "ts: Input should have timezone info (write the time with its offset, e.g. "
                                    "2026-11-01T08:00:00Z or 2026-11-01T16:00:00+08:00)"),
    ({"amount": -52.31}, "amount: Input should be greater than 0 (amounts are positive; `direction` says debit "
                         "or credit)"),
    ({"currency": "usd"}, "(an ISO 4217 code in capitals, e.g. USD)"),
    ({"channel": ...}, "channel: Field required"),  # no hint where the reason says it all
    ({"account_id": 12345}, 'account_id: Input should be a valid string (ids and codes are JSON strings: "12345", '
                            "not 12345)"),
])
def test_common_producer_mistakes_are_refused_with_what_to_do(change: dict[str, Any], reason: str) -> None:
    for decode in (decode_transaction, lambda raw: decode_event(raw, Transaction)):  # the worker's, the contract's
        with pytest.raises(EventError) as exc:
            decode(variant(**change))
        assert reason in exc.value.reason and exc.value.reason.count("(") <= 1


def test_the_common_case_takes_the_fast_path() -> None:
    # If msgspec refused the canonical form, every event would silently pay for both decoders.
    assert type(decode_transaction(variant())[0]) is TransactionRecord
    assert type(decode_transaction(variant(amount="52.31"))[0]) is Transaction  # lax form: pydantic's path


def test_schema_registry_json_is_read_on_the_fast_path_as_its_json() -> None:
    """Confluent's JSON Schema serializer puts a zero byte and a 4-byte schema id before the JSON."""
    framed = b"\x00\x00\x00\x01\x2c" + variant()
    txn, ts = decode_transaction(framed)
    assert type(txn) is TransactionRecord and (txn, ts) == decode_transaction(variant())
    assert event_id_of(framed) == json.loads(variant())["event_id"], "a dead letter still names the event"
    with pytest.raises(EventError, match=r"schema id 300\) around a value that is not JSON"):
        decode_transaction(b"\x00\x00\x00\x01\x2c\x02\x04A1")


def test_oversized_payloads_are_refused_before_parsing() -> None:
    with pytest.raises(EventError, match="byte limit"):
        decode_transaction(variant(note="x" * 1_100_000))


def test_pseudonymising_keeps_the_decoders_type() -> None:
    fast, _ = decode_transaction(variant())
    slow = decode_event(variant(), Transaction)
    for txn in (fast, slow):
        moved = replace(txn, account_id="ps-1")
        assert type(moved) is type(txn) and moved.account_id == "ps-1" and moved.amount == txn.amount


_text = st.one_of(st.text(max_size=6), st.text(alphabet="A-Z09.: ", max_size=40), st.just(""))
_values = st.one_of(st.none(), st.booleans(), st.integers(-3, 10**16), st.floats(allow_nan=False, allow_infinity=False),
                    _text, st.lists(st.integers(), max_size=2))
_times = st.one_of(
    st.datetimes(min_value=datetime(1990, 1, 1), max_value=datetime(2110, 1, 1),
                 timezones=st.sampled_from([None, *(timezone(timedelta(minutes=m))
                                                    for m in (-600, -1, 0, 330, 480, 1439))]))
    .map(lambda d: d.isoformat()),
    st.sampled_from(["2026-10-31T16:00:02.1234567Z", "2026-10-31T16:00:02.12345678+08:00", "2026-10-31T16:00:02Z"]),
)


@settings(max_examples=400, deadline=None)
@given(changes=st.dictionaries(st.sampled_from([*FIELDS, "event_type", "extra"]), _values, max_size=3),
       ts=_times, drop=st.sets(st.sampled_from(FIELDS), max_size=1))
def test_fast_decoder_agrees_with_pydantic_on_generated_inputs(changes: dict[str, Any], ts: str,
                                                               drop: set[str]) -> None:
    d = {**BASE, "ts": ts, **changes}
    for name in drop:
        d.pop(name, None)
    assert_agrees(json.dumps(d).encode())


# --- one decision per input (issue 17 item 3): depth, string sizes and numbers swept across their ranges
def _nested(levels: int, shape: str) -> str:
    """A JSON value `levels` deep: arrays, objects, or the two alternating."""
    value = "1"
    for i in range(levels):
        if shape == "[" or (shape == "mixed" and i % 2):
            value = f"[{value}]"
        else:
            value = f'{{"k":{value}}}'
    return value


def _with(field: str, literal: str, at_end: bool = False) -> bytes:
    """BASE with `field` set to a raw JSON literal (replacing it, or as an unknown field first or last)."""
    d = {k: json.dumps(v) for k, v in BASE.items() if k != field}
    items = [f"{json.dumps(k)}:{v}" for k, v in d.items()]
    items.insert(len(items) if at_end else 0, f"{json.dumps(field)}:{literal}")
    return ("{" + ",".join(items) + "}").encode()


def test_both_decoders_stop_at_the_contracts_nesting_depth_exactly() -> None:
    """Every depth from 1 to 2,000 levels, in an unknown field, as arrays and as objects (the outer object is one)."""
    for shape in ("[", "{"):
        for levels in range(1, 2001):
            raw = _with("x", _nested(levels - 1, shape))
            assert_agrees(raw)
            try:
                decode_transaction(raw)
                accepted = True
            except EventError:
                accepted = False
            assert accepted == (levels <= MAX_JSON_DEPTH), (shape, levels)


_STRING_LIMITS = {"event_id": 128, "account_id": 128, "counterparty_id": 128, "channel": 32, "device_id": 128,
                  "ip": 64, "country": 8, "merchant_category": 16, "currency": 3, "note": 256}
# Each one code point in the decoded string: plain, escaped, astral (a surrogate pair), a lone surrogate, raw UTF-8.
_CHARS = st.sampled_from(["a", "Z", r"\u00e9", r"\ud83d\ude00", r"\"", r"\\", r"\u0000", r"\n", r"\ud800", "餐", "😀"])
_NUMBERS = st.one_of(
    st.sampled_from(["NaN", "Infinity", "-Infinity", "1e15", "999999999999999.9", "1e-400", "5e-324", "-0", "-0.0",
                     "0", "0e0", "1e400", "-1e400", "1.7976931348623157e308", "9223372036854775807",
                     "9223372036854775808", "18446744073709551615", "18446744073709551616", "-9223372036854775809",
                     "1" + "0" * 40, "1" + "0" * 400, "0." + "0" * 400 + "1", "1.0", "1E14", "01", "1.", ".5", "+1",
                     "true", "null", '"12.5"', '"1e400"', '"NaN"']),
    st.integers(-(2**80), 2**80).map(str),
    st.floats(allow_nan=False, allow_infinity=False).map(repr),
    st.floats(min_value=1e14, max_value=1e16).map(repr),
)


@settings(max_examples=1500, deadline=None)
@given(levels=st.integers(1, 2000), shape=st.sampled_from(["[", "{", "mixed"]),
       field=st.sampled_from(["x", "amount", "label", "event_id", "ts"]), at_end=st.booleans())
@example(levels=MAX_JSON_DEPTH, shape="[", field="x", at_end=False)
@example(levels=MAX_JSON_DEPTH + 1, shape="[", field="x", at_end=True)
@example(levels=997, shape="{", field="x", at_end=False)
@example(levels=998, shape="mixed", field="x", at_end=False)
def test_decoders_agree_on_any_nesting_depth(levels: int, shape: str, field: str, at_end: bool) -> None:
    assert_agrees(_with(field, _nested(levels - 1, shape), at_end))


@settings(max_examples=1500, deadline=None)
@given(field=st.sampled_from(sorted(_STRING_LIMITS)), delta=st.integers(-3, 3), chars=st.lists(_CHARS, max_size=3),
       short=st.integers(0, 3), use_short=st.booleans())
def test_decoders_agree_on_strings_around_the_contracts_limits(field: str, delta: int, chars: list[str], short: int,
                                                               use_short: bool) -> None:
    n = short if use_short else _STRING_LIMITS[field] + delta  # code points
    body = "".join(chars[:n]) + "A" * max(n - len(chars), 0)
    assert_agrees(_with(field, f'"{body}"'))


@settings(max_examples=1500, deadline=None)
@given(field=st.sampled_from(["amount", "label", "x", "event_id", "ts", "channel"]), literal=_NUMBERS,
       at_end=st.booleans())
def test_decoders_agree_on_numeric_edge_cases(field: str, literal: str, at_end: bool) -> None:
    assert_agrees(_with(field, literal, at_end))
