"""Rules as plug-ins: one module per rule, found by the registry, run by the catalogue, gated by themselves."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any, ClassVar

import pytest
from pydantic import Field

from models.errors import ConfigError
from models.features import AccountState
from models.feedback import key_of
from models.rules import (
    ADAPTIVE_RULES,
    DEFAULT_RULES,
    REGISTRY,
    REQUIRED_RULES,
    Event,
    RuleParams,
    TxnRule,
    load_catalogue,
    parse_catalogue,
    register,
)
from models.schemas import Reason, Transaction
from models.scoring import TransactionScorer

Make = Callable[..., dict[str, Any]]


def _txn(make_txn: Make, **kw: Any) -> Transaction:
    return Transaction.model_validate(make_txn(**kw))


def _rule_hits(out: Any) -> list[str]:
    return [f.detector for f in out.findings if f.detector.startswith("rule:")]


def test_every_rule_module_in_the_package_is_registered_and_its_sets_are_derived_from_the_classes() -> None:
    import pkgutil

    import models.rules as pkg

    modules = {m.name for m in pkgutil.iter_modules(pkg.__path__)} - {"base"}
    assert modules == set(REGISTRY), "one module per rule type, named as the type"
    assert REQUIRED_RULES == {"fund_isolation", "large_transaction", "structuring"}
    assert ADAPTIVE_RULES == {"velocity", "card_testing", "pass_through", "dormant_reactivation", "amount_spike",
                              "new_account_spike", "payee_fanout"}
    shipped = load_catalogue()
    assert {r.type for r in shipped.txn_rules()} == set(REGISTRY), "the shipped catalogue runs every rule type"


def test_two_instances_of_one_rule_type_run_side_by_side_with_their_own_ids_and_parameters(make_txn: Make) -> None:
    text = DEFAULT_RULES.read_text().replace("rules:\n", """rules:
  large_wire:
    type: large_transaction
    category: large_wire
    level: high
    description: Wires from 20,000 up get a second look the same day.
    params: {default_threshold: 20000}
""", 1)
    cat = parse_catalogue(text)
    assert cat.rules["large_wire"].type == "large_transaction" and cat.rules["large_transaction"].type == \
        "large_transaction"
    sc = TransactionScorer(cat)
    st = AccountState()
    out = sc.process(_txn(make_txn, amount=30_000.0), st)
    assert _rule_hits(out) == ["rule:large_wire"]
    wire = out.findings[0]
    assert (wire.category, wire.level) == ("large_wire", "high")
    assert "CNY 20,000 reporting threshold" in wire.reasons[0].message
    out = sc.process(_txn(make_txn, amount=60_000.0, minutes=1), st)
    assert sorted(_rule_hits(out)) == ["rule:large_transaction", "rule:large_wire"]
    # A second instance of a required rule is required too: verdicts never move it.
    assert key_of("rule:large_wire", ["large_transaction"]) is None


def test_a_catalogue_naming_an_unknown_type_or_a_second_model_is_refused_with_the_reason() -> None:
    base = "version: 2\nrules:\n"
    with pytest.raises(ConfigError, match=r"unknown rule type 'nope' \(of rule 'x'\)"):
        parse_catalogue(base + "  x: {type: nope, category: c, level: high, description: d}\n")
    with pytest.raises(ConfigError, match="runs once, under its own id 'anomaly'"):
        parse_catalogue(base + "  anomaly2: {type: anomaly, category: c, level: high, description: d}\n")
    with pytest.raises(ConfigError, match="min_count"):
        parse_catalogue(base + "  s2: {type: structuring, category: s, level: high, description: d, "
                               "params: {min_count: 1}}\n")


class _OddCentsParams(RuleParams):
    cents: int = Field(13, ge=0, le=99)


class _OddCents(TxnRule):
    """A test-only rule with no gate of its own: the scorer must ask it about every event."""

    type = "test_odd_cents"
    Params = _OddCentsParams
    debit_only = False
    seen: ClassVar[list[str]] = []

    def check(self, ev: Event) -> list[Reason] | None:
        self.seen.append(ev.txn.event_id)
        if round(ev.txn.amount * 100) % 100 != self.p.cents:
            return None
        return [Reason(code=self.type, message=f"{ev.txn.amount:.2f} ends in .{self.p.cents}")]


def test_a_new_rule_is_one_module_and_one_entry_and_without_a_gate_it_sees_every_event(make_txn: Make) -> None:
    register(_OddCents)
    try:
        text = DEFAULT_RULES.read_text().replace("rules:\n", """rules:
  odd_cents:
    type: test_odd_cents
    category: odd_cents
    level: high
    description: Test rule.
    params: {cents: 13}
