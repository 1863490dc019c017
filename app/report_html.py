"""The replay report as one self-contained page: matplotlib figures embedded as PNG data URIs, plain HTML."""

from __future__ import annotations

import base64
import html
import io
import math
from collections.abc import Sequence
from datetime import UTC, datetime
from typing import Any

import numpy as np

from app.replay import Result
from app.report import arrays
from models.evaluation import curves
from models.schemas import LEVELS, Alert

LEVEL_COLOURS = {"low": "#9ecae1", "medium": "#fdae6b", "high": "#e6550d", "critical": "#a50f15"}


def _png(fig: Any) -> str:
    buf = io.BytesIO()
    fig.savefig(buf, format="png", dpi=96, bbox_inches="tight")
    import matplotlib.pyplot as plt

    plt.close(fig)
    return "data:image/png;base64," + base64.b64encode(buf.getvalue()).decode()


def _bin_seconds(span: float) -> float:
    for step in (60, 300, 900, 3600, 6 * 3600, 86400, 7 * 86400):
        if span / step <= 120:
            return float(step)
    return 30 * 86400.0


def plots(res: Result, report: dict[str, Any]) -> dict[str, str]:
    """The report's figures as PNG data URIs, keyed by name; curves only when labels exist."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    out: dict[str, str] = {}
    a = arrays(res)
    out["timeline"] = _timeline_plot(plt, res)
    out["scores"] = _scores_plot(plt, res, a)
    out["categories"] = _categories_plot(plt, report["warnings"]["by_category"])
    ev = report["evaluation"]
    if ev is not None:
        png = _curves_plot(plt, ev, a)
        if png:
            out["curves"] = png
        if ev["budget_curve"] is not None:
            out["budget"] = _budget_plot(plt, ev["budget_curve"])
    if report["comparison"] is not None:
        out["comparison"] = _comparison_plot(plt, report["comparison"])
    return out


def _timeline_plot(plt: Any, res: Result) -> str:
    """New warnings per time bin, stacked by the level each one ended at."""
    import matplotlib.dates as mdates

    main = res.outcomes[0]
    first: dict[str, Alert] = {}
    for x in main.published:
        first.setdefault(x.alert_id, x)
    final = main.final()
    fig, ax = plt.subplots(figsize=(10, 3.4))
    if res.first_ts is not None and res.last_ts is not None:
        step = _bin_seconds(max(res.last_ts - res.first_ts, 1.0))
        edges = np.arange(math.floor(res.first_ts / step) * step, res.last_ts + step + 1, step)
        bottom = np.zeros(len(edges) - 1)
        centres = mdates.date2num([datetime.fromtimestamp(e, UTC) for e in edges[:-1]])
        for lv in LEVELS:
            times = [first[k].created_at.timestamp() for k in first if final[k].level == lv]
            counts, _ = np.histogram(times, bins=edges)
            ax.bar(
                centres, counts, width=step / 86400.0, bottom=bottom, align="edge", color=LEVEL_COLOURS[lv], label=lv
            )
            bottom += counts
        ax.xaxis.set_major_formatter(mdates.ConciseDateFormatter(mdates.AutoDateLocator()))
        ax.set_ylabel(f"new warnings per {_human(step)}")
        ax.legend(loc="upper left", fontsize=8)
    ax.set_title("Warnings over time (event time, UTC), by level")
    return _png(fig)


def _scores_plot(plt: Any, res: Result, a: dict[str, Any]) -> str:
    """The distribution of calibrated scores, transactions and market ticks apart, log scale."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    bins = np.linspace(0.0, 1.0, 51).tolist()
    if a["market"].any():
        ax.hist(a["scores"][a["market"]], bins=bins, color="#a1d99b", histtype="stepfilled", label="market ticks")
    ax.hist(a["scores"][~a["market"]], bins=bins, color="#08519c", histtype="step", linewidth=1.6, label="transactions")
    ax.axvline(res.threshold, color="#a50f15", linestyle="--", label=f"model threshold {res.threshold:g}")
    if a["scores"].size:
        ax.set_yscale("log")  # the few high scores are the point; a linear axis hides them
    ax.set_xlabel("calibrated score")
    ax.set_ylabel("events")
    ax.set_title("Score distribution")
    ax.legend(fontsize=8)
    return _png(fig)


