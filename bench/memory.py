"""Worker memory against the number of tracked accounts: peak RSS at each step, and the bytes per account."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

from bench.common import Data, Figure, Report, loadavg
from bench.endtoend import done_count
from bench.kafka import BenchError, Namespace, Worker, produce

GROUP = "memory"
TARGET_BYTES = 1024


def _fit(points: list[tuple[int, int]]) -> tuple[float, float]:
    """Least-squares slope and intercept of bytes against accounts."""
    n = len(points)
    mx = sum(x for x, _ in points) / n
    my = sum(y for _, y in points) / n
    sxx = sum((x - mx) ** 2 for x, _ in points)
    slope = sum((x - mx) * (y - my) for x, y in points) / sxx if sxx else 0.0
    return slope, my - slope * mx


def state_sizes(data: Data, n: int = 20_000) -> dict[str, float]:
    """AccountState sizes after scoring the data in-process: pickled (the old table value) and compact (today's)."""
    from app.faust_app import dump_account, dumps
    from models.features import AccountState
    from models.rules import load_catalogue
    from models.schemas import Transaction, decode_event
    from models.scoring import TransactionScorer

    scorer = TransactionScorer(load_catalogue())
    states: dict[str, AccountState] = {}
    for raw in data.values[:n]:
        txn = decode_event(raw, Transaction)
        scorer.process(txn, states.setdefault(txn.account_id, AccountState()))
    sizes = sorted(len(dumps(s)) for s in states.values())
    compact = sorted(len(dump_account(s)) for s in states.values())
    return {"accounts": len(sizes), "events": min(n, len(data)), "mean_bytes": round(sum(sizes) / len(sizes)),
            "p50_bytes": sizes[len(sizes) // 2], "max_bytes": sizes[-1],
            "codec_mean_bytes": round(sum(compact) / len(compact)), "codec_p50_bytes": compact[len(compact) // 2],
            "codec_max_bytes": compact[-1]}


def rss_per_account(report: Report, data: Data, bootstrap: str, work: Path, steps: list[int],
                    timeout: float = 900.0) -> list[Figure]:
    """One worker; feed it one transaction for each of `steps[-1]` new accounts, reading its peak RSS at each step."""
    templates: list[dict[str, Any]] = [e for raw in data.values if not (e := json.loads(raw)).get("label")]
    ns = Namespace(bootstrap, work)
    ns.create()
    figures: list[Figure] = []
    try:
        w = Worker(ns, work / "worker-memory.log")
        try:
            w.wait_ready()
            time.sleep(1.0)
            load = loadavg()
            base = w.status("VmHWM")
            points: list[dict[str, Any]] = [{"accounts": 0, "vm_hwm": base, "vm_rss": w.status("VmRSS")}]
            tag = f"{time.time_ns():x}"
            done = 0
            for target in steps:
                keys, values = [], []
                for k in range(done, target):
                    e = dict(templates[k % len(templates)])
                    e["account_id"] = f"R{k:08d}"
                    e["event_id"] = f"mem-{tag}-{k}"
                    keys.append(e["account_id"].encode())
                    values.append(json.dumps(e, separators=(",", ":")).encode())
                produce(ns.bootstrap, ns.transactions, keys, values, batched=True)
                deadline = time.monotonic() + timeout
                while done_count(w.scrape()) < target:
                    if time.monotonic() > deadline or w.proc.poll() is not None:
                        raise BenchError(f"the worker did not process {target} events in {timeout:.0f}s; "
                                         f"log:\n{w.tail()}")
                    time.sleep(0.5)
                done = target
                time.sleep(2.5)  # the accounts gauge is refreshed by a 2 s timer
                points.append({"accounts": target, "vm_hwm": w.status("VmHWM"), "vm_rss": w.status("VmRSS"),
                               "accounts_gauge": w.metric("riskwatch_entities", table="accounts")})
        finally:
            w.stop()
    finally:
        ns.delete()
    for p in points[1:]:
        figures.append(report.add(Figure(GROUP, f"rss_{p['accounts']}", f"worker peak RSS, {p['accounts']:,} accounts",
                                         p["vm_hwm"] / 2**20, "MiB", load_before=load, detail=p)))
    # The slope over the steps, not from zero: the first events allocate fixed things (detectors, buffers).
    fitted = points[1:] if len(points) > 2 else points
    slope, intercept = _fit([(p["accounts"], p["vm_hwm"]) for p in fitted])
    detail = {"steps": points, "base_vm_hwm_mib": round(base / 2**20, 1),
              "fit_intercept_mib": round(intercept / 2**20, 1), "transactions_per_account": 1,
              "pickled_state": state_sizes(data)}
    figures.append(report.add(Figure(GROUP, "rss_per_account", "worker RSS growth per tracked account", slope,
                                     "B/account", target=f"< {TARGET_BYTES:,} B/account", load_before=load,
                                     detail=detail)))
    return figures


__all__ = ["rss_per_account", "state_sizes"]
