"""The replay report's numbers (report.json): counts, rates, label metrics, detection delays, comparison."""

from __future__ import annotations

import importlib.util
import json
from collections import Counter
from collections.abc import Sequence
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import numpy as np
import numpy.typing as npt

from app.replay import PLATFORM_SCENARIOS, Loaded, Outcome, Result
from models.evaluation import (
    active_account_days,
    budget_curve,
    detection_delays,
    episodes,
    evaluate_scores,
    instance_key,
    median_detection_delay,
    paged_alerts,
    warning_load,
    warning_precision,
)
from models.schemas import LEVELS, Alert, Transaction

EVALUATION_NOTE = (
    "Event-level metrics use each transaction's calibrated score against its label, at the model's default "
    "threshold. 'transactions' covers every labelled transaction; 'account_scenarios' leaves out the events of "
    "platform-level scenarios (" + ", ".join(sorted(PLATFORM_SCENARIOS)) + "), which are one incident across "
    "many accounts or instruments and are measured by detection delay per instance instead. Market ticks are "
    "not in the event-level metrics. A detection is the first published warning naming any event of the "
    "instance; the delay runs from the instance's first labelled event to that warning's event time."
)
PLOTS_HINT = "report.html has no figures: pip install 'riskwatch[report]' (matplotlib, scikit-learn) for them"
BUDGET_NOTE = (
    "Recall of account-level episodes if the model warned on every transaction scoring at or above the "
    "threshold that lets through the budget's share of normal transactions. An event's score is the model's, "
    "or its highest per-transaction rule finding's when higher; warnings from windowed rules and platform "
    "monitors that leave scores unchanged are not counted. The operating point is what the model's own "
    "warnings reached: their false warnings per 1,000 normal transactions against the share of these "
    "episodes they named."
)


def arrays(res: Result) -> dict[str, npt.NDArray[Any]]:
    """The replay's per-event columns (scores, labels, market and platform flags) as numpy arrays."""
    return {
        "scores": np.frombuffer(res.scores, dtype=np.float64) if res.scores else np.zeros(0),
        "labels": np.asarray(res.labels, dtype=np.int8),
        "market": np.asarray(res.market, dtype=bool),
        "platform": np.asarray(res.platform, dtype=bool),
    }


def traffic(loaded: Loaded) -> dict[str, int]:
    """Active accounts per UTC day, summed over days; read before `replay` consumes `loaded.events`."""
    pairs = [
        (t, ev.account_id) for ev, t in zip(loaded.events, loaded.times, strict=True) if isinstance(ev, Transaction)
    ]
    return active_account_days([t for t, _ in pairs], [acc for _, acc in pairs])


def _risky_scores(res: Result, a: dict[str, npt.NDArray[Any]]) -> tuple[list[dict[str, Any]], npt.NDArray[Any]] | None:
    """The label-1 events in replay order with their scores; None when they cannot be lined up one to one.

    The replay orders events by time, stably, and keeps label-1 events (in input order) beside; a copy
    the scorer recognised as a duplicate has no score, so repeated event ids are dropped when counts differ.
    """
    pos = np.flatnonzero(a["labels"] == 1)
    risky = sorted(res.loaded.labelled, key=lambda e: e["ts"].timestamp())
    if len(risky) != pos.size:
        first: dict[str, dict[str, Any]] = {}
        for e in risky:
            first.setdefault(e["event_id"], e)
        risky = list(first.values())
    return (risky, a["scores"][pos]) if len(risky) == pos.size else None


def _curve(res: Result, a: dict[str, npt.NDArray[Any]], eps: dict[str, Any], load: dict[str, Any]) -> Any:
    lined = _risky_scores(res, a)
    if lined is None:
        return None
    risky, scores = lined
    keep = [e["kind"] == "transaction" and e["scenario"] not in PLATFORM_SCENARIOS for e in risky]
    acct = [e for e, k in zip(risky, keep, strict=True) if k]
    curve = budget_curve(
        a["scores"][~a["market"] & (a["labels"] == 0)],
        scores[np.asarray(keep, dtype=bool)],
        [instance_key(e) for e in acct],
        [str(e["scenario"]) for e in acct],
        warned={k for k, r in eps["instances"].items() if "model" in r["detectors"]},
        warned_rate=load["model"]["false_per_1000_normal"],
    )
    if curve is not None:
        curve["configured_per_1000"] = round(1000.0 * (1.0 - res.threshold), 9)
        curve["note"] = BUDGET_NOTE
    return curve


