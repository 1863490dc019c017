"""The contingency-plan catalogue: the shipped plans, selection by (category, level), validation, trigger ids."""

from __future__ import annotations

import re
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest
import yaml

from app.cli import main
from models.errors import ConfigError
from models.plans import (
    ACTIONS,
    load_plans,
    make_trigger,
    next_level,
    parse_duration,
    parse_plans,
    trigger_id,
)

ROOT = Path(__file__).resolve().parents[2]
# The categories the detectors raise, and the levels each is raised at (from the risk-assessment issue).
RAISED = {
    "fund_isolation": ["critical"],
    "large_transaction": ["medium"],
    "structuring": ["high"],
    "velocity": ["high"],
    "card_testing": ["high"],
    "anomaly": ["medium", "high"],
    "liquidity_run": ["high", "critical"],
    "market_anomaly": ["medium", "high"],
    "market_crash": ["high", "critical"],
    "market_stress": ["high", "critical"],
    "amount_spike": ["medium", "high"],
    "money_mule": ["high"],
    "dormant_account": ["high"],
    "access_control": ["high"],
    "block_list": ["high"],
    "watch_list": ["medium"],
}


def plan_yaml(**over: object) -> str:
    plan = {"title": "t", "category": "velocity", "min_level": "low", "actions": ["page_oncall"],
            "owner_team": "fraud-ops", "ack_within": "5m", "resolve_within": "1h", "runbook": "docs/x.md"}
    plan.update(over)
    return yaml.safe_dump({"version": 1, "plans": {"p": plan}})


@pytest.fixture(scope="module")
def shipped():
    return load_plans(ROOT / "deploy" / "plans.yaml")


def test_every_category_and_level_raised_has_a_dedicated_plan(shipped) -> None:
    for category, levels in RAISED.items():
        for level in levels:
            plan = shipped.select(category, level)
            assert plan is not None and plan.category == category, (category, level)
    rules = yaml.safe_load((ROOT / "deploy" / "rules.yaml").read_text())["rules"]
    # The lists rule raises in its lists' categories, not its own.
    lists = rules.pop("lists")["params"]["lists"].values()
    raised = {r["category"] for r in rules.values()} | {f"{d['type']}_list" for d in lists if d["type"] != "allow"}
    assert raised <= set(RAISED), "a new category needs a plan here"


def test_the_plans_the_issue_asks_for(shipped) -> None:
    fund = shipped.select("fund_isolation", "critical")
    assert {"freeze_account", "notify_compliance", "page_oncall"} <= set(fund.actions)
    assert fund.actions[0] == "freeze_account" and fund.ack_within <= 300 and fund.owner_team == "compliance"
    large = shipped.select("large_transaction", "medium")
    assert "file_large_transaction_report" in large.actions and large.resolve_within <= 86_400
    run = shipped.select("liquidity_run", "high")
    assert run.owner_team == "treasury" and "page_oncall" in run.actions
    stress = shipped.select("market_stress", "high")
    assert stress.owner_team == "market-risk" and "page_oncall" in stress.actions
    assert shipped.select("liquidity_run", "critical").ack_within < run.ack_within


def test_every_team_has_a_route_in_the_shipped_alertmanager_config(shipped) -> None:
    config = yaml.safe_load((ROOT / "deploy" / "alertmanager" / "alertmanager.yml").read_text())
    routed: set[str] = set()
    receivers = {r["name"] for r in config["receivers"]}

    def walk(route: dict) -> None:
        for m in route.get("matchers", []):
            if m.startswith("team="):
                routed.add(m.split("=", 1)[1].strip('"'))
        for child in route.get("routes", []):
            walk(child)

    walk(config["route"])
    # risk-duty is the receiver of every warning no team route claims.
    assert shipped.teams() <= routed | ({"risk-duty"} & receivers)


def test_selection_takes_the_highest_min_level_at_or_below_the_warning(shipped) -> None:
    assert shipped.select("anomaly", "medium").plan_id == "anomaly-review"
    assert shipped.select("anomaly", "high").plan_id == "anomaly-urgent"
    assert shipped.select("anomaly", "critical").plan_id == "anomaly-urgent"
    assert shipped.select("something_new", "low").plan_id == "triage"
    assert parse_plans(plan_yaml(min_level="high")).select("velocity", "medium") is None


@pytest.mark.parametrize(("over", "message"), [
    ({"actions": ["freeze_acount"]}, "unknown action 'freeze_acount'; known actions: "),
    ({"actions": ["page_oncall", "page_oncall"]}, "listed twice"),
    ({"ack_within": "2h", "resolve_within": "1h"}, "shorter than ack_within"),
    ({"ack_within": "soon"}, "plans.p.ack_within: 'soon' is not a duration"),
    ({"ack_within": -5}, "must be positive"),
    ({"min_level": "severe"}, "plans.p.min_level"),
    ({"owner_team": "Fraud Ops"}, "plans.p.owner_team"),
    ({"colour": "red"}, "plans.p.colour"),
])
def test_invalid_plans_are_refused_with_the_plan_field_and_problem(over: dict, message: str) -> None:
    with pytest.raises(ConfigError, match="the plan catalogue was not loaded") as exc:
        parse_plans(plan_yaml(**over), "plans.yaml")
    assert message in str(exc.value)
    assert str(exc.value).startswith("plans.yaml: ")


