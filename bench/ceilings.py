"""Ceilings: the fastest anything can go here: parse+validate only, a bare consume loop, bare produce loops."""

from __future__ import annotations

from bench.common import Data, Figure, Report, clocked, loadavg
from bench.kafka import Namespace, consume, produce
from models.schemas import Transaction, decode_event

GROUP = "ceilings"
PARSE = "parse_validate"
CONSUME = "bare_consume"
PRODUCE = "bare_produce"


def parse_validate(report: Report, data: Data) -> Figure:
    """pydantic parse+validate of every transaction (models.schemas.decode_event), nothing else: the CPU ceiling."""
    load = loadavg()
    values = data.values
    decode_event(values[0], Transaction)  # first call builds pydantic's validator caches
    with clocked() as c:
        for raw in values:
            decode_event(raw, Transaction)
    return report.add(Figure(GROUP, PARSE, "ceiling: parse+validate only", len(values) / c.wall, "events/s",
                             load_before=load, detail=_detail(len(values), c.wall, c.cpu)))


def kafka(report: Report, data: Data, ns: Namespace) -> None:
    """Bare produce loops into the namespace's transactions topic, then a bare consume loop over it."""
    load = loadavg()
    half = len(data) // 2
    # The same records twice: once one await per record (what Faust's send does), once batch by batch.
    sec = produce(ns.bootstrap, ns.transactions, data.keys[:half], data.values[:half])
    report.add(Figure(GROUP, PRODUCE, "ceiling: bare produce (aiokafka send)", half / sec, "events/s",
                      load_before=load, detail=_detail(half, sec) | {"linger_ms": 20, "acks": 1}))
    load = loadavg()
    sec = produce(ns.bootstrap, ns.transactions, data.keys[half:], data.values[half:], batched=True)
    report.add(Figure(GROUP, PRODUCE + "_batched", "ceiling: bare produce (aiokafka batches)",
                      (len(data) - half) / sec, "events/s", load_before=load,
                      detail=_detail(len(data) - half, sec) | {"acks": 1}))
    load = loadavg()
    sec = consume(ns.bootstrap, ns.transactions, len(data))
    report.add(Figure(GROUP, CONSUME, "ceiling: bare consume (aiokafka getmany)", len(data) / sec, "events/s",
                      load_before=load, detail=_detail(len(data), sec) | {"topic_partitions": 4}))


def _detail(n: int, wall: float, cpu: float | None = None) -> dict[str, float]:
    out = {"events": n, "wall_seconds": round(wall, 3)}
    if cpu is not None:
        out["cpu_seconds"] = round(cpu, 3)
        out["events_per_cpu_second"] = round(n / cpu) if cpu > 0 else 0
    return out


__all__ = ["CONSUME", "PARSE", "PRODUCE", "kafka", "parse_validate"]
