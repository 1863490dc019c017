"""Per-account streaming features: compact state and the surprises it yields for one transaction."""

from __future__ import annotations

import json
import math
import struct
import sys
import zlib
from array import array
from bisect import bisect_left, bisect_right
from dataclasses import dataclass
from operator import attrgetter
from typing import Any

# Bounds on per-account memory: every array below is capped, so an account costs well under 1 KiB.
AMOUNT_HISTORY = 24
DEBIT_HISTORY = 32
KNOWN_COUNTERPARTIES = 24
KNOWN_DEVICES = 6
KNOWN_COUNTRIES = 6
VELOCITY_WINDOW = 600.0  # seconds: the "short window" of the velocity feature
HOUR = 3600.0
DAY = 86400.0
TINY_AMOUNT = 5.0  # major units: below this, a debit is a card-testing probe rather than a purchase
# The same probe in currencies whose unit is worth far less (a few US dollars' worth, rounded): 5 yen
# or 5 won is no purchase at all, and a card tester's 100-yen probes would never count as tiny.
TINY_AMOUNTS: dict[str, float] = {
    "CNY": 30.0, "JPY": 500.0, "KRW": 5000.0, "INR": 300.0, "IDR": 50000.0, "VND": 100000.0, "THB": 150.0, "PHP": 250.0,
    "TWD": 150.0, "HKD": 40.0, "MYR": 20.0, "HUF": 1500.0, "CZK": 100.0, "PLN": 20.0, "SEK": 50.0, "NOK": 50.0,
    "DKK": 35.0, "RUB": 300.0, "TRY": 100.0, "BRL": 25.0, "MXN": 75.0, "ZAR": 75.0, "CLP": 4000.0,
    "COP": 20000.0, "ARS": 5000.0, "NGN": 5000.0, "PKR": 1000.0, "BDT": 500.0, "LKR": 1500.0, "EGP": 200.0,
    "KZT": 2500.0, "UAH": 200.0, "CNH": 30.0, "KES": 500.0, "TZS": 10000.0, "UGX": 15000.0, "GHS": 50.0,
    "XOF": 2500.0, "XAF": 2500.0, "MAD": 40.0, "AED": 15.0, "SAR": 15.0, "QAR": 15.0, "ILS": 15.0, "PEN": 15.0,
    "RON": 20.0, "ISK": 500.0, "NPR": 500.0, "MMK": 10000.0,
}


def tiny_amount(currency: str | None) -> float:
    """The amount below which a debit in `currency` is a card-testing probe (TINY_AMOUNT unless listed)."""
    return TINY_AMOUNTS.get(currency, TINY_AMOUNT) if currency else TINY_AMOUNT
MIN_LOG_SPREAD = 0.35  # an account that always pays 100.00 must not alarm at 101
# Evidence of unusual transactions carries over to the account's next ones, fading by e every
# SESSION_SECONDS: a takeover or a card test is a run of moderately odd debits minutes apart, none
# decisive alone. Only what an event adds beyond SESSION_FLOOR nats carries over, so ordinary
# activity (almost always under 1 nat) builds nothing up.
SESSION_SECONDS = 900.0
SESSION_FLOOR = 1.0
# Money received from counterparties the account never dealt with, fading by e every INFLOW_SECONDS:
# what a mule account sends on within hours.
INFLOW_SECONDS = 6 * 3600.0
IN_PAYERS = 16  # payers remembered within that window: "many" is a handful
# Most accounts never hear from a stranger: they all share this empty list for both of AccountState's
# payer arrays (an empty array costs 80 bytes, and memory per account has a budget); note_payer gives
# an account arrays of its own before its first write, and nothing else writes them.
_NO_PAYERS = array("d")
# Likewise the times of money sent on to new payees (AccountState.fan_ts): note_fanout alone writes it.
_NO_FANOUT = array("d")
# Times kept: the payee_fanout rule counts at most this many before the current debit, enough for its
# default count moved by the most false-positive verdicts can ask (3 / MIN_FACTOR = 12).
FANOUT_MAX = 16
# An account is dormant when its silence is both DORMANT_FACTOR times its usual gap between debits
# (a geometric mean, about half the arithmetic one for Poisson-like activity) and at least
# DORMANT_MIN_SECONDS: an account that pays every few hours and then says nothing for three days is
# dormant; one that pays once a day is not.
DORMANT_FACTOR = 10.0
DORMANT_MIN_SECONDS = 86400.0


def stable_hash(value: str) -> int:
    """A 63-bit hash stable across processes (str hash() is salted per process, so it cannot be stored)."""
    b = value.encode()
    # Two independent C checksums: fast, and collisions within a 24-entry novelty set are negligible.
    return (zlib.crc32(b) << 31) ^ zlib.adler32(b)


