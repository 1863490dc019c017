"""Offline evaluation of risk scores against labels: ranking quality, alert rates, curves, detection delays.

Event-level metrics (AUC, AP) say how scores rank single events; the episode metrics say what an
analyst sees: which risky runs (episodes) got a warning, how late, how many warnings were noise,
and what recall a given warning budget would buy. docs/episode-metrics.md defines each number.
"""

from __future__ import annotations

import math
import statistics
from collections import Counter
from collections.abc import Collection, Iterable, Iterator, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from scipy.stats import rankdata

from models.plans import level_at_least

MAX_CURVE_POINTS = 200
# Warnings per 1,000 normal transactions: from one in 4,000 (a small team) to one in 62 (a noisy rule set).
BUDGETS_PER_1000 = (0.25, 0.5, 1.0, 2.0, 4.0, 8.0, 16.0)


@dataclass(frozen=True, slots=True)
class EvalResult:
    """How well scores separate labelled events; None where the data cannot say (e.g. no positives)."""

    roc_auc: float | None
    average_precision: float | None
    recall_at_threshold: float | None  # share of positives with score >= threshold
    precision_at_threshold: float | None  # share of events with score >= threshold that are positive
    alert_rate_normal: float | None  # share of negatives with score >= threshold: the false-alarm load
    n: int
    n_positive: int


def _arrays(labels: Sequence[int], scores: Sequence[float]) -> tuple[npt.NDArray[np.int_], npt.NDArray[np.float64]]:
    try:
        y = np.asarray(labels, dtype=np.int_)
        s = np.asarray(scores, dtype=np.float64)
    except (TypeError, ValueError) as exc:
        # The contract allows label None (unknown): such events cannot be scored against a label.
        raise ValueError(f"labels must be 0/1 and scores numbers; drop unlabelled events first ({exc})") from None
    if y.shape != s.shape or y.ndim != 1:
        raise ValueError(f"labels and scores must be flat and equally long, got {len(labels)} and {len(scores)}")
    if not np.isin(y, (0, 1)).all():
        raise ValueError(f"labels must be 0 or 1, got {sorted(set(y.tolist()) - {0, 1})[:5]}")
    if not np.isfinite(s).all():
        raise ValueError(f"scores must be finite numbers; {int((~np.isfinite(s)).sum())} are NaN or infinite")
    return y, s


def roc_auc(y: npt.NDArray[np.int_], s: npt.NDArray[np.float64]) -> float:
    """ROC AUC as the Mann-Whitney statistic (ties count half): sklearn's roc_auc_score without sklearn.

    Computed here so that replay's report.json needs no analysis extra; tests hold it to sklearn's.

    >>> roc_auc(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]))
    0.75
    """
    n_pos = int(y.sum())
    n_neg = y.size - n_pos
    ranks = rankdata(s)  # average ranks: a tie between a positive and a negative counts one half
    return float((ranks[y == 1].sum() - n_pos * (n_pos + 1) / 2) / (n_pos * n_neg))


def average_precision(y: npt.NDArray[np.int_], s: npt.NDArray[np.float64]) -> float:
    """Average precision, sum of (R_k - R_k-1) * P_k over distinct score thresholds: sklearn's, without sklearn.

    >>> average_precision(np.array([0, 0, 1, 1]), np.array([0.1, 0.6, 0.4, 0.9]))
    0.8333333333333333
    """
    order = np.argsort(-s, kind="mergesort")
    s_desc, y_desc = s[order], y[order]
    # One point per distinct score: the last index of each run of equal scores, as sklearn does.
    last = np.r_[np.flatnonzero(np.diff(s_desc)), y.size - 1]
    tp = np.cumsum(y_desc)[last]
    precision = tp / (last + 1)
    recall = tp / tp[-1]
    return float(np.sum(np.diff(np.r_[0.0, recall]) * precision))


