"""The compact AccountState codec: exact round trips, old pickled blobs still readable, malformed blobs refused."""

from __future__ import annotations

import gzip
import math
import pickle
import struct
from array import array
from pathlib import Path
from typing import Any

import pytest

from app.faust_app import dump_account, dumps, load_account
from models.features import STATE_MAGIC, AccountState, StateCodecError, stable_hash
from models.rules import load_catalogue
from models.schemas import Transaction, decode_event
from models.scoring import TransactionScorer

SAMPLE = Path(__file__).parents[1] / "data" / "sample.jsonl.gz"


def _exact(x: Any) -> tuple[type, Any]:
    """A value with its type; floats bit for bit, so -0.0 and NaN compare exactly."""
    return (float, struct.pack("<d", x)) if isinstance(x, float) else (type(x), x)


def _fingerprint(st: AccountState) -> list[Any]:
    """Every field with its exact type (and array typecode): equal fingerprints mean an exact round trip."""
    out: list[Any] = []
    for name in AccountState.__slots__:
        v = getattr(st, name)
        if isinstance(v, array):
            out.append((name, v.typecode, v.tobytes()))
        elif isinstance(v, float):
            out.append((name, _exact(v)))
        elif isinstance(v, dict):
            out.append((name, dict, [(k, type(e), [_exact(x) for x in e]) for k, e in v.items()]))
        else:
            out.append((name, type(v), v))
    return out


@pytest.fixture(scope="module")
def scored_states() -> dict[str, AccountState]:
    """Account states after scoring the sample data: varied histories, some with open alerts."""
    sc = TransactionScorer(load_catalogue())
    states: dict[str, AccountState] = {}
    with gzip.open(SAMPLE, "rb") as f:
        for line in f:
            if b'"event_type":"transaction"' not in line:
                continue
            t = decode_event(line.rstrip(b"\n"), Transaction)
            sc.process(t, states.setdefault(t.account_id, AccountState()))
    return states


def test_round_trip_is_exact_and_smaller_than_pickle(scored_states: dict[str, AccountState]) -> None:
    assert any(st.alerts for st in scored_states.values()), "the sample should leave some alerts open"
    new = old = 0
    for st in [*scored_states.values(), AccountState()]:
        blob = dump_account(st)
        assert blob[:1] == STATE_MAGIC
        assert _fingerprint(load_account(blob)) == _fingerprint(st)
        assert dump_account(load_account(blob)) == blob
        new += len(blob)
        old += len(dumps(st))
    assert new < 0.8 * old


def test_unusual_floats_round_trip_bit_for_bit() -> None:
    st = AccountState()
    st.log_med, st.gap_ew, st.day_in, st.day_out = -0.0, math.inf, math.nan, 5e-324
    st.debit_ts.extend([math.nan, -math.inf, 1.7e308])
    st.alerts["x"] = ("id", math.nan, ["e1", "é\u2603"], "high")
    blob = dump_account(st)
    assert blob[:1] == STATE_MAGIC
    assert _fingerprint(load_account(blob)) == _fingerprint(st)


def test_scoring_through_the_codec_matches_scoring_in_memory(make_txn) -> None:
    events = [Transaction.model_validate(make_txn(account_id=f"a{i % 5}", amount=5 + (i * 37) % 900,
                                                  minutes=i * 2.0, counterparty_id=f"c{i % 13}",
                                                  device_id=f"d{i % 4}")) for i in range(600)]
    live, stored = TransactionScorer(load_catalogue()), TransactionScorer(load_catalogue())
    states: dict[str, AccountState] = {}
    blobs: dict[str, bytes] = {}
    for e in events:
        a = live.process(e, states.setdefault(e.account_id, AccountState()))
        st = load_account(blobs[e.account_id]) if e.account_id in blobs else AccountState()
        b = stored.process(e, st)
        blobs[e.account_id] = dump_account(st)
        assert (a.score, a.raw, [x.alert_id for x in a.alerts]) == (b.score, b.raw, [x.alert_id for x in b.alerts])
    for k, st in states.items():
        assert _fingerprint(load_account(blobs[k])) == _fingerprint(st)


