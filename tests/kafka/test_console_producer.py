"""A worker fed by Kafka's own console producer (Java, keyed by account) warns as a file replay does.

Replay is what analysts trust to predict the worker: the same events must give the same warnings,
whoever produced them. Here the producer is not one of riskwatch's Python clients but Kafka's
`ConsoleProducer` from its tools jar, so the partition each account lands in is the Java client's
own murmur2, and replay's partitioning (models/pipeline.py) has to agree with it for the per-partition
detectors to see the same events in the same order.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import time
from pathlib import Path

import pytest

from app import kafka_local
from app.admin import ensure_topics
from app.faust_app import ALERTS, TRANSACTIONS
from models.synth import generate
from tests.conftest import ROOT, consume, last_versions, settings_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

LABELS = ("label", "scenario", "scenario_instance")


def _events(path: Path) -> int:
    """Write a labelled synthetic stream's transactions, labels stripped, as `key<TAB>json` lines; return the count."""
    n = 0
    with open(path, "w") as f:
        for e in generate(seed=29, accounts=240, days=2.0, instruments=0):
            if "account_id" not in e:
                continue
            body = {k: v for k, v in e.items() if k not in LABELS}
            f.write(f"{body['account_id']}\t{json.dumps(body, separators=(',', ':'))}\n")
            n += 1
    return n


def test_a_worker_fed_by_kafkas_console_producer_warns_as_a_file_replay(settings, start_worker, tmp_path):
    s = settings
    keyed = tmp_path / "keyed.txt"
    n = _events(keyed)
    plain = tmp_path / "events.jsonl"
    plain.write_text("".join(line.split("\t", 1)[1] for line in keyed.read_text().splitlines(keepends=True)))

    # The analyst's prediction: `riskwatch replay` of the same events with the worker's settings.
    replayed = tmp_path / "replayed.jsonl"
    subprocess.run([sys.executable, "-m", "app.cli", "replay", str(plain), "--alerts", str(replayed),
                    "--partitions", str(s.topic_partitions)], cwd=ROOT, env=settings_env(s), check=True,
                   capture_output=True, timeout=300)
    expected = last_versions([json.loads(line) for line in replayed.read_text().splitlines()])
    assert len({v[0] for v in expected.values()}) >= 4, f"too few kinds of warning to compare: {expected}"

    ensure_topics(s)
    worker = start_worker(s)
    libs = kafka_local.ensure_jars()
    java = os.environ.get("JAVA_HOME")
    producer = [str(Path(java) / "bin" / "java") if java else "java", "-cp", f"{libs}/*",
                "org.apache.kafka.tools.ConsoleProducer", "--bootstrap-server", s.kafka_bootstrap,
                "--topic", s.topic(TRANSACTIONS), "--property", "parse.key=true",
                "--property", "key.separator=\t"]
    with open(keyed, "rb") as stdin:
        done = subprocess.run(producer, stdin=stdin, capture_output=True, timeout=180, check=False)
    assert done.returncode == 0, done.stderr.decode()[-2000:]

    topic = s.topic(TRANSACTIONS)
    deadline = time.monotonic() + 120
    while worker.metric("riskwatch_events_scored_total", topic=topic) < n:
        assert time.monotonic() < deadline, f"the worker scored only part of {n} events:\n{worker.tail()}"
        time.sleep(0.5)
    got = consume(s, ALERTS, lambda msgs: set(expected) <= {m["alert_id"] for m in msgs}, timeout=60)
    time.sleep(2.0)  # later versions of the same warnings, if any, are on the topic by now
    got = consume(s, ALERTS, lambda msgs: len(msgs) >= len(got), timeout=30)
    actual = last_versions(got)

    only_replay = {k: v for k, v in expected.items() if k not in actual}
    only_worker = {k: v for k, v in actual.items() if k not in expected}
    differ = {k: (expected[k], actual[k]) for k in expected.keys() & actual.keys() if expected[k] != actual[k]}
    assert not (only_replay or only_worker or differ), (
        f"{len(expected)} warnings replayed, {len(actual)} from the worker; only in replay: {only_replay}; "
        f"only from the worker: {only_worker}; different: {differ}")
    assert worker.metric("riskwatch_deadletters_total", topic=topic) == 0
    assert worker.metric("riskwatch_engine_phase", phase="running") == 1
    assert worker.metric("riskwatch_engine_phase") == 1, "one phase at a time"
    kinds: dict[str, int] = {}
    for v in expected.values():
        kinds[v[0]] = kinds.get(v[0], 0) + 1
    print(f"console producer: {n} events, {len(expected)} warnings the same from worker and replay: {kinds}")