def evaluate_scores(labels: Sequence[int], scores: Sequence[float], threshold: float) -> EvalResult:
    """Ranking metrics (ROC AUC, average precision) and the alert picture at one score threshold.

    >>> r = evaluate_scores([0, 0, 1, 1], [0.1, 0.6, 0.4, 0.9], threshold=0.5)
    >>> r.roc_auc, r.recall_at_threshold, r.precision_at_threshold, r.alert_rate_normal
    (0.75, 0.5, 0.5, 0.5)
    """
    y, s = _arrays(labels, scores)
    n_pos = int(y.sum())
    n_neg = int(y.size - n_pos)
    alerted = s >= threshold
    n_alerted = int(alerted.sum())
    both = n_pos > 0 and n_neg > 0  # ranking metrics need both classes to compare
    return EvalResult(
        roc_auc=roc_auc(y, s) if both else None,
        # With no negatives every ranking is perfect; AP is still defined, unlike ROC AUC.
        average_precision=average_precision(y, s) if n_pos > 0 else None,
        recall_at_threshold=int((alerted & (y == 1)).sum()) / n_pos if n_pos else None,
        precision_at_threshold=int((alerted & (y == 1)).sum()) / n_alerted if n_alerted else None,
        alert_rate_normal=int((alerted & (y == 0)).sum()) / n_neg if n_neg else None,
        n=int(y.size),
        n_positive=n_pos,
    )


def _thin(xs: npt.NDArray[np.float64], ys: npt.NDArray[np.float64], limit: int) -> npt.NDArray[np.intp]:
    """Indices of at most `limit` points spread evenly along the curve's length, ends included."""
    if xs.size <= limit:
        return np.arange(xs.size)
    # Even spacing along the path keeps the bends; even spacing by index would crowd the flat runs.
    path = np.concatenate([[0.0], np.cumsum(np.hypot(np.diff(xs), np.diff(ys)))])
    idx = np.searchsorted(path, np.linspace(0.0, path[-1], limit))
    idx = np.unique(np.clip(idx, 0, xs.size - 1))
    return np.unique(np.concatenate([[0], idx, [xs.size - 1]]))


def _finite(values: Iterable[float]) -> list[float | None]:
    # roc_curve's first threshold is +inf, which JSON cannot carry.
    return [float(v) if math.isfinite(v) else None for v in values]


def curves(labels: Sequence[int], scores: Sequence[float], *, max_points: int = MAX_CURVE_POINTS) -> dict[str, Any]:
    """ROC and precision-recall curves, each thinned to at most max_points points, as JSON-ready lists.

    Returns {"roc": {"fpr", "tpr", "thresholds"} | None, "pr": {"precision", "recall", "thresholds"} | None,
    "n", "n_positive"}; a curve is None when the labels lack the class it needs. The PR curve's last
    point (recall 0, precision 1) has no threshold: its threshold is None.
    """
    if max_points < 2:
        raise ValueError(f"max_points must be at least 2, got {max_points}")
    # Only report.html draws these: scikit-learn is in the `report` extra, which the worker image leaves out.
    from sklearn.metrics import precision_recall_curve, roc_curve

    y, s = _arrays(labels, scores)
    n_pos = int(y.sum())
    out: dict[str, Any] = {"roc": None, "pr": None, "n": int(y.size), "n_positive": n_pos}
    if 0 < n_pos < y.size:
        fpr, tpr, thr = roc_curve(y, s)
        k = _thin(fpr, tpr, max_points)
        out["roc"] = {"fpr": fpr[k].tolist(), "tpr": tpr[k].tolist(), "thresholds": _finite(thr[k])}
    if n_pos > 0:
        precision, recall, thr = precision_recall_curve(y, s)
        thr = np.append(thr, np.inf)
        k = _thin(recall, precision, max_points)
        out["pr"] = {"precision": precision[k].tolist(), "recall": recall[k].tolist(), "thresholds": _finite(thr[k])}
    return out


def _get(obj: Any, name: str) -> Any:
    return obj.get(name) if isinstance(obj, Mapping) else getattr(obj, name, None)


def _seconds(ts: Any) -> float:
    when = ts if isinstance(ts, datetime) else datetime.fromisoformat(str(ts))
    if when.tzinfo is None:
        raise ValueError(f"timestamp {ts!r} has no UTC offset; riskwatch only compares aware times")
    return when.timestamp()


def instance_key(event: Mapping[str, Any]) -> str:
    """Which scenario instance a labelled event belongs to.

    The generator's explicit `scenario_instance` wins; otherwise `scenario:entity`, the entity
    being the account, else the instrument, else the whole platform.
    """
    explicit = event.get("scenario_instance")
    if explicit:
        return str(explicit)
    entity = event.get("account_id") or event.get("instrument") or "platform"
    return f"{event.get('scenario') or 'unknown'}:{entity}"


