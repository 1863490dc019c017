"""Replay benchmark: events/s and peak memory of `riskwatch replay` on 1M generated transactions.

Usage: .venv/bin/python -m bench.replay_bench [--events 1000000] [--accounts 10000,100000,1000000] [--cpu 1]
       [--out FILE]

For each account count it writes a JSONL file of `--events` transactions spread over 30 days, then
replays it in a child process pinned to one CPU (alerts and scores written to files, as an analyst
would run it) and reads the child's peak RSS from the kernel. Prints a table and writes
bench/results/replay.json (`--out FILE` for a trial run that should not replace the recorded one).
Scoring time (models.pipeline) and replay overhead (read, decode, order, write) are measured
separately, so a change on either side shows where it went.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import resource
import subprocess
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results" / "replay.json"
DAYS = 30
# (txn_type, direction, share, amount factor): the everyday mix of a payments and wealth platform.
KINDS = (
    ("payment", "debit", 0.55, 1.0),
    ("transfer", "debit", 0.1, 1.5),
    ("transfer", "credit", 0.08, 1.5),
    ("deposit", "credit", 0.1, 3.0),
    ("withdrawal", "debit", 0.08, 2.5),
    ("investment", "debit", 0.05, 4.0),
    ("redemption", "credit", 0.04, 4.0),
)


def generate(path: Path, events: int, accounts: int, seed: int = 11) -> None:
    """Write `events` contract transactions over `accounts` accounts and 30 days, sorted by time, as JSONL."""
    rng = np.random.default_rng([seed, accounts])
    start = np.datetime64("2026-10-01T00:00:00", "ms")
    offs = np.sort(rng.integers(0, DAYS * 86_400_000, events))
    # Local time at +08:00, as the platform's producers write it.
    stamps = np.datetime_as_string(start + offs.astype("timedelta64[ms]"), unit="ms").tolist()
    who = rng.integers(0, accounts, events)
    median = np.exp(rng.normal(np.log(250), 1.0, accounts))
    kind = rng.choice(len(KINDS), events, p=np.array([k[2] for k in KINDS]) / sum(k[2] for k in KINDS))
    factor = np.array([k[3] for k in KINDS])[kind]
    amount = np.round(median[who] * factor * np.exp(rng.normal(0, 0.6, events)), 2).clip(0.01, None)
    payee = rng.zipf(1.6, events).clip(1, 40) - 1  # a few favourite counterparties take most payments
    new_device = rng.random(events) < 0.002
    who_l, kind_l, amount_l, payee_l, dev_l = (
        who.tolist(),
        kind.tolist(),
        amount.tolist(),
        payee.tolist(),
        new_device.tolist(),
    )
    with open(path, "w", encoding="utf-8") as out:
        for i in range(events):
            a = who_l[i]
            txn_type, direction, _, _ = KINDS[kind_l[i]]
            j = payee_l[i]
            cp = f"M{(a * 7919 + j) % 50_000:05d}" if txn_type == "payment" else f"X{a * 31 + j:09d}"
            device = f"dev-{i:08x}" if dev_l[i] else f"dev-{a:07d}"
            out.write(
                f'{{"event_type":"transaction","event_id":"b{i:08d}","ts":"{stamps[i]}+08:00",'
                f'"account_id":"A{a:07d}","counterparty_id":"{cp}","amount":{amount_l[i]},"currency":"CNY",'
                f'"direction":"{direction}","txn_type":"{txn_type}","channel":"app","device_id":"{device}"}}\n'
            )


def child(path: Path, outdir: Path) -> dict[str, Any]:
    """Replay one file as the CLI does (alerts and scores to files) and return the timings."""
    from app.replay import Config, DeadLetters, open_text, read_file, replay
    from models.rules import load_catalogue

    reference = _reference_loop()
    t0 = time.perf_counter()
    cpu0 = _cpu()
    dead = DeadLetters(outdir / "deadletter.jsonl")
    loaded = read_file(path, dead)
    dead.close()
    alerts, scores = open_text(outdir / "alerts.jsonl"), open_text(outdir / "scores.jsonl")
    res = replay(loaded, [Config("A", "deploy/rules.yaml", load_catalogue())], alerts_out=[alerts], scores_out=scores)
    assert alerts is not None and scores is not None
    t_close = time.perf_counter()
    alerts.close()
    scores.close()
    total = time.perf_counter() - t0
    cpu = _cpu() - cpu0
    n = res.events + res.duplicates
    overhead = total - res.score_seconds
    # On a shared machine wall time includes waiting for the CPU; CPU time is what one core spent.
    score_cpu = cpu * res.score_seconds / total
    return {
        "events": n,
        "warnings": len(res.outcomes[0].final()),
        "total_seconds": round(total, 3),
        "read_seconds": round(res.loaded.seconds, 3),
        "replay_seconds": round(res.loop_seconds + time.perf_counter() - t_close, 3),
        "score_seconds": round(res.score_seconds, 3),
        "events_per_second": round(n / total),
        "scoring_events_per_second": round(n / res.score_seconds),
        "overhead_events_per_second": round(n / overhead) if overhead > 0 else None,
        "cpu_seconds": round(cpu, 3),
        "reference_loop_cpu_seconds": round(reference, 3),
        "events_per_cpu_second": round(n / cpu),
        "scoring_events_per_cpu_second": round(n / score_cpu),
        "overhead_events_per_cpu_second": round(n / (cpu - score_cpu)),
    }


def _reference_loop() -> float:
    """CPU seconds of a fixed pure-Python loop: says how fast this core was during the run."""
    t0 = time.process_time()
    total = 0
    for i in range(10_000_000):
        total += i
    return time.process_time() - t0


def _cpu() -> float:
    ru = resource.getrusage(resource.RUSAGE_SELF)
    return ru.ru_utime + ru.ru_stime


def run_child(path: Path, outdir: Path, cpu: int | None) -> dict[str, Any]:
    """Run child() in a fresh process pinned to one CPU; add its peak RSS from wait4."""
    cmd = [sys.executable, "-m", "bench.replay_bench", "--child", str(path), str(outdir)]
    pin = (lambda: os.sched_setaffinity(0, {cpu})) if cpu is not None else None
    proc = subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, preexec_fn=pin)
    assert proc.stdout is not None
    out = proc.stdout.read()
    _, status, usage = os.wait4(proc.pid, 0)
    proc.returncode = os.waitstatus_to_exitcode(status)
    if proc.returncode != 0:
        raise SystemExit(f"replay child failed with exit code {proc.returncode}")
    stats: dict[str, Any] = json.loads(out)
    stats["peak_rss_mib"] = round(usage.ru_maxrss / 1024, 1)  # Linux reports KiB
    return stats


def main() -> int:
    """Generate, replay, print the table and write bench/results/replay.json."""
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--events", type=int, default=1_000_000)
    ap.add_argument("--accounts", default="10000,100000,1000000", help="comma-separated account counts")
    ap.add_argument("--cpu", type=int, default=max(os.sched_getaffinity(0)), help="CPU to pin the replay to")
    ap.add_argument("--keep", type=Path, help="keep generated files in this folder (default: a temp folder)")
    ap.add_argument("--out", type=Path, default=RESULTS, help="where the JSON goes (default: %(default)s)")
    ap.add_argument("--child", nargs=2, type=Path, help=argparse.SUPPRESS)
    args = ap.parse_args()
    if args.child:
        print(json.dumps(child(*args.child)))
        return 0
    rows = []
    with tempfile.TemporaryDirectory(prefix="riskwatch-bench-") as tmp:
        work = args.keep or Path(tmp)
        work.mkdir(parents=True, exist_ok=True)
        for accounts in [int(x) for x in args.accounts.split(",")]:
            path = work / f"txns-{args.events}-{accounts}.jsonl"
            t0 = time.perf_counter()
            if not path.exists():
                generate(path, args.events, accounts)
            gen = time.perf_counter() - t0
            out = Path(tmp) / f"out-{accounts}"
            out.mkdir()
            stats = run_child(path, out, args.cpu)
            stats.update(
                accounts=accounts, file_mib=round(path.stat().st_size / 2**20, 1), generate_seconds=round(gen, 1)
            )
            rows.append(stats)
            print(
                f"{accounts:>9,} accounts: {stats['events_per_second']:>7,} events/s wall, "
                f"{stats['events_per_cpu_second']:>7,} per CPU second, peak RSS {stats['peak_rss_mib']:>7,.0f} MiB "
                f"(reference loop {stats['reference_loop_cpu_seconds']:.2f} s)",
                flush=True,
            )
    result = {
        "command": "python -m bench.replay_bench " + " ".join(sys.argv[1:]),
        "events": args.events,
        "cpu_pinned": args.cpu,
        "python": platform.python_version(),
        "machine": platform.machine(),
        "cpus": os.cpu_count(),
        "load_average_at_end": [round(x, 2) for x in os.getloadavg()],
        "runs": rows,
    }
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(json.dumps(result, indent=1) + "\n")
    print("\n             |       wall clock: events/s        |    per CPU second: events/s     |")
    print(
        f"{'accounts':>12} | {'overall':>9} {'scoring':>10} {'overhead':>11} | {'overall':>9} {'scoring':>10} "
        f"{'overhead':>10} | {'total s':>7} {'peak MiB':>8}"
    )
    for r in rows:
        print(
            f"{r['accounts']:>12,} | {r['events_per_second']:>9,} {r['scoring_events_per_second']:>10,} "
            f"{r['overhead_events_per_second']:>11,} | {r['events_per_cpu_second']:>9,} "
            f"{r['scoring_events_per_cpu_second']:>10,} {r['overhead_events_per_cpu_second']:>10,} | "
            f"{r['total_seconds']:>7.1f} {r['peak_rss_mib']:>8,.0f}"
        )
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    # Run as a script, this folder would come first on the path, and bench/kafka.py would shadow kafka-python.
    if Path(sys.path[0]).resolve() == Path(__file__).resolve().parent:
        sys.path[0] = str(ROOT)
    sys.exit(main())
