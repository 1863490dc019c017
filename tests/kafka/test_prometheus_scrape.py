"""A real scrape: Debian's Prometheus, with the shipped config and rules, scraping a real worker.

The shipped deploy/prometheus/prometheus.yml is copied with its targets pointed at the test's
worker and Prometheus, intervals cut to one second, and Alertmanager left out; the shipped rule
file is loaded as is. The test checks through Prometheus' HTTP API that the riskwatch series are
there, that they move when events flow, that a warning's first increment is visible to
increase() (the label sets are created at zero on start), and that the recording rules evaluate.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import time
import urllib.parse
import urllib.request
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import pytest
import yaml

from app.faust_app import TRANSACTIONS
from app.settings import Settings
from tests.conftest import ROOT, free_port, produce

PROMETHEUS_DIR = ROOT / "deploy" / "prometheus"


class Prometheus:
    """A Prometheus server process and its HTTP query API."""

    def __init__(self, base: str, proc: subprocess.Popen[bytes], log: Path) -> None:
        self.base = base
        self.proc = proc
        self.log = log

    def query(self, expr: str) -> list[dict[str, Any]]:
        """Instant query; the result vector."""
        url = f"{self.base}/api/v1/query?{urllib.parse.urlencode({'query': expr})}"
        with urllib.request.urlopen(url, timeout=10) as r:
            body = json.load(r)
        assert body["status"] == "success", body
        return list(body["data"]["result"])

    def value(self, expr: str) -> float | None:
        """The single value of an instant query, or None when it returns nothing."""
        result = self.query(expr)
        assert len(result) <= 1, f"{expr} returned {len(result)} series"
        return float(result[0]["value"][1]) if result else None

    def wait(self, what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
        """Poll until `check()` holds."""
        deadline = time.monotonic() + timeout
        while not check():
            if time.monotonic() > deadline:
                raise AssertionError(f"Prometheus never saw {what}; its log:\n{self.log.read_text()[-3000:]}")
            time.sleep(0.5)


def _config(metrics_port: int, prometheus_port: int) -> dict[str, Any]:
    config = yaml.safe_load((PROMETHEUS_DIR / "prometheus.yml").read_text())
    config["global"].update(scrape_interval="1s", evaluation_interval="1s")
    config.pop("alerting")  # no Alertmanager here; deploy tests cover the routing
    config["rule_files"] = [str(PROMETHEUS_DIR / name) for name in config["rule_files"]]
    jobs = {job["job_name"]: job for job in config["scrape_configs"]}
    jobs["riskwatch"].update(scrape_interval="1s", scrape_timeout="1s")
    jobs["riskwatch"]["static_configs"] = [{"targets": [f"127.0.0.1:{metrics_port}"]}]
    jobs["prometheus"]["static_configs"] = [{"targets": [f"127.0.0.1:{prometheus_port}"]}]
    return config


@pytest.fixture
def prometheus(settings: Settings, tmp_path: Path) -> Iterator[Prometheus]:
    """Debian's Prometheus scraping this test's worker every second."""
    binary = shutil.which("prometheus")
    if binary is None:
        pytest.fail("prometheus not found on PATH: run `apt-get install prometheus`", pytrace=False)
    port = free_port()
    config = tmp_path / "prometheus.yml"
    config.write_text(yaml.safe_dump(_config(settings.metrics_port, port)))
    log = tmp_path / "prometheus.log"
    with log.open("wb") as out:
        proc = subprocess.Popen([binary, f"--config.file={config}", f"--storage.tsdb.path={tmp_path / 'tsdb'}",
                                 f"--web.listen-address=127.0.0.1:{port}", "--storage.tsdb.retention.time=1h"],
                                stdout=out, stderr=subprocess.STDOUT)
    prom = Prometheus(f"http://127.0.0.1:{port}", proc, log)
    try:
        deadline = time.monotonic() + 30
        while True:
            try:
                with urllib.request.urlopen(f"{prom.base}/-/ready", timeout=2) as r:
                    if r.status == 200:
                        break
            except OSError:
                pass
            if proc.poll() is not None or time.monotonic() > deadline:
                raise AssertionError(f"Prometheus did not start:\n{log.read_text()[-3000:]}")
            time.sleep(0.2)
        yield prom
    finally:
        proc.terminate()
        try:
            proc.wait(15)
        except subprocess.TimeoutExpired:
            proc.kill()
            proc.wait(5)


@pytest.mark.kafka
def test_prometheus_scrapes_the_worker_and_sees_its_series_move(
        settings: Settings, start_worker: Callable[..., Any], prometheus: Prometheus,
        make_txn: Callable[..., dict[str, Any]]) -> None:
    start_worker(settings)
    topic = settings.topic(TRANSACTIONS)
    consumed = f'riskwatch_events_consumed_total{{job="riskwatch",topic="{topic}"}}'
    warned = 'riskwatch_warnings_total{job="riskwatch",category="large_transaction",level="medium"}'
    prometheus.wait("the worker up", lambda: prometheus.value('up{job="riskwatch"}') == 1)
    # The warning counter exists at zero before any warning: increase() will see the first one.
    prometheus.wait("a primed warning series", lambda: prometheus.value(warned) == 0)

    first = [(b"acct-1", json.dumps(make_txn(minutes=i)).encode()) for i in range(5)] + [(b"acct-1", b"not json")]
    produce(settings, TRANSACTIONS, first)
    prometheus.wait("the first events counted", lambda: (prometheus.value(consumed) or 0) >= 6)
    produce(settings, TRANSACTIONS, [(b"acct-1", json.dumps(make_txn(minutes=10, amount=60000)).encode())])
    prometheus.wait("the count move", lambda: (prometheus.value(consumed) or 0) >= 7)
    prometheus.wait("the warning in increase()", lambda: (prometheus.value(f"increase({warned}[1m])") or 0) > 0)

    expected = {
        "riskwatch_events_consumed_total", "riskwatch_events_scored_total", "riskwatch_events_published_total",
        "riskwatch_warnings_total", "riskwatch_rule_hits_total", "riskwatch_processing_seconds_bucket",
        "riskwatch_event_to_warning_seconds_bucket", "riskwatch_event_time_lag_seconds",
        "riskwatch_consumer_lag_messages", "riskwatch_score_bucket", "riskwatch_entities",
        "riskwatch_rules_version", "riskwatch_storm_dropped_total", "riskwatch_deadletters_total",
        "riskwatch_top_entity_warnings",
    }

    def missing() -> set[str]:
        query = 'count by (__name__) ({__name__=~"riskwatch_.+"})'
        return expected - {r["metric"]["__name__"] for r in prometheus.query(query)}

    # Consumer lag is measured every two seconds, from the end offsets of the first fetches.
    prometheus.wait("every riskwatch series", lambda: not missing(), timeout=30)
    assert prometheus.value(f'riskwatch_deadletters_total{{topic="{topic}",reason="invalid_json"}}') == 1
    assert (prometheus.value(f'riskwatch_event_time_lag_seconds{{job="riskwatch",topic="{topic}"}}') or 0) > 0
    prometheus.wait("the accounts table size", lambda: prometheus.value(
        'riskwatch_entities{job="riskwatch",table="accounts"}') == 1)

    # The shipped recording rules evaluate against the real series.
    prometheus.wait("the recording rule", lambda: (prometheus.value(
        f'topic:riskwatch_events_consumed:rate5m{{topic="{topic}"}}') or 0) > 0)
    prometheus.wait("the lag recording rule", lambda: prometheus.value(
        f'topic:riskwatch_consumer_lag_messages:sum{{topic="{topic}"}}') is not None)


def test_every_alert_rule_links_a_runbook_section_that_exists_in_the_readme() -> None:
    rules = yaml.safe_load((PROMETHEUS_DIR / "riskwatch-rules.yml").read_text())
    alerts = [r for g in rules["groups"] for r in g["rules"] if "alert" in r]
    # GitHub's anchor for a heading "### Name" is "#name".
    anchors = {line[4:].strip().lower() for line in (ROOT / "README.md").read_text().splitlines()
               if line.startswith("### ")}
    assert alerts
    for rule in alerts:
        link = rule["annotations"]["runbook"]
        assert link.startswith("README.md#") and link.split("#", 1)[1] in anchors, rule["alert"]