def detection_delays(events_with_labels_and_scenario: Iterable[Mapping[str, Any]],
                     alerts: Iterable[Any]) -> dict[str, float | None]:
    """Seconds from each scenario instance's first labelled event to the first alert naming any of its events.

    Alerts are mappings or `models.schemas.Alert` objects; "first" and the delay use the alert's
    `event_ts` (event time, so replays at any speed agree), falling back to `created_at`. An
    instance no alert names maps to None. Keys come from `instance_key`.

    >>> events = [{"event_id": "a", "ts": "2026-11-01T10:00:00+08:00", "label": 1, "scenario": "spike",
    ...            "account_id": "A1"},
    ...           {"event_id": "b", "ts": "2026-11-01T10:00:30+08:00", "label": 1, "scenario": "spike",
    ...            "account_id": "A1"}]
    >>> detection_delays(events, [{"event_ids": ["b"], "event_ts": "2026-11-01T02:00:30+00:00"}])
    {'spike:A1': 30.0}
    """
    first_ts: dict[str, float] = {}
    owner: dict[str, str] = {}
    for ev in events_with_labels_and_scenario:
        if ev.get("label") != 1:
            continue
        key = instance_key(ev)
        t = _seconds(ev["ts"])
        first_ts[key] = min(first_ts.get(key, t), t)
        owner[str(ev["event_id"])] = key
    detected: dict[str, float] = {}
    for alert in alerts:
        stamp = _get(alert, "event_ts") or _get(alert, "created_at")
        if stamp is None:
            raise ValueError(f"alert {_get(alert, 'alert_id')!r} has neither event_ts nor created_at")
        t = _seconds(stamp)
        for key in {owner[e] for e in _get(alert, "event_ids") or () if e in owner}:
            detected[key] = min(detected.get(key, t), t)
    return {key: (detected[key] - t0 if key in detected else None) for key, t0 in sorted(first_ts.items())}


def median_detection_delay(delays: Mapping[str, float | None], scenario: str | None = None) -> float | None:
    """Median delay in seconds over detected instances (of one scenario if given); None if none was detected.

    >>> median_detection_delay({"spike:A1": 30.0, "spike:A2": None, "takeover:A3": 90.0, "takeover:A4": 10.0})
    30.0
    >>> median_detection_delay({"spike:A1": 30.0, "spike:A2": None, "takeover:A3": 90.0}, scenario="takeover")
    90.0
    """
    found = [d for key, d in delays.items()
             if d is not None and (scenario is None or key.split(":", 1)[0] == scenario)]
    return float(statistics.median(found)) if found else None


def detector_kind(detector: str) -> str:
    """'model' for the anomaly model, 'rule' for catalogue rules, 'platform' for market and aggregate monitors.

    >>> [detector_kind(d) for d in ("surprise", "rule:velocity", "market.drawdown", "aggregates.liquidity")]
    ['model', 'rule', 'platform', 'platform']
    """
    if detector == "surprise":
        return "model"
    return "rule" if detector.startswith("rule:") else "platform"


@dataclass(frozen=True, slots=True)
class _Version:
    alert_id: str
    t: float  # event time of this version, epoch seconds
    category: str
    kind: str
    event_ids: Sequence[str]
    detector: str = ""
    level: str = ""


def _versions(warnings: Iterable[Any]) -> Iterator[_Version]:
    for a in warnings:
        stamp = _get(a, "event_ts") or _get(a, "created_at")
        if stamp is None:
            raise ValueError(f"alert {_get(a, 'alert_id')!r} has neither event_ts nor created_at")
        detector = str(_get(a, "detector") or "")
        yield _Version(str(_get(a, "alert_id")), _seconds(stamp), str(_get(a, "category")),
                       detector_kind(detector), _get(a, "event_ids") or (), detector, str(_get(a, "level") or ""))