class AccountState:
    """What riskwatch remembers about one account: bounded, picklable, a few hundred bytes."""

    __slots__ = (  # noqa: RUF023 - order is the pickle layout; "offset" and the session fields are appended
        "alerts",
        "burst_max",
        "counterparties",
        "day_in",
        "day_out",
        "day_out_ew",
        "day_start",
        "debit_amt",
        "debit_ts",
        "devices",
        "first_ts",
        "fresh_dev",
        "fresh_dev_ts",
        "gap_ew",
        "hours",
        "last_ts",
        "log_amounts",
        "log_med",
        "log_spread",
        "n",
        "n_debits",
        "near_ts",
        "new_cp",
        "new_dev",
        "recent_ids",
        # Appended, not sorted in: pickles of earlier versions restore their values by slot position.
        "offset",
        "ev_sum",
        "ev_ts",
        "in_new",
        "in_ts",
        "cp_counts",
        "shift_log",
        "countries",
        "in_sent",
        "in_payers",
        "in_paid",
        "fan_ts",
    )

    def __init__(self) -> None:
        self.n = 0
        self.n_debits = 0
        self.first_ts = 0.0
        self.last_ts = 0.0
        self.log_amounts = array("f")
        self.log_med = 0.0  # median and robust spread of log debit amounts, refreshed on learn
        self.log_spread = MIN_LOG_SPREAD
        self.debit_ts = array("d")
        self.debit_amt = array("f")
        self.counterparties = array("q")
        self.cp_counts = array("H")  # debits to each of `counterparties`, in the same order (to 65,535)
        self.new_cp = 0
        self.devices = array("q")
        self.new_dev = 0
        self.hours = array("H", bytes(48))
        self.gap_ew = 0.0  # EW mean of log seconds between debits
        self.burst_max = 0  # most debits this account ever made within one velocity window
        self.fresh_dev = 0  # the newest device and when it first appeared (device age)
        self.fresh_dev_ts = 0.0
        self.day_start = 0.0
        self.day_in = 0.0
        self.day_out = 0.0
        self.day_out_ew = 0.0
        self.near_ts = array("d")  # times of transactions just under the reporting threshold (structuring)
        self.recent_ids = array("q")  # hashes of the last event ids, to score a redelivered event once
        self.alerts: dict[str, tuple[str, float, list[str], str]] = {}
        # Input offset of the last event this state applied (the worker's; -1 in replay): a redelivered
        # event at or below it is recognised whatever the number of events since.
        self.offset = -1
        # Evidence carried over from this account's last unusual transactions (nats, fading with
        # SESSION_SECONDS), and money received from counterparties it never dealt with (fading with
        # INFLOW_SECONDS), each with the time it was last updated.
        self.ev_sum = 0.0
        self.ev_ts = 0.0
        self.in_new = 0.0
        self.in_ts = 0.0
        # The detector's type-shift steps this account's events took since the partition's last
        # commit, as offset << 2 | (sign + 1) (see TransactionProcessor: a redelivered event this
        # state already applied takes its step again, so the shifts, and the rules' "x this
        # account's usual", come out as they did the first time). Empty in replay.
        self.shift_log = array("q")
        # Hashes of the countries the account's debits came from, oldest first (at most KNOWN_COUNTRIES).
        self.countries = array("q")
        # Of that inflow, how much the account has already sent on (faded with it, from in_ts): a mule
        # splits what it passes on, so the pass-through is judged on the sum, not debit by debit.
        self.in_sent = 0.0
        # When counterparties it never dealt with paid in within the last INFLOW_SECONDS, and how much
        # (at most IN_PAYERS): "many payers" is what tells a mule from a customer paid back by one friend.
        self.in_payers = self.in_paid = _NO_PAYERS
        # When it last sent money on (transfer or withdrawal) to a payee it never paid before (at most
        # FANOUT_MAX, the payee_fanout rule's): three strangers paid within minutes is a takeover's
        # cash-out whatever the account's history, and the one thing a first-seen account shows.
        self.fan_ts = _NO_FANOUT

    def __getstate__(self) -> tuple[Any, ...]:
        return tuple(getattr(self, s) for s in self.__slots__)

    def __setstate__(self, state: tuple[Any, ...]) -> None:
        full = len(self.__slots__)
        if len(state) == full - 12:  # pickled before `offset` existed
            state = (*state, -1)
        if len(state) == full - 11:  # pickled before the session fields existed
            state = (*state, 0.0, 0.0, 0.0, 0.0)
        if len(state) == full - 7:  # pickled before payees were counted: each counts once
            state = (*state, array("H", [1] * len(state[_CP_SLOT])))
        if len(state) == full - 6:  # pickled before the shift log
            state = (*state, array("q"))
        if len(state) == full - 5:  # pickled before countries were kept
            state = (*state, array("q"))
        if len(state) == full - 4:  # pickled before the money passed on was kept
            state = (*state, 0.0)
        if len(state) == full - 3:  # pickled before the payers were kept
            state = (*state, _NO_PAYERS, _NO_PAYERS)
        if len(state) == full - 1:  # pickled before new payees' times were kept
            state = (*state, _NO_FANOUT)
        for name, value in zip(self.__slots__, state, strict=True):
            setattr(self, name, value)

    def to_bytes(self) -> bytes:
        """The compact binary form of this state (see STATE_FORMAT); StateCodecError if a value does not fit it."""
        # Read and type-checked in bulk (attrgetter, one tuple compare): this runs for every account
        # written, about once a second per active account.
        scalars = _get_scalars(self)
        arrays = _get_arrays(self)
        if (tuple(map(type, scalars)) != _SCALAR_TYPES or tuple(map(type, arrays)) != _ARRAY_TYPES
                or [a.typecode for a in arrays] != _ARRAY_CODES):
            self._refuse()
        try:
            head = _HEAD.pack(_MAGIC, _VERSION, *scalars, *map(len, arrays))
        except struct.error as exc:  # a count beyond uint32 or an array longer than 255
            raise StateCodecError(f"AccountState does not fit the compact format: {exc}") from None
        if _BIG_ENDIAN:
            arrays = tuple(_swapped(a) for a in arrays)
        parts: list[Any] = [head, *arrays]
        if self.alerts:
            parts.append(_alerts_to_json(self.alerts))
        # bytes.join takes the arrays' buffers directly: no intermediate tobytes() copies.
        return b"".join(parts)

    def _refuse(self) -> None:
        """Raise StateCodecError naming the first field whose type the compact format cannot hold."""
        for name in _FLOAT_FIELDS:
            if type(getattr(self, name)) is not float:
                raise StateCodecError(f"AccountState.{name} is not a float")
        for name in _INT_FIELDS:
            if type(getattr(self, name)) is not int:
                raise StateCodecError(f"AccountState.{name} is not an int")
        for name, code in _ARRAYS:
            a = getattr(self, name)
            if type(a) is not array or a.typecode != code:
                raise StateCodecError(f"AccountState.{name} is not an array of typecode {code!r}")

    @classmethod
    def from_bytes(cls, blob: bytes) -> AccountState:
        """Decode a blob written by to_bytes, refusing (StateCodecError) anything malformed."""
        size = len(blob)
        head = _HEADS.get(blob[1], _HEAD_V1) if size >= 2 else _HEAD_V1
        if size < head.size:
            raise StateCodecError(f"AccountState blob too short ({size} bytes)")
        fields = head.unpack_from(blob)
        if fields[0] != _MAGIC or fields[1] not in _HEADS:
            raise StateCodecError(f"not an AccountState blob of version 1 to {_VERSION} "
                                  f"(starts with {bytes(blob[:2])!r})")
        st = cls.__new__(cls)
        if head is _HEAD or head is _HEAD_V7 or head is _HEAD_V6:
            (st.n, st.n_debits, st.new_cp, st.new_dev, st.burst_max, st.fresh_dev, st.offset, st.first_ts,
             st.last_ts, st.log_med, st.log_spread, st.gap_ew, st.fresh_dev_ts, st.day_start, st.day_in,
             st.day_out, st.day_out_ew, st.ev_sum, st.ev_ts, st.in_new, st.in_ts, st.in_sent) = fields[2:24]
            counts = fields[24:]
        elif head is _HEAD_V5 or head is _HEAD_V4 or head is _HEAD_V3:
            (st.n, st.n_debits, st.new_cp, st.new_dev, st.burst_max, st.fresh_dev, st.offset, st.first_ts,
             st.last_ts, st.log_med, st.log_spread, st.gap_ew, st.fresh_dev_ts, st.day_start, st.day_in,
             st.day_out, st.day_out_ew, st.ev_sum, st.ev_ts, st.in_new, st.in_ts) = fields[2:23]
            st.in_sent = 0.0
            counts = fields[23:]
        elif head is _HEAD_V2:
            (st.n, st.n_debits, st.new_cp, st.new_dev, st.burst_max, st.fresh_dev, st.offset, st.first_ts,
             st.last_ts, st.log_med, st.log_spread, st.gap_ew, st.fresh_dev_ts, st.day_start, st.day_in,
             st.day_out, st.day_out_ew) = fields[2:19]
            st.ev_sum = st.ev_ts = st.in_new = st.in_ts = st.in_sent = 0.0
            counts = fields[19:]
        else:
            (st.n, st.n_debits, st.new_cp, st.new_dev, st.burst_max, st.fresh_dev, st.first_ts, st.last_ts,
             st.log_med, st.log_spread, st.gap_ew, st.fresh_dev_ts, st.day_start, st.day_in, st.day_out,
             st.day_out_ew) = fields[2:18]
            st.offset = -1
            st.ev_sum = st.ev_ts = st.in_new = st.in_ts = st.in_sent = 0.0
            counts = fields[18:]
        view = memoryview(blob)
        off = head.size
        for (name, code), count in zip(_ARRAYS[:_N_ARRAYS[head]], counts, strict=True):
            end = off + count * _ITEMSIZE[code]
            if end > size:
                raise StateCodecError(f"AccountState blob truncated in {name} ({size} bytes)")
            a = array(code)
            a.frombytes(view[off:end])
            if _BIG_ENDIAN:
                a.byteswap()
            setattr(st, name, a)
            off = end
        st.alerts = _alerts_from_json(view[off:]) if off < size else {}
        _complete(st, head)
        return st


