"""The worker end to end through the broker: N events already on the topic, 1 or 2 worker processes."""

from __future__ import annotations

import logging
import shutil
import subprocess
import sys
import time
from collections import Counter
from pathlib import Path
from typing import Any

from bench.ceilings import CONSUME
from bench.common import Data, Figure, Report, loadavg
from bench.kafka import BenchError, Committed, Namespace, Worker, end_offsets, produce

log = logging.getLogger("riskwatch.bench")
GROUP = "worker"
SCORED = "riskwatch_events_scored_total"
STORM_CAP = "1000000"  # count the cost of every warning instead of dropping most of them


def done_count(samples: dict[str, float]) -> float:
    """Events a worker finished with: scored, recognised as duplicates or dead-lettered."""
    return sum(samples.get(k, 0.0) for k in (SCORED, "riskwatch_duplicates_total", "riskwatch_deadletters_total"))


def worker_e2e(report: Report, data: Data, bootstrap: str, work: Path, workers: int, budget: float = 120.0,
               profile: Path | None = None, lists: tuple[list[bytes], list[bytes]] | None = None,
               name: str | None = None) -> Figure:
    """Load N events, start the workers, time from all ready until every offset is committed.

    A worker too slow to finish within `budget` seconds is measured over the budget instead
    (events finished in it / its length), and a note says so. `lists` (keys, values of risk.lists
    records) are loaded first, and the timing starts once every worker holds all of them.
    """
    from app.faust_app import LISTS

    if lists is None and workers > 1:
        # Several workers: the events go in once all are ready, as with lists. Loaded first, they were
        # all scored by the first worker ready before the others joined (the figure read 0 events/s).
        lists = ([], [])
    ns = Namespace(bootstrap, work)
    ns.create()
    try:
        if lists is None:
            produce(ns.bootstrap, ns.transactions, data.keys, data.values, batched=True)
            ends = end_offsets(ns.settings, ns.transactions)
        else:
            # With lists, the events go in once the lists are loaded (a backlog would be scored while they
            # load); a run without lists to compare with passes empty ones, so both are timed the same way.
            if lists[0]:
                produce(ns.bootstrap, ns.settings.topic(LISTS), lists[0], lists[1], batched=True)
            ends = {p: 0 for p in range(ns.settings.topic_partitions)}
        n = len(data.values) if lists is not None else sum(ends.values())
        load = loadavg()
        procs = [Worker(ns, work / f"worker-e2e-{workers}p-{i}.log", RISKWATCH_STORM_CAP_PER_MINUTE=STORM_CAP)
                 for i in range(workers)]
        committed = Committed(ns.settings, ns.settings.transactions_group, ns.transactions)
        spy = None
        try:
            ready = [w.wait_ready() for w in procs]
            lists_seconds = _wait_lists(procs, len(set(lists[0]))) if lists is not None else None
            if lists is not None:
                # A warm-up slice first, scored before the clock starts: a worker just ready is still settling
                # (assignment, first fetches), and a run with lists has had their loading time to settle.
                k = max(1, len(data.values) // 50)
                produce(ns.bootstrap, ns.transactions, data.keys[:k], data.values[:k], batched=True)
                _wait_done(procs, k)
            t0 = time.monotonic()
            before = sum(done_count(w.scrape()) for w in procs)
            cpu0 = [w.cpu_seconds() for w in procs]
            if lists is not None:
                produce(ns.bootstrap, ns.transactions, data.keys[k:], data.values[k:], batched=True)
                ends = end_offsets(ns.settings, ns.transactions)
            spy = _profile(procs[0], profile) if profile else None
            t_scored: float | None = None
            t_end = t0
            last_scrape = 0.0
            finished = False
            while True:
                t_end = time.monotonic()
                for w in procs:
                    if w.proc.poll() is not None:
                        raise BenchError(f"a worker exited with code {w.proc.returncode}; its log:\n{w.tail()}")
                # Scraping costs the worker CPU too: twice a second is enough for a figure over seconds.
                if t_scored is None and t_end - last_scrape >= 0.5:
                    last_scrape = t_end
                    if sum(done_count(w.scrape()) for w in procs) >= n:
                        t_scored = t_end
                offs = committed.offsets()
                if all(offs.get(p, -1) >= end for p, end in ends.items()):
                    finished = True
                    break
                if t_end - t0 > budget:
                    break
                time.sleep(0.2)
            cpu = sum(w.cpu_seconds() - c for w, c in zip(procs, cpu0, strict=True))
            samples = [w.scrape() for w in procs]
            phases = [(w.metric("riskwatch_batch_seconds_sum", phase="process"),
                       w.metric("riskwatch_batch_seconds_sum", phase="write")) for w in procs]
            rss = [w.status("VmHWM") for w in procs]
        finally:
            committed.close()
            for w in procs:
                w.stop()
            if spy is not None:
                spy.wait(60)
        elapsed = t_end - t0
        processed = (n if finished else sum(done_count(s) for s in samples)) - before
        detail = {
            "events": n,
            "workers": workers,
            "topic_partitions": len(ends),
            "ready_seconds": [round(r, 1) for r in ready],
            "list_entries": len(set(lists[0])) if lists is not None else 0,
            "lists_loaded_seconds_after_ready": lists_seconds,
            "processed_before_timing": int(before),
            "finished": finished,
            "processed_in_window": int(processed),
            "window_seconds": round(elapsed, 2),
            "seconds_to_last_scored": round(t_scored - t0, 2) if t_scored else None,
            "worker_cpu_seconds": round(cpu, 2),
            "events_per_worker_cpu_second": round(processed / cpu) if cpu > 0 else 0,
            "scored": int(sum(s.get(SCORED, 0.0) for s in samples)),
            "warnings": int(sum(s.get("riskwatch_warnings_total", 0.0) for s in samples)),
            "warning_updates": int(sum(s.get("riskwatch_warning_updates_total", 0.0) for s in samples)),
            "duplicates": int(sum(s.get("riskwatch_duplicates_total", 0.0) for s in samples)),
            "deadletters": int(sum(s.get("riskwatch_deadletters_total", 0.0) for s in samples)),
            "peak_rss_mib": [round(r / 2**20, 1) for r in rss],
            "storm_cap_per_minute": int(STORM_CAP),
            # Where a batch's time goes (summed over the workers): scoring, and waiting for Kafka's acks.
            "batches": int(sum(s.get("riskwatch_batch_records_count", 0.0) for s in samples)),
            "batch_process_seconds": round(sum(p for p, _ in phases), 2),
            "batch_write_seconds": round(sum(w for _, w in phases), 2),
        }
        if spy is not None and profile is not None and profile.exists():
            detail["profile"] = {"raw_stacks": str(profile), **summarise(profile)}
        if not finished:
            report.note(GROUP, f"{workers} process(es): {processed:,.0f} of {n - before:,.0f} events done when the "
                               f"{budget:.0f} s budget ran out; the figure is events done / {elapsed:.0f} s, "
                               "not time to the last commit")
        label = f"riskwatch: worker end to end, {workers} process{'es' if workers > 1 else ''}"
        return report.add(Figure(GROUP, name or f"worker_{workers}p", label, processed / elapsed, "events/s",
                                 ceiling=CONSUME, target=">= 10,000/s" if workers == 1 else None,
                                 load_before=load, detail=detail))
    finally:
        ns.delete()


def _wait_done(procs: list[Worker], n: int, timeout: float = 120.0) -> None:
    """Wait until the workers have finished with n events."""
    t0 = time.monotonic()
    while sum(done_count(w.scrape()) for w in procs) < n:
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"the workers did not finish {n:,} warm-up events within {timeout:.0f} s")
        time.sleep(0.2)