def _categories_plot(plt: Any, cats: dict[str, dict[str, int]]) -> str:
    """Warnings by category, stacked by level."""
    fig, ax = plt.subplots(figsize=(5.2, 3.4))
    names = list(cats)
    left = np.zeros(len(names))
    for lv in LEVELS:
        vals = np.array([cats[c][lv] for c in names], dtype=float)
        ax.barh(names, vals, left=left, color=LEVEL_COLOURS[lv], label=lv)
        left += vals
    ax.invert_yaxis()
    ax.set_xlabel("warnings")
    ax.set_title("Warnings by category and level")
    ax.legend(fontsize=8, loc="lower right")
    return _png(fig)


def _curves_plot(plt: Any, ev: dict[str, Any], a: dict[str, Any]) -> str | None:
    """ROC and precision-recall curves of all transactions and of the account-level scenarios (None: no positives)."""
    txn = ~a["market"] & (a["labels"] >= 0)
    sets = {"all transactions": txn, "account-level scenarios": txn & ~a["platform"]}
    got = {name: curves(a["labels"][m].tolist(), a["scores"][m].tolist()) for name, m in sets.items() if m.any()}
    if not any(c["roc"] for c in got.values()):
        return None
    fig, (ax1, ax2) = plt.subplots(1, 2, figsize=(10, 4))
    for (name, c), colour in zip(got.items(), ("#3182bd", "#e6550d"), strict=False):
        key = "transactions" if name == "all transactions" else "account_scenarios"
        if c["roc"]:
            ax1.plot(c["roc"]["fpr"], c["roc"]["tpr"], color=colour, label=f"{name} (AUC {ev[key]['roc_auc']:.3f})")
        if c["pr"]:
            ax2.plot(
                c["pr"]["recall"],
                c["pr"]["precision"],
                color=colour,
                label=f"{name} (AP {ev[key]['average_precision']:.3f})",
            )
    ax1.plot([0, 1], [0, 1], color="#999999", linestyle=":")
    ax1.set(xlabel="false positive rate", ylabel="true positive rate", title="ROC curve")
    ax2.set(xlabel="recall", ylabel="precision", title="Precision-recall curve", ylim=(0, 1.02))
    ax1.legend(fontsize=8, loc="lower right")
    ax2.legend(fontsize=8, loc="upper right")
    return _png(fig)


def _comparison_plot(plt: Any, comp: dict[str, Any]) -> str:
    """Champion / challenger warnings by category: only A, both, only B."""
    cats = sorted(
        set(comp["only_a"]["by_category"]) | set(comp["only_b"]["by_category"]) | set(comp["both"]["by_category"])
    )
    fig, ax = plt.subplots(figsize=(8, 3.4))
    y = np.arange(len(cats))
    for k, (name, colour) in enumerate((("only_a", "#3182bd"), ("both", "#969696"), ("only_b", "#e6550d"))):
        ax.barh(
            y + (k - 1) * 0.27,
            [comp[name]["by_category"].get(c, 0) for c in cats],
            height=0.27,
            color=colour,
            label=name.replace("_", " ").replace(" a", " A").replace(" b", " B"),
        )
    ax.set_yticks(y, cats)
    ax.invert_yaxis()
    ax.set_xlabel("warnings")
    ax.set_title("Champion (A) vs challenger (B)")
    ax.legend(fontsize=8)
    return _png(fig)


def _budget_plot(plt: Any, c: dict[str, Any]) -> str:
    """Episode recall against warnings per 1,000 normal transactions, one line per scenario, log x."""
    fig, ax = plt.subplots(figsize=(8, 4))
    x = c["budgets_per_1000"]
    for scen, ys in c["recall"]["per_scenario"].items():
        ax.plot(x, ys, marker=".", linewidth=1.2, label=f"{scen} ({c['episodes'][scen]})")
    if c["episodes"]["overall"]:
        ax.plot(x, c["recall"]["overall"], color="black", linewidth=2.4, label=f"all ({c['episodes']['overall']})")
    ax.axvline(c["configured_per_1000"], color="#555555", linestyle="--", label="model threshold's target rate")
    op = c["operating_point"]
    if op is not None and op["false_per_1000_normal"]:  # a log axis cannot show zero
        ax.plot(
            [op["false_per_1000_normal"]],
            [op["recall"]],
            marker="*",
            markersize=14,
            color="#a50f15",
            linestyle="none",
            label="model warnings reached",
        )
    ax.set_xscale("log")
    ax.set_xticks(x, [f"{b:g}" for b in x])
    ax.set(
        xlabel="warnings per 1,000 normal transactions (budget)",
        ylabel="episodes with an event at or above",
        ylim=(-0.02, 1.02),
        title="Recall of account-level episodes against the warning budget",
    )
    ax.legend(fontsize=8, loc="center left", bbox_to_anchor=(1.01, 0.5))
    return _png(fig)