def _complete(st: AccountState, head: struct.Struct) -> None:
    """Give a state read from a blob of an earlier version the fields that version lacked; check the pairs."""
    if head is not _HEAD or not st.fan_ts:
        st.fan_ts = _NO_FANOUT
    if (head is not _HEAD and head is not _HEAD_V7) or (not st.in_payers and not st.in_paid):
        st.in_payers = st.in_paid = _NO_PAYERS
    elif len(st.in_paid) != len(st.in_payers):
        raise StateCodecError(f"AccountState blob has {len(st.in_payers)} payer times but "
                              f"{len(st.in_paid)} amounts")
    if head is _HEAD_V3 or head is _HEAD_V2 or head is _HEAD_V1:
        st.shift_log = array("q")
    if head is _HEAD_V4 or head is _HEAD_V3 or head is _HEAD_V2 or head is _HEAD_V1:
        st.countries = array("q")
    if head is _HEAD_V2 or head is _HEAD_V1:
        st.cp_counts = array("H", [1] * len(st.counterparties))  # not counted before version 3: once each
    elif len(st.cp_counts) != len(st.counterparties):
        raise StateCodecError(f"AccountState blob counts {len(st.cp_counts)} payees but holds "
                              f"{len(st.counterparties)}")


class StateCodecError(ValueError):
    """A state that the compact codec cannot write, or a blob it refuses to read."""