def _wait_lists(procs: list[Worker], entries: int, timeout: float = 300.0) -> float:
    """Seconds after ready until every worker holds `entries` list entries (riskwatch_list_entries)."""
    t0 = time.monotonic()
    while any(w.scrape().get("riskwatch_list_entries", 0.0) < entries for w in procs):
        if time.monotonic() - t0 > timeout:
            raise BenchError(f"the workers did not load {entries:,} list entries within {timeout:.0f} s")
        time.sleep(0.5)
    return round(time.monotonic() - t0, 1)


def _profile(w: Worker, out: Path) -> subprocess.Popen[bytes] | None:
    """py-spy on one worker for 30 s: raw folded stacks (flamegraph input) of the thread holding the GIL."""
    spy = shutil.which("py-spy", path=str(Path(sys.executable).parent)) or shutil.which("py-spy")
    if spy is None:
        log.warning("py-spy not found next to %s or on PATH: no profile", sys.executable)
        return None
    out.parent.mkdir(parents=True, exist_ok=True)
    return subprocess.Popen([spy, "record", "-f", "raw", "--gil", "-d", "30", "-r", "200", "-p", str(w.pid),
                             "-o", str(out)], stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)


def summarise(path: Path, top: int = 20) -> dict[str, Any]:
    """The costliest frames of a py-spy raw profile: by own time, including callees, and by package."""
    total = 0
    own: Counter[str] = Counter()
    incl: Counter[str] = Counter()
    pkg: Counter[str] = Counter()
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        total += n
        frames = stack.split(";")
        own[frames[-1]] += n
        for f in set(frames):
            incl[f] += n
        where = frames[-1].partition("(")[2].split("/")
        pkg[where[0] if len(where) > 1 else where[0].split(":")[0]] += n

    def share(c: Counter[str]) -> list[tuple[str, float]]:
        return [(k, round(v / total, 4)) for k, v in c.most_common(top)] if total else []

    return {"samples": total, "own": share(own), "inclusive": share(incl), "by_package": share(pkg)}


__all__ = ["done_count", "summarise", "worker_e2e"]
