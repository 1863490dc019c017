"""The rule catalogue: the shipped file loads, and bad catalogues are refused with a clear reason."""

from __future__ import annotations

import pytest

from models.errors import ConfigError
from models.rules import DEFAULT_RULES, LargeTransactionParams, load_catalogue, parse_catalogue


def test_shipped_catalogue_has_every_default_rule():
    cat = load_catalogue(DEFAULT_RULES)
    expected = {"large_transaction": "medium", "structuring": "high", "fund_isolation": "critical",
                "velocity": "high", "card_testing": "high", "liquidity_run": "high", "market_crash": "high",
                "market_stress": "high",
                "anomaly": "medium", "market_anomaly": "medium", "lists": "high", "pass_through": "high",
                "amount_spike": "high", "new_account_spike": "medium", "dormant_reactivation": "high",
                "platform_account_new_device": "high", "payee_fanout": "high", "new_access": "high"}
    assert {k: r.level for k, r in cat.rules.items()} == expected
    assert all(r.description for r in cat.rules.values())
    p = cat.params("large_transaction", LargeTransactionParams)
    assert p.threshold("CNY") == 50_000 and p.threshold("XYZ") == 50_000


@pytest.mark.parametrize(("text", "needle"), [
    ("version: 2\nrules: {nonsense: {category: x, level: high, description: d}}", "unknown rule id 'nonsense'"),
    ("version: 2\nrules: {structuring: {category: s, level: high, description: d, params: {min_count: 1}}}",
     "rules.structuring.min_count: Input should be greater than or equal to 2"),
    ("version: 2\nrules: {velocity: {category: v, level: severe, description: d}}", "rules.velocity.level"),
    # A zero floor would be the only bar before a baseline exists: every outflow would be a run.
    ("version: 2\nrules: {liquidity_run: {category: l, level: high, description: d, params: {min_net_outflow: 0}}}",
     "rules.liquidity_run.min_net_outflow: Input should be greater than 0"),
    ("version: 0\nrules: {}", "version"),
    ("version: [unclosed", "not valid YAML"),
    ("- a list", "expected a mapping"),
])
def test_bad_catalogues_are_refused_with_the_field_and_problem(text, needle):
    with pytest.raises(ConfigError) as exc:
        parse_catalogue(text, "test.yaml")
    assert needle in str(exc.value) and "test.yaml" in str(exc.value)


def test_missing_file_says_which_setting_to_fix(tmp_path):
    with pytest.raises(ConfigError, match="RISKWATCH_RULES_FILE"):
        load_catalogue(tmp_path / "nope.yaml")


def test_disabled_rule_is_not_in_force():
    cat = parse_catalogue("version: 3\nrules: {velocity: {category: velocity, level: high, enabled: false, "
                          "description: d}}")
    assert cat.rule("velocity") is None and cat.rule("structuring") is None