def _metrics(labels: npt.NDArray[Any], scores: npt.NDArray[Any], threshold: float) -> dict[str, Any]:
    r = evaluate_scores(labels.tolist(), scores.tolist(), threshold)
    return {
        "roc_auc": r.roc_auc,
        "average_precision": r.average_precision,
        "recall_at_threshold": r.recall_at_threshold,
        "precision_at_threshold": r.precision_at_threshold,
        "alert_rate_normal": r.alert_rate_normal,
        "n": r.n,
        "n_positive": r.n_positive,
    }


def evaluation(
    res: Result,
    outcome: Outcome | None = None,
    *,
    traffic: dict[str, int] | None = None,
    page_min_level: str | None = "high",
) -> dict[str, Any] | None:
    """Label metrics (None without labelled transactions), detection delays and episode metrics.

    `traffic` (from `traffic(loaded)` before the replay) gives the active account-days the load per
    account is measured against; without it those rates are None. Warnings reaching `page_min_level`
    (RISKWATCH_PAGE_MIN_LEVEL) are counted as pages too: episodes paged and the paged load.
    """
    a = arrays(res)
    txn = ~a["market"] & (a["labels"] >= 0)
    if not txn.any() and not res.loaded.labelled:
        return None
    acct = txn & ~a["platform"]
    published = (outcome or res.outcomes[0]).published
    delays = detection_delays(res.loaded.labelled, published)
    per: dict[str, dict[str, Any]] = {}
    for key, d in delays.items():
        scen = key.split(":", 1)[0]
        row = per.setdefault(
            scen,
            {
                "level": "platform" if scen in PLATFORM_SCENARIOS else "account",
                "instances": 0,
                "detected": 0,
                "median_delay_seconds": None,
            },
        )
        row["instances"] += 1
        row["detected"] += d is not None
    for scen, row in per.items():
        row["median_delay_seconds"] = median_detection_delay(delays, scen)
    eps = episodes(res.loaded.labelled, published, page_min_level=page_min_level)
    for scen, row in eps["per_scenario"].items():
        row["level"] = "platform" if scen in PLATFORM_SCENARIOS else "account"
    load = warning_load(
        res.loaded.labelled,
        published,
        normal_transactions=int((~a["market"] & (a["labels"] == 0)).sum()),
        account_days=(traffic or {}).get("account_days"),
        page_min_level=page_min_level,
    )
    load["days"] = (traffic or {}).get("days")
    return {
        "threshold": res.threshold,
        "note": EVALUATION_NOTE,
        "transactions": _metrics(a["labels"][txn], a["scores"][txn], res.threshold),
        "account_scenarios": _metrics(a["labels"][acct], a["scores"][acct], res.threshold),
        "detection": {
            "median_delay_seconds": median_detection_delay(delays),
            "per_scenario": dict(sorted(per.items())),
            "instances": delays,
        },
        "episodes": eps,
        "warnings": warning_precision(res.loaded.labelled, published),
        "load": load,
        "budget_curve": _curve(res, a, eps, load),
    }


def _by_category(alerts: Sequence[Alert]) -> dict[str, dict[str, int]]:
    out: dict[str, dict[str, int]] = {}
    for a in alerts:
        row = out.setdefault(a.category, {lv: 0 for lv in LEVELS})
        row[a.level] += 1
    return dict(sorted(out.items()))


def comparison(a: Outcome, b: Outcome, page_min_level: str | None = "high") -> dict[str, Any]:
    """Champion/challenger: warnings only under A, only under B and under both, matched by alert_id; and how
    many of each side's warnings would have paged (`pages`), the cost a level change moves."""
    fa, fb = a.final(), b.final()
    groups = {
        "only_a": [fa[k] for k in fa if k not in fb],
        "only_b": [fb[k] for k in fb if k not in fa],
        "both": [fa[k] for k in fa if k in fb],
    }
    out: dict[str, Any] = {"a": a.config.source, "b": b.config.source}
    for name, alerts in groups.items():
        out[name] = {
            "total": len(alerts),
            "by_category": dict(sorted(Counter(x.category for x in alerts).items())),
            "alert_ids": sorted(x.alert_id for x in alerts),
        }
    out["both"]["level_differs"] = sum(1 for x in groups["both"] if fb[x.alert_id].level != x.level)
    out["pages"] = {
        "a": len(paged_alerts(a.published, page_min_level)),
        "b": len(paged_alerts(b.published, page_min_level)),
    }
    return out


def _iso(ts: float | None) -> str | None:
    return None if ts is None else datetime.fromtimestamp(ts, UTC).isoformat()


