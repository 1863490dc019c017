"""Producers that compress (snappy, lz4, zstd, gzip) are read like any other, and the worker's own output can be too.

A producer picks its codec, and Java's and librdkafka's are often snappy, lz4 or zstd. Measured
before the codecs were dependencies: the first snappy batch from Kafka's console producer stopped the
engine in a retry loop ("Libraries for snappy compression codec not found"), nothing scored again.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from datetime import UTC, datetime, timedelta
from pathlib import Path

import pytest

from app import kafka_local
from app.admin import ensure_topics
from app.faust_app import ALERTS, CODECS, TRANSACTIONS
from models.synth import generate
from tests.conftest import ROOT, consume, settings_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LABELS = ("label", "scenario", "scenario_instance")


def test_records_in_every_codec_are_scored_and_zstd_output_is_read(settings, start_worker, tmp_path):
    s = settings.model_copy(update={"kafka_compression": "zstd"})
    lines = [f"{e['account_id']}\t{json.dumps({k: v for k, v in e.items() if k not in LABELS})}\n"
             for e in generate(seed=43, accounts=120, days=1.0, instruments=0, scenarios=["card_testing", "takeover"])
             if "account_id" in e]
    n = len(lines)
    ensure_topics(s)
    worker = start_worker(s)
    topic = s.topic(TRANSACTIONS)
    since = datetime.now(UTC) - timedelta(minutes=1)  # record times: the producer's clock
    libs = kafka_local.ensure_jars()
    java = os.environ.get("JAVA_HOME")
    # In time order, a quarter of the day in each codec, by Kafka's own (Java) producer.
    for i, codec in enumerate(CODECS):
        part = tmp_path / f"{codec}.txt"
        part.write_text("".join(lines[i * n // len(CODECS):(i + 1) * n // len(CODECS)]))
        producer = [str(Path(java) / "bin" / "java") if java else "java", "-cp", f"{libs}/*",
                    "org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server", s.kafka_bootstrap,
                    "--topic", topic, "--compression-codec", codec, "--property", "parse.key=true",
                    "--property", "key.separator=\t"]
        with open(part, "rb") as stdin:
            done = subprocess.run(producer, stdin=stdin, capture_output=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        deadline = time.monotonic() + 60
        while worker.metric("riskwatch_events_scored_total", topic=topic) < (i + 1) * n // len(CODECS):
            assert time.monotonic() < deadline, f"{codec}-compressed records were not scored:\n{worker.tail()}"
            time.sleep(0.3)

    assert worker.metric("riskwatch_events_scored_total", topic=topic) == n
    assert worker.metric("riskwatch_deadletters_total", topic=topic) == 0
    assert worker.metric("riskwatch_engine_phase", phase="running") == 1
    assert "batch failed" not in worker.tail(400)

    # The worker writes zstd; kafka-python (what these helpers and the CLI use) reads it back.
    alerts = consume(s, ALERTS, lambda got: len(got) > 0, timeout=30)
    assert {a["category"] for a in alerts} & {"card_testing", "account_takeover"}, alerts[:3]
    # Kafka replay reads the input through kafka-python: every codec, every record.
    subprocess.run([sys.executable, "-m", "app.cli", "replay", "--from-kafka", "--since", since.isoformat(),
                    "--run-id", "codecs", "--alerts", str(tmp_path / "alerts.jsonl"), "--report",
                    str(tmp_path / "report")], cwd=ROOT, env=settings_env(s), check=True, capture_output=True,
                   timeout=300)
    read = json.loads((tmp_path / "report" / "report.json").read_text())["events"]
    assert (read["records"], read["scored"]) == (n, n), read