def paged_alerts(warnings: Iterable[Any], min_level: str | None) -> set[str]:
    """Alert ids that reached `min_level` or above in any version: what Alertmanager would have been sent.

    The pager sends a warning once any of its versions is at the page level (a medium warning raised to
    high pages then); None or an unknown level pages nothing.

    >>> ws = [{"alert_id": "1", "event_ts": "2026-11-01T00:00:00Z", "level": "medium"},
    ...       {"alert_id": "1", "event_ts": "2026-11-01T00:05:00Z", "level": "high"},
    ...       {"alert_id": "2", "event_ts": "2026-11-01T00:00:00Z", "level": "medium"}]
    >>> sorted(paged_alerts(ws, "high")), sorted(paged_alerts(ws, "medium")), paged_alerts(ws, None)
    (['1'], ['1', '2'], set())
    """
    if min_level is None:
        return set()
    return {v.alert_id for v in _versions(warnings) if level_at_least(v.level, min_level)}


def _risky(labelled: Iterable[Mapping[str, Any]]) -> list[Mapping[str, Any]]:
    """Label-1 events, each event_id once (a redelivered copy is the same event)."""
    seen: set[str] = set()
    out = []
    for ev in labelled:
        eid = str(ev["event_id"])
        if ev.get("label", 1) == 1 and eid not in seen:
            seen.add(eid)
            out.append(ev)
    return out


def _spread(values: Sequence[float]) -> tuple[float | None, float | None]:
    """(median, 90th percentile, linear interpolation) or (None, None) for no values."""
    if not values:
        return None, None
    med, p90 = np.percentile(np.asarray(values, dtype=np.float64), [50, 90])
    return float(med), float(p90)


def _summary(rows: Sequence[Mapping[str, Any]]) -> dict[str, Any]:
    warned = [r for r in rows if r["warned"]]
    med_e, p90_e = _spread([r["delay_events"] for r in warned])
    med_s, p90_s = _spread([r["delay_seconds"] for r in warned])
    return {
        "episodes": len(rows),
        "warned": len(warned),
        "recall": len(warned) / len(rows) if rows else None,
        "paged": sum(1 for r in warned if r["paged"]),
        "median_delay_events": med_e,
        "p90_delay_events": p90_e,
        "median_delay_seconds": med_s,
        "p90_delay_seconds": p90_s,
        "caught_by_category": dict(sorted(Counter(c for r in warned for c in r["categories"]).items())),
        "caught_by_detector": dict(sorted(Counter(k for r in warned for k in r["detectors"]).items())),
    }


def episodes(labelled: Iterable[Mapping[str, Any]], warnings: Iterable[Any], *,
             page_min_level: str | None = None) -> dict[str, Any]:
    """Which episodes (scenario instances, `instance_key`) were warned, how late, and by what.

    `warnings` are every published version (mappings or `Alert`s): a version counts from its own
    `event_ts`. An episode's delay runs from its first risky event to the first version naming
    any of its events, in seconds and in risky events: how many of its events had happened by
    then (1 = warned at its first). With `page_min_level`, an episode is also `paged` when a warning
    naming any of its events reached that level (`paged_alerts`): on-call was called for it, not only
    the console. Returns {"overall", "per_scenario", "instances"}.

    >>> ev = lambda i: {"event_id": f"e{i}", "ts": f"2026-11-01T00:0{i}:00+00:00", "label": 1,
    ...                 "scenario": "takeover", "account_id": "A1"}
    >>> w = {"alert_id": "w1", "event_ts": "2026-11-01T00:02:00+00:00", "category": "velocity",
    ...      "detector": "rule:velocity", "event_ids": ["e1", "e2"]}
    >>> r = episodes([ev(1), ev(2), ev(3)], [w])
    >>> r["instances"]["takeover:A1"]["delay_events"], r["instances"]["takeover:A1"]["delay_seconds"]
    (2, 60.0)
    >>> r["overall"]["warned"], r["overall"]["caught_by_detector"], r["overall"]["paged"]
    (1, {'rule': 1}, 0)
    >>> episodes([ev(1)], [{**w, "level": "high"}], page_min_level="high")["overall"]["paged"]
    1
    """
    times: dict[str, list[float]] = {}
    scenario: dict[str, str] = {}
    owner: dict[str, str] = {}
    for ev in _risky(labelled):
        key = instance_key(ev)
        times.setdefault(key, []).append(_seconds(ev["ts"]))
        scenario.setdefault(key, str(ev.get("scenario") or "unknown"))
        owner[str(ev["event_id"])] = key
    first: dict[str, float] = {}
    caught: dict[str, tuple[set[str], set[str]]] = {}
    named: dict[str, set[str]] = {}  # alert_id -> episodes any of its versions named
    warnings = list(warnings)
    for v in _versions(warnings):
        for key in {owner[e] for e in v.event_ids if e in owner}:
            first[key] = min(first.get(key, v.t), v.t)
            cats, kinds = caught.setdefault(key, (set(), set()))
            cats.add(v.category)
            kinds.add(v.kind)
            named.setdefault(v.alert_id, set()).add(key)
    paged = {key for a in paged_alerts(warnings, page_min_level) for key in named.get(a, ())}
    rows: dict[str, dict[str, Any]] = {}
    for key, ts in sorted(times.items()):
        t = np.sort(np.asarray(ts))
        w = first.get(key)
        cats, kinds = caught.get(key, (set(), set()))
        rows[key] = {
            "scenario": scenario[key],
            "events": int(t.size),
            "warned": w is not None,
            "delay_seconds": None if w is None else w - float(t[0]),
            # At least 1: a platform monitor may stamp a warning with the start of its time bucket.
            "delay_events": None if w is None else max(1, int(np.searchsorted(t, w, side="right"))),
            "categories": sorted(cats),
            "detectors": sorted(kinds),
            "paged": key in paged,
        }
    per: dict[str, list[dict[str, Any]]] = {}
    for r in rows.values():
        per.setdefault(r["scenario"], []).append(r)
    return {
        "overall": _summary(list(rows.values())),
        "per_scenario": {s: _summary(rs) for s, rs in sorted(per.items())},
        "instances": rows,
    }


