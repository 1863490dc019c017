"""Run-time lists without a broker: the index, risk.lists records, import files, and how scoring uses them."""

from __future__ import annotations

import json
import pickle
from collections.abc import Callable
from typing import Any

import pytest
from pydantic import ValidationError

from models.errors import RiskwatchError
from models.features import AccountState
from models.lists import ListChange, ListDef, ListIndex, decode, entry_key
from models.rules import load_catalogue, parse_catalogue
from models.schemas import Transaction
from models.scoring import TransactionScorer

Make = Callable[..., dict[str, Any]]
DEFS = {"blocked": ListDef(type="block"), "watch": ListDef(type="watch"), "known-good": ListDef(type="allow")}


def _add(idx: ListIndex, name: str, kind: str, value: str, cp: str | None = None, note: str | None = None) -> bool:
    return idx.apply(ListChange(list=name, kind=kind, value=value, counterparty=cp, note=note, by="t"))  # type: ignore[arg-type]


def _catalogue(**lists: dict[str, Any]) -> Any:
    text = json.loads(json.dumps(_yaml()))
    if lists:
        text["rules"]["lists"]["params"]["lists"] = lists
    return parse_catalogue(json.dumps(text))


def _yaml() -> dict[str, Any]:
    import yaml

    from models.rules import DEFAULT_RULES

    return yaml.safe_load(DEFAULT_RULES.read_text())


# --------------------------------------------------------------------------- the index
def test_index_matches_every_kind_by_exact_value_and_forgets_removed_entries() -> None:
    idx = ListIndex(DEFS)
    assert not idx.active and idx.match("a", "b", "d", "1.2.3.4") is None
    _add(idx, "blocked", "counterparty", "mule-7", note="case 41: confirmed mule")
    _add(idx, "watch", "device", "dev-x")
    _add(idx, "blocked", "ip", "203.0.113.9")
    _add(idx, "watch", "account", "acct-3")
    hits = idx.match("acct-3", "mule-7", "dev-x", "203.0.113.9")
    assert sorted((h.list, h.kind, h.note) for h in hits) == [
        ("blocked", "counterparty", "case 41: confirmed mule"), ("blocked", "ip", None),
        ("watch", "account", None), ("watch", "device", None)]
    assert idx.match("acct-33", "mule-70", "dev-y", None) is None
    assert idx.match("acct-1", "mule-7", None, None)[0].kind == "counterparty", "a missing device or IP is fine"
    # A device id equal to a listed counterparty's is not a hit: kinds do not mix.
    assert idx.match("acct-1", "x", "mule-7", None) is None
    assert idx.remove("blocked", "counterparty", "mule-7") and not idx.remove("blocked", "counterparty", "mule-7")
    assert [h.kind for h in idx.match("a", "mule-7", None, "203.0.113.9")] == ["ip"]
    assert idx.hits == {"blocked": 4, "watch": 2}
    assert idx.sizes() == {"watch": 2, "blocked": 1}


def test_a_note_can_be_changed_and_re_adding_does_not_count_twice() -> None:
    idx = ListIndex(DEFS)
    _add(idx, "blocked", "counterparty", "m", note="first")
    _add(idx, "blocked", "counterparty", "m", note="second")
    assert len(idx) == 1 and idx.match("a", "m", None, None)[0].note == "second"
    _add(idx, "blocked", "counterparty", "m")
    assert idx.match("a", "m", None, None)[0].note is None


def test_entries_of_an_undefined_list_are_kept_and_match_once_the_catalogue_defines_it() -> None:
    idx = ListIndex({})
    _add(idx, "sanctions", "counterparty", "ofac-1")
    assert idx.sizes() == {"sanctions": 1} and idx.match("a", "ofac-1", None, None) is None
    idx.set_definitions({"sanctions": ListDef(type="block", level="critical")})
    (hit,) = idx.match("a", "ofac-1", None, None)
    assert hit.definition.warn_level == "critical" and hit.definition.warn_category == "block_list"


