"""Run-time reference lists: named block, watch and allow lists of accounts, counterparties, devices and IPs.

Analysts keep them while the system runs (a compliance officer learns that a counterparty is a
known mule account; a device was seen in a confirmed takeover). Which lists exist, of which type and
at which warning level, is in the rule catalogue (rule `lists`); their entries are changes on the
compacted topic risk.lists, one record per (list, kind, value), applied by every worker into a
ListIndex.

- a **block** or **watch** list entry that a transaction touches (its account, counterparty,
  device or IP) warns at the list's level, naming the list and the entry's note;
- an **allow** list entry suppresses the *model's* warnings for a known-good (account,
  counterparty) pair, or for an account or counterparty as a whole, but never a rule a regulator
  requires (those do not consult allow lists at all).

The index holds a 64-bit hash of each value, not the value: one int in a set per entry, about 60
bytes (measured in docs/benchmarks.md), so a list of a million entries costs tens of megabytes. The
hash is Python's own keyed string hash, fresh in each process, so nobody can aim a value at another
entry; the chance that a lookup of an unlisted value meets one of a million entries is about 1e-13.

>>> idx = ListIndex({"mules": ListDef(type="block", level="high")})
>>> idx.apply(ListChange(list="mules", kind="counterparty", value="cp-9", note="case 41", by="ana"))
True
>>> [(h.list, h.kind, h.note) for h in idx.match("acct-1", "cp-9", None, None)]
[('mules', 'counterparty', 'case 41')]
>>> idx.remove("mules", "counterparty", "cp-9"), idx.match("acct-1", "cp-9", None, None)
(True, None)
"""

from __future__ import annotations

import json
from collections.abc import Iterator, Mapping
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, model_validator

from models.schemas import Level

Kind = Literal["account", "counterparty", "device", "ip", "pair"]
KINDS: tuple[str, ...] = ("account", "counterparty", "device", "ip", "pair")
ListType = Literal["block", "watch", "allow"]
LIST_NAME = r"^[a-z0-9][a-z0-9_.-]{0,63}$"
DEFAULT_LEVEL: dict[str, Level] = {"block": "high", "watch": "medium"}
ALLOW_KINDS = frozenset({"account", "counterparty", "pair"})  # a shared device or IP is never known-good
MAX_NOTE = 500


class ListDef(BaseModel):
    """One list in the catalogue: its type, and for block and watch lists the level and category of its warnings."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    type: ListType
    level: Level | None = Field(None, description="warning level (block: high, watch: medium by default)")
    category: str | None = Field(None, description="warning category (default: block_list or watch_list)")
    description: str = ""

    @model_validator(mode="after")
    def _allow_has_no_level(self) -> ListDef:
        if self.type == "allow" and (self.level is not None or self.category is not None):
            raise ValueError("an allow list raises no warning: it takes no level or category")
        return self

    @property
    def warn_level(self) -> Level:
        """The level its hits warn at."""
        return self.level or DEFAULT_LEVEL.get(self.type, "medium")

    @property
    def warn_category(self) -> str:
        """The category its hits warn in (plans route by it)."""
        return self.category or f"{self.type}_list"


class ListsParams(BaseModel):
    """Parameters of the catalogue's `lists` rule: the lists that exist, by name."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    lists: dict[str, ListDef] = Field(default_factory=dict)
    max_entries: int = Field(5_000_000, ge=1, description="entries all lists may hold together in one worker")

    @model_validator(mode="after")
    def _names(self) -> ListsParams:
        import re

        bad = sorted(n for n in self.lists if not re.match(LIST_NAME, n))
        if bad:
            raise ValueError(f"list names {bad} must be 1-64 lowercase letters, digits, '_', '.' or '-'")
        return self


class ListChange(BaseModel):
    """One entry added to a list (a record on risk.lists; a removal is the key's tombstone)."""

    model_config = ConfigDict(extra="forbid", frozen=True, str_strip_whitespace=True)

    list: str = Field(pattern=LIST_NAME)
    kind: Kind
    value: str = Field(min_length=1, max_length=128, description="the id; for kind 'pair' the account")
    counterparty: str | None = Field(None, min_length=1, max_length=128, description="kind 'pair' only")
    note: str | None = Field(None, max_length=MAX_NOTE)
    by: str = Field(min_length=1, max_length=128)
    via: Literal["cli", "console"] = "cli"
    ts: AwareDatetime = Field(default_factory=lambda: datetime.now(UTC))

    @model_validator(mode="after")
    def _pair(self) -> ListChange:
        if (self.kind == "pair") != (self.counterparty is not None):
            raise ValueError("kind 'pair' takes an account and a counterparty; other kinds take one value")
        return self

    @property
    def key(self) -> bytes:
        """The record key on risk.lists: one per entry, so compaction keeps each entry's latest state."""
        return entry_key(self.list, self.kind, self.value, self.counterparty)