def _judge(labelled: Iterable[Mapping[str, Any]],
           warnings: Iterable[Any]) -> tuple[dict[str, _Version], set[str], set[str], set[str]]:
    """(final version per alert_id, ids of true warnings, risky event ids, event ids named by the model)."""
    risky = {str(ev["event_id"]) for ev in _risky(labelled)}
    final: dict[str, _Version] = {}
    true: set[str] = set()
    model_named: set[str] = set()
    for v in _versions(warnings):
        final[v.alert_id] = v
        # Any version, not just the last: a long warning keeps only its newest 50 event ids.
        if v.alert_id not in true and not risky.isdisjoint(v.event_ids):
            true.add(v.alert_id)
        if v.kind == "model":
            model_named.update(v.event_ids)
    return final, true, risky, model_named


def _share(true: int, n: int) -> dict[str, Any]:
    return {"warnings": n, "true": true, "precision": true / n if n else None}


def warning_precision(labelled: Iterable[Mapping[str, Any]], warnings: Iterable[Any]) -> dict[str, Any]:
    """Share of warnings (final version per alert_id) naming at least one risky event: overall, by category,
    by detector kind, and by rule (a backtest's question: which rule earns its warnings).

    >>> lab = [{"event_id": "r", "ts": "2026-11-01T00:00:00Z", "label": 1}]
    >>> ws = [{"alert_id": i, "event_ts": "2026-11-01T00:00:00Z", "category": "velocity", "detector": d,
    ...        "event_ids": ids} for i, d, ids in (("1", "surprise", ["r"]), ("2", "surprise", ["n"]),
    ...                                             ("3", "rule:velocity", ["n", "r"]))]
    >>> p = warning_precision(lab, ws)
    >>> p["overall"], p["by_detector"]["model"]["precision"]
    ({'warnings': 3, 'true': 2, 'precision': 0.6666666666666666}, 0.5)
    >>> p["by_rule"]
    {'velocity': {'warnings': 1, 'true': 1, 'precision': 1.0}}
    """
    final, true, _, _ = _judge(labelled, warnings)
    out: dict[str, Any] = {"overall": _share(len(true), len(final))}
    for name, attr in (("by_category", "category"), ("by_detector", "kind")):
        n: Counter[str] = Counter(getattr(v, attr) for v in final.values())
        t: Counter[str] = Counter(getattr(final[a], attr) for a in true)
        out[name] = {g: _share(t[g], n[g]) for g in sorted(n)}
    # A warning is its rule's when the rule opened it (its `detector`); category warnings several rules
    # feed are counted once, under that one.
    rules: Counter[str] = Counter(_source(v) for v in final.values() if v.kind == "rule")
    hits: Counter[str] = Counter(_source(final[a]) for a in true if final[a].kind == "rule")
    out["by_rule"] = {r: _share(hits[r], rules[r]) for r in sorted(rules)}
    return out