def _human(seconds: float) -> str:
    for unit, size in (("day", 86400), ("hour", 3600), ("minute", 60)):
        if seconds >= size and seconds % size == 0:
            n = int(seconds // size)
            return unit if n == 1 else f"{n} {unit}s"
    return f"{seconds:g} s"


# ---- HTML --------------------------------------------------------------------------------------------------

_CSS = """
body{font:14px/1.45 system-ui,-apple-system,Segoe UI,Roboto,sans-serif;margin:24px auto;max-width:1100px;color:#222}
h1{font-size:22px;margin-bottom:4px}h2{font-size:17px;margin-top:28px;border-bottom:1px solid #ddd}
table{border-collapse:collapse;margin:8px 0}td,th{padding:3px 10px;border-bottom:1px solid #eee;text-align:left}
th{background:#f6f6f6}td.n{text-align:right;font-variant-numeric:tabular-nums}.muted{color:#777}
.chip{display:inline-block;padding:1px 8px;border-radius:9px;color:#fff;font-size:12px}
.row{display:flex;gap:12px;flex-wrap:wrap}img{max-width:100%;border:1px solid #eee}
"""


def _e(x: Any) -> str:
    return html.escape(str(x))


def _num(x: Any, digits: int = 3) -> str:
    if x is None:
        return "—"
    if isinstance(x, float):
        return f"{x:,.0f}" if abs(x) >= 100 else f"{x:,.{digits}f}"
    return f"{x:,}" if isinstance(x, int) else _e(x)


def _table(head: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    th = "".join(f"<th>{_e(h)}</th>" for h in head)
    body = "".join(
        "<tr>"
        + "".join(
            f'<td class="n">{_num(c)}</td>' if isinstance(c, int | float) or c is None else f"<td>{c}</td>" for c in r
        )
        + "</tr>"
        for r in rows
    )
    return f"<table><tr>{th}</tr>{body}</table>"


def _chip(level: str) -> str:
    return f'<span class="chip" style="background:{LEVEL_COLOURS.get(level, "#777")}">{_e(level)}</span>'


def _short(iso: str | None, *, seconds: bool = False) -> str:
    fmt = "%Y-%m-%d %H:%M:%S" if seconds else "%Y-%m-%d %H:%M UTC"
    return "—" if iso is None else datetime.fromisoformat(iso).astimezone(UTC).strftime(fmt)


def _duration(seconds: float | None) -> str:
    if seconds is None:
        return "not detected"
    return f"{seconds:,.0f} s" if seconds < 600 else f"{seconds / 60:,.1f} min"


def _events(x: float | None) -> str:
    return "—" if x is None else f"{x:.3g}"


def _precision_load_html(ev: dict[str, Any]) -> str:
    """Warning precision by detector kind and by rule beside the warning load, per 1,000 normal transactions and
    account-days."""
    prec, load = ev["warnings"], ev["load"]
    kinds = [("all", prec["overall"]), *prec["by_detector"].items(),
             *((f"rule: {r}", p) for r, p in prec.get("by_rule", {}).items())]
    return (
        "<div class=row>"
        + _table(
            ["warnings by detector", "warnings", "naming a risky event", "precision"],
            [[_e(k), p["warnings"], p["true"], p["precision"]] for k, p in kinds],
        )
        + _table(
            ["load", "per 1,000 normal txns", "false only", "per 1,000 active accounts a day", "false only"],
            [
                [
                    name,
                    g["per_1000_normal"],
                    g["false_per_1000_normal"],
                    g["per_1000_account_days"],
                    g["false_per_1000_account_days"],
                ]
                for name, g in (("all warnings", load["all"]), ("model warnings", load["model"]),
                                ("paged warnings", load["paged"]))
            ],
        )
        + _table(
            ["pages by source", "pages", "false"],
            [[_e(src), n["warnings"], n["false_warnings"]] for src, n in load["paged"]["by_source"].items()],
        )
        + "</div>"
    )


def _episodes_html(ev: dict[str, Any]) -> str:
    """The episode table per scenario, warning precision by detector kind and the warning load."""
    eps = ev["episodes"]
    rows = [*eps["per_scenario"].items(), ("<b>all</b>", {**eps["overall"], "level": ""})]
    share = ev["load"]["model_normal_named_share"]
    named = "—" if share is None else f"{share:.4%}"
    return (
        "<h2>Episodes: labelled risky runs, one entity and scenario each</h2><p class=muted>An episode is warned "
        "when a published warning names any of its events, paged when such a warning reached the page level. "
        "Delay runs from its first risky event to that "
        "warning: in risky events (1 = warned at the first) and in event-time seconds. docs/episode-metrics.md "
        "defines each figure.</p>"
        + _table(
            [
                "scenario",
                "level",
                "warned",
                "episodes",
                "recall",
                "paged",
                "median delay, events",
                "p90, events",
                "median delay",
                "p90 delay",
                "caught by",
            ],
            [
                [
                    s if s.startswith("<b>") else _e(s),
                    _e(r["level"]),
                    r["warned"],
                    r["episodes"],
                    r["recall"],
                    r["paged"],
                    _events(r["median_delay_events"]),
                    _events(r["p90_delay_events"]),
                    _duration(r["median_delay_seconds"]),
                    _duration(r["p90_delay_seconds"]),
                    _e(", ".join(f"{k} {n}" for k, n in r["caught_by_detector"].items())),
                ]
                for s, r in rows
            ],
        )
        + _precision_load_html(ev)
        + f"<p>Median detection delay over all detected instances: "
        f"{_duration(ev['detection']['median_delay_seconds'])}. Normal transactions named by a model warning: "
        f"{named}.</p>" + (f"<p class=muted>{_e(ev['budget_curve']['note'])}</p>" if ev["budget_curve"] else "")
    )


def render(report: dict[str, Any], images: dict[str, str], *, max_rows: int = 100) -> str:
    """report.html: the numbers of `report` with the figures embedded, one file that opens anywhere."""
    img = {k: f'<img alt="{_e(k)}" src="{v}">' for k, v in images.items()}
    parts = _summary_html(report, img)
    parts += _labels_html(report, img)
    parts += _comparison_html(report, img)
    parts += _alerts_html(report, max_rows)
    parts.append("<p class=muted>Generated by <code>riskwatch replay</code>.</p></body></html>\n")
    return "".join(parts)


def _summary_html(report: dict[str, Any], img: dict[str, str]) -> list[str]:
    """The page's head, the events, warnings and throughput tables, the timeline and score figures."""
    ev, w, t = report["events"], report["warnings"], report["throughput"]
    parts = [
        f"<!doctype html><html lang=en><head><meta charset=utf-8><title>riskwatch replay: "
        f"{_e(report['input'])}</title><style>{_CSS}</style></head><body>",
        f"<h1>Replay report</h1><div class=muted>{_e(report['input'])} · rules "
        + "; ".join(f"{_e(r['name'])}: {_e(r['source'])} (version {r['version']})" for r in report["rules"])
        + f" · event time {_e(_short(ev['first_ts']))} to {_e(_short(ev['last_ts']))}</div>",
        "<h2>Events and warnings</h2><div class=row>",
        _table(
            ["events", ""],
            [
                ["read", ev["records"]],
                ["scored", ev["scored"]],
                ["transactions", ev["transactions"]],
                ["market ticks", ev["market"]],
                ["duplicates (not rescored)", ev["duplicates"]],
                ["invalid (dead-lettered)", ev["invalid"]],
            ],
        ),
        _table(
            ["warnings", ""],
            [
                ["distinct warnings", w["total"]],
                ["published versions", w["versions_published"]],
                *[[_chip(lv), n] for lv, n in w["by_level"].items()],
                ["per 1,000 events", report["alert_rate"]["warnings_per_1000_events"]],
                ["per day", report["alert_rate"]["warnings_per_day"]],
                [f"paged ({_e(str(report['alert_rate']['page_min_level']))} and above) per day",
                 report["alert_rate"]["pages_per_day"]],
            ],
        ),
        _table(
            ["throughput", ""],
            [
                ["events/s (read + replay)", t["events_per_second"]],
                ["events/s (scoring alone)", t["scoring_events_per_second"]],
                ["read and order, s", t["read_seconds"]],
                ["replay, s", t["replay_seconds"]],
            ],
        ),
        "</div>",
        img.get("timeline", ""),
        "<div class=row>",
        img.get("scores", ""),
        img.get("categories", ""),
        "</div>",
    ]
    if w["dropped_by_storm_cap"]:
        parts.append(
            "<p>Dropped by the storm cap: "
            + ", ".join(f"{_e(k)} {v:,}" for k, v in w["dropped_by_storm_cap"].items())
            + "</p>"
        )
    return parts


def _labels_html(report: dict[str, Any], img: dict[str, str]) -> list[str]:
    """Ranking, episode and budget figures against the labels (nothing for an unlabelled input)."""
    parts: list[str] = []
    evaluation_ = report["evaluation"]
    if evaluation_ is not None:
        parts.append(f"<h2>Against the labels</h2><p class=muted>{_e(evaluation_['note'])}</p>")
        names = {"transactions": "all transactions", "account_scenarios": "account-level scenarios"}
        parts.append(
            _table(
                [
                    "events",
                    "n",
                    "positives",
                    "ROC AUC",
                    "average precision",
                    f"recall ≥ {evaluation_['threshold']:g}",
                    f"precision ≥ {evaluation_['threshold']:g}",
                    "alert rate on normal",
                ],
                [
                    [
                        names[k],
                        m["n"],
                        m["n_positive"],
                        m["roc_auc"],
                        m["average_precision"],
                        m["recall_at_threshold"],
                        m["precision_at_threshold"],
                        m["alert_rate_normal"],
                    ]
                    for k, m in ((k, evaluation_[k]) for k in names)
                ],
            )
        )
        parts.append(img.get("curves", ""))
        parts.append(_episodes_html(evaluation_))
        parts.append(img.get("budget", ""))
    return parts


def _comparison_html(report: dict[str, Any], img: dict[str, str]) -> list[str]:
    """Champion / challenger: warnings only A raised, both raised, only B raised (nothing for one catalogue)."""
    parts: list[str] = []
    comp = report["comparison"]
    if comp is not None:
        cats = sorted(
            set(comp["only_a"]["by_category"]) | set(comp["only_b"]["by_category"]) | set(comp["both"]["by_category"])
        )
        parts.append(
            f"<h2>Champion / challenger</h2><p>A: {_e(comp['a'])} · B: {_e(comp['b'])}. Warnings are "
            "matched by alert_id (the same first event gives the same id); "
            f"{comp['both']['level_differs']:,} of those in both end at a different level. Pages (warnings "
            f"reaching the page level): A {comp['pages']['a']:,}, B {comp['pages']['b']:,}.</p>"
        )
        parts.append(
            _table(
                ["category", "only A", "both", "only B"],
                [
                    [
                        _e(c),
                        comp["only_a"]["by_category"].get(c, 0),
                        comp["both"]["by_category"].get(c, 0),
                        comp["only_b"]["by_category"].get(c, 0),
                    ]
                    for c in cats
                ]
                + [["<b>total</b>", comp["only_a"]["total"], comp["both"]["total"], comp["only_b"]["total"]]],
            )
        )
        parts.append(img.get("comparison", ""))
    return parts


def _alerts_html(report: dict[str, Any], max_rows: int) -> list[str]:
    """The most severe warnings, one row each."""
    parts: list[str] = []
    alerts = report["alerts"]
    parts.append(
        f"<h2>Warnings, most severe first</h2><p class=muted>{min(len(alerts), max_rows):,} of "
        f"{len(alerts):,} shown; report.json holds the final state of every warning.</p>"
    )
    parts.append(
        _table(
            ["level", "category", "entity", "event time", "score", "events", "reason"],
            [
                [
                    _chip(a["level"]),
                    _e(a["category"]),
                    _e(a["entity_id"]),
                    _e(_short(a["event_ts"], seconds=True)),
                    a["score"],
                    len(a["event_ids"]),
                    _e(a["reasons"][0]["message"] if a["reasons"] else ""),
                ]
                for a in alerts[:max_rows]
            ],
        )
    )
    return parts


__all__ = ["LEVEL_COLOURS", "plots", "render"]
