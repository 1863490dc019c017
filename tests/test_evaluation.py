"""Tests for offline evaluation: metrics checked against hand computation, curves, detection delays."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import numpy as np
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from app.schemas import Alert
from models.evaluation import (
    EvalResult,
    curves,
    detection_delays,
    evaluate_scores,
    instance_key,
    median_detection_delay,
)

# Ranked by score: 0.8(+) 0.7(-) 0.4(+) 0.35(-) 0.3(-) 0.2(+) 0.1(-) 0.05(-)
LABELS = [0, 0, 0, 1, 0, 1, 1, 0]
SCORES = [0.1, 0.3, 0.35, 0.4, 0.7, 0.8, 0.2, 0.05]


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
