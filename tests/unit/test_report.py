"""The replay report: numbers checked against an independent computation, and the HTML rendered in Chromium."""

from __future__ import annotations

import gzip
import json
import os
import re
import shutil
import signal
import subprocess
from collections import Counter
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import matplotlib.image
import numpy as np
import pytest
from sklearn.metrics import roc_auc_score

from app.cli import main
from models.schemas import Alert
from models.synth import write_jsonl

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "sample.jsonl.gz"
CHROMIUM = shutil.which("chromium") or "/usr/bin/chromium"
# Counts the images the browser actually decoded, and writes the count where --dump-dom shows it.
PROBE = """<script>
window.addEventListener("load", () => {
  const imgs = [...document.images];
  const ok = imgs.filter(i => i.complete && i.naturalWidth > 0 && i.naturalHeight > 0);
  document.body.setAttribute("data-probe", JSON.stringify({images: imgs.length, decoded: ok.length,
    widths: ok.map(i => i.naturalWidth)}));
});
</script></body>"""


@pytest.fixture(scope="module")
def sample_report(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """Replay the shipped sample once, with alerts, scores and the report."""
    out = tmp_path_factory.mktemp("report")
    code = main(
        [
            "replay",
            str(SAMPLE),
            "--alerts",
            str(out / "alerts.jsonl"),
            "--scores",
            str(out / "scores.jsonl"),
            "--report",
            str(out / "report"),
        ]
    )
    assert code == 0
    return out


def chromium(tmp_path: Path, *args: str, timeout: float = 120.0) -> subprocess.CompletedProcess[str]:
    """Run headless Chromium once and make sure none of its processes outlive the call."""
    cmd = [
        CHROMIUM,
        "--headless",
        "--no-sandbox",
        "--disable-gpu",
        "--disable-background-networking",
        "--disable-component-update",
        "--disable-sync",
        "--no-first-run",
        "--hide-scrollbars",
        f"--user-data-dir={tmp_path / 'chromium-profile'}",
        *args,
    ]
    proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, start_new_session=True)
    try:
        out, err = proc.communicate(timeout=timeout)
    finally:
        try:
            os.killpg(proc.pid, signal.SIGKILL)  # renderer and zygote children share the session
        except ProcessLookupError:
            pass
        proc.wait()
    return subprocess.CompletedProcess(cmd, proc.returncode, out, err)


def render(tmp_path: Path, html: Path) -> dict[str, Any]:
    """Load the page in Chromium; return what the probe saw."""
    probe = tmp_path / "probe.html"
    text = html.read_text(encoding="utf-8")
    assert text.count("</body>") == 1
    probe.write_text(text.replace("</body>", PROBE), encoding="utf-8")
    done = chromium(tmp_path, "--virtual-time-budget=10000", "--dump-dom", probe.as_uri())
    found = re.search(r'data-probe="([^"]*)"', done.stdout)
    assert found, f"no probe result in the DOM; chromium said: {done.stderr[-2000:]}"
    result: dict[str, Any] = json.loads(found.group(1).replace("&quot;", '"'))
    return result


def _events() -> list[dict[str, Any]]:
    with gzip.open(SAMPLE, "rt") as f:
        return [json.loads(line) for line in f]


