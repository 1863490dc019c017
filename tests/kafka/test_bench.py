"""Smoke test of the benchmark harness: `python -m bench --quick` runs every group, prints the table, writes JSON."""

from __future__ import annotations

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest

from bench.__main__ import GROUPS, parse
from bench.common import Figure, Report
from bench.endtoend import summarise
from bench.latency import _percentile
from bench.memory import _fit

ROOT = Path(__file__).resolve().parents[2]


def test_ratio_is_taken_against_the_ceiling_of_the_same_run() -> None:
    report = Report("python -m bench", {})
    report.add(Figure("ceilings", "parse_validate", "ceiling", 100_000.0, "events/s"))
    fig = report.add(Figure("riskwatch", "scoring_only", "scoring", 25_000.0, "events/s", ceiling="parse_validate",
                            detail={"events_per_cpu_second": 40_000}))
    assert fig.ratio == pytest.approx(0.25)
    assert fig.per_cpu == 40_000
    assert "25.0% of parse_validate" in report.table()


def test_undelivered_warnings_push_percentiles_to_infinity() -> None:
    lat = [0.01] * 98 + [float("inf")] * 2
    assert _percentile(lat, 50) == 0.01
    assert _percentile(lat, 98) == 0.01
    assert _percentile(lat, 99) == float("inf")


def test_memory_slope_is_bytes_per_account() -> None:
    slope, intercept = _fit([(1000, 100_000_000 + 1000 * 700), (5000, 100_000_000 + 5000 * 700)])
    assert slope == pytest.approx(700)
    assert intercept == pytest.approx(100_000_000)


def test_profile_summary_ranks_frames(tmp_path: Path) -> None:
    raw = tmp_path / "p.txt"
    raw.write_text("main (app/cli.py:1);score (models/scoring.py:9) 30\n"
                   "main (app/cli.py:1);poll (aiokafka/c.py:3) 10\n")
    s = summarise(raw)
    assert s["samples"] == 40
    assert s["own"][0] == ("score (models/scoring.py:9)", 0.75)
    assert dict(s["by_package"]) == {"models": 0.75, "aiokafka": 0.25}


def test_unknown_group_is_refused(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit):
        parse(["--only", "speed"])
    assert "unknown group(s) speed" in capsys.readouterr().err


@pytest.mark.kafka
@pytest.mark.slow
def test_quick_run_prints_the_table_and_writes_every_group(kafka_bootstrap: str, tmp_path: Path) -> None:
    env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWATCH_")}
    env["RISKWATCH_KAFKA_BOOTSTRAP"] = kafka_bootstrap
    out = tmp_path / "results"
    done = subprocess.run([sys.executable, "-m", "bench", "--quick", "--out", str(out)], cwd=ROOT, env=env,
                          capture_output=True, text=True, timeout=400)
    assert done.returncode == 0, done.stdout[-3000:] + done.stderr[-3000:]
    assert "| figure" in done.stdout
    for label in ("ceiling: parse+validate only", "baseline: naive River loop", "riskwatch: scoring only",
                  "riskwatch: file replay", "worker end to end, 1 process", "latency p99 at 200/s offered",
                  "worker RSS growth per tracked account"):
        assert label in done.stdout, label
    written = sorted(p.stem for p in out.glob("*.json"))
    assert written == sorted(GROUPS)
    names = set()
    for group in GROUPS:
        doc = json.loads((out / f"{group}.json").read_text())
        assert doc["group"] == group
        assert doc["machine"]["nproc"] >= 1
        assert len(doc["load_at_start"]) == 3
        assert doc["figures"], group
        for fig in doc["figures"]:
            assert fig["value"] > 0, fig
            assert len(fig["load_before"]) == 3
            names.add(fig["name"])
    worker = json.loads((out / "worker.json").read_text())["figures"][0]
    assert worker["detail"]["scored"] == worker["detail"]["events"] == 1000
    assert worker["ratio"] is not None
    memory = {f["name"]: f for f in json.loads((out / "memory.json").read_text())["figures"]}
    assert memory["rss_8000"]["detail"]["accounts_gauge"] == 8000
    assert {"parse_validate", "bare_consume", "bare_produce", "scoring_only", "worker_1p",
            "latency_200_p99", "rss_per_account", "scoring_with_lists", "list_bytes_per_entry", "list_load",
            "worker_1p_lists"} <= names