def test_two_plans_for_the_same_category_and_level_are_refused() -> None:
    doc = yaml.safe_load(plan_yaml())
    doc["plans"]["q"] = dict(doc["plans"]["p"])
    with pytest.raises(ConfigError, match="plans 'p' and 'q' both match category 'velocity' from level 'low'"):
        parse_plans(yaml.safe_dump(doc))


@pytest.mark.parametrize(("text", "message"), [
    ("version: [", "not valid YAML"),
    ("- a\n- b", "expected a mapping with 'version' and 'plans'"),
    ("version: 0\nplans: {}", "version"),
])
def test_unreadable_catalogues_are_refused(text: str, message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        parse_plans(text)


def test_a_missing_file_names_the_setting(tmp_path: Path) -> None:
    with pytest.raises(ConfigError, match="RISKWATCH_PLANS_FILE"):
        load_plans(tmp_path / "nope.yaml")


def test_durations() -> None:
    assert [parse_duration(v) for v in ("30s", "15m", "4h", "1d", 90, 2.5)] == [30, 900, 14400, 86400, 90, 2.5]
    for bad in ("1w", "", True, "m5"):
        with pytest.raises(ValueError):
            parse_duration(bad)
    assert next_level("medium") == "high" and next_level("critical") == "critical"


def test_trigger_ids_are_deterministic_per_alert_plan_and_kind(shipped) -> None:
    a = "39420a2727473c06d8dc4e5e"
    assert trigger_id(a, "p") == trigger_id(a, "p")
    assert len({trigger_id(a, "p"), trigger_id(a, "q"), trigger_id(a, "p", "escalation"),
                trigger_id("49420a2727473c06d8dc4e5e", "p")}) == 4
    plan = shipped.select("fund_isolation", "critical")
    at = datetime(2026, 11, 2, 1, 0, tzinfo=UTC)
    t = make_trigger(plan, 3, alert_id=a, level="critical", category="fund_isolation", entity_type="account",
                     entity_id="custody-1", opened_at=at)
    assert t.trigger_id == trigger_id(a, plan.plan_id) and t.kind == "plan" and t.plans_version == 3
    assert t.ack_deadline == at + timedelta(seconds=plan.ack_within)
    assert t.resolve_deadline == at + timedelta(seconds=plan.resolve_within)
    assert t.actions == plan.actions and t.owner_team == "compliance" and t.runbook == plan.runbook
    esc = make_trigger(plan, 3, alert_id=a, level="critical", category="fund_isolation", entity_type="account",
                       entity_id="custody-1", opened_at=at, kind="escalation", round=2)
    assert esc.owner_team == plan.escalation_team and esc.escalation_of == t.trigger_id
    assert esc.trigger_id == trigger_id(a, plan.plan_id, "escalation-2")
    assert set(esc.actions) <= ACTIONS


def test_plans_check_command(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["plans", "check", str(ROOT / "deploy" / "plans.yaml")]) == 0
    out = capsys.readouterr().out
    rows = [line.split() for line in out.splitlines()]
    assert ["fund_isolation", "critical", "fund-isolation-breach", "compliance"] in rows
    assert ["liquidity_run", "critical", "liquidity-run-critical", "treasury"] in rows
    assert out.rstrip().endswith("21 plans: OK")
    no_fallback = tmp_path / "plans.yaml"
    no_fallback.write_text(plan_yaml())
    assert main(["plans", "check", str(no_fallback)]) == 2
    err = capsys.readouterr().err
    assert ("no plan answers access_control, amount_spike, anomaly, block_list, card_testing, dormant_account, "
            "fund_isolation") in err
    assert "list_match" not in err, "the lists rule raises in its lists' categories, not its own"


def test_every_runbook_link_points_at_a_section_of_the_docs(shipped) -> None:
    def anchors(path: str) -> set[str]:
        # GitHub's heading anchors: lowercase, punctuation dropped, spaces to hyphens.
        docs = (ROOT / path).read_text()
        return {re.sub(r"[^a-z0-9 -]", "", h.lower()).replace(" ", "-") for h in re.findall(r"^#+ (.+)$", docs, re.M)}

    for plan in shipped.plans.values():
        path, _, anchor = plan.runbook.partition("#")
        assert path in ("docs/disposal.md", "docs/lists.md") and anchor in anchors(path), (plan.plan_id, plan.runbook)


def test_alert_states_are_written_to_their_key_partition_without_asking_the_producer(tmp_path: Path) -> None:
    # Faust's partitioner needs the producer's metadata for the changelog topic, which a just-started
    # worker may lack (TypeError, the warning dead-lettered instead of getting its plan).
    from agents.disposal import Disposal, partition_of
    from agents.sink import Sink
    from app.faust_app import create_app
    from app.settings import Settings

    rt = create_app(Settings(topic_prefix="unit.", app_id="unit", data_dir=tmp_path / "data", topic_partitions=6))
    d = Disposal(rt, Sink(rt), load_plans(ROOT / "deploy" / "plans.yaml"))
    for key in (b"a1", b"alert-0001", b"\x00\xff"):
        assert d.table.partition_for_key(key) == partition_of(key, 6)
