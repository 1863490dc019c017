"""`riskwatch check` without a broker: each finding says what is wrong and what to do, and the rest is still checked."""

from __future__ import annotations

from pathlib import Path

from app.preflight import FAIL, NOTE, OK, check
from app.settings import Settings


def test_every_check_runs_and_a_failure_names_what_to_do(tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    rules.write_text("version: 1\nrules:\n  big:\n    type: large_transaction\n    category: x\n    level: loud\n")
    s = Settings(kafka_bootstrap="127.0.0.1:9", data_dir=tmp_path, rules_file=rules, metrics_port=0, web_port=0)
    found = {f.subject: f for f in check(s, kafka_timeout=1.0)}
    assert list(found) == ["codecs", "topic names", "ports", "rules", "plans", "kafka", "console", "paging"], (
        "no topic check without Kafka")
    assert (found["codecs"].outcome, found["plans"].outcome) == (OK, OK)
    assert found["rules"].outcome == FAIL and "level" in found["rules"].text, found["rules"]
    assert found["kafka"].outcome == FAIL and "RISKWATCH_KAFKA_BOOTSTRAP" in found["kafka"].text, found["kafka"]
    assert found["console"].outcome == NOTE and "riskwatch users add" in found["console"].text
    assert found["paging"].line() == "--   paging: RISKWATCH_ALERTMANAGER_URL is empty: no warning is paged"