def entry_key(name: str, kind: str, value: str, counterparty: str | None = None) -> bytes:
    """The risk.lists key of one entry: JSON, so any id (with any separator in it) round-trips."""
    parts = [name, kind, value] if counterparty is None else [name, kind, value, counterparty]
    return json.dumps(parts, separators=(",", ":")).encode()


def parse_key(key: bytes) -> tuple[str, str, str, str | None]:
    """(list, kind, value, counterparty) of a risk.lists key; ValueError when it is not one."""
    parts = json.loads(key)
    if not (isinstance(parts, list) and len(parts) in (3, 4) and all(isinstance(p, str) for p in parts)):
        raise ValueError("a risk.lists key is a JSON array [list, kind, value] or [list, 'pair', account, cp]")
    name, kind, value = parts[0], parts[1], parts[2]
    if kind not in KINDS or (kind == "pair") != (len(parts) == 4):
        raise ValueError(f"unknown or malformed kind {kind!r} in a risk.lists key")
    return name, kind, value, parts[3] if len(parts) == 4 else None


@dataclass(frozen=True, slots=True)
class Hit:
    """A transaction touched a block or watch list entry."""

    list: str
    kind: str
    value: str
    note: str | None
    definition: ListDef


_Probe = list[tuple[str, "ListDef", set[int]]]


def _h(kind: str, value: str, counterparty: str | None = None) -> int:
    return hash((value, counterparty)) if kind == "pair" else hash(value)


class ListIndex:
    """Every list's entries as value hashes, with the lookups scoring needs, in bounded memory.

    `max_entries` bounds the whole index: an add beyond it is refused (apply returns False and the
    follower counts and dead-letters it), so a runaway import cannot take the worker's memory.
    """

    def __init__(self, definitions: Mapping[str, ListDef] | None = None, max_entries: int = 5_000_000) -> None:
        self.max_entries = max_entries
        self._sets: dict[tuple[str, str], set[int]] = {}
        self._notes: dict[tuple[str, str, int], str] = {}
        self.hits: dict[str, int] = {}
        self.definitions: dict[str, ListDef] = {}
        # Block and watch lists per kind, as _rebuild sets them (None: no list of that kind has entries).
        self._acct: _Probe | None = None
        self._cp: _Probe | None = None
        self._dev: _Probe | None = None
        self._ip: _Probe | None = None
        self._allow: list[tuple[str, set[int]]] = []
        self.active = False  # any block or watch entry a transaction could touch
        self.allowing = False  # any allow entry
        self.suppressed = 0  # model warnings an allow list kept quiet
        self.set_definitions(definitions or {})

    def __len__(self) -> int:
        return sum(len(s) for s in self._sets.values())

    def sizes(self) -> dict[str, int]:
        """Entries per list name (all kinds), including lists the catalogue does not define (yet)."""
        out: dict[str, int] = {}
        for (name, _), s in self._sets.items():
            out[name] = out.get(name, 0) + len(s)
        return out

    def configure(self, params: ListsParams | None) -> None:
        """Apply the catalogue's `lists` rule (None: the rule is absent or disabled, so no list matches)."""
        if params is not None:
            self.max_entries = params.max_entries
        self.set_definitions(params.lists if params is not None else {})

    def set_definitions(self, definitions: Mapping[str, ListDef]) -> None:
        """Apply the catalogue's list definitions; entries of lists it does not define are kept but match nothing."""
        self.definitions = dict(definitions)
        self._rebuild()

    def _rebuild(self) -> None:
        probe: dict[str, list[tuple[str, ListDef, set[int]]]] = {}
        allow: list[tuple[str, set[int]]] = []
        for (name, kind), s in self._sets.items():
            d = self.definitions.get(name)
            if d is None or not s:
                continue
            if d.type == "allow":
                if kind in ALLOW_KINDS:
                    allow.append((kind, s))
            elif kind != "pair":
                probe.setdefault(kind, []).append((name, d, s))
        self._acct = probe.get("account")
        self._cp = probe.get("counterparty")
        self._dev = probe.get("device")
        self._ip = probe.get("ip")
        self._allow = allow
        self.active = bool(probe)
        self.allowing = bool(allow)

    def apply(self, change: ListChange) -> bool:
        """Add (or re-note) one entry; False when the index is full and the entry was not added."""
        k = (change.list, change.kind)
        s = self._sets.get(k)
        h = _h(change.kind, change.value, change.counterparty)
        if s is None or h not in s:
            if len(self) >= self.max_entries:
                return False
            if s is None:
                s = self._sets[k] = set()
            was_empty = not s
            s.add(h)
            if was_empty:
                self._rebuild()
        nk = (change.list, change.kind, h)
        if change.note:
            self._notes[nk] = change.note
        else:
            self._notes.pop(nk, None)
        return True

    def remove(self, name: str, kind: str, value: str, counterparty: str | None = None) -> bool:
        """Remove one entry; False when it was not there."""
        s = self._sets.get((name, kind))
        h = _h(kind, value, counterparty)
        if s is None or h not in s:
            return False
        s.discard(h)
        self._notes.pop((name, kind, h), None)
        if not s:
            del self._sets[(name, kind)]
            self._rebuild()
        return True

    def match(self, account: str, counterparty: str, device: str | None, ip: str | None) -> list[Hit] | None:
        """The block and watch list entries a transaction touches; None (the usual case) when there are none.

        Straight-line per kind, not a loop over kinds: this runs for every event while any list has entries.
        """
        out: list[Hit] | None = None
        lists = self._acct
        if lists:
            h = hash(account)
            for name, d, s in lists:
                if h in s:
                    out = self._hit(out, name, "account", account, h, d)
        lists = self._cp
        if lists:
            h = hash(counterparty)
            for name, d, s in lists:
                if h in s:
                    out = self._hit(out, name, "counterparty", counterparty, h, d)
        lists = self._dev
        if lists and device:
            h = hash(device)
            for name, d, s in lists:
                if h in s:
                    out = self._hit(out, name, "device", device, h, d)
        lists = self._ip
        if lists and ip:
            h = hash(ip)
            for name, d, s in lists:
                if h in s:
                    out = self._hit(out, name, "ip", ip, h, d)
        return out

    def _hit(self, out: list[Hit] | None, name: str, kind: str, value: str, h: int, d: ListDef) -> list[Hit]:
        self.hits[name] = self.hits.get(name, 0) + 1
        hit = Hit(name, kind, value, self._notes.get((name, kind, h)), d)
        if out is None:
            return [hit]
        out.append(hit)
        return out

    def allowed(self, account: str, counterparty: str) -> bool:
        """True when an allow list vouches for this account, counterparty or (account, counterparty) pair."""
        for kind, s in self._allow:
            if kind == "pair":
                h = hash((account, counterparty))
            else:
                h = hash(account if kind == "account" else counterparty)
            if h in s:
                return True
        return False

    def entries(self) -> Iterator[tuple[str, str, int]]:
        """(list, kind, hash) of every entry: for tests and sizing, not for export (values are not kept)."""
        for (name, kind), s in self._sets.items():
            for h in s:
                yield name, kind, h