""", 1)
        sc = TransactionScorer(parse_catalogue(text))
        st = AccountState()
        outs = [sc.process(_txn(make_txn, amount=a, direction=d, minutes=i), st)
                for i, (a, d) in enumerate([(10.0, "debit"), (55.13, "credit"), (99.13, "debit"), (7.5, "debit")])]
        assert len(_OddCents.seen) == 4, "no gate declared: asked about every event, credits included"
        assert [_rule_hits(o) for o in outs] == [[], ["rule:odd_cents"], ["rule:odd_cents"], []]
        # Both paths of the scorer run the same plug-ins.
        st2 = AccountState()
        ref = sc.process_reference(_txn(make_txn, amount=1.13), st2)
        assert _rule_hits(ref) == ["rule:odd_cents"]
    finally:
        del REGISTRY["test_odd_cents"]


def _custody(sc: TransactionScorer, make_txn: Make, st: AccountState, n: int) -> None:
    for i in range(n):
        sc.process(_txn(make_txn, account_id="C001", account_kind="custody", txn_type="redemption",
                        amount=3_000.0 + i, counterparty_id=f"cust-{i}", device_id=f"ops-{i % 2}",
                        minutes=i * 30), st)


@pytest.fixture
def sc() -> TransactionScorer:
    return TransactionScorer(load_catalogue())


def test_money_leaving_a_custody_account_from_a_device_it_never_used_warns_access_control(sc, make_txn) -> None:
    st = AccountState()
    _custody(sc, make_txn, st, 8)
    out = sc.process(_txn(make_txn, account_id="C001", account_kind="custody", txn_type="redemption",
                          amount=3_100.0, counterparty_id="cust-x", device_id="laptop-unknown", minutes=300), st)
    (fd,) = [f for f in out.findings if f.detector == "rule:platform_account_new_device"]
    assert (fd.category, fd.level) == ("access_control", "high")
    assert fd.reasons[0].message == ("redemption of CNY 3,100.00 from custody account C001 on device laptop-unknown, "
                                     "which it never used before (2 devices in 8 transactions)")
    assert out.alerts and out.alerts[0].category == "access_control"


def test_known_devices_customers_and_new_platform_accounts_do_not_warn_access_control(sc, make_txn) -> None:
    st = AccountState()
    _custody(sc, make_txn, st, 8)
    known = sc.process(_txn(make_txn, account_id="C001", account_kind="custody", txn_type="redemption",
                            amount=3_100.0, device_id="ops-1", minutes=300), st)
    credit = sc.process(_txn(make_txn, account_id="C001", account_kind="custody", txn_type="investment",
                             direction="credit", amount=3_100.0, device_id="new-box", minutes=301), st)
    assert "rule:platform_account_new_device" not in _rule_hits(known) + _rule_hits(credit)
    fresh = AccountState()
    _custody(sc, make_txn, fresh, 3)  # fewer than min_history transactions: every device is new to it
    young = sc.process(_txn(make_txn, account_id="C001", account_kind="custody", txn_type="redemption",
                            amount=3_100.0, device_id="new-box", minutes=300), fresh)
    assert "rule:platform_account_new_device" not in _rule_hits(young)
    cust = AccountState()
    for i in range(8):
        sc.process(_txn(make_txn, amount=100.0 + i, device_id="phone-1", minutes=i * 30), cust)
    new_phone = sc.process(_txn(make_txn, amount=100.0, device_id="phone-2", minutes=300), cust)
    assert "rule:platform_account_new_device" not in _rule_hits(new_phone), "customers change phones"
