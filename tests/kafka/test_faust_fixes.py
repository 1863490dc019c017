"""riskwatch's Faust transport: wired by the broker scheme, leaves Faust itself unchanged, and each fix does its job."""

from __future__ import annotations

import asyncio
import logging
import subprocess
import sys
import textwrap
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import faust
import pytest
from faust.transport.drivers import aiokafka as faust_aiokafka
from faust.transport.producer import ProducerBuffer
from faust.types import TP
from prometheus_client import CollectorRegistry

from app import faust_fixes
from app.faust_fixes import DrainingProducerBuffer, RiskwatchConsumer, RiskwatchProducer, RiskwatchTransport
from app.metrics import Metrics
from app.settings import Settings

ROOT = Path(__file__).resolve().parents[2]

# Runs in a fresh interpreter: every Faust, mode and aiokafka class and module global loaded before
# riskwatch is imported must be the same object afterwards (a dict or list also equal in content),
# except the entries mode's Service adds to `_tasks` for each new subclass (StateTable, ours).
_SNAPSHOT = textwrap.dedent('''
    import sys
    import faust, faust.transport.consumer, faust.transport.producer, faust.transport.drivers.aiokafka
    import faust.serializers.codecs, faust.tables.table, faust.tables.recovery
    from mode.utils.imports import FactoryMapping

    def snapshot():
        out = {}
        for name, mod in list(sys.modules.items()):
            if not name.split(".")[0] in ("faust", "mode", "aiokafka") or mod is None:
                continue
            for key, value in list(vars(mod).items()):
                out[(name, key)] = value
                if isinstance(value, type) and value.__module__ == name:
                    for attr, member in list(vars(value).items()):
                        out[(name, key, attr)] = member
        return {k: (v, content(v)) for k, v in out.items()}

    def content(v):
        if isinstance(v, FactoryMapping):  # Faust's registries: transports, stores, codecs...
            return dict(v.aliases)
        return dict(v) if isinstance(v, dict) else list(v) if isinstance(v, list) else None

    before = snapshot()
    import {modules}
    {after_import}
    after = snapshot()
    def same(k, v, c):
        if k not in after or after[k][0] is not v:
            return False
        now = after[k][1]
        if k[-1] == "_tasks" and c is not None:  # mode files every Service subclass here, by class id
            now = {cid: tasks for cid, tasks in now.items() if cid in c}
        return c is None or now == c

    changed = sorted(".".join(k) for k, (v, c) in before.items() if not same(k, v, c))
    print("\\n".join(changed))
''')


def _changed_by(modules: str, after_import: str = "") -> list[str]:
    code = _SNAPSHOT.replace("{modules}", modules).replace("{after_import}", after_import)
    out = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert out.returncode == 0, out.stderr
    return [line for line in out.stdout.splitlines() if line]


def test_importing_riskwatch_changes_nothing_in_faust() -> None:
    """Faust's methods were replaced process-wide at import (and its unpickler allowlist widened): no longer."""
    assert _changed_by("app.faust_app, app.worker") == []


def test_create_app_only_adds_the_riskwatch_scheme_to_fausts_transport_registry(tmp_path: Path) -> None:
    after = f"app.faust_app.create_app(app.settings.Settings(data_dir={str(tmp_path)!r}))"
    assert _changed_by("app.faust_app, app.settings", after) == ["faust.transport.drivers.TRANSPORTS"], (
        "the registry gains a name; no Faust class or other global changes")


def _settings(tmp_path: Path) -> Settings:
    return Settings(topic_prefix="u.", app_id="u", data_dir=tmp_path, kafka_bootstrap="127.0.0.1:1,127.0.0.2:1")


def test_the_app_gets_riskwatchs_consumer_and_producer_and_another_faust_app_faust_s_own(tmp_path: Path) -> None:
    from app.faust_app import create_app

    loop = asyncio.new_event_loop()
    asyncio.set_event_loop(loop)
    try:
        app = create_app(_settings(tmp_path), Metrics(CollectorRegistry())).app
        assert [str(u) for u in app.conf.broker] == ["riskwatch://127.0.0.1:1", "riskwatch://127.0.0.2:1"]
        assert type(app.transport) is RiskwatchTransport
        assert type(app.consumer) is RiskwatchConsumer
        assert type(app.producer) is RiskwatchProducer
        assert type(app.producer.buffer) is DrainingProducerBuffer
        assert app.producer.buffer.app is app
        assert app.producer.buffer.beacon.parent is app.producer.beacon
        assert [n.data for n in app.producer.beacon.children].count(app.producer.buffer) == 1, (
            "the stock buffer Faust built first is gone from the service graph")

        other = faust.App("unit-other", broker="kafka://127.0.0.1:1")
        assert type(other.transport) is faust_aiokafka.Transport
        assert type(other.consumer) is faust_aiokafka.Consumer
        assert type(other.producer.buffer) is ProducerBuffer
    finally:
        asyncio.set_event_loop(None)
        loop.close()


