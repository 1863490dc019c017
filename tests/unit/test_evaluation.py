"""Tests for offline evaluation: metrics checked against hand computation, curves, detection delays, episodes."""

from __future__ import annotations

import itertools
from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.evaluation import (
    EvalResult,
    active_account_days,
    average_precision,
    budget_curve,
    budget_threshold,
    curves,
    detection_delays,
    episodes,
    evaluate_scores,
    instance_key,
    median_detection_delay,
    roc_auc,
    warning_load,
    warning_precision,
)
from models.schemas import Alert

# Ranked by score: 0.8(+) 0.7(-) 0.4(+) 0.35(-) 0.3(-) 0.2(+) 0.1(-) 0.05(-)
LABELS = [0, 0, 0, 1, 0, 1, 1, 0]
SCORES = [0.1, 0.3, 0.35, 0.4, 0.7, 0.8, 0.2, 0.05]


@settings(max_examples=200, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.sampled_from([0.0, 0.1, 0.5, 0.9, 1.0])), min_size=1, max_size=60),
       st.integers(0, 2**32 - 1))
def test_ranking_metrics_equal_sklearns(pairs: list[tuple[int, float]], seed: int) -> None:
    # Ours keep report.json free of the `report` extra; they must give sklearn's numbers, ties included.
    from sklearn.metrics import average_precision_score, roc_auc_score

    y = np.array([p[0] for p in pairs])
    s = np.array([p[1] for p in pairs]) + np.random.default_rng(seed).choice([0.0, 0.001], size=len(pairs))
    if y.any():
        assert average_precision(y, s) == pytest.approx(average_precision_score(y, s), abs=1e-12)
    if 0 < y.sum() < y.size:
        assert roc_auc(y, s) == pytest.approx(roc_auc_score(y, s), abs=1e-12)


def test_metrics_match_hand_computation() -> None:
    r = evaluate_scores(LABELS, SCORES, threshold=0.35)
    # AUC: of the 3 x 5 positive-negative pairs, 0.4 beats 4, 0.8 beats 5, 0.2 beats 2.
    assert r.roc_auc == pytest.approx(11 / 15)
    # AP: precision at each positive's rank (1, 3, 6) is 1/1, 2/3, 3/6.
    assert r.average_precision == pytest.approx((1 + 2 / 3 + 3 / 6) / 3)
    # At >= 0.35: alerted 0.8+, 0.7-, 0.4+, 0.35- (the threshold itself counts).
    assert r.recall_at_threshold == pytest.approx(2 / 3)
    assert r.precision_at_threshold == pytest.approx(2 / 4)
    assert r.alert_rate_normal == pytest.approx(2 / 5)
    assert (r.n, r.n_positive) == (8, 3)


def test_ties_count_half() -> None:
    assert evaluate_scores([0, 1], [0.5, 0.5], threshold=0.9).roc_auc == pytest.approx(0.5)


def test_degenerate_inputs_give_none_not_errors() -> None:
    no_pos = evaluate_scores([0, 0, 0], [0.1, 0.9, 0.5], threshold=0.5)
    assert (no_pos.roc_auc, no_pos.average_precision, no_pos.recall_at_threshold) == (None, None, None)
    assert no_pos.precision_at_threshold == 0.0 and no_pos.alert_rate_normal == pytest.approx(2 / 3)
    all_pos = evaluate_scores([1, 1], [0.1, 0.9], threshold=0.5)
    assert all_pos.roc_auc is None and all_pos.alert_rate_normal is None and all_pos.recall_at_threshold == 0.5
    assert evaluate_scores([], [], threshold=0.5) == EvalResult(None, None, None, None, None, 0, 0)
    nothing_alerted = evaluate_scores(LABELS, SCORES, threshold=2.0)
    assert nothing_alerted.precision_at_threshold is None and nothing_alerted.recall_at_threshold == 0.0


@pytest.mark.parametrize(
    ("labels", "scores"),
    [([0, 1], [0.5]), ([0, 2], [0.1, 0.2]), ([0, 1], [0.1, float("nan")]), ([0, None], [0.1, 0.2])],
)
def test_bad_inputs_are_rejected(labels: list[Any], scores: list[float]) -> None:
    with pytest.raises(ValueError):
        evaluate_scores(labels, scores, threshold=0.5)


