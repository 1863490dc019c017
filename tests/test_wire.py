"""The worker's fast transaction decoder (app.wire) agrees with the pydantic contract on every input."""

from __future__ import annotations

import json
from datetime import datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.errors import EventError
from app.schemas import Transaction, decode_event
from app.wire import TransactionRecord, decode_transaction, replace

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
}


@pytest.mark.parametrize("raw", EDGE_CASES.values(), ids=EDGE_CASES.keys())
def test_fast_decoder_agrees_with_pydantic_on_edge_cases(raw: bytes) -> None:
    assert_agrees(raw)


def test_the_common_case_takes_the_fast_path() -> None:
    # If msgspec refused the canonical form, every event would silently pay for both decoders.
    assert type(decode_transaction(variant())[0]) is TransactionRecord
    assert type(decode_transaction(variant(amount="52.31"))[0]) is Transaction  # lax form: pydantic's path


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