# STATE_FORMAT, version 8, little-endian: magic 0xA5, version byte, then five uint32 counts
# (n, n_debits, new_cp, new_dev, burst_max), fresh_dev and offset as int64, fifteen float64 scalars
# (_FLOAT_FIELDS order), one uint8 length per array (_ARRAYS order), the arrays' raw items, and last, only
# when the account has open alerts, their JSON (a list of [category, alert_id, last_ts, ids, level]).
# Versions 1 (no offset), 2 (no ev_sum, ev_ts, in_new, in_ts, cp_counts), 3 (no shift_log), 4 (no
# countries), 5 (no in_sent), 6 (no in_payers, in_paid) and 7 (no fan_ts) are still read. Pickle blobs start with 0x80
# (protocol >= 2), so the two formats are told apart by the first byte.
_MAGIC = 0xA5
_VERSION = 8
_INT_FIELDS = ("n", "n_debits", "new_cp", "new_dev", "burst_max", "fresh_dev", "offset")
_FLOAT_FIELDS = ("first_ts", "last_ts", "log_med", "log_spread", "gap_ew", "fresh_dev_ts", "day_start", "day_in",
                 "day_out", "day_out_ew", "ev_sum", "ev_ts", "in_new", "in_ts", "in_sent")
_ARRAYS = (("log_amounts", "f"), ("debit_ts", "d"), ("debit_amt", "f"), ("counterparties", "q"),
           ("devices", "q"), ("hours", "H"), ("near_ts", "d"), ("recent_ids", "q"), ("cp_counts", "H"),
           ("shift_log", "q"), ("countries", "q"), ("in_payers", "d"),
           ("in_paid", "d"), ("fan_ts", "d"))
_ITEMSIZE = {code: array(code).itemsize for _, code in _ARRAYS}
# The head's scalars in their order (_INT_FIELDS, then _FLOAT_FIELDS), and the arrays, read at once.
_get_scalars = attrgetter(*_INT_FIELDS, *_FLOAT_FIELDS)
_get_arrays = attrgetter(*(name for name, _ in _ARRAYS))
_SCALAR_TYPES = (int,) * len(_INT_FIELDS) + (float,) * len(_FLOAT_FIELDS)
_ARRAY_TYPES = (array,) * len(_ARRAYS)
_ARRAY_CODES = [code for _, code in _ARRAYS]
_HEAD = struct.Struct("<BB5Iqq15d14B")
_HEAD_V7 = struct.Struct("<BB5Iqq15d13B")
_HEAD_V6 = struct.Struct("<BB5Iqq15d11B")
_HEAD_V5 = struct.Struct("<BB5Iqq14d11B")
_HEAD_V4 = struct.Struct("<BB5Iqq14d10B")
_HEAD_V3 = struct.Struct("<BB5Iqq14d9B")
_HEAD_V2 = struct.Struct("<BB5Iqq10d8B")
_HEAD_V1 = struct.Struct("<BB5Iq10d8B")
_HEADS = {1: _HEAD_V1, 2: _HEAD_V2, 3: _HEAD_V3, 4: _HEAD_V4, 5: _HEAD_V5, 6: _HEAD_V6, 7: _HEAD_V7, 8: _HEAD}
_N_ARRAYS = {_HEAD: 14, _HEAD_V7: 13, _HEAD_V6: 11, _HEAD_V5: 11, _HEAD_V4: 10, _HEAD_V3: 9, _HEAD_V2: 8, _HEAD_V1: 8}
_BIG_ENDIAN = sys.byteorder == "big"
# Where last_ts sits in the head: after the counts, fresh_dev, offset (from version 2) and first_ts.
_LAST_TS_AT = {1: struct.calcsize("<BB5Iqd"), 2: struct.calcsize("<BB5Iqqd"), 3: struct.calcsize("<BB5Iqqd"),
               4: struct.calcsize("<BB5Iqqd"), 5: struct.calcsize("<BB5Iqqd"), 6: struct.calcsize("<BB5Iqqd"),
               7: struct.calcsize("<BB5Iqqd"), 8: struct.calcsize("<BB5Iqqd")}