@settings(max_examples=25, deadline=None)
@given(st.lists(st.tuples(st.integers(0, 1), st.floats(0, 1)), min_size=1, max_size=40), st.floats(0, 1))
def test_threshold_figures_match_plain_counting(pairs: list[tuple[int, float]], threshold: float) -> None:
    labels, scores = [p[0] for p in pairs], [p[1] for p in pairs]
    r = evaluate_scores(labels, scores, threshold)
    hits = sum(1 for y, s in pairs if y and s >= threshold)
    false = sum(1 for y, s in pairs if not y and s >= threshold)
    pos = sum(labels)
    assert r.recall_at_threshold == (hits / pos if pos else None)
    assert r.alert_rate_normal == (false / (len(pairs) - pos) if len(pairs) > pos else None)
    if r.roc_auc is not None:
        assert 0.0 <= r.roc_auc <= 1.0


def test_curves_on_the_hand_example() -> None:
    c = curves(LABELS, SCORES)
    roc, pr = c["roc"], c["pr"]
    assert (roc["fpr"][0], roc["tpr"][0], roc["fpr"][-1], roc["tpr"][-1]) == (0.0, 0.0, 1.0, 1.0)
    assert roc["thresholds"][0] is None  # +inf, which JSON cannot carry
    assert (pr["recall"][-1], pr["precision"][-1], pr["thresholds"][-1]) == (0.0, 1.0, None)
    assert pr["recall"][0] == 1.0
    assert len(pr["precision"]) == len(pr["recall"]) == len(pr["thresholds"])


def test_curves_are_thinned_keeping_their_ends() -> None:
    rng = np.random.default_rng(0)
    labels = (rng.random(20_000) < 0.1).astype(int)
    scores = rng.random(20_000) + labels * 0.3
    c = curves(labels.tolist(), scores.tolist())
    for name, (x, y) in {"roc": ("fpr", "tpr"), "pr": ("recall", "precision")}.items():
        assert 50 < len(c[name][x]) <= 200 and len(c[name][x]) == len(c[name][y])
    assert c["roc"]["fpr"][-1] == 1.0 and c["pr"]["recall"][-1] == 0.0
    assert curves([0, 0], [0.1, 0.2])["roc"] is None and curves([0, 0], [0.1, 0.2])["pr"] is None


def event(event_id: str, ts: str, scenario: str, **extra: Any) -> dict[str, Any]:
    return {"event_id": event_id, "ts": ts, "label": 1, "scenario": scenario, **extra}


EVENTS = [
    {"event_id": "n1", "ts": "2026-11-01T09:00:00+08:00", "label": 0, "account_id": "A1"},
    event("t1", "2026-11-01T10:00:00+08:00", "takeover", account_id="A1"),
    event("t2", "2026-11-01T10:01:00+08:00", "takeover", account_id="A1"),
    event("s1", "2026-11-01T11:00:00+08:00", "spike", account_id="A2"),
    event("m1", "2026-11-01T03:00:00+00:00", "market_crash", instrument="INS01"),
    event("r1", "2026-11-01T12:00:00+08:00", "liquidity_run", account_id="A3",
          scenario_instance="liquidity_run:platform#1"),
    event("r2", "2026-11-01T12:30:00+08:00", "liquidity_run", account_id="A4",
          scenario_instance="liquidity_run:platform#1"),
]


def test_detection_delay_per_instance() -> None:
    alerts = [
        {"event_ids": ["n1"], "event_ts": "2026-11-01T09:00:00+08:00"},  # names no labelled event
        {"event_ids": ["t2"], "event_ts": "2026-11-01T10:01:00+08:00"},
        {"event_ids": ["t1", "t2"], "event_ts": "2026-11-01T02:00:00Z"},  # earlier, listed later
        {"event_ids": ["r2"], "event_ts": "2026-11-01T12:30:00+08:00"},
        Alert(alert_id="x", created_at=datetime(2030, 1, 1, tzinfo=UTC),
              event_ts=datetime(2026, 11, 1, 3, 2, tzinfo=UTC), entity_type="instrument",
              entity_id="INS01", category="market", level="high", score=0.9, reasons=[], event_ids=["m1"],
              detector="test"),
    ]
    assert detection_delays(EVENTS, alerts) == {
        "liquidity_run:platform#1": 1800.0,
        "market_crash:INS01": 120.0,
        "spike:A2": None,
        "takeover:A1": 0.0,
    }


def test_instance_key_falls_back_to_account_then_instrument_then_platform() -> None:
    assert instance_key({"scenario": "spike", "account_id": "A2"}) == "spike:A2"
    assert instance_key({"scenario": "market_crash", "instrument": "INS01"}) == "market_crash:INS01"
    assert instance_key({"scenario": "liquidity_run"}) == "liquidity_run:platform"


