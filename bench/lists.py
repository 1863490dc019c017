"""Run-time lists: what a million-entry list costs the scorer per event, in memory per entry, and to load.

Scoring with and without the lists is timed in alternating rounds (A B A B ...) on the same data, so
the machine's drift shows as the spread between rounds of one kind: the lists' cost is "within
noise" when the two medians differ by less than that spread. Memory is what tracemalloc sees the
index allocate (the worker's heap, not the process's RSS); loading is the follower's decode-and-apply
of risk.lists records, without the broker (the broker's read rate is the consume ceiling).
"""

from __future__ import annotations

import asyncio
import gc
import statistics
import tracemalloc
from collections.abc import Sequence
from pathlib import Path
from typing import Any

from bench.common import Data, Figure, Report, clocked, loadavg
from bench.scoring import _scorer

GROUP = "lists"
ROUNDS = 3


def _changes(n: int, data_cps: list[str]) -> list[Any]:
    """n entries over four lists and kinds, mostly values the stream never meets plus a few it does."""
    from models.lists import ListChange

    out = []
    kinds = (("blocked", "counterparty", 0.7), ("watch", "device", 0.1), ("blocked", "ip", 0.1),
             ("known-good", "pair", 0.1))
    for name, kind, share in kinds:
        for i in range(int(n * share)):
            value = f"{kind[:2]}-{i:09d}"
            out.append(ListChange(list=name, kind=kind, value=value,  # type: ignore[arg-type]
                                  counterparty=f"cp-{i:09d}" if kind == "pair" else None,
                                  note="bench entry" if i % 10 == 0 else None, by="bench"))
    # Real hits: a few of the stream's counterparties, so the cost of a hit is in the figure too.
    for cp in data_cps[:: max(1, len(data_cps) // 50)]:
        out.append(ListChange(list="blocked", kind="counterparty", value=cp, note="bench hit", by="bench"))
    return out


def _score(records: Sequence[tuple[Any, float | None]], index: Any) -> tuple[float, int]:
    from models.features import AccountState

    scorer = _scorer()
    if index is not None:
        scorer.set_lists(index)
    states: dict[str, AccountState] = {}
    warnings = 0
    with clocked() as c:
        for txn, ts in records:
            state = states.get(txn.account_id)
            if state is None:
                state = states[txn.account_id] = AccountState()
            warnings += len(scorer.process(txn, state, ts).alerts)
    return len(records) / c.wall, warnings


def million_entry_list(report: Report, data: Data, entries: int) -> list[Figure]:
    """Scoring throughput with and without `entries` list entries, memory per entry, and the load rate."""
    from app.wire import decode_transaction
    from models.lists import ListIndex

    records = [decode_transaction(raw) for raw in data.values]
    cps = sorted({txn.counterparty_id for txn, _ in records})
    changes = _changes(entries, cps)
    load = loadavg()

    tracemalloc.start()
    before = tracemalloc.get_traced_memory()[0]
    index = ListIndex(max_entries=len(changes) + 1)
    for c in changes:
        index.apply(c)
    per_entry = (tracemalloc.get_traced_memory()[0] - before) / len(index)
    tracemalloc.stop()
    loaded = _load_rate(report, changes, load)
    # The worker keeps no change objects once applied: a million live ones would slow every GC pass here.
    del changes
    gc.collect()

    without: list[float] = []
    with_lists: list[float] = []
    hits = 0
    for _ in range(ROUNDS):
        without.append(_score(records, None)[0])
        index.hits.clear()
        rate, _w = _score(records, index)
        with_lists.append(rate)
        hits = sum(index.hits.values())
    a, b = statistics.median(without), statistics.median(with_lists)
    noise = max(max(without) - min(without), max(with_lists) - min(with_lists))
    detail = {"entries": len(index), "rounds_without": [round(v) for v in without],
              "rounds_with": [round(v) for v in with_lists], "median_without": round(a), "median_with": round(b),
              "difference": round(b - a), "noise_spread": round(noise),
              "within_noise": abs(b - a) <= noise, "list_hits": hits, "events": len(records)}
    figs = [report.add(Figure(GROUP, "scoring_with_lists", f"riskwatch: scoring with a {len(index):,}-entry list",
                              b, "events/s", target="within noise of scoring without it", load_before=load,
                              detail=detail)),
            report.add(Figure(GROUP, "list_bytes_per_entry", "run-time lists: heap per entry", per_entry, "bytes",
                              load_before=load,
                              detail={"entries": len(index), "index_mib": round(per_entry * len(index) / 2**20, 1)}))]
    figs.append(loaded)
    figs[0].met = abs(b - a) <= noise
    return figs


def _load_rate(report: Report, changes: list[Any], load: list[float]) -> Figure:
    """The follower's apply rate: decode and apply risk.lists records as a worker does at start."""
    from types import SimpleNamespace

    from prometheus_client import CollectorRegistry

    from agents.lists import ListFollower
    from app.metrics import Metrics
    from app.settings import Settings
    from models.lists import ListIndex

    records = [(c.key, c.model_dump_json().encode()) for c in changes]
    rt = SimpleNamespace(metrics=Metrics(CollectorRegistry()), settings=Settings())
    follower = ListFollower(rt, None, ListIndex(max_entries=len(records) + 1))  # type: ignore[arg-type]

    async def apply_all() -> None:
        for i, (k, v) in enumerate(records):
            await follower.handle(k, v, 0, i)

    with clocked() as c:
        asyncio.run(apply_all())
    return report.add(Figure(GROUP, "list_load", "run-time lists: records applied at worker start",
                             len(records) / c.wall, "records/s", load_before=load,
                             detail={"records": len(records), "seconds": round(c.wall, 1)}))


def worker_with_lists(report: Report, data: Data, bootstrap: str, work: Path, entries: int,
                      rounds: int = 2) -> Figure:
    """The worker end to end with and without an `entries`-entry list, in alternating runs on fresh namespaces."""
    from app.wire import decode_transaction
    from bench.endtoend import worker_e2e

    cps = sorted({decode_transaction(raw)[0].counterparty_id for raw in data.values})
    changes = _changes(entries, cps)
    keys = [c.key for c in changes]
    values = [c.model_dump_json().encode() for c in changes]
    del changes
    runs: dict[str, list[Figure]] = {"without": [], "with": []}
    load = loadavg()
    for _ in range(rounds):
        for kind, lists in (("without", ([], [])), ("with", (keys, values))):
            fig = worker_e2e(report, data, bootstrap, work, 1, lists=lists, name=f"worker_1p_{kind}_lists")
            report.figures.remove(fig)  # summarised below, not a row each
            runs[kind].append(fig)
    a = [f.value for f in runs["without"]]
    b = [f.value for f in runs["with"]]
    noise = max(max(a) - min(a), max(b) - min(b))
    med_a, med_b = statistics.median(a), statistics.median(b)
    last = runs["with"][-1].detail
    detail = {"entries": last["list_entries"], "runs_without": [round(v) for v in a],
              "runs_with": [round(v) for v in b],
              "median_without": round(med_a), "median_with": round(med_b), "noise_spread": round(noise),
              "within_noise": abs(med_b - med_a) <= noise,
              "lists_loaded_seconds_after_ready": [f.detail["lists_loaded_seconds_after_ready"] for f in runs["with"]],
              "peak_rss_mib_without": [f.detail["peak_rss_mib"][0] for f in runs["without"]],
              "peak_rss_mib_with": [f.detail["peak_rss_mib"][0] for f in runs["with"]]}
    fig = report.add(Figure(GROUP, "worker_1p_lists", f"riskwatch: worker end to end with a {detail['entries']:,}"
                            "-entry list", med_b, "events/s", target="within noise of the worker without it",
                            load_before=load, detail=detail))
    fig.met = detail["within_noise"]
    return fig
