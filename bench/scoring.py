"""riskwatch without Kafka: the scorer alone, decode plus scorer, and `riskwatch replay` of a generated file."""

from __future__ import annotations

import logging
import subprocess
import sys
import time
from pathlib import Path
from typing import Any

from bench.ceilings import PARSE
from bench.common import ROOT, Data, Figure, Report, clocked, loadavg
from bench.kafka import BenchError
from models.schemas import Transaction, decode_event

log = logging.getLogger("riskwatch.bench")
GROUP = "riskwatch"
STORM_CAP = 1_000_000  # the benchmark measures cost per warning, not the cap that would drop most of them


def _scorer() -> Any:
    from models.rules import load_catalogue
    from models.scoring import TransactionScorer

    return TransactionScorer(load_catalogue(), storm_cap=STORM_CAP)


def scoring_only(report: Report, data: Data) -> Figure:
    """TransactionScorer.process over transactions decoded as the worker decodes them, with per-account states.

    The worker's decoder (app.wire) gives msgspec records and their epoch time, which the worker
    passes to the scorer; that is what this figure times. The same loop over pydantic Transactions
    (the scorer then reads pydantic attributes and computes the epoch itself, as replay does) is
    in the detail, `pydantic_input_per_second`.
    """
    from app.wire import decode_transaction

    records: list[tuple[Any, float | None]] = [decode_transaction(raw) for raw in data.values]
    load = loadavg()
    with clocked() as c:
        warnings = _score_all(records)
    pydantic: list[tuple[Any, float | None]] = [(decode_event(raw, Transaction), None) for raw in data.values]
    with clocked() as p:
        _score_all(pydantic)
    detail = _detail(len(records), c.wall, c.cpu) | {
        "warnings": warnings, "pydantic_input_per_second": round(len(records) / p.wall)}
    return report.add(Figure(GROUP, "scoring_only", "riskwatch: scoring only (no Kafka)", len(records) / c.wall,
                             "events/s", ceiling=PARSE, target=">= 30,000/s and >= 9% of parse",
                             load_before=load, detail=detail))


def _score_all(items: list[tuple[Any, float | None]]) -> int:
    """Score (transaction, epoch or None) pairs with a fresh scorer and states; returns the warnings raised."""
    from models.features import AccountState

    scorer = _scorer()
    states: dict[str, AccountState] = {}
    warnings = 0
    for txn, ts in items:
        state = states.get(txn.account_id)
        if state is None:
            state = states[txn.account_id] = AccountState()
        warnings += len(scorer.process(txn, state, ts).alerts)
    return warnings


def decode_and_score(report: Report, data: Data) -> Figure:
    """The worker's decoder (app.wire) then TransactionScorer.process: its per-event work except Kafka and tables."""
    from app.wire import decode_transaction
    from models.features import AccountState

    scorer = _scorer()
    states: dict[str, AccountState] = {}
    load = loadavg()
    with clocked() as c:
        for raw in data.values:
            txn, ts = decode_transaction(raw)
            state = states.get(txn.account_id)
            if state is None:
                state = states[txn.account_id] = AccountState()
            scorer.process(txn, state, ts)
    return report.add(Figure(GROUP, "decode_score", "riskwatch: decode + scoring (no Kafka)", len(data) / c.wall,
                             "events/s", ceiling=PARSE, load_before=load, detail=_detail(len(data), c.wall, c.cpu)))


def file_replay(report: Report, data: Data, work: Path) -> Figure:
    """`riskwatch replay` of the data as a JSONL file (bench/replay_bench.py's child), alerts and scores to files."""
    path = work / "replay-input.jsonl"
    with open(path, "wb") as f:
        for raw in data.values:
            f.write(raw + b"\n")
    out = work / "replay-out"
    out.mkdir(exist_ok=True)
    load = loadavg()
    try:
        from bench.replay_bench import run_child

        stats = run_child(path, out, None)
        wall = float(stats["total_seconds"])
        n = int(stats["events"])
    except (ImportError, AttributeError, TypeError, KeyError) as exc:
        # replay_bench is another benchmark's harness; if its interface moved, time the CLI instead.
        log.warning("bench.replay_bench.run_child unusable (%s); timing `riskwatch replay` instead", exc)
        t0 = time.perf_counter()
        done = subprocess.run([sys.executable, "-m", "app.cli", "replay", str(path), "--alerts",
                               str(out / "alerts.jsonl"), "--scores", str(out / "scores.jsonl")], cwd=ROOT,
                              capture_output=True, text=True)
        wall = time.perf_counter() - t0
        if done.returncode != 0:
            raise BenchError(f"riskwatch replay failed ({done.returncode}): {done.stderr[-2000:]}") from None
        n, stats = len(data), {"total_seconds": round(wall, 3), "includes_interpreter_start": True}
    return report.add(Figure(GROUP, "file_replay", "riskwatch: file replay (riskwatch replay)", n / wall,
                             "events/s", ceiling=PARSE, load_before=load, detail=stats))


def _detail(n: int, wall: float, cpu: float) -> dict[str, float]:
    return {"events": n, "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
            "events_per_cpu_second": round(n / cpu) if cpu > 0 else 0}


__all__ = ["decode_and_score", "file_replay", "scoring_only"]