def test_report_numbers_match_an_independent_computation(sample_report: Path) -> None:
    rep = json.loads((sample_report / "report" / "report.json").read_text())
    events = _events()
    txns = [e for e in events if e["event_type"] == "transaction"]
    assert rep["events"]["scored"] == len(events) and rep["events"]["transactions"] == len(txns)

    # Warnings: the last published version of each alert_id, counted by category and level.
    final: dict[str, Alert] = {}
    for line in (sample_report / "alerts.jsonl").read_text().splitlines():
        a = Alert.model_validate_json(line)
        final[a.alert_id] = a
    assert rep["warnings"]["total"] == len(final)
    by_cat = Counter((a.category, a.level) for a in final.values())
    assert {(c, lv): n for c, row in rep["warnings"]["by_category"].items() for lv, n in row.items() if n} == by_cat
    assert {a["alert_id"] for a in rep["alerts"]} == set(final)
    assert rep["alert_rate"]["warnings_per_1000_events"] == pytest.approx(1000 * len(final) / len(events))

    # Event-level metrics from the scores file and the input's labels, recomputed with scikit-learn.
    scores = {s["event_id"]: s["score"] for s in map(json.loads, (sample_report / "scores.jsonl").open())}
    ev = rep["evaluation"]
    y = [e["label"] for e in txns]
    s = [scores[e["event_id"]] for e in txns]
    assert ev["transactions"]["roc_auc"] == pytest.approx(roc_auc_score(y, s))
    platform = {"liquidity_run", "market_crash"}
    acct = [e for e in txns if e.get("scenario") not in platform]
    assert ev["account_scenarios"]["n"] == len(acct) < len(txns)
    assert ev["account_scenarios"]["n_positive"] == sum(e["label"] for e in acct)
    assert ev["account_scenarios"]["roc_auc"] == pytest.approx(
        roc_auc_score([e["label"] for e in acct], [scores[e["event_id"]] for e in acct])
    )
    thr = ev["threshold"]
    hits = [e for e in txns if e["label"] == 1 and scores[e["event_id"]] >= thr]
    assert ev["transactions"]["recall_at_threshold"] == pytest.approx(len(hits) / sum(y))

    # Detection is per scenario instance; platform-level scenarios are listed as such.
    instances = Counter(e["scenario"] for e in {e["scenario_instance"]: e for e in events if e["label"]}.values())
    per = ev["detection"]["per_scenario"]
    assert {k: v["instances"] for k, v in per.items()} == dict(instances)
    assert per["liquidity_run"]["level"] == per["market_crash"]["level"] == "platform"
    assert per["fund_isolation"]["detected"] == per["fund_isolation"]["instances"]  # a deterministic rule
    assert "platform-level" in ev["note"]


def test_report_episode_metrics_match_an_independent_computation(sample_report: Path) -> None:
    ev = json.loads((sample_report / "report" / "report.json").read_text())["evaluation"]
    # The earlier keys stay for old readers; the episode metrics come beside them.
    assert {"threshold", "note", "transactions", "account_scenarios", "detection"} < set(ev)
    assert {"episodes", "warnings", "load", "budget_curve"} < set(ev)
    events = _events()
    risky = [e for e in events if e["label"] == 1]
    alerts = [Alert.model_validate_json(line) for line in (sample_report / "alerts.jsonl").read_text().splitlines()]

    # Episodes are the scenario instances: the same keys, and warned exactly when detected.
    eps = ev["episodes"]
    assert set(eps["instances"]) == {e["scenario_instance"] for e in risky}
    for scen, row in ev["detection"]["per_scenario"].items():
        assert (eps["per_scenario"][scen]["episodes"], eps["per_scenario"][scen]["warned"]) == (
            row["instances"],
            row["detected"],
        )
        assert eps["per_scenario"][scen]["level"] == row["level"]
    # The delay in events: the episode's risky events up to the first warning naming one of them.
    named: dict[str, float] = {}
    for a in alerts:
        for e in risky:
            if e["event_id"] in a.event_ids:
                named[e["scenario_instance"]] = min(named.get(e["scenario_instance"], 1e18), a.event_ts.timestamp())
    for key, row in eps["instances"].items():
        ts = [datetime.fromisoformat(e["ts"]).timestamp() for e in risky if e["scenario_instance"] == key]
        assert row["events"] == len(ts) and row["warned"] == (key in named)
        if key in named:
            assert row["delay_events"] == max(1, sum(t <= named[key] for t in ts))
            assert row["delay_seconds"] == pytest.approx(named[key] - min(ts))

    # Precision: a warning is true when any version names a risky event.
    ids = {e["event_id"] for e in risky}
    true = {a.alert_id for a in alerts if ids & set(a.event_ids)}
    final = {a.alert_id: a for a in alerts}
    assert ev["warnings"]["overall"] == {"warnings": len(final), "true": len(true), "precision": len(true) / len(final)}

    # Load: per normal transaction and per account active on each UTC day.
    txns = [e for e in events if e["event_type"] == "transaction"]
    normal = [e for e in txns if e["label"] == 0]
    days = {(datetime.fromisoformat(e["ts"]).astimezone(UTC).date(), e["account_id"]) for e in txns}
    load = ev["load"]
    assert (load["normal_transactions"], load["account_days"]) == (len(normal), len(days))
    assert load["all"]["false_per_1000_normal"] == pytest.approx(1000 * (len(final) - len(true)) / len(normal))
    assert load["all"]["per_1000_account_days"] == pytest.approx(1000 * len(final) / len(days))

    # Pages: warnings any version of which reached the page level (high by default), and the episodes
    # such a warning named.
    paged = {a.alert_id for a in alerts if a.level in ("high", "critical")}
    assert load["page_min_level"] == "high" and load["paged"]["warnings"] == len(paged)
    assert load["paged"]["false_warnings"] == len(paged - true)
    paged_eps = {e["scenario_instance"] for a in alerts if a.alert_id in paged for e in risky
                 if e["event_id"] in a.event_ids}
    assert {k for k, row in eps["instances"].items() if row["paged"]} == paged_eps
    sources = Counter(
        final[i].detector.removeprefix("rule:") if final[i].detector != "surprise" else "model" for i in paged
    )
    assert {src: n["warnings"] for src, n in load["paged"]["by_source"].items()} == dict(sources)
    assert 0 < eps["overall"]["paged"] <= eps["overall"]["warned"]

    # Recall at each budget, recomputed from the scores file: episodes of account-level scenarios with an
    # event at or above the threshold that lets through at most the budget's share of normal transactions.
    scores = {s["event_id"]: s["score"] for s in map(json.loads, (sample_report / "scores.jsonl").open())}
    c = ev["budget_curve"]
    s = np.array([scores[e["event_id"]] for e in normal])
    acct = [
        e for e in risky if e["event_type"] == "transaction" and e["scenario"] not in ("liquidity_run", "market_crash")
    ]
    best: dict[str, float] = {}
    for e in acct:
        best[e["scenario_instance"]] = max(best.get(e["scenario_instance"], -1.0), scores[e["event_id"]])
    assert c["episodes"]["overall"] == len(best)
    for b, t, recall in zip(c["budgets_per_1000"], c["thresholds"], c["recall"]["overall"], strict=True):
        assert 1000 * (s >= t).mean() <= b
        assert recall == pytest.approx(sum(v >= t for v in best.values()) / len(best))
    assert c["recall"]["overall"] == sorted(c["recall"]["overall"])
    assert c["configured_per_1000"] == pytest.approx(1000 * (1 - ev["threshold"]))