def hit_message(hit: Hit) -> str:
    """The reason a person reads: which entity, on which list, and the entry's note."""
    what = "IP" if hit.kind == "ip" else hit.kind
    text = f"{what} {hit.value} is on {hit.definition.type} list '{hit.list}'"
    return f"{text}: {hit.note}" if hit.note else text


def decode(key: bytes | None, value: bytes | None) -> ListChange | tuple[str, str, str, str | None]:
    """One risk.lists record: the entry added, or for a tombstone the (list, kind, value, counterparty) removed.

    Raises ValueError (pydantic's ValidationError is one) naming what is wrong.
    """
    if key is None:
        raise ValueError("a risk.lists record has no key")
    if value is None:
        return parse_key(key)
    change = ListChange.model_validate_json(value)
    if change.key != key:
        raise ValueError("the record's key does not match its list, kind and value")
    return change


def as_row(change: ListChange) -> list[str]:
    """The CSV row of an entry, as `riskwatch lists import` reads and `export` writes it."""
    row = [change.value] if change.counterparty is None else [change.value, change.counterparty]
    return row + ([change.note] if change.note else [])





class ListAudit(BaseModel):
    """A list change on risk.audit (key: the list name); `kind` tells it from lifecycle records.

    An import is one record (how many entries, from which file and its SHA-256), not one per entry.
    """

    kind: Literal["list"] = "list"
    audit_id: str
    action: Literal["add", "remove", "import"]
    list: str
    entry_kind: Kind
    value: str | None = None
    counterparty: str | None = None
    note: str | None = None
    count: int = 1
    source: str | None = Field(None, description="import: the file's name and SHA-256")
    by: str
    via: Literal["cli", "console"]
    ts: AwareDatetime


__all__ = ["KINDS", "Hit", "ListAudit", "ListChange", "ListDef", "ListIndex", "ListsParams", "as_row", "decode",
           "entry_key", "hit_message", "parse_key"]
