"""Baselines: what a first attempt with River looks like, on the same data, to put riskwatch's speed in context."""

from __future__ import annotations

import json
from datetime import datetime

from bench.ceilings import PARSE
from bench.common import Data, Figure, Report, clocked, loadavg

GROUP = "baselines"


def naive_river(report: Report, data: Data, n: int) -> Figure:
    """json.loads, then River HalfSpaceTrees() with default parameters on a few raw fields, score then learn."""
    from river.anomaly import HalfSpaceTrees

    values = data.values[:n]
    hst = HalfSpaceTrees()
    load = loadavg()
    with clocked() as c:
        for raw in values:
            e = json.loads(raw)
            x = {"amount": e["amount"], "hour": int(e["ts"][11:13]), "debit": e["direction"] == "debit"}
            hst.score_one(x)
            hst.learn_one(x)
    return report.add(Figure(GROUP, "naive_river", "baseline: naive River loop (HST defaults)", n / c.wall,
                             "events/s", ceiling=PARSE, load_before=load, detail=_detail(n, c.wall, c.cpu)))


def river_with_features(report: Report, data: Data, n: int) -> Figure:
    """The same loop fed riskwatch's per-account features (models.features + surprises) instead of raw fields."""
    from river.anomaly import HalfSpaceTrees

    from models.detector import WEIGHTS, surprises
    from models.features import AccountState, learn, observe

    values = data.values[:n]
    hst = HalfSpaceTrees()
    states: dict[str, AccountState] = {}
    names = tuple(WEIGHTS)
    load = loadavg()
    with clocked() as c:
        for raw in values:
            e = json.loads(raw)
            ts = datetime.fromisoformat(e["ts"])
            state = states.get(e["account_id"])
            if state is None:
                state = states[e["account_id"]] = AccountState()
            f = observe(state, ts.timestamp(), e["amount"], e["direction"] == "debit", e["counterparty_id"],
                        e.get("device_id"), ts.hour, e["txn_type"])
            s = surprises(f)
            # HalfSpaceTrees builds its trees from the first event's keys: every event must carry them all.
            x = {k: s.get(k, 0.0) for k in names}
            hst.score_one(x)
            hst.learn_one(x)
            learn(state, f)
    return report.add(Figure(GROUP, "river_features", "baseline: River loop + riskwatch features", n / c.wall,
                             "events/s", ceiling=PARSE, load_before=load, detail=_detail(n, c.wall, c.cpu)))


def _detail(n: int, wall: float, cpu: float) -> dict[str, float]:
    return {"events": n, "wall_seconds": round(wall, 3), "cpu_seconds": round(cpu, 3),
            "events_per_cpu_second": round(n / cpu) if cpu > 0 else 0}


__all__ = ["naive_river", "river_with_features"]