def test_median_detection_delay() -> None:
    delays = {"a:1": 10.0, "a:2": None, "a:3": 40.0, "b:1": 5.0}
    assert median_detection_delay(delays) == 10.0
    assert median_detection_delay(delays, scenario="a") == 25.0
    assert median_detection_delay({"a:1": None}) is None and median_detection_delay({}) is None


# ---- episodes ---------------------------------------------------------------------------------------------


def warning(alert_id: str, ts: str, ids: list[str], detector: str = "surprise", category: str = "anomaly") -> Any:
    return {"alert_id": alert_id, "event_ts": ts, "event_ids": ids, "detector": detector, "category": category}


# Takeover on A1: five risky events a minute apart from 10:00 (+08:00, so 02:00 UTC).
TAKEOVER = [event(f"t{i}", f"2026-11-01T10:0{i}:00+08:00", "takeover", account_id="A1") for i in range(5)]


def test_delay_counts_the_risky_events_up_to_the_first_warning_and_its_seconds() -> None:
    # A windowed rule fires at the third event naming all three: warned at the 3rd, not the 1st.
    late = warning("w1", "2026-11-01T02:02:00Z", ["t0", "t1", "t2"], detector="rule:velocity", category="velocity")
    # A later version of a model warning names the fifth event: the episode keeps the earlier warning.
    later = warning("w2", "2026-11-01T02:04:00Z", ["n9", "t4"])
    r = episodes(TAKEOVER + EVENTS[3:4], [later, late])["instances"]
    assert r["takeover:A1"] == {
        "scenario": "takeover",
        "events": 5,
        "warned": True,
        "delay_seconds": 120.0,
        "delay_events": 3,
        "categories": ["anomaly", "velocity"],
        "detectors": ["model", "rule"],
        "paged": False,
    }
    assert r["spike:A2"]["warned"] is False and r["spike:A2"]["delay_events"] is None


def test_an_episode_is_paged_when_a_warning_naming_it_reaches_the_page_level_in_any_version() -> None:
    def level(w: dict[str, Any], lv: str) -> dict[str, Any]:
        return {**w, "level": lv}

    # The takeover's first warning is medium (console); its later version is high and names a later event.
    first = level(warning("w1", "2026-11-01T02:00:00Z", ["t0"]), "medium")
    raised = level(warning("w1", "2026-11-01T02:03:00Z", ["t3"]), "high")
    # A high warning on normal traffic: a false page.
    noise = level(warning("w9", "2026-11-01T03:00:00Z", ["n1"], detector="rule:amount_spike"), "high")
    labelled = [*TAKEOVER, {"event_id": "n1", "ts": "2026-11-01T11:00:00+08:00", "label": 0, "account_id": "A7"}]
    ws = [first, raised, noise]
    eps = episodes(labelled, ws, page_min_level="high")
    assert eps["instances"]["takeover:A1"]["paged"] is True
    assert eps["per_scenario"]["takeover"]["paged"] == 1
    assert episodes(labelled, [first], page_min_level="high")["overall"]["paged"] == 0, "medium only: the console"
    assert episodes(labelled, ws, page_min_level="critical")["overall"]["paged"] == 0
    assert episodes(labelled, ws)["overall"]["paged"] == 0, "no page level: nothing pages"
    load = warning_load(labelled, ws, normal_transactions=1000, account_days=100, page_min_level="high")
    assert (load["paged"]["warnings"], load["paged"]["false_warnings"]) == (2, 1)
    assert load["paged"]["false_per_1000_account_days"] == 10.0
    by = load["paged"]["by_source"]
    assert list(by) == ["amount_spike", "model"], "the source of most false pages first"
    assert by["amount_spike"] == {"warnings": 1, "false_warnings": 1} and by["model"]["false_warnings"] == 0
    assert load["all"]["warnings"] == 2 and load["page_min_level"] == "high"
    assert warning_load(labelled, ws, normal_transactions=1000, page_min_level="medium")["paged"]["warnings"] == 2


