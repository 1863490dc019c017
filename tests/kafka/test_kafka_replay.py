"""Kafka replay on a real broker: a time range of the live topics gives the file replay's warnings, in isolation."""

from __future__ import annotations

import json
import subprocess
import sys
import time
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition

from app.admin import admin, consumer, ensure_topics, producer
from app.faust_app import ALERTS, MARKET, TRANSACTIONS
from app.settings import Settings
from models.synth import generate, write_jsonl
from tests.conftest import settings_env

pytestmark = pytest.mark.kafka
ROOT = Path(__file__).resolve().parents[2]
CLI = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]
HOUR_MS = 3_600_000


def run_cli(s: Settings, *args: str | Path) -> str:
    """Run `riskwatch ...` against the test's namespace; return stdout, fail on a non-zero exit."""
    proc = subprocess.run(
        [*CLI, *map(str, args)], cwd=ROOT, env=settings_env(s), capture_output=True, text=True, timeout=300
    )
    assert proc.returncode == 0, proc.stderr[-3000:]
    return proc.stdout


def end_offsets(s: Settings, topic: str) -> int:
    """Sum of a topic's end offsets: how many messages it ever held."""
    c = consumer(s)
    try:
        tps = [TopicPartition(topic, p) for p in c.partitions_for_topic(topic) or ()]
        return sum(c.end_offsets(tps).values()) if tps else 0
    finally:
        c.close()


def iso(ms: int) -> str:
    """Epoch milliseconds as RFC 3339 UTC."""
    return datetime.fromtimestamp(ms / 1000, UTC).isoformat()


@pytest.fixture
def history(settings: Settings) -> tuple[list[list[dict[str, Any]]], int]:
    """Live topics holding three hours of record time, one part per hour; returns the parts and the middle's start."""
    ensure_topics(settings)
    events, seen = [], set()
    for e in generate(seed=5, accounts=50, days=1.0, instruments=2):
        if e["ts"] not in seen:  # equal event times from different partitions have no single order
            seen.add(e["ts"])
            events.append(e)
    n = len(events)
    parts = [events[: n // 5], events[n // 5 : 4 * n // 5], events[4 * n // 5 :]]
    base = (int(time.time() * 1000) - 4 * HOUR_MS) // HOUR_MS * HOUR_MS
    p = producer(settings, linger_ms=20)
    try:
        for k, part in enumerate(parts):
            for i, e in enumerate(part):
                topic, key = (
                    (MARKET, e["instrument"]) if e["event_type"] == "market" else (TRANSACTIONS, e["account_id"])
                )
                # Record time (what offsets_for_times searches) is the hour the part was "produced" in.
                p.send(
                    settings.topic(topic),
                    key=key.encode(),
                    value=json.dumps(e).encode(),
                    timestamp_ms=base + k * HOUR_MS + i,
                )
        p.flush(60)
    finally:
        p.close()
    return parts, base + HOUR_MS


def test_kafka_replay_equals_file_replay_and_leaves_live_topics_alone(
    settings: Settings, history: tuple[list[list[dict[str, Any]]], int], tmp_path: Path
) -> None:
    (_, middle, _), since = history
    write_jsonl(middle, tmp_path / "middle.jsonl")
    live_alerts = settings.topic(ALERTS)
    assert end_offsets(settings, live_alerts) == 0

    run_cli(
        settings,
        "replay",
        tmp_path / "middle.jsonl",
        "--alerts",
        tmp_path / "file" / "alerts.jsonl",
        "--scores",
        tmp_path / "file" / "scores.jsonl",
    )
    out = run_cli(
        settings,
        "replay",
        "--from-kafka",
        "--since",
        iso(since),
        "--until",
        iso(since + HOUR_MS),
        "--run-id",
        "t1",
        "--alerts",
        tmp_path / "kafka" / "alerts.jsonl",
        "--scores",
        tmp_path / "kafka" / "scores.jsonl",
    )

    file_alerts = (tmp_path / "file" / "alerts.jsonl").read_bytes()
    assert file_alerts.count(b"\n") >= 5
    assert (tmp_path / "kafka" / "alerts.jsonl").read_bytes() == file_alerts
    assert (tmp_path / "kafka" / "scores.jsonl").read_bytes() == (tmp_path / "file" / "scores.jsonl").read_bytes()

    # The warnings went to the replay's own namespace, and nowhere live.
    isolated = f"{settings.topic_prefix}replay.t1.{ALERTS}"
    assert isolated in out
    assert end_offsets(settings, isolated) == file_alerts.count(b"\n")
    assert end_offsets(settings, live_alerts) == 0
    group = admin(settings)
    try:
        gid = f"{settings.deployment_id}-replay-t1"
        committed = group.list_group_offsets(gid)[gid]
    finally:
        group.close()
    # The replay's own group records how far it read; the live worker's group is never used.
    assert {tp.topic for tp in committed} == {settings.topic(TRANSACTIONS), settings.topic(MARKET)}


def test_kafka_replay_without_until_stops_at_the_end_offsets(
    settings: Settings, history: tuple[list[list[dict[str, Any]]], int], tmp_path: Path
) -> None:
    (_, middle, last), since = history
    out = run_cli(
        settings,
        "replay",
        "--from-kafka",
        "--since",
        iso(since),
        "--run-id",
        "t2",
        "--scores",
        tmp_path / "scores.jsonl",
    )
    scored = {json.loads(x)["event_id"] for x in (tmp_path / "scores.jsonl").read_text().splitlines()}
    # From the middle hour to the end offsets: the middle and last parts, never the first hour's events.
    assert scored == {e["event_id"] for e in middle + last}
    assert f"replayed {len(scored):,} events" in out


def test_kafka_replay_reports_a_missing_topic(settings: Settings) -> None:
    proc = subprocess.run(
        [*CLI, "replay", "--from-kafka", "--since", "2026-11-01T00:00:00Z"],
        cwd=ROOT,
        env=settings_env(settings),
        capture_output=True,
        text=True,
        timeout=120,
    )
    assert proc.returncode == 2
    assert "does not exist" in proc.stderr and proc.stderr.count("\n") == 1