def test_report_html_has_the_episode_table_and_budget_plot(sample_report: Path) -> None:
    text = (sample_report / "report" / "report.html").read_text()
    ev = json.loads((sample_report / "report" / "report.json").read_text())["evaluation"]
    assert '<img alt="budget" src="data:image/png;base64,' in text
    table = text[text.index("<h2>Episodes") :]
    row = ev["episodes"]["per_scenario"]["fund_isolation"]
    assert f'<td>fund_isolation</td><td>account</td><td class="n">{row["warned"]}</td>' in table
    assert "warnings by detector" in table and "per 1,000 active accounts a day" in table
    assert f'<td class="n">{row["episodes"]}</td><td class="n">1.000</td><td class="n">{row["paged"]}</td>' in table
    assert "<td>paged warnings</td>" in table and "paged (high and above) per day" in text


def test_report_html_renders_its_images_in_chromium(sample_report: Path, tmp_path: Path) -> None:
    page = sample_report / "report" / "report.html"
    text = page.read_text()
    assert "http://" not in text and "https://" not in text  # one file: nothing to fetch
    seen = render(tmp_path, page)
    # Timeline, scores, categories, the ROC/PR curves and recall against budget (the sample has labels).
    assert seen["images"] == 5 and seen["decoded"] == 5, seen
    assert min(seen["widths"]) > 300
    shot = tmp_path / "shot.png"
    chromium(tmp_path, "--window-size=1200,2400", f"--screenshot={shot}", page.as_uri())
    pixels = matplotlib.image.imread(shot)[..., :3]
    # The plots put colour on the page: a blank or broken render is nearly all white.
    coloured = (np.abs(pixels - pixels.mean(axis=2, keepdims=True)).max(axis=2) > 0.1).mean()
    assert coloured > 0.02, coloured


def test_report_without_labels_has_no_curves(tmp_path: Path) -> None:
    events = [
        {k: v for k, v in e.items() if k not in ("label", "scenario", "scenario_instance")} for e in _events()[:4000]
    ]
    write_jsonl(events, tmp_path / "in.jsonl")
    assert main(["replay", str(tmp_path / "in.jsonl"), "--report", str(tmp_path / "report")]) == 0
    rep = json.loads((tmp_path / "report" / "report.json").read_text())
    assert rep["evaluation"] is None and rep["comparison"] is None
    html = (tmp_path / "report" / "report.html").read_text()
    assert "Against the labels" not in html
    seen = render(tmp_path, tmp_path / "report" / "report.html")
    assert seen["images"] == 3 and seen["decoded"] == 3, seen