def test_an_untested_faust_runs_on_fausts_own_transport_and_says_so(monkeypatch: pytest.MonkeyPatch,
                                                                    caplog: pytest.LogCaptureFixture) -> None:
    monkeypatch.setattr(faust, "__version__", "0.16.0")
    with caplog.at_level(logging.WARNING, logger="riskwatch.faust_fixes"):
        assert faust_fixes.transport_scheme() == "kafka"
    assert "faust-streaming 0.16.0 is not a version" in caplog.text
    monkeypatch.setattr(faust, "__version__", "0.15.3")
    assert faust_fixes.transport_scheme() == "riskwatch"


def test_the_buffer_flush_waits_for_sends_slower_than_a_tenth_of_a_second() -> None:
    sent: list[Any] = []

    class SlowChannel:
        """Stands in for the topic: the client takes 0.3 s to accept each message (a loaded broker)."""

        async def publish_message(self, fut: Any, wait: bool = True) -> None:
            await asyncio.sleep(0.3)
            sent.append(fut)

    async def run() -> None:
        buffer = DrainingProducerBuffer()
        buffer.app = faust.App("unit-flush", broker="kafka://127.0.0.1:1")
        await buffer.start()
        try:
            for _ in range(3):
                buffer.put(SimpleNamespace(message=SimpleNamespace(channel=SlowChannel())))
            await buffer.flush()
            # Faust's own flush returned after 0.1 s with all three still pending.
            assert len(sent) == 3, f"flush returned with {3 - len(sent)} changelog writes not handed over"
        finally:
            await buffer.stop()

    asyncio.run(run())


def test_a_partition_whose_commits_stall_behind_a_hole_is_read_again_from_its_committed_offset() -> None:
    tp, busy = TP("t", 1), TP("t", 2)
    sought: list[dict[Any, int]] = []

    async def seek_wait(targets: dict[Any, int]) -> None:
        sought.append(dict(targets))

    consumer = SimpleNamespace(
        app=SimpleNamespace(rebalancing=False),
        # Partition 1: committed 100, offsets 103-105 acked, 100-102 never reached the agent.
        # Partition 2: the same hole, but offset 100 is still being processed: not a stall.
        _acked={tp: [103, 104, 105], busy: [103]},
        _committed_offset={tp: 100, busy: 100},
        _unacked_messages=[SimpleNamespace(tp=busy, offset=100)],
        _stalls={},
        seek_wait=seek_wait,
    )
    heal = RiskwatchConsumer._heal_stalled_commits
    asyncio.run(heal(consumer))
    assert sought == [], "one look is not a stall: the hole may be filled by the next batch"
    asyncio.run(heal(consumer))
    assert sought == [{tp: 100}]
    consumer._acked[tp] = [100, 101]  # read again: the commits go on, nothing more to heal
    asyncio.run(heal(consumer))
    asyncio.run(heal(consumer))
    assert sought == [{tp: 100}]


def test_a_commit_never_moves_past_a_single_missing_record() -> None:
    from collections import defaultdict

    from intervaltree import IntervalTree

    tp = TP("t", 0)
    consumer = SimpleNamespace(_acked={tp: [101, 102]}, _gap=defaultdict(IntervalTree), _committed_offset={tp: 100},
                               _acked_index={tp: {101, 102}})
    assert RiskwatchConsumer._new_offset(consumer, tp) is None, "Faust's own returned 103, skipping offset 100"
    consumer._acked[tp] = [100, 101, 102]
    assert RiskwatchConsumer._new_offset(consumer, tp) == 103


def test_a_codec_either_kafka_client_lacks_is_named(monkeypatch: pytest.MonkeyPatch) -> None:
    """lz4's module alone once made a worker that aiokafka refused to produce with (it needs cramjam)."""
    import aiokafka.codec
    import kafka.codec

    from app.faust_app import missing_codecs

    assert missing_codecs() == [], "the dependencies read every codec a producer may use"
    monkeypatch.setattr(aiokafka.codec, "cramjam", None)
    assert missing_codecs() == ["snappy", "lz4", "zstd"], "aiokafka reads all three through cramjam"
    monkeypatch.undo()
    monkeypatch.setattr(kafka.codec, "zstd", None)
    assert missing_codecs() == ["zstd"], "Kafka replay and the CLI could not read zstd"
