"""Event-to-warning latency at a steady offered load, as a consumer of risk.alerts sees it."""

from __future__ import annotations

import asyncio
import json
import math
import time
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from app.faust_app import ALERTS
from bench.common import Data, Figure, Report, loadavg
from bench.endtoend import STORM_CAP
from bench.kafka import Namespace, Worker

GROUP = "latency"
TRIGGER_AMOUNT = 60_000.0  # above deploy/rules.yaml's CNY 50,000 reporting threshold: a large_transaction warning
BUDGET_MS = 250.0
CONSUMED = "riskwatch_events_consumed_total"


@dataclass
class Run:
    """What one offered-load run sent and saw."""

    rate: float
    seconds: float
    warmup: float
    sent: int = 0
    triggers: int = 0  # trigger events sent after the warm-up
    send_seconds: float = 0.0
    latencies: list[float] = field(default_factory=list)  # seconds from trigger event time to its warning
    pending: dict[str, float] = field(default_factory=dict)  # trigger event id -> event time, not yet warned
    categories: dict[str, int] = field(default_factory=dict)  # every warning received, by category


def _templates(data: Data) -> list[dict[str, Any]]:
    # Normal traffic is the generated mix; amounts the generator made large are tamed so that only
    # the planted triggers cross the reporting threshold and the warning count is known.
    out = []
    for raw in data.values:
        e = json.loads(raw)
        if e.get("label"):
            continue  # the generator's risk scenarios would add warnings nobody planted
        if e["amount"] >= 0.5 * TRIGGER_AMOUNT:
            e["amount"] = 100.0
        out.append(e)
    return out


async def _offer(ns: Namespace, templates: list[dict[str, Any]], run: Run, share: float, drain: float) -> None:
    from aiokafka import AIOKafkaConsumer, AIOKafkaProducer, TopicPartition

    alerts_topic = ns.prefix + ALERTS
    producer = AIOKafkaProducer(bootstrap_servers=ns.bootstrap, acks=1, linger_ms=1)
    consumer = AIOKafkaConsumer(bootstrap_servers=ns.bootstrap, group_id=None, enable_auto_commit=False,
                                auto_offset_reset="latest", fetch_max_wait_ms=50)
    await producer.start()
    await consumer.start()
    try:
        parts = await producer.partitions_for(alerts_topic)
        consumer.assign([TopicPartition(alerts_topic, p) for p in parts])
        await consumer.seek_to_end()
        tag = f"{time.time_ns():x}"
        every = max(1, round(1 / share))
        t_start = time.time()
        t_measure = t_start + run.warmup
        stop = asyncio.Event()

        async def receive() -> None:
            while True:
                batches = await consumer.getmany(timeout_ms=100)
                now = time.time()
                for records in batches.values():
                    for r in records:
                        a = json.loads(r.value)
                        run.categories[a["category"]] = run.categories.get(a["category"], 0) + 1
                        # The first warning naming a trigger as its latest event answers it.
                        sent_at = run.pending.pop(a["event_ids"][-1], None)
                        if sent_at is not None:
                            run.latencies.append(now - sent_at)
                if stop.is_set() and not batches:
                    return

        receiver = asyncio.create_task(receive())
        total = int(run.rate * (run.warmup + run.seconds))
        i = 0
        while i < total:
            due = int((time.time() - t_start) * run.rate) + 1
            while i < min(due, total):
                e = dict(templates[i % len(templates)])
                e["event_id"] = f"lat-{tag}-{i}"
                now = time.time()
                # Event time is the wall clock at send: what a payment platform's producer would stamp.
                e["ts"] = datetime.fromtimestamp(now, UTC).isoformat(timespec="microseconds")
                if i % every == 0:
                    e["amount"] = TRIGGER_AMOUNT
                    if now >= t_measure:
                        run.triggers += 1
                        run.pending[e["event_id"]] = datetime.fromisoformat(e["ts"]).timestamp()
                await producer.send(ns.transactions, json.dumps(e, separators=(",", ":")).encode(),
                                    key=e["account_id"].encode())
                i += 1
            await asyncio.sleep(max(0.0, t_start + (i + 1) / run.rate - time.time()))
        await producer.flush()
        run.sent = total
        run.send_seconds = time.time() - t_start
        # Wait for the last warnings; a worker that cannot keep up leaves some undelivered.
        deadline = time.monotonic() + drain
        while run.pending and time.monotonic() < deadline:
            await asyncio.sleep(0.1)
        stop.set()
        await asyncio.wait_for(receiver, timeout=10)
    finally:
        await consumer.stop()
        await producer.stop()


