"""Offline evaluation of risk scores against labels: ranking quality, alert rates, curves, detection delays."""

from __future__ import annotations

import math
import statistics
from collections.abc import Iterable, Mapping, Sequence
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import numpy as np
import numpy.typing as npt
from sklearn.metrics import average_precision_score, precision_recall_curve, roc_auc_score, roc_curve

MAX_CURVE_POINTS = 200


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
        roc_auc=float(roc_auc_score(y, s)) if both else None,
        # With no negatives every ranking is perfect; AP is still defined, unlike ROC AUC.
        average_precision=float(average_precision_score(y, s)) if n_pos > 0 else None,
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

    Alerts are mappings or `app.schemas.Alert` objects; "first" and the delay use the alert's
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


__all__ = [
    "MAX_CURVE_POINTS",
    "EvalResult",
    "curves",
    "detection_delays",
    "evaluate_scores",
    "instance_key",
    "median_detection_delay",
]