_F64 = struct.Struct("<d")


# A state keeps at most this many shift steps: the events of about two commit intervals of one busy
# account. A step that fell off is not taken again on redelivery (the shifts then differ by one
# step of SHIFT_STEP, 0.2%), which takes an account with more events than this in two seconds.
SHIFT_LOG_MAX = 64


def log_shift_step(state: AccountState, residual: float) -> None:
    """Remember the sign of the type-shift step the event at `state.offset` took (see AccountState.shift_log)."""
    sl = state.shift_log
    sl.append((state.offset << 2) | (1 + (residual > 0.0) - (residual < 0.0)))
    if len(sl) > SHIFT_LOG_MAX:
        del sl[0]


def shift_step_of(state: AccountState, offset: int) -> float | None:
    """The sign (-1.0, 0.0 or 1.0) of the shift step the event at `offset` took, None if none is remembered.

    >>> st = AccountState()
    >>> st.offset = 7
    >>> log_shift_step(st, -0.3)
    >>> shift_step_of(st, 7), shift_step_of(st, 8)
    (-1.0, None)
    """
    for v in state.shift_log:
        if v >> 2 == offset:
            return float((v & 3) - 1)
    return None


def prune_shift_log(state: AccountState, committed: int) -> None:
    """Drop the steps of events before the partition's committed offset: they are never redelivered.

    >>> st = AccountState()
    >>> for st.offset in (5, 9, 12):
    ...     log_shift_step(st, 1.0)
    >>> prune_shift_log(st, 9)
    >>> [v >> 2 for v in st.shift_log], shift_step_of(st, 5)
    ([9, 12], None)
    """
    sl = state.shift_log
    if sl and sl[0] >> 2 < committed:
        state.shift_log = array("q", (v for v in sl if v >> 2 >= committed))


def last_ts_of(blob: bytes) -> float | None:
    """An account state blob's last_ts, read from its head without decoding the rest; None if not readable so.

    Reading a partition back holds a million accounts or more: eviction needs only when each was
    last active, and a full decode of each would multiply the read-back time.

    >>> st = AccountState()
    >>> st.last_ts = 1_700_000_000.5
    >>> last_ts_of(st.to_bytes()), last_ts_of(b"garbage")
    (1700000000.5, None)
    """
    if len(blob) < 2 or blob[0] != _MAGIC:
        return None
    at = _LAST_TS_AT.get(blob[1])
    if at is None or len(blob) < at + 8:
        return None
    ts: float = _F64.unpack_from(blob, at)[0]
    return ts if math.isfinite(ts) else None
_CP_SLOT = AccountState.__slots__.index("counterparties")
STATE_MAGIC = bytes([_MAGIC])


def _swapped(a: array[Any]) -> array[Any]:
    b = array(a.typecode, a)
    b.byteswap()
    return b


def _alerts_to_json(alerts: dict[str, Any]) -> bytes:
    rows = []
    for cat, entry in alerts.items():
        if not (type(cat) is str and type(entry) is tuple and len(entry) == 4):
            raise StateCodecError("AccountState.alerts holds an entry of an unexpected shape")
        alert_id, last_ts, ids, level = entry
        if not (type(alert_id) is str and type(last_ts) is float and type(ids) is list
                and type(level) is str and all(type(i) is str for i in ids)):
            raise StateCodecError("AccountState.alerts holds an entry of an unexpected shape")
        rows.append([cat, alert_id, last_ts, ids, level])
    return json.dumps(rows, separators=(",", ":")).encode()


def _alerts_from_json(raw: memoryview) -> dict[str, tuple[str, float, list[str], str]]:
    try:
        rows = json.loads(bytes(raw))
    except (ValueError, UnicodeDecodeError) as exc:
        raise StateCodecError(f"AccountState blob has unreadable alerts: {exc}") from None
    out: dict[str, tuple[str, float, list[str], str]] = {}
    if type(rows) is not list or not rows:
        raise StateCodecError("AccountState blob has malformed alerts")
    for row in rows:
        if not (type(row) is list and len(row) == 5):
            raise StateCodecError("AccountState blob has a malformed alert entry")
        cat, alert_id, last_ts, ids, level = row
        if not (type(cat) is str and type(alert_id) is str and type(last_ts) is float and type(ids) is list
                and type(level) is str and all(type(i) is str for i in ids)):
            raise StateCodecError("AccountState blob has a malformed alert entry")
        out[cat] = (alert_id, last_ts, ids, level)
    return out


