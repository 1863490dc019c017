"""Failover times and restore rate: kill -9 a worker, then time until the affected partitions warn again.

    python -m bench.failover --own-broker [--accounts 200000] [--json FILE]

Three cases, each on a fresh namespace with `--accounts` accounts of history (one transaction
each, so each partition has state to restore): a worker restarted in place with static membership
(RISKWATCH_INSTANCE_ID), the same without it (dynamic membership), and two workers of which one is
killed and not restarted (its partitions move to the survivor). After the kill one large
transaction per probe account (keys over every partition) is sent; the figure is the time from
the kill, and from the new process's start where there is one, to the last probe's warning on
risk.alerts: when every affected partition warns again. The restore rate is read from the
restarted worker's log line "read back N changelog records ... in S s".
"""

from __future__ import annotations

import argparse
import json
import re
import sys
import tempfile
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from bench.endtoend import done_count
from bench.kafka import BenchError, Namespace, Worker, produce

SESSION_TIMEOUT = 30.0
PROBES = 40
READ_BACK = re.compile(rb"read back (\d+) changelog records of partitions \[[^\]]*\] in ([\d.]+) s")


def _txn(account: str, eid: str, amount: float, ts: datetime) -> bytes:
    return json.dumps({"event_type": "transaction", "event_id": eid, "ts": ts.isoformat(), "account_id": account,
                       "counterparty_id": "shop-1", "amount": amount, "currency": "CNY", "direction": "debit",
                       "txn_type": "payment", "channel": "app"}, separators=(",", ":")).encode()


def _history(ns: Namespace, accounts: int, workers: list[Worker]) -> None:
    """One transaction for each of `accounts` accounts, processed by the workers before the kill."""
    t0 = datetime.now(UTC) - timedelta(hours=2)
    keys = [f"H{k:08d}".encode() for k in range(accounts)]
    values = [_txn(k.decode(), f"h-{k.decode()}", 40.0 + i % 90, t0 + timedelta(milliseconds=i))
              for i, k in enumerate(keys)]
    produce(ns.bootstrap, ns.transactions, keys, values, batched=True)
    deadline = time.monotonic() + 900
    while sum(done_count(w.scrape()) for w in workers) < accounts:
        if time.monotonic() > deadline:
            raise BenchError("the workers did not take the history in 15 minutes")
        time.sleep(0.5)
    time.sleep(3.0)  # states written and offsets committed (about once a second)


def _probe_warnings(ns: Namespace, tag: str, since: float, timeout: float = 120.0) -> float:
    """Send one large transaction per probe account; seconds from `since` until the last one is warned."""
    from app.admin import consumer

    now = datetime.now(UTC)
    keys = [f"P{i:03d}".encode() for i in range(PROBES)]
    want = {f"{tag}-{i}" for i in range(PROBES)}
    produce(ns.bootstrap, ns.transactions, keys,
            [_txn(k.decode(), f"{tag}-{i}", 90_000.0, now) for i, k in enumerate(keys)])
    c = consumer(ns.settings, ns.prefix + "risk.alerts")
    seen: set[str] = set()
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline:
            for records in c.poll(timeout_ms=200).values():
                for r in records:
                    seen.update(json.loads(r.value)["event_ids"])
            if want <= seen:
                return time.monotonic() - since
    finally:
        c.close()
    raise BenchError(f"{len(want - seen)} of {PROBES} probes not warned within {timeout:.0f} s")


def case(bootstrap: str, work: Path, name: str, accounts: int, *, static: bool, workers: int,
         restart: bool) -> dict[str, Any]:
    """Run one failover case on a fresh namespace; return its figures."""
    ns = Namespace(bootstrap, work)
    ns.create()
    env = {"RISKWATCH_KAFKA_SESSION_TIMEOUT": str(SESSION_TIMEOUT)}
    started: list[Worker] = []

    def start(i: int) -> Worker:
        extra = {**env, "RISKWATCH_INSTANCE_ID": f"{ns.app_id}-{i}"} if static else env
        w = Worker(ns, work / f"{name}-{i}-{len(started)}.log", **extra)
        started.append(w)
        return w

    try:
        live = [start(i) for i in range(workers)]
        for w in live:
            w.wait_ready()
        _history(ns, accounts, live)
        victim = live[0]
        killed = time.monotonic()
        victim.proc.kill()
        victim.proc.wait(10)
        out: dict[str, Any] = {"case": name, "accounts": accounts, "workers": workers,
                               "static_membership": static, "session_timeout_s": SESSION_TIMEOUT}
        if restart:
            back = start(0)
            began = time.monotonic()
            took = _probe_warnings(ns, f"{name}-probe", killed)
            out["kill_to_all_partitions_warned_s"] = round(took, 2)
            out["start_to_all_partitions_warned_s"] = round(took - (began - killed), 2)
            out["worker_ready_s"] = round(back.wait_ready(), 2)
            m = READ_BACK.search(back.log_path.read_bytes())
            if m:
                records, seconds = int(m.group(1)), float(m.group(2))
                out.update(restored_records=records, restore_seconds=seconds,
                           restore_records_per_s=round(records / seconds) if seconds else None)
        else:
            out["kill_to_all_partitions_warned_s"] = round(_probe_warnings(ns, f"{name}-probe", killed), 2)
        return out
    finally:
        for w in started:
            if w.proc.poll() is None:
                w.stop()
        ns.delete()


def main(argv: Sequence[str] | None = None) -> int:
    """Measure the three failover cases and print one line each (and JSON with --json)."""
    ap = argparse.ArgumentParser(prog="python -m bench.failover", description=__doc__.splitlines()[0])
    ap.add_argument("--bootstrap", default="127.0.0.1:9092")
    ap.add_argument("--own-broker", action="store_true", help="start a private broker for the run")
    ap.add_argument("--accounts", type=int, default=200_000, help="accounts of history before the kill")
    ap.add_argument("--json", type=Path, help="write the figures here as JSON")
    args = ap.parse_args(argv)
    from bench.__main__ import broker

    results = []
    with tempfile.TemporaryDirectory(prefix="rw-failover-") as tmp:
        work = Path(tmp)
        with broker(args, work) as bootstrap:
            for name, static, workers, restart in (("restart-in-place-static", True, 1, True),
                                                   ("restart-in-place-dynamic", False, 1, True),
                                                   ("move-to-survivor", False, 2, False)):
                r = case(bootstrap, work, name, args.accounts, static=static, workers=workers, restart=restart)
                results.append(r)
                print(json.dumps(r), flush=True)
    if args.json:
        args.json.write_text(json.dumps(results, indent=1) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