def test_old_pickled_blobs_still_load(scored_states: dict[str, AccountState]) -> None:
    # What the previous version wrote to the changelog: pickle protocol 5 of the whole state.
    for st in list(scored_states.values())[:200]:
        old = pickle.dumps(st, protocol=pickle.HIGHEST_PROTOCOL)
        assert _fingerprint(load_account(old)) == _fingerprint(st)


def test_states_the_codec_cannot_hold_fall_back_to_the_pickle_form() -> None:
    odd = AccountState()
    odd.day_in = 3  # an int where a float is expected: the codec would turn it into 3.0
    big = AccountState()
    big.n = 2**40  # beyond the uint32 count
    long = AccountState()
    long.recent_ids.extend(range(300))  # beyond the uint8 length
    flag = AccountState()
    flag.n = True  # a bool is an int subclass: it would come back as 1
    wide = AccountState()
    wide.hours = array("I", bytes(96))  # another typecode: the items would be read back as uint16
    for st, named in ((odd, "day_in"), (big, "fit"), (long, "fit"), (flag, "AccountState.n "), (wide, "hours")):
        with pytest.raises(StateCodecError, match=named):
            st.to_bytes()
        blob = dump_account(st)
        assert blob[:1] == b"\x80"
        assert _fingerprint(load_account(blob)) == _fingerprint(st)


def test_malformed_blobs_are_refused_with_a_clear_error(scored_states: dict[str, AccountState]) -> None:
    with_alerts = next(st for st in scored_states.values() if st.alerts)
    good = dump_account(with_alerts)
    plain = dump_account(next(st for st in scored_states.values() if not st.alerts and st.n > 3))
    bad = [b"", b"\x00", b"{}", STATE_MAGIC, bytes([0xA5, 99]) + good[2:], good[:40], plain[:-1],
           good[:-3], plain + b"x", plain + b"{}", plain + b"[]", plain + b'[["c","id",1,[],"high"]]',
           plain + b'[["c","id",1.5,["e"]]]', plain + b'[["c","id",1.5,[2],"high"]]', b"\x80\x05garbage"]
    for blob in bad:
        with pytest.raises(StateCodecError):
            load_account(blob)
    # A pickle of another allowed class is not an account state.
    from models.market import InstrumentState
    with pytest.raises(StateCodecError, match="not an AccountState"):
        load_account(dumps(InstrumentState()))