def test_allow_lists_vouch_for_pairs_accounts_and_counterparties_but_never_devices_or_ips() -> None:
    idx = ListIndex(DEFS)
    _add(idx, "known-good", "pair", "acct-1", "landlord")
    _add(idx, "known-good", "counterparty", "utility-co")
    _add(idx, "known-good", "device", "shared-kiosk")  # kept, but an allow list never trusts a device
    assert idx.allowed("acct-1", "landlord") and not idx.allowed("acct-2", "landlord")
    assert not idx.allowed("landlord", "acct-1"), "a pair is ordered: account, then counterparty"
    assert idx.allowed("anyone", "utility-co")
    assert not idx.active, "allow entries are no block or watch hits"


def test_the_index_is_bounded_and_refuses_entries_beyond_its_limit() -> None:
    idx = ListIndex(DEFS, max_entries=3)
    assert all(_add(idx, "blocked", "counterparty", f"c{i}") for i in range(3))
    assert not _add(idx, "blocked", "counterparty", "c3")
    assert _add(idx, "blocked", "counterparty", "c1", note="re-noting an entry is no new entry")
    assert len(idx) == 3


# --------------------------------------------------------------------------- records on risk.lists
def test_records_round_trip_and_malformed_ones_say_what_is_wrong() -> None:
    c = ListChange(list="blocked", kind="pair", value="a,1", counterparty='b"2', note="n", by="ana")
    assert decode(c.key, c.model_dump_json().encode()) == c
    assert decode(c.key, None) == ("blocked", "pair", "a,1", 'b"2'), "a tombstone removes the entry it keys"
    other = entry_key("blocked", "counterparty", "x")
    with pytest.raises(ValueError, match="does not match"):
        decode(other, c.model_dump_json().encode())
    with pytest.raises(ValueError, match="no key"):
        decode(None, b"{}")
    with pytest.raises(ValueError):
        decode(b"not json", None)
    with pytest.raises(ValueError, match="kind"):
        decode(json.dumps(["blocked", "email", "x"]).encode(), None)
    with pytest.raises(ValidationError, match="pair"):
        ListChange(list="blocked", kind="pair", value="a", by="ana")
    with pytest.raises(ValidationError, match="list"):
        ListChange(list="Bad Name", kind="ip", value="a", by="ana")


def test_import_rows_read_csv_with_notes_and_comments_and_stop_at_a_bad_line(monkeypatch) -> None:
    from app.cli_lists import parse_rows

    monkeypatch.delenv("RISKWATCH_PSEUDONYMISE_KEY", raising=False)
    text = "# mules from case 41\nm1\nm2,known mule, see case 41\n\n\"m,3\",quoted\n"
    rows = [(c.value, c.note) for c in parse_rows("blocked", "counterparty", text, "ana")]
    assert rows == [("m1", None), ("m2", "known mule, see case 41"), ("m,3", "quoted")]
    pairs = list(parse_rows("known-good", "pair", "acct-1,landlord,rent\n", "ana"))
    assert (pairs[0].value, pairs[0].counterparty, pairs[0].note) == ("acct-1", "landlord", "rent")
    with pytest.raises(RiskwatchError, match="line 2: kind pair needs"):
        list(parse_rows("known-good", "pair", "a,b\nlonely\n", "ana"))
    with pytest.raises(RiskwatchError, match="line 1: value"):
        list(parse_rows("blocked", "ip", "x" * 200, "ana"))


def test_entries_are_pseudonymised_like_the_events_they_must_match(monkeypatch) -> None:
    from app.list_changes import make_change
    from app.security import Pseudonymiser
    from app.settings import get_settings

    key = "a-test-key-of-enough-length"
    monkeypatch.setenv("RISKWATCH_PSEUDONYMISE_KEY", key)
    get_settings.cache_clear() if hasattr(get_settings, "cache_clear") else None
    c = make_change("known-good", "pair", "acct-1", "landlord", None, "ana")
    p = Pseudonymiser(key)
    assert (c.value, c.counterparty) == (p.pseudonym("acct-1"), p.pseudonym("landlord"))
    monkeypatch.delenv("RISKWATCH_PSEUDONYMISE_KEY")
    get_settings.cache_clear() if hasattr(get_settings, "cache_clear") else None