def active_account_days(times: Sequence[float], accounts: Sequence[str]) -> dict[str, int]:
    """Distinct accounts with a transaction on each UTC day, summed over the days; and the number of days.

    >>> day = 86400.0
    >>> active_account_days([0.0, 10.0, 20.0, day + 5, day + 6], ["A", "A", "B", "A", "A"])
    {'account_days': 3, 'days': 2}
    """
    days = (np.asarray(times, dtype=np.float64) // 86400.0).astype(np.int64)
    pairs = set(zip(days.tolist(), accounts, strict=True))
    return {"account_days": len(pairs), "days": len({d for d, _ in pairs})}


def _per(n: int, base: int | None) -> float | None:
    return 1000.0 * n / base if base else None


def warning_load(labelled: Iterable[Mapping[str, Any]], warnings: Iterable[Any], *, normal_transactions: int,
                 account_days: int | None = None, page_min_level: str | None = None) -> dict[str, Any]:
    """Warnings per 1,000 normal transactions and per 1,000 active accounts per day: all, model-only, paged.

    `false_*` counts only warnings naming no risky event: the noise normal traffic costs. A rate over
    account-days is warnings per day per 1,000 accounts active that day, weighted by each day's traffic.
    `paged` (with `page_min_level`) counts the warnings that reached the page level: the load on-call
    is staffed for, where the others wait in the console; its `by_source` splits them by rule (its
    name), `model` and platform monitor, most false pages first. `model_normal_named_share` is the
    share of normal transactions named by any model warning.

    >>> lab = [{"event_id": "r", "ts": "2026-11-01T00:00:00Z", "label": 1}]
    >>> ws = [{"alert_id": i, "event_ts": "2026-11-01T00:00:00Z", "category": "c", "detector": d, "event_ids": ids}
    ...       for i, d, ids in (("1", "surprise", ["r"]), ("2", "surprise", ["n1", "n2"]), ("3", "rule:x", ["n3"]))]
    >>> load = warning_load(lab, ws + [{**ws[2], "level": "high"}], normal_transactions=4000, account_days=500,
    ...                     page_min_level="high")
    >>> load["all"]["false_per_1000_normal"], load["model"]["per_1000_account_days"], load["model_normal_named_share"]
    (0.5, 4.0, 0.0005)
    >>> load["paged"]["warnings"], load["paged"]["false_per_1000_account_days"], load["paged"]["by_source"]
    (1, 2.0, {'x': {'warnings': 1, 'false_warnings': 1}})
    """
    warnings = list(warnings)
    final, true, risky, model_named = _judge(labelled, warnings)
    paged = paged_alerts(warnings, page_min_level)
    out: dict[str, Any] = {"normal_transactions": normal_transactions, "account_days": account_days,
                           "page_min_level": page_min_level}
    for group, keep in (("all", lambda v: True), ("model", lambda v: v.kind == "model"),
                        ("paged", lambda v: v.alert_id in paged)):
        ids = [a for a, v in final.items() if keep(v)]
        n, false = len(ids), sum(a not in true for a in ids)
        out[group] = {
            "warnings": n,
            "false_warnings": false,
            "per_1000_normal": _per(n, normal_transactions),
            "false_per_1000_normal": _per(false, normal_transactions),
            "per_1000_account_days": _per(n, account_days),
            "false_per_1000_account_days": _per(false, account_days),
        }
    # Which rule or monitor pages, and how often for nothing: where a page budget is won or lost.
    pages: Counter[str] = Counter(_source(final[a]) for a in paged)
    false_pages: Counter[str] = Counter(_source(final[a]) for a in paged - true)
    out["paged"]["by_source"] = {
        src: {"warnings": n, "false_warnings": false_pages[src]}
        for src, n in sorted(pages.items(), key=lambda kv: (-false_pages[kv[0]], -kv[1], kv[0]))
    }
    named = len(model_named - risky)
    out["model_normal_named_share"] = named / normal_transactions if normal_transactions else None
    return out


def _source(v: _Version) -> str:
    """A warning's source as a person names it: the rule's name, `model`, or the platform monitor's id."""
    if v.kind == "rule":
        return v.detector.removeprefix("rule:")
    return "model" if v.kind == "model" else v.detector


def budget_threshold(sorted_normal: npt.NDArray[np.float64], per_1000: float) -> float:
    """The lowest score at which at most per_1000/1000 of the normal scores (sorted ascending) are at or above it.

    Ties stay together: when the cut falls inside a run of equal scores, the threshold moves above the run.

    >>> s = np.array([0.1, 0.2, 0.5, 0.5, 0.9])
    >>> [budget_threshold(s, b) for b in (200.0, 400.0, 600.0, 1000.0)]
    [0.9, 0.9, 0.5, 0.1]
    >>> budget_threshold(s, 100.0) > 0.9
    True
    """
    n = sorted_normal.size
    k = min(n, math.floor(per_1000 * n / 1000.0 + 1e-9))
    above = float(np.nextafter(sorted_normal[-1], np.inf))
    i = n - k
    if i >= n:
        return above
    v = sorted_normal[i]
    if i > 0 and sorted_normal[i - 1] == v:
        j = int(np.searchsorted(sorted_normal, v, side="right"))
        return float(sorted_normal[j]) if j < n else above
    return float(v)


def budget_curve(normal_scores: Sequence[float] | npt.NDArray[np.float64],
                 risky_scores: Sequence[float] | npt.NDArray[np.float64],
                 risky_episodes: Sequence[str], risky_scenarios: Sequence[str], *,
                 budgets: Sequence[float] = BUDGETS_PER_1000,
                 warned: Collection[str] | None = None, warned_rate: float | None = None) -> dict[str, Any] | None:
    """Episode recall at several warning budgets, from event scores alone (None without normal scores).

    For each budget B (warnings per 1,000 normal transactions) the threshold is `budget_threshold`;
    an episode counts as found when any of its events scores at or above it. Warnings that never
    raise an event's score (windowed rules, platform monitors) are not in this curve. `warned` (the
    episodes model warnings named) and `warned_rate` (their false warnings per 1,000 normal) give
    the operating point actually reached.

    >>> c = budget_curve([0.1, 0.2, 0.3, 0.4], [0.35, 0.05, 0.5], ["a", "a", "b"], ["s", "s", "t"],
    ...                  budgets=[250.0, 500.0])
    >>> c["thresholds"], c["recall"]["overall"], c["recall"]["per_scenario"]
    ([0.4, 0.3], [0.5, 1.0], {'s': [0.0, 1.0], 't': [1.0, 1.0]})
    """
    s = np.sort(np.asarray(normal_scores, dtype=np.float64))
    if s.size == 0:
        return None
    thr = np.array([budget_threshold(s, b) for b in budgets])
    keys, inv = np.unique(np.asarray(risky_episodes, dtype=str), return_inverse=True)
    best = np.full(keys.size, -np.inf)
    np.maximum.at(best, inv, np.asarray(risky_scores, dtype=np.float64))
    scen = np.empty(keys.size, dtype=object)
    scen[inv] = list(risky_scenarios)
    found = best[None, :] >= thr[:, None]  # budgets x episodes
    per = {str(x): found[:, scen == x].mean(axis=1).tolist() for x in sorted(set(scen.tolist()))}
    op = None
    if warned is not None and keys.size:
        op = {"false_per_1000_normal": warned_rate, "recall": float(np.isin(keys, list(warned)).mean())}
    return {
        "budgets_per_1000": [float(b) for b in budgets],
        "thresholds": thr.tolist(),
        "normal_per_1000": (1000.0 * (s.size - np.searchsorted(s, thr, side="left")) / s.size).tolist(),
        "episodes": {"overall": int(keys.size), **{x: int((scen == x).sum()) for x in per}},
        "recall": {"overall": found.mean(axis=1).tolist() if keys.size else [None] * len(budgets),
                   "per_scenario": per},
        "operating_point": op,
    }


__all__ = [
    "BUDGETS_PER_1000",
    "MAX_CURVE_POINTS",
    "EvalResult",
    "active_account_days",
    "average_precision",
    "budget_curve",
    "budget_threshold",
    "curves",
    "detection_delays",
    "detector_kind",
    "episodes",
    "evaluate_scores",
    "instance_key",
    "median_detection_delay",
    "paged_alerts",
    "roc_auc",
    "warning_load",
    "warning_precision",
]