def test_the_input_offset_round_trips_and_version_1_blobs_and_old_pickles_still_load(
        scored_states: dict[str, AccountState]) -> None:
    from models import features

    st = next(s for s in scored_states.values() if s.alerts)
    st.offset = 123_456_789_012
    st.ev_sum, st.ev_ts, st.in_new, st.in_ts, st.in_sent = 2.5, 1.7e9, 900.0, 1.7e9 + 60, 321.5
    st.shift_log = array("q", [(123_456_789_000 << 2) | 2, (123_456_789_012 << 2) | 0])
    st.countries = array("q", [stable_hash("CN"), stable_hash("JP")])
    st.in_payers, st.in_paid = array("d", [1.7e9 + 10, 1.7e9 + 50]), array("d", [450.0, 380.5])
    st.fan_ts = array("d", [1.7e9 + 100, 1.7e9 + 400])
    back = AccountState.from_bytes(st.to_bytes())
    assert back.offset == 123_456_789_012 and back.shift_log == st.shift_log and back.countries == st.countries
    assert back.in_sent == 321.5 and back.in_payers == st.in_payers and back.in_paid == st.in_paid
    assert back.fan_ts == st.fan_ts
    v8 = st.to_bytes()
    fields = list(features._HEAD.unpack_from(v8))[:-1]  # as version 7 had them: no fan_ts length
    # fields: magic, version, 5 counts, fresh_dev, offset (2-8), 15 floats (9-23, in_sent last), array lengths.
    # Earlier versions had no fan_ts (version 7), no in_payers (6), no in_sent (5), no countries (4), no shift
    # log (3), nor payee counts (1 and 2): their arrays are the first ones, then the alerts.
    alerts = features._alerts_to_json(st.alerts) if st.alerts else b""
    arrays7 = b"".join(getattr(st, name).tobytes() for name, _ in features._ARRAYS[:-1]) + alerts
    arrays6 = b"".join(getattr(st, name).tobytes() for name, _ in features._ARRAYS[:-3]) + alerts
    arrays4 = b"".join(getattr(st, name).tobytes() for name, _ in features._ARRAYS[:-4]) + alerts
    arrays3 = b"".join(getattr(st, name).tobytes() for name, _ in features._ARRAYS[:-5]) + alerts
    arrays = b"".join(getattr(st, name).tobytes() for name, _ in features._ARRAYS[:-6]) + alerts
    v7 = features._HEAD_V7.pack(fields[0], 7, *fields[2:]) + arrays7
    v6 = features._HEAD_V6.pack(fields[0], 6, *fields[2:24], *fields[24:-2]) + arrays6
    v5 = features._HEAD_V5.pack(fields[0], 5, *fields[2:23], *fields[24:-2]) + arrays6
    v4 = features._HEAD_V4.pack(fields[0], 4, *fields[2:23], *fields[24:-3]) + arrays4
    v3 = features._HEAD_V3.pack(fields[0], 3, *fields[2:23], *fields[24:-4]) + arrays3
    # Version 2, as an earlier release wrote it: no session fields (the last four floats).
    v2 = features._HEAD_V2.pack(fields[0], 2, *fields[2:19], *fields[24:-5]) + arrays
    # Version 1, as the release before it wrote it: no offset either.
    v1 = features._HEAD_V1.pack(fields[0], 1, *fields[2:8], *fields[9:19], *fields[24:-5]) + arrays
    old7 = AccountState.from_bytes(v7)
    assert len(old7.fan_ts) == 0 and old7.in_payers == st.in_payers and old7.countries == st.countries
    old7.fan_ts = st.fan_ts
    assert _fingerprint(old7) == _fingerprint(st)
    old6 = AccountState.from_bytes(v6)
    assert old6.in_sent == st.in_sent and len(old6.in_payers) == len(old6.in_paid) == 0
    old6.in_payers, old6.in_paid, old6.fan_ts = st.in_payers, st.in_paid, st.fan_ts
    assert _fingerprint(old6) == _fingerprint(st)
    old5 = AccountState.from_bytes(v5)
    assert old5.in_sent == 0.0 and old5.countries == st.countries
    old5.in_sent, old5.in_payers, old5.in_paid, old5.fan_ts = st.in_sent, st.in_payers, st.in_paid, st.fan_ts
    assert _fingerprint(old5) == _fingerprint(st)
    old4 = AccountState.from_bytes(v4)
    assert len(old4.countries) == 0 and old4.shift_log == st.shift_log and old4.in_sent == 0.0
    old4.countries, old4.in_sent = st.countries, st.in_sent
    old4.in_payers, old4.in_paid, old4.fan_ts = st.in_payers, st.in_paid, st.fan_ts
    assert _fingerprint(old4) == _fingerprint(st)
    old3 = AccountState.from_bytes(v3)
    assert len(old3.shift_log) == 0 and len(old3.countries) == 0
    old3.shift_log, old3.countries, old3.in_sent = st.shift_log, st.countries, st.in_sent
    old3.in_payers, old3.in_paid, old3.fan_ts = st.in_payers, st.in_paid, st.fan_ts
    assert _fingerprint(old3) == _fingerprint(st)
    for blob, offset in ((v2, st.offset), (v1, -1)):
        old = AccountState.from_bytes(blob)
        assert old.offset == offset and len(old.shift_log) == 0 and len(old.countries) == 0
        assert (old.ev_sum, old.ev_ts, old.in_new, old.in_ts, old.in_sent) == (0.0, 0.0, 0.0, 0.0, 0.0)
        assert list(old.cp_counts) == [1] * len(st.counterparties), "each known payee counted once"
        old.offset, old.ev_sum, old.ev_ts, old.in_new, old.in_ts = st.offset, st.ev_sum, st.ev_ts, st.in_new, st.in_ts
        old.cp_counts, old.shift_log, old.countries, old.in_sent = st.cp_counts, st.shift_log, st.countries, st.in_sent
        old.in_payers, old.in_paid, old.fan_ts = st.in_payers, st.in_paid, st.fan_ts
        assert _fingerprint(old) == _fingerprint(st)
    # Pickles from before the slots existed: one value fewer (fan_ts), three (the payers too), four (in_sent
    # too), five (countries too), six (the shift log too), seven (payee counts too), eleven (the session fields
    # too), or twelve (no offset either).
    for missing in (1, 3, 4, 5, 6, 7, 11, 12):
        legacy = pickle.loads(pickle.dumps(st))
        legacy.__setstate__(tuple(getattr(st, name) for name in AccountState.__slots__[:-missing]))
        assert legacy.n == st.n and len(legacy.fan_ts) == 0
        assert len(legacy.in_payers) == len(legacy.in_paid) == (2 if missing == 1 else 0)
        assert legacy.in_sent == (st.in_sent if missing <= 3 else 0.0)
        assert len(legacy.countries) == (len(st.countries) if missing <= 4 else 0)
        assert len(legacy.shift_log) == (len(st.shift_log) if missing <= 5 else 0)
        assert list(legacy.cp_counts) == (list(st.cp_counts) if missing <= 6 else [1] * len(st.counterparties))
        assert (legacy.ev_sum, legacy.in_new) == ((0.0, 0.0) if missing > 7 else (st.ev_sum, st.in_new))
        assert legacy.offset == (-1 if missing == 12 else st.offset)