def build(
    res: Result,
    *,
    input_name: str,
    timings: dict[str, float] | None = None,
    traffic: dict[str, int] | None = None,
    page_min_level: str | None = "high",
) -> dict[str, Any]:
    """Everything report.json holds, for the first configuration (and the comparison when there are two).

    `page_min_level` is the lowest level the worker pages at (RISKWATCH_PAGE_MIN_LEVEL): the report
    counts the warnings that would have paged on-call beside all of them.
    """
    main = res.outcomes[0]
    final = list(main.final().values())
    pages = len(paged_alerts(main.published, page_min_level))
    by_level: Counter[str] = Counter(x.level for x in final)
    a = arrays(res)
    txn = ~a["market"]
    span_days = ((res.last_ts or 0.0) - (res.first_ts or 0.0)) / 86400.0
    report: dict[str, Any] = {
        "input": input_name,
        "rules": [
            {"name": o.config.name, "source": o.config.source, "version": o.config.catalogue.version}
            for o in res.outcomes
        ],
        "events": {
            "records": res.loaded.records,
            "valid": res.events + res.duplicates,
            "scored": res.events,
            "transactions": res.transactions,
            "market": res.events - res.transactions,
            "duplicates": res.duplicates,
            "invalid": res.loaded.invalid,
            "invalid_by_field": dict(sorted(res.loaded.invalid_reasons.items())),
            "first_ts": _iso(res.first_ts),
            "last_ts": _iso(res.last_ts),
        },
        "warnings": {
            "total": len(final),
            "versions_published": len(main.published),
            "by_level": {lv: by_level.get(lv, 0) for lv in LEVELS},
            "by_category": _by_category(final),
            "dropped_by_storm_cap": dict(sorted(main.dropped.items())),
        },
        "alert_rate": {
            "threshold": res.threshold,
            "warnings_per_1000_events": 1000.0 * len(final) / res.events if res.events else None,
            "warnings_per_day": len(final) / span_days if span_days > 0 else None,
            "page_min_level": page_min_level,
            "pages": pages,
            "pages_per_day": pages / span_days if span_days > 0 else None,
            "transactions_at_or_above_threshold": float((a["scores"][txn] >= res.threshold).mean())
            if txn.any()
            else None,
        },
        "throughput": _throughput(res, timings),
        "evaluation": evaluation(res, traffic=traffic, page_min_level=page_min_level),
        "comparison": comparison(res.outcomes[0], res.outcomes[1], page_min_level) if len(res.outcomes) > 1 else None,
        "alerts": [json.loads(x.model_dump_json()) for x in sorted(final, key=_rank)],
    }
    return report


def _throughput(res: Result, timings: dict[str, float] | None) -> dict[str, Any]:
    """Events per second of the whole replay and of scoring alone, and where the time went."""
    seconds, n = res.seconds, res.events + res.duplicates
    return {
        "events_per_second": n / seconds if seconds > 0 else None,
        "scoring_events_per_second": n / res.score_seconds if res.score_seconds > 0 else None,
        "read_seconds": res.loaded.seconds,
        "replay_seconds": res.loop_seconds,
        "score_seconds": res.score_seconds,
        **(timings or {}),
    }


def _rank(a: Alert) -> tuple[int, float, str]:
    return (-LEVELS.index(a.level), -a.score, a.alert_id)


def plots_available() -> bool:
    """Whether the `report` extra (matplotlib, scikit-learn) is installed, so report.html gets its figures."""
    return all(importlib.util.find_spec(name) is not None for name in ("matplotlib", "sklearn"))


def write(outdir: Path, res: Result, report: dict[str, Any]) -> tuple[Path, Path]:
    """Write report.json and report.html (with figures when `plots_available()`) into outdir; return both paths."""
    outdir.mkdir(parents=True, exist_ok=True)
    js, page = outdir / "report.json", outdir / "report.html"
    js.write_text(json.dumps(report, indent=1, ensure_ascii=False) + "\n", encoding="utf-8")
    from app.report_html import plots, render  # matplotlib costs a second to import: only when asked

    # Without the extra (the worker image) the page keeps every table and leaves the figures out.
    page.write_text(render(report, plots(res, report) if plots_available() else {}), encoding="utf-8")
    return js, page


__all__ = [
    "BUDGET_NOTE",
    "EVALUATION_NOTE",
    "PLOTS_HINT",
    "arrays",
    "build",
    "comparison",
    "evaluation",
    "plots_available",
    "traffic",
    "write",
]