@dataclass(slots=True)
class TxnFeatures:
    """Features of one transaction against its account's history, with the baselines used."""

    ts: float
    amount: float
    debit: bool
    external: bool  # a debit whose money leaves the platform (payment, transfer, withdrawal)
    local_hour: int
    cp_hash: int
    dev_hash: int
    history: int
    amount_z: float
    amount_ratio: float
    median_amount: float
    new_counterparty: bool
    p_new_counterparty: float
    new_device: bool
    p_new_device: float
    debits_10m: int
    expected_10m: float
    burst_max: int
    fresh_device: bool
    tiny_10m: int
    debits_1h: int
    debits_24h: int
    hour_share: float
    day_out: float
    day_in: float
    day_out_ratio: float
    shift: float = 0.0  # the log-amount shift of this transaction's type (SurpriseDetector.shift)
    session: float = 0.0  # nats of evidence carried over from the account's last minutes
    inflow_new: float = 0.0  # recent money in from new counterparties, faded to now
    idle: float = 0.0  # seconds since the account's last transaction (0 for its first)
    typical_gap: float = DAY  # the account's usual seconds between debits
    country: str | None = None  # the debit's country, as given
    country_hash: int = 0  # its hash when the account's debits never came from it (to learn), else 0
    new_country: bool = False  # a country the account's debits never came from, when some came from one
    p_new_country: float = 1.0  # how often the account's debits came from a country new to it


