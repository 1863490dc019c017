"""Rule changes published to risk.rules take effect on a running worker; bad versions are refused."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from pathlib import Path

import pytest
import yaml

from app.faust_app import ALERTS, DEADLETTER, TRANSACTIONS
from models.rules import DEFAULT_RULES
from tests.conftest import ROOT, consume, produce, settings_env

pytestmark = pytest.mark.kafka


def _publish(settings, path: Path) -> subprocess.CompletedProcess[str]:
    return subprocess.run([sys.executable, "-m", "app.cli", "rules", "publish", str(path)], cwd=ROOT,
                          env=settings_env(settings), capture_output=True, text=True, timeout=60)


def _wait_metric(worker, name: str, value: float, timeout: float = 30.0) -> float:
    start = time.monotonic()
    while time.monotonic() - start < timeout:
        if worker.metric(name) == value:
            return time.monotonic() - start
        time.sleep(0.1)
    raise AssertionError(f"{name} never reached {value}: {worker.metric(name)}\n{worker.tail()}")


def test_published_catalogue_applies_within_seconds_and_bad_one_is_rejected(settings, start_worker, make_txn,
                                                                           tmp_path):
    worker = start_worker(settings)
    assert worker.metric("riskwatch_rules_version") == 1

    rules = yaml.safe_load(DEFAULT_RULES.read_text())
    rules["version"] = 2
    rules["rules"]["large_transaction"]["params"] = {"default_threshold": 1000, "thresholds": {}}
    v2 = tmp_path / "v2.yaml"
    v2.write_text(yaml.safe_dump(rules))
    done = _publish(settings, v2)
    assert done.returncode == 0, done.stderr
    assert "published rules version 2" in done.stdout
    took = _wait_metric(worker, "riskwatch_rules_version", 2)
    print(f"rules version 2 in force {took:.2f}s after publishing")

    small = make_txn(amount=5000.0)
    produce(settings, TRANSACTIONS, [(b"acct-1", json.dumps(small).encode())])
    alerts = consume(settings, ALERTS, lambda got: any(small["event_id"] in a["event_ids"] for a in got))
    hit = next(a for a in alerts if small["event_id"] in a["event_ids"])
    assert hit["category"] == "large_transaction" and "CNY 1,000 reporting threshold" in hit["reasons"][0]["message"]

    bad = tmp_path / "v3.yaml"
    bad.write_text("version: 3\nrules: {velocity: {category: velocity, level: extreme, description: x}}\n")
    assert _publish(settings, bad).returncode == 2, "the CLI validates before publishing"
    # A producer that skips the CLI still cannot install a bad catalogue.
    produce(settings, "risk.rules", [(b"catalogue", bad.read_bytes())])
    dead = consume(settings, DEADLETTER, lambda got: any(d["source_topic"].endswith("risk.rules") for d in got))
    letter = next(d for d in dead if d["source_topic"].endswith("risk.rules"))
    assert "rules.velocity.level" in letter["reason"]
    _wait_metric(worker, "riskwatch_rules_rejected_total", 1)
    assert worker.metric("riskwatch_rules_version") == 2