def test_per_scenario_recall_median_and_p90() -> None:
    evs = [event(f"e{i}{j}", f"2026-11-01T00:{j:02d}:00Z", "spike", account_id=f"A{i}") for i in range(5)
           for j in range(6)]
    # Account Ai is warned at its (i+1)-th event, i minutes after its first; A4 is never warned.
    ws = [warning(f"w{i}", f"2026-11-01T00:{i:02d}:00Z", [f"e{i}{i}"]) for i in range(4)]
    row = episodes(evs, ws)["per_scenario"]["spike"]
    assert (row["episodes"], row["warned"], row["recall"]) == (5, 4, 0.8)
    # Delays 1, 2, 3, 4 events: median 2.5, p90 by linear interpolation 3.7.
    assert row["median_delay_events"] == 2.5 and row["p90_delay_events"] == pytest.approx(3.7)
    assert row["median_delay_seconds"] == 90.0 and row["p90_delay_seconds"] == pytest.approx(162.0)
    assert row["caught_by_detector"] == {"model": 4} and row["caught_by_category"] == {"anomaly": 4}


def test_episode_keys_and_redelivered_events() -> None:
    evs = [*EVENTS, EVENTS[1]]  # t1 read twice: the same event, counted once
    ws = [warning("w", "2026-11-01T04:30:00Z", ["r2"], detector="aggregates.liquidity")]
    r = episodes(evs, ws)
    assert set(r["instances"]) == {"takeover:A1", "spike:A2", "market_crash:INS01", "liquidity_run:platform#1"}
    assert r["instances"]["takeover:A1"]["events"] == 2
    run = r["instances"]["liquidity_run:platform#1"]
    assert run["events"] == 2 and run["delay_events"] == 2 and run["detectors"] == ["platform"]
    assert r["overall"]["episodes"] == 4 and r["overall"]["warned"] == 1
    assert episodes([], ws)["overall"]["recall"] is None


def test_episodes_take_alert_objects() -> None:
    a = Alert(alert_id="x", created_at=datetime(2030, 1, 1, tzinfo=UTC),
              event_ts=datetime(2026, 11, 1, 3, 2, tzinfo=UTC), entity_type="instrument",
              entity_id="INS01", category="market_crash", level="high", score=0.9, reasons=[], event_ids=["m1"],
              detector="market.drawdown")
    r = episodes(EVENTS, [a])["instances"]["market_crash:INS01"]
    assert r["delay_seconds"] == 120.0 and r["delay_events"] == 1 and r["detectors"] == ["platform"]


def test_precision_uses_the_final_version_and_every_version_s_events() -> None:
    ws = [
        warning("a", "2026-11-01T02:00:00Z", ["t0"], detector="rule:velocity", category="velocity"),
        # The same warning grew past its id cap: t0 dropped off, yet it did name a risky event.
        warning("a", "2026-11-01T02:30:00Z", ["n1", "n2"], detector="rule:velocity", category="velocity"),
        warning("b", "2026-11-01T03:00:00Z", ["n3"]),
        warning("c", "2026-11-01T03:00:00Z", ["t1", "n4"]),
        warning("d", "2026-11-01T03:00:00Z", ["n5"], detector="market.drawdown", category="market_crash"),
    ]
    p = warning_precision(TAKEOVER, ws)
    assert p["overall"] == {"warnings": 4, "true": 2, "precision": 0.5}
    assert p["by_detector"] == {
        "model": {"warnings": 2, "true": 1, "precision": 0.5},
        "platform": {"warnings": 1, "true": 0, "precision": 0.0},
        "rule": {"warnings": 1, "true": 1, "precision": 1.0},
    }
    assert p["by_category"]["velocity"]["true"] == 1 and p["by_category"]["anomaly"]["warnings"] == 2
    assert p["by_rule"] == {"velocity": {"warnings": 1, "true": 1, "precision": 1.0}}, "the model is no rule"
    assert warning_precision(TAKEOVER, [])["overall"]["precision"] is None


def test_active_accounts_are_counted_per_utc_day() -> None:
    t = [datetime.fromisoformat(x).timestamp() for x in (
        "2026-11-01T07:00:00+08:00",  # 23:00 UTC on 31 October
        "2026-11-01T09:00:00+08:00",  # 01:00 UTC on 1 November
        "2026-11-01T10:00:00+08:00",
        "2026-11-01T10:00:00+08:00",
        "2026-11-02T09:00:00+08:00",
    )]
    # A on 31 Oct, A and B on 1 Nov (A twice), B on 2 Nov: 1 + 2 + 1 account-days over three days.
    assert active_account_days(t, ["A", "A", "B", "A", "B"]) == {"account_days": 4, "days": 3}
    assert active_account_days([], []) == {"account_days": 0, "days": 0}


