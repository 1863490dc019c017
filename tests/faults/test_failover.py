"""Failover in seconds: a worker killed and restarted in place warns again within 10 s of starting.

With dynamic group membership the restarted worker waited for the dead member's session timeout
(30 s by default) before either group gave it partitions: its first new warning came 30 s after
it started (issue 17). With RISKWATCH_INSTANCE_ID (static membership, KIP-345) the broker hands
the returning member its partitions at once. `python -m bench.failover` measures the three cases.
"""

from __future__ import annotations

import json
import time
from typing import Any

import pytest

from app.faust_app import ALERTS, SCORES, TRANSACTIONS
from tests.conftest import consume, free_port, produce

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

WARN_WITHIN = 10.0
ACCOUNTS = 40  # keys over every partition


def _large(make_txn: Any, tag: str) -> list[dict[str, Any]]:
    """One large transaction per account: each is a large_transaction warning on its account's partition."""
    return [make_txn(account_id=f"acct-{i:03d}", amount=90_000.0, minutes=60.0 + i, event_id=f"{tag}-{i:03d}")
            for i in range(ACCOUNTS)]


def test_a_worker_restarted_in_place_warns_within_10_s(settings, start_worker, make_txn):
    s = settings.model_copy(update={"instance_id": "worker-0", "kafka_session_timeout": 30.0,
                                    "publish_scores": True})
    history = [make_txn(account_id=f"acct-{i % ACCOUNTS:03d}", amount=50.0 + i % 70, minutes=i * 0.1)
               for i in range(400)]
    first = start_worker(s)
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in history])
    consume(s, SCORES, lambda got: len(got) >= len(history), timeout=90)
    first.kill()

    started = time.monotonic()
    # On other ports, as a rescheduled pod may be: Faust's assignor once refused the returning member's
    # old assignment when its web URL changed, and that worker never consumed again.
    second = start_worker(s.model_copy(update={"web_port": free_port(), "metrics_port": free_port()}), ready=False)
    probes = _large(make_txn, "probe")
    produce(s, TRANSACTIONS, [(e["account_id"].encode(), json.dumps(e).encode()) for e in probes])
    want = {e["event_id"] for e in probes}
    seen: dict[str, float] = {}

    def warned(got: list[dict[str, Any]]) -> bool:
        for a in got:
            for eid in a["event_ids"]:
                if eid in want:
                    seen.setdefault(eid, time.monotonic() - started)
        return want <= set(seen)

    consume(s, ALERTS, warned, timeout=90)
    first_at, last_at = min(seen.values()), max(seen.values())
    print(f"restart in place (static membership, session timeout 30 s): first warning {first_at:.1f} s after "
          f"start, warnings on all {ACCOUNTS} accounts (every partition) by {last_at:.1f} s")
    assert second.proc.poll() is None, second.tail()
    assert last_at < WARN_WITHIN, f"the last partition warned {last_at:.1f} s after the restart:\n{second.tail()}"