# --------------------------------------------------------------------------- scoring
def _txn(make_txn: Make, **kw: Any) -> Transaction:
    return Transaction.model_validate(make_txn(**kw))


def test_a_block_listed_counterparty_is_warned_at_the_lists_level_with_its_name_and_note(make_txn) -> None:
    sc = TransactionScorer(load_catalogue())
    idx = ListIndex()
    sc.set_lists(idx)
    idx.apply(ListChange(list="blocked", kind="counterparty", value="mule-7", note="confirmed mule, case 41",
                         by="ana"))
    idx.apply(ListChange(list="watch", kind="ip", value="198.51.100.4", by="ana"))
    out = sc.process(_txn(make_txn, counterparty_id="mule-7", ip="198.51.100.4"), AccountState())
    got = sorted((f.category, f.level, f.detector, f.reasons[0].code, f.reasons[0].message) for f in out.findings)
    assert got == [
        ("block_list", "high", "list:blocked", "block_list",
         "counterparty mule-7 is on block list 'blocked': confirmed mule, case 41"),
        ("watch_list", "medium", "list:watch", "watch_list", "IP 198.51.100.4 is on watch list 'watch'")]
    assert {a.category for a in out.alerts} == {"block_list", "watch_list"}
    assert sc.process(_txn(make_txn, counterparty_id="merchant-2", minutes=1), AccountState()).findings == []
    # A catalogue without the lists rule (or with it disabled) consults no list.
    text = _yaml()
    text["rules"]["lists"]["enabled"] = False
    sc.set_catalogue(parse_catalogue(json.dumps(text)))
    assert sc.process(_txn(make_txn, counterparty_id="mule-7", minutes=2), AccountState()).findings == []


def test_an_allow_list_quiets_the_model_but_never_a_rule_a_regulator_requires(make_txn) -> None:
    text = _yaml()
    text["rules"]["amount_spike"]["enabled"] = False  # a high rule on the same event would quiet the model itself
    sc = TransactionScorer(parse_catalogue(json.dumps(text)))
    idx = ListIndex()
    sc.set_lists(idx)
    states: dict[str, AccountState] = {}

    def run(cp: str, minutes: float, **kw: Any) -> list[str]:
        st = states.setdefault("w1", AccountState())
        out = sc.process(_txn(make_txn, account_id="w1", counterparty_id=cp, minutes=minutes, **kw), st)
        return [f.detector for f in out.findings]

    for i in range(1500):  # warm the calibration and w* accounts' habits
        acct = f"w{i % 50}"
        sc.process(_txn(make_txn, account_id=acct, amount=80 + i % 40, minutes=i * 7.0,
                        counterparty_id=f"shop{i % 3}", device_id=f"d{acct}"),
                   states.setdefault(acct, AccountState()))
    idx.apply(ListChange(list="known-good", kind="pair", value="w1", counterparty="new-landlord", by="ana"))
    quiet = run("new-landlord", 11_000, amount=6_000.0, device_id="new-phone")
    loud = run("stranger", 11_060, amount=6_000.0, device_id="new-phone-2")
    assert "surprise" not in quiet and "surprise" in loud, (quiet, loud)
    assert idx.suppressed >= 1
    # The reporting threshold applies whatever an allow list says.
    assert "rule:large_transaction" in run("new-landlord", 11_200, amount=60_000.0)