def test_a_blob_whose_payee_counts_do_not_match_its_payees_is_refused(
        scored_states: dict[str, AccountState]) -> None:
    some = next(s for s in scored_states.values() if len(s.counterparties) > 1)
    st = AccountState.from_bytes(some.to_bytes())  # a copy: the fixture is shared
    st.cp_counts = st.cp_counts[:-1]
    with pytest.raises(StateCodecError, match="counts"):
        AccountState.from_bytes(st.to_bytes())
    # Likewise the times and amounts of payments in from strangers (one list each, in step).
    st = AccountState.from_bytes(some.to_bytes())
    st.in_payers, st.in_paid = array("d", [1.7e9, 1.7e9 + 60]), array("d", [100.0])
    with pytest.raises(StateCodecError, match="2 payer times but 1 amounts"):
        AccountState.from_bytes(st.to_bytes())


def test_accounts_share_an_empty_payer_list_until_a_stranger_pays_one_of_them() -> None:
    from models.features import note_payer, payers_since

    quiet, paid = AccountState(), AccountState()
    assert quiet.in_payers is paid.in_payers, "one empty list for all: memory per account has a budget"
    note_payer(paid, 1.7e9, 450.0)
    note_payer(paid, 1.7e9 + 600, 50.0)
    assert len(quiet.in_payers) == len(quiet.in_paid) == 0 and quiet.in_payers is not paid.in_payers
    assert payers_since(paid, 1.7e9 + 600)[:2] == (2, 500.0) and payers_since(quiet, 1.7e9) == (0, 0.0, 0.0)
    # Read back, an account that never heard from a stranger shares the empty list again.
    assert AccountState.from_bytes(quiet.to_bytes()).in_payers is AccountState().in_payers
    assert list(AccountState.from_bytes(paid.to_bytes()).in_paid) == [450.0, 50.0]
