"""What other clients send is read like riskwatch's own: any compression codec, Schema Registry's JSON framing.

A producer picks its codec, and Java's and librdkafka's are often snappy, lz4 or zstd. Measured
before the codecs were dependencies: the first snappy batch from Kafka's console producer stopped the
engine in a retry loop ("Libraries for snappy compression codec not found"), nothing scored again.
Platforms on Confluent's stack produce with the JSON Schema serializer: JSON behind a 5-byte header
(a zero byte, the schema id), every such record dead-lettered as "not valid JSON" before.
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
from app.faust_app import ALERTS, CODECS, DEADLETTER, TRANSACTIONS
from models.synth import generate
from tests.conftest import ROOT, consume, produce, settings_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LABELS = ("label", "scenario", "scenario_instance")


def test_every_codec_and_schema_registry_json_are_scored_and_zstd_output_is_read(settings, start_worker,
                                                                                      tmp_path):
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
    # In time order, a fifth of the day in each codec by Kafka's own (Java) producer, the last fifth
    # framed as Confluent's JSON Schema serializer frames it (schema id 7).
    cut = [i * n // (len(CODECS) + 1) for i in range(len(CODECS) + 2)]
    for i, codec in enumerate(CODECS):
        part = tmp_path / f"{codec}.txt"
        part.write_text("".join(lines[cut[i]:cut[i + 1]]))
        producer = [str(Path(java) / "bin" / "java") if java else "java", "-cp", f"{libs}/*",
                    "org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server", s.kafka_bootstrap,
                    "--topic", topic, "--compression-codec", codec, "--property", "parse.key=true",
                    "--property", "key.separator=\t"]
        with open(part, "rb") as stdin:
            done = subprocess.run(producer, stdin=stdin, capture_output=True, timeout=180, check=False)
        assert done.returncode == 0, done.stderr.decode()[-2000:]
        deadline = time.monotonic() + 60
        while worker.metric("riskwatch_events_scored_total", topic=topic) < cut[i + 1]:
            assert time.monotonic() < deadline, f"{codec}-compressed records were not scored:\n{worker.tail()}"
            time.sleep(0.3)
    header = b"\x00" + (7).to_bytes(4, "big")
    framed = [line.rstrip("\n").split("\t", 1) for line in lines[cut[-2]:]]
    avro = header + b"\x02\x0eA000001"  # Avro behind the same header: set aside with what to do
    produce(s, TRANSACTIONS, [(key.encode(), header + body.encode()) for key, body in framed] + [(b"A000001", avro)])
    deadline = time.monotonic() + 60
    while worker.metric("riskwatch_deadletters_total", topic=topic) < 1:
        assert time.monotonic() < deadline, f"framed records not all read:\n{worker.tail()}"
        time.sleep(0.3)

    assert worker.metric("riskwatch_events_scored_total", topic=topic) == n
    assert worker.metric("riskwatch_deadletters_total", topic=topic) == 1
    dead = consume(s, DEADLETTER, lambda got: len(got) >= 1, timeout=30)
    assert [d["reason"] for d in dead] == [
        "Confluent Schema Registry framing (schema id 7) around a value that is not JSON (Avro or Protobuf?): "
        "riskwatch reads JSON events; produce with the JSON Schema serializer or plain JSON"], dead
    assert worker.metric("riskwatch_engine_phase", phase="running") == 1
    assert "batch failed" not in worker.tail(400)

    # The worker writes zstd; kafka-python (what these helpers and the CLI use) reads it back.
    alerts = consume(s, ALERTS, lambda got: len(got) > 0, timeout=30)
    assert {a["category"] for a in alerts} & {"card_testing", "account_takeover"}, alerts[:3]
    # Kafka replay reads the input through kafka-python: every codec, every framed record.
    subprocess.run([sys.executable, "-m", "app.cli", "replay", "--from-kafka", "--since", since.isoformat(),
                    "--run-id", "codecs", "--alerts", str(tmp_path / "alerts.jsonl"), "--report",
                    str(tmp_path / "report")], cwd=ROOT, env=settings_env(s), check=True, capture_output=True,
                   timeout=300)
    read = json.loads((tmp_path / "report" / "report.json").read_text())["events"]
    assert (read["records"], read["scored"]) == (n + 1, n), read