def test_scoring_with_lists_matches_the_step_by_step_reference_bit_for_bit() -> None:
    from tests.unit.test_scoring import _scenario_stream

    events = _scenario_stream()
    cps = sorted({e.counterparty_id for e in events})
    devices = sorted({e.device_id for e in events if e.device_id})
    pairs = sorted({(e.account_id, e.counterparty_id) for e in events})

    def run(fused: bool) -> list[Any]:
        sc = TransactionScorer(load_catalogue(), storm_cap=20)
        idx = ListIndex()
        sc.set_lists(idx)
        for cp in cps[::40]:
            idx.apply(ListChange(list="blocked", kind="counterparty", value=cp, note="n", by="t"))
        for d in devices[::60]:
            idx.apply(ListChange(list="watch", kind="device", value=d, by="t"))
        for a, cp in pairs[::5]:
            idx.apply(ListChange(list="known-good", kind="pair", value=a, counterparty=cp, by="t"))
        step = sc.process if fused else sc.process_reference
        states: dict[str, AccountState] = {}
        got: list[Any] = []
        for e in events:
            o = step(e, states.setdefault(e.account_id, AccountState()))
            got.append((repr(o.score), o.new_ids, [(f.category, f.level, f.detector) for f in o.findings]))
        return [got, idx.hits, idx.suppressed, [pickle.dumps(states[k]) for k in sorted(states)]]

    fused, ref = run(True), run(False)
    kinds = {f[0] for g in ref[0] for f in g[2]}
    assert {"block_list", "watch_list", "anomaly"} <= kinds, kinds
    assert ref[2] > 0, "the allow list must have quieted some model warnings"
    assert fused == ref


def test_the_catalogue_validates_list_definitions() -> None:
    with pytest.raises(Exception, match="allow list raises no warning"):
        _catalogue(ok={"type": "allow", "level": "high"})
    with pytest.raises(Exception, match="list names"):
        _catalogue(**{"Bad Name": {"type": "block"}})
    cat = _catalogue(sanctions={"type": "block", "level": "critical", "category": "sanctions"})
    assert cat.rules["lists"].params.lists["sanctions"].warn_category == "sanctions"


# --------------------------------------------------------------------------- the worker's follower
def test_the_follower_applies_records_sets_bad_ones_aside_and_exports_metrics() -> None:
    import asyncio
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from agents.lists import ListFollower
    from app.metrics import Metrics
    from app.settings import Settings

    letters: list[tuple[Any, ...]] = []

    class Sink:
        async def dead_letter(self, *args: Any) -> None:
            letters.append(args)

    m = Metrics(CollectorRegistry())
    rt = SimpleNamespace(metrics=m, settings=Settings())
    idx = ListIndex(DEFS, max_entries=2)
    f = ListFollower(rt, Sink(), idx)  # type: ignore[arg-type]
    good = [ListChange(list="blocked", kind="counterparty", value=f"m{i}", by="t") for i in range(3)]

    async def feed() -> None:
        for i, c in enumerate(good):
            await f.handle(c.key, c.model_dump_json().encode(), 0, i)
        await f.handle(good[0].key, None, 0, 3)
        await f.handle(b"[]", b"{}", 0, 4)

    asyncio.run(feed())
    reasons = [a[4] for a in letters]
    assert reasons[0].startswith("list index full (2 entries, lists.params.max_entries): entry not applied")
    assert reasons[1].startswith("invalid list record: ")
    idx.match("a", "m1", None, None)
    idx.suppressed = 3
    f.export_metrics()

    def value(name: str, **labels: str) -> float | None:
        return m.registry.get_sample_value(name, labels)

    assert value("riskwatch_list_changes_total", op="add") == 2
    assert value("riskwatch_list_changes_total", op="remove") == 1
    assert value("riskwatch_list_rejected_total", reason="full") == 1
    assert value("riskwatch_list_rejected_total", reason="invalid") == 1
    assert value("riskwatch_list_entries", list="blocked") == 1
    assert value("riskwatch_list_hits_total", list="blocked") == 1
    assert value("riskwatch_list_suppressed_total") == 3