def _percentile(values: list[float], q: float) -> float:
    """Nearest-rank percentile; inf entries stand for warnings never delivered."""
    s = sorted(values)
    return s[max(0, math.ceil(q / 100 * len(s)) - 1)]


def offered_load(report: Report, data: Data, bootstrap: str, work: Path, rates: list[float], seconds: float,
                 warmup: float = 3.0, share: float = 0.01, drain: float = 20.0) -> list[Figure]:
    """For each rate, a fresh worker offered that load for `seconds` after a warm-up: p50/p95/p99 per rate.

    Every rate gets its own worker and namespace, so a backlog left by one cannot delay the next.
    """
    figures: list[Figure] = []
    templates = _templates(data)
    for rate in rates:
        ns = Namespace(bootstrap, work)
        ns.create()
        try:
            w = Worker(ns, work / f"worker-latency-{rate:.0f}.log", RISKWATCH_STORM_CAP_PER_MINUTE=STORM_CAP)
            try:
                w.wait_ready()
                load = loadavg()
                run = Run(rate, seconds, warmup)
                cpu0, consumed0 = w.cpu_seconds(), w.scrape().get(CONSUMED, 0.0)
                t0 = time.monotonic()
                asyncio.run(_offer(ns, templates, run, share, drain))
                cpu = w.cpu_seconds() - cpu0
                consumed = w.scrape().get(CONSUMED, 0.0) - consumed0
                elapsed = time.monotonic() - t0
            finally:
                w.stop()
        finally:
            ns.delete()
        figures += _figures(report, run, load, drain, {
            "worker_cpu_seconds": round(cpu, 2),
            "worker_consumed": int(consumed),
            "worker_kept_up": consumed >= run.sent,
            "worker_consume_rate": round(consumed / elapsed),
        }, share)
    return figures


def _figures(report: Report, run: Run, load: list[float], drain: float, extra: dict[str, Any],
             share: float) -> list[Figure]:
    missing = len(run.pending)
    lat = run.latencies + [math.inf] * missing
    rate = run.rate
    detail = {
        "offered_rate": rate,
        "achieved_send_rate": round(run.sent / run.send_seconds) if run.send_seconds else 0,
        "seconds": run.seconds,
        "warmup_seconds": run.warmup,
        "trigger_share": share,
        "triggers_after_warmup": run.triggers,
        "warnings_received": len(run.latencies),
        "warnings_by_category": run.categories,
        "undelivered_after_drain": missing,
        "drain_seconds": drain,
        "storm_cap_per_minute": int(STORM_CAP),
        **extra,
    }
    if not lat:
        report.note(GROUP, f"{rate:,.0f}/s: no trigger was sent after the warm-up; nothing to measure")
        return []
    p = {q: _percentile(lat, q) for q in (50, 95, 99)}
    for q, v in p.items():
        detail[f"p{q}_ms"] = round(v * 1000, 1) if math.isfinite(v) else None
    if missing:
        report.note(GROUP, f"{rate:,.0f}/s: {missing} of {run.triggers} warnings had not arrived {drain:.0f} s after "
                           f"the last send (counted as infinitely late); the worker consumed "
                           f"{extra['worker_consume_rate']:,}/s against {rate:,.0f}/s offered")
    out = []
    for q, v in p.items():
        # A percentile that lands on an undelivered warning is only known to exceed the wait.
        finite = math.isfinite(v)
        value = v * 1000 if finite else drain * 1000
        label = f"latency p{q} at {rate:,.0f}/s offered" + ("" if finite else " (lower bound)")
        target = f"<= {BUDGET_MS:.0f} ms" if q == 99 and rate == 1000 else None
        out.append(report.add(Figure(GROUP, f"latency_{rate:.0f}_p{q}", label, value, "ms", target=target,
                                     load_before=load, detail=detail)))
    return out


__all__ = ["offered_load"]