def _median(values: list[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


def median_mad(s: list[float]) -> tuple[float, float]:
    """Median and median absolute deviation of sorted `s`, equal bit for bit to sorting the deviations.

    The deviations below and above the median are two sorted runs, so their middle is found by a
    binary search over the split instead of a second sort: it runs per debit on the hot path.
    """
    m = len(s)
    h = m >> 1
    odd = m & 1
    # The deviation wanted is the k-th smallest (0-based): k = h for an odd count; k = h - 1 and the
    # next one for an even count.
    med = s[h] if odd else 0.5 * (s[h - 1] + s[h])
    # Deviations below the median: L[i] = med - s[h-1-i]; above: R[j] = s[h+j] - med; both ascending,
    # and med - v == -(v - med) exactly in IEEE arithmetic, so they equal abs(v - med). Taking i from
    # L and k+1-i from R, find the smallest i with L[i] >= R[k-i].
    below = h - 1
    above = h + h - 1 + odd  # h + k
    lo, hi = 0, h
    while lo < hi:
        i = (lo + hi) >> 1
        if med - s[below - i] < s[above - i] - med:
            lo = i + 1
        else:
            hi = i
    # The k-th smallest deviation is the larger of the last taken from each side.
    j = h + odd - lo  # taken from R: k + 1 - i
    if lo == 0:
        d = s[h + j - 1] - med
    else:
        d = med - s[h - lo]
        if j:
            b = s[h + j - 1] - med
            if b >= d:
                d = b
    if odd:
        return med, d
    # Even count: the next smallest deviation too, for the mean of the middle two.
    if lo == h:
        e = s[h + j] - med
    else:
        e = med - s[below - lo]
        if j < h:
            b = s[h + j] - med
            if b < e:
                e = b
    return med, 0.5 * (d + e)


def _push(buf: array[Any], value: Any, cap: int) -> None:
    buf.append(value)
    if len(buf) > cap:
        del buf[0]


EXTERNAL_TYPES = frozenset({"payment", "transfer", "withdrawal"})
# Credits that are money from another party (what a mule passes on); deposits from the account's own
# bank, redemptions and loan disbursements are not.
INBOUND_TYPES = frozenset({"transfer"})
# Debits that send money on to another party or to cash (what a mule does with it); a card payment spends it.
ONWARD_TYPES = frozenset({"transfer", "withdrawal"})


def observe(state: AccountState, ts: float, amount: float, debit: bool, counterparty: str,
            device: str | None, local_hour: int, txn_type: str = "payment", shift: float = 0.0,
            country: str | None = None, tiny: float = TINY_AMOUNT) -> TxnFeatures:
    """Compute the features of a transaction from the state before it (score before learn).

    `shift` is how much larger, in log units, this type of transaction usually is than the
    account's typical debit (a withdrawal to the bank is typically a few times a card payment):
    amounts are compared with the account's history after taking it off.
    """
    n_hist = len(state.log_amounts)
    if n_hist >= 3:
        med = state.log_med
        z = (math.log(amount) - shift - med) / state.log_spread
        median_amount = math.exp(med + shift)
    else:
        z, median_amount = 0.0, amount
    cp = stable_hash(counterparty)
    dev = stable_hash(device) if device else 0
    new_dev = dev != 0 and dev not in state.devices
    ctry = stable_hash(country) if debit and country else 0
    if ctry and ctry in state.countries:
        ctry = 0
    known = len(state.countries)

    c24, c1h, c10, n_tiny = _debit_counts(state, ts, tiny)
    # Expected debits in 10 minutes from the account's typical gap; floor keeps new accounts sane.
    typical_gap = math.exp(state.gap_ew) if state.n_debits >= 3 else HOUR
    expected = min(VELOCITY_WINDOW / max(typical_gap, 30.0), 20.0)

    same_day = ts - state.day_start < DAY
    d = 1 if debit else 0
    day_out = (state.day_out if same_day else 0.0) + (amount if debit else 0.0)
    session = faded(state.ev_sum, ts - state.ev_ts, SESSION_SECONDS)
    inflow = faded(state.in_new, ts - state.in_ts, INFLOW_SECONDS)
    return TxnFeatures(
        ts, amount, debit, debit and txn_type in EXTERNAL_TYPES, local_hour, cp, dev,
        history=n_hist,
        amount_z=z,
        amount_ratio=amount / median_amount,
        median_amount=median_amount,
        new_counterparty=cp not in state.counterparties,
        p_new_counterparty=p_new_payee(state),
        new_device=new_dev,
        p_new_device=p_new_device(state),
        debits_10m=c10 + d,
        expected_10m=expected,
        burst_max=state.burst_max,
        fresh_device=(dev != 0 and not new_dev and dev == state.fresh_dev and ts - state.fresh_dev_ts < HOUR),
        tiny_10m=n_tiny + (1 if debit and amount < tiny else 0),
        debits_1h=c1h + d,
        debits_24h=c24 + d,
        hour_share=(state.hours[local_hour] + 1.0) / (state.n + 24.0),
        day_out=day_out,
        day_in=(state.day_in if same_day else 0.0) + (0.0 if debit else amount),
        day_out_ratio=day_out / state.day_out_ew if state.day_out_ew > 0 else 1.0,
        shift=shift,
        session=session,
        inflow_new=inflow,
        idle=ts - state.last_ts if state.n else 0.0,
        typical_gap=typical_gap if state.n_debits >= 3 else DAY,
        country=country,
        country_hash=ctry,
        new_country=ctry != 0 and known > 0,
        # Known countries over debits, the first one not counted as a change (as with payees: every
        # account had a first); most accounts pay from one country all their life.
        p_new_country=known / (state.n_debits + 2.0),
    )


def _debit_counts(state: AccountState, ts: float, tiny: float = TINY_AMOUNT) -> tuple[int, int, int, int]:
    """Debits before `ts` in the last day, hour and velocity window, and those under `tiny` in that window."""
    dts = state.debit_ts
    k = len(dts)
    # Debit times are appended in event order, so window counts are binary searches, not loops.
    first10 = bisect_left(dts, ts - VELOCITY_WINDOW)
    n_tiny = len(tiny_debit_times(state, ts, tiny)) if first10 < k else 0
    return k - bisect_left(dts, ts - DAY), k - bisect_left(dts, ts - HOUR), k - first10, n_tiny


def tiny_debit_times(state: AccountState, ts: float, tiny: float = TINY_AMOUNT) -> list[float]:
    """Times of the debits under `tiny` before `ts` in the velocity window, oldest first (card-testing probes)."""
    dts = state.debit_ts
    first = bisect_left(dts, ts - VELOCITY_WINDOW)
    return [t for t, a in zip(dts[first:], state.debit_amt[first:], strict=True) if a < tiny]


def p_new_payee(state: AccountState) -> float:
    """Chance that the account's next debit goes to a payee it never paid: Good-Turing, smoothed.

    The share of debits whose payee was paid exactly once, not the share of debits that were a
    first: every account's regular payees were firsts once, so on a few days of history the naive
    share said 'new payees 90% of the time' for an account that pays the same five shops. While
    the tracked payees are not yet a full window, every debit is covered; after that, those they
    cover.
    """
    counts = state.cp_counts
    covered = state.n_debits if len(counts) < KNOWN_COUNTERPARTIES else sum(counts)
    return (counts.count(1) + 1.0) / (covered + 2.0)


def p_new_device(state: AccountState) -> float:
    """Chance that the account's next event comes from a device it never used: devices over events.

    The first device is not counted as a change (every account had one), as with countries: a
    Laplace estimate that counted it said 'new devices 40% of the time' for an account three
    payments old from one phone, and a takeover's new device on a young account was no evidence.
    """
    k = state.new_dev
    return k / (state.n + 2.0) if k else 1.0


def faded(value: float, elapsed: float, scale: float) -> float:
    """`value` faded by e every `scale` seconds over `elapsed` (an event earlier than the last: not faded)."""
    if value == 0.0:
        return 0.0
    return value * math.exp(-elapsed / scale) if elapsed > 0.0 else value


def carry(state: AccountState, f: TxnFeatures, own: float, txn_type: str) -> None:
    """Fold one scored transaction's evidence (`own`: its raw score without the session's) and money flow
    into the account's session and inflow memory (transfers in count when they come from a new counterparty)."""
    ts = f.ts
    session = f.session
    if own > SESSION_FLOOR:
        session += own - SESSION_FLOOR
    if session > 0.01 or state.ev_sum:
        state.ev_sum = session if session > 0.01 else 0.0
        state.ev_ts = ts
    inflow = f.inflow_new
    if f.debit:
        if inflow:
            sent = faded(state.in_sent, ts - state.in_ts, INFLOW_SECONDS)
            if txn_type in ONWARD_TYPES:
                sent += f.amount if f.amount < inflow else inflow
            state.in_sent = sent
            inflow -= f.amount
            state.in_new = inflow if inflow > 0.0 else 0.0
            state.in_ts = ts
    elif f.new_counterparty and txn_type in INBOUND_TYPES:
        state.in_sent = faded(state.in_sent, ts - state.in_ts, INFLOW_SECONDS)
        state.in_new = inflow + f.amount
        state.in_ts = ts
        note_payer(state, ts, f.amount)


def note_payer(state: AccountState, ts: float, amount: float) -> None:
    """Remember that a counterparty the account never dealt with paid `amount` in at `ts` (the window's only)."""
    times = state.in_payers
    if times is _NO_PAYERS:
        times = state.in_payers = array("d")
        state.in_paid = array("d")
    cut = ts - INFLOW_SECONDS
    if times and (times[0] < cut or len(times) >= IN_PAYERS):
        first = max(bisect_left(times, cut), len(times) - IN_PAYERS + 1)
        del times[:first]
        del state.in_paid[:first]
    at = bisect_right(times, ts)  # a late event keeps its place: the window is cut by time
    times.insert(at, ts)
    state.in_paid.insert(at, amount)


def note_fanout(state: AccountState, ts: float, window: float) -> None:
    """Remember money sent on to a payee the account never paid, at `ts`; forget times over `window` old."""
    times = state.fan_ts
    if times is _NO_FANOUT:
        times = state.fan_ts = array("d")
    times.insert(bisect_right(times, ts), ts)  # a late event keeps its place: the window is cut by time
    while times[-1] - times[0] > window or len(times) > FANOUT_MAX:
        del times[0]


def payers_since(state: AccountState, ts: float) -> tuple[int, float, float]:
    """How many payments in from counterparties the account never dealt with fell within INFLOW_SECONDS
    before `ts`, their sum, and that sum faded as the inflow is (AccountState.in_new), to compare with
    what went on."""
    times = state.in_payers
    first = bisect_left(times, ts - INFLOW_SECONDS)
    paid = faded_paid = 0.0
    for t, a in zip(times[first:], state.in_paid[first:], strict=True):
        paid += a
        faded_paid += a * math.exp((t - ts) / INFLOW_SECONDS) if t < ts else a
    return len(times) - first, paid, faded_paid


def _remember_debit(state: AccountState, ts: float, amount: float) -> None:
    """Add a debit to the time-ordered window arrays (a slightly late one in its place, for bisect)."""
    dts = state.debit_ts
    if dts and ts < dts[-1]:
        i = bisect_left(dts, ts)
        dts.insert(i, ts)
        state.debit_amt.insert(i, amount)
        if len(dts) > DEBIT_HISTORY:
            del dts[0]
            del state.debit_amt[0]
    else:
        _push(dts, ts, DEBIT_HISTORY)
        _push(state.debit_amt, amount, DEBIT_HISTORY)


def learn(state: AccountState, f: TxnFeatures) -> None:
    """Fold a scored transaction into its account's state (the features carry what it needs)."""
    ts = f.ts
    if state.n == 0:
        state.first_ts = ts
    state.n += 1
    if state.hours[f.local_hour] < 65000:
        state.hours[f.local_hour] += 1
    if f.new_device:
        state.new_dev += 1
        _push(state.devices, f.dev_hash, KNOWN_DEVICES)
        state.fresh_dev, state.fresh_dev_ts = f.dev_hash, ts
    if ts - state.day_start >= DAY:
        if state.day_start:
            # Daily outflow baseline, EW over days; seeded by the first full day.
            state.day_out_ew = state.day_out if state.day_out_ew == 0 else 0.8 * state.day_out_ew + 0.2 * state.day_out
        state.day_start, state.day_in, state.day_out = ts, 0.0, 0.0
    if f.country_hash:
        _push(state.countries, f.country_hash, KNOWN_COUNTRIES)
    if f.debit:
        state.day_out += f.amount
        dts = state.debit_ts
        if dts:
            lg = math.log(max(ts - dts[-1], 1.0))
            state.gap_ew = lg if state.n_debits <= 1 else 0.9 * state.gap_ew + 0.1 * lg
        state.n_debits += 1
        if f.debits_10m > state.burst_max:
            state.burst_max = f.debits_10m
        if f.new_counterparty:
            state.new_cp += 1
            _push(state.counterparties, f.cp_hash, KNOWN_COUNTERPARTIES)
            _push(state.cp_counts, 1, KNOWN_COUNTERPARTIES)
        else:
            i = state.counterparties.index(f.cp_hash)
            if state.cp_counts[i] < 65535:
                state.cp_counts[i] += 1
        _push(state.log_amounts, math.log(f.amount) - f.shift, AMOUNT_HISTORY)
        _remember_debit(state, ts, f.amount)
        if len(state.log_amounts) >= 3:
            vals = list(state.log_amounts)
            med = _median(vals)
            state.log_med = med
            state.log_spread = max(1.4826 * _median([abs(v - med) for v in vals]), MIN_LOG_SPREAD)
    else:
        state.day_in += f.amount
    if ts > state.last_ts:
        state.last_ts = ts


__all__ = [
    "INBOUND_TYPES",
    "ONWARD_TYPES",
    "STATE_MAGIC",
    "AccountState",
    "StateCodecError",
    "TxnFeatures",
    "carry",
    "faded",
    "last_ts_of",
    "learn",
    "note_payer",
    "observe",
    "p_new_device",
    "payers_since",
    "stable_hash",
    "tiny_amount",
    "tiny_debit_times",
]