def test_load_counts_false_warnings_over_normal_traffic_and_account_days() -> None:
    ws = [
        warning("m1", "2026-11-01T02:00:00Z", ["t0"]),
        warning("m2", "2026-11-01T03:00:00Z", ["n1", "n2"]),
        warning("m2", "2026-11-01T03:01:00Z", ["n1", "n2", "n3"]),  # a second version: still one warning
        warning("r1", "2026-11-01T03:00:00Z", ["n3"], detector="rule:large_transaction"),
        warning("r2", "2026-11-01T03:00:00Z", ["n4"], detector="rule:large_transaction"),
    ]
    load = warning_load(TAKEOVER, ws, normal_transactions=2000, account_days=400)
    assert load["all"] == {
        "warnings": 4,
        "false_warnings": 3,
        "per_1000_normal": 2.0,
        "false_per_1000_normal": 1.5,
        "per_1000_account_days": 10.0,
        "false_per_1000_account_days": 7.5,
    }
    assert load["model"]["warnings"] == 2 and load["model"]["false_per_1000_normal"] == 0.5
    assert load["model_normal_named_share"] == 3 / 2000  # n1, n2, n3; t0 is risky
    empty = warning_load(TAKEOVER, ws, normal_transactions=0)
    assert empty["all"]["per_1000_normal"] is None and empty["all"]["per_1000_account_days"] is None


# ---- recall against the warning budget ---------------------------------------------------------------------


def test_budget_threshold_keeps_ties_together() -> None:
    s = np.sort(np.array([0.1, 0.2, 0.3, 0.3, 0.3, 0.6, 0.7, 0.8, 0.9, 0.95]))
    assert budget_threshold(s, 100.0) == 0.95  # one of ten
    assert budget_threshold(s, 500.0) == 0.6  # five of ten
    assert budget_threshold(s, 600.0) == 0.6  # the sixth is a tie of three: none of them
    assert budget_threshold(s, 800.0) == 0.3  # eight of ten take the whole tie
    assert budget_threshold(s, 50.0) > 0.95  # not even one
    assert budget_threshold(s, 5000.0) == 0.1


def test_budget_curve_on_a_hand_example() -> None:
    normal = [i / 1000 for i in range(1000)]  # 0.000 .. 0.999: budget B lets through the top B
    risky = [0.9995, 0.5, 0.9975, 0.997, 0.9985]
    c = budget_curve(normal, risky, ["a", "a", "b", "c", "d"], ["x", "x", "x", "y", "y"],
                     budgets=[1.0, 2.0, 4.0], warned={"a", "c", "zz"}, warned_rate=0.3)
    assert c is not None
    assert c["thresholds"] == [0.999, 0.998, 0.996]
    assert c["normal_per_1000"] == [1.0, 2.0, 4.0]
    # a (0.9995) counts at every budget, d (0.9985) from 2, b and c (0.9975, 0.997) from 4.
    assert c["recall"] == {"overall": [0.25, 0.5, 1.0], "per_scenario": {"x": [0.5, 0.5, 1.0], "y": [0.0, 0.5, 1.0]}}
    assert c["episodes"] == {"overall": 4, "x": 2, "y": 2}
    assert c["operating_point"] == {"false_per_1000_normal": 0.3, "recall": 0.5}
    assert budget_curve([], risky, list("abcde"), list("xxxyy")) is None


@settings(max_examples=40, deadline=None)
@given(
    st.lists(st.floats(0, 1), min_size=1, max_size=300),
    st.lists(st.tuples(st.floats(0, 1), st.integers(0, 6), st.sampled_from("xyz")), min_size=1, max_size=60),
)
def test_budget_curve_is_monotone_and_keeps_to_its_budget(
    normal: list[float], risky: list[tuple[float, int, str]]
) -> None:
    c = budget_curve(normal, [r[0] for r in risky], [f"{r[2]}{r[1]}" for r in risky], [r[2] for r in risky],
                     budgets=[0.5, 10.0, 100.0, 400.0, 2000.0])
    assert c is not None
    assert all(a >= b for a, b in itertools.pairwise(c["thresholds"]))
    for ys in [c["recall"]["overall"], *c["recall"]["per_scenario"].values()]:
        assert all(a <= b for a, b in itertools.pairwise(ys))
    s = np.asarray(normal)
    for b, t, rate in zip(c["budgets_per_1000"], c["thresholds"], c["normal_per_1000"], strict=True):
        assert rate == pytest.approx(1000 * (s >= t).mean()) and rate <= b + 1e-9
        lower = s[s < t]  # the next lower score would break the budget: the threshold is the lowest allowed
        if lower.size:
            assert 1000 * (s >= lower.max()).mean() > b
