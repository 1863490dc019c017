"""Verdict feedback end to end: a real broker, a real worker, verdicts published as `riskwatch resolve` publishes them.

Two runs of the same five-day stream (300 accounts, models.synth seed 5, about 3,800 transactions
a day, the model budget raised to 20 warnings per 1,000 so a day gives dozens of one kind). Days
1-4 go in; every model warning of day 4 whose lead reason code is the day's most frequent is
resolved, all `false_positive` in one run, all `confirmed` in the control run, through
`app.cli_disposal.publish_act` onto risk.acks. Once the worker has fed the verdicts back (its
follower has read them all from risk.feedback), day 5 goes in. That kind's warnings per 1,000
transactions must fall to under a third of day 4's after false positives, and stay at four fifths
or more after confirmations (replayed offline the same stream gives 57 -> 12 and 57 -> 48; without
verdicts 57 -> 30, which is why the bar for a drop is a third: a worker that ignored verdicts fails).
risk.audit must carry the adaptation records naming the key.
"""

from __future__ import annotations

import json
import math
import time
import uuid
from collections.abc import Callable, Iterator
from datetime import datetime
from pathlib import Path
from typing import Any

import pytest

from app.faust_app import ALERTS, AUDIT, FEEDBACK, TRANSACTIONS
from app.settings import Settings, get_settings
from models.scoring import MODEL_DETECTOR
from models.synth import generate
from tests.conftest import ROOT, WorkerProcess, consume, free_port, settings_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

DAY = 86_400.0


@pytest.fixture(scope="module")
def days() -> list[list[dict[str, Any]]]:
    """The stream cut into its five days (event time from the first event)."""
    events = generate(seed=5, accounts=300, days=5.0, instruments=0)
    t0 = datetime.fromisoformat(events[0]["ts"]).timestamp()
    out: list[list[dict[str, Any]]] = [[] for _ in range(5)]
    for e in events:
        out[min(int((datetime.fromisoformat(e["ts"]).timestamp() - t0) // DAY), 4)].append(e)
    return out


@pytest.fixture
def cli_env(monkeypatch: pytest.MonkeyPatch) -> Iterator[Callable[[Settings], None]]:
    """Point `riskwatch`'s own settings (get_settings) at a test's settings, as its environment would."""

    def use(s: Settings) -> None:
        for name, value in settings_env(s).items():
            if name.startswith("RISKWATCH_"):
                monkeypatch.setenv(name, value)
        get_settings.cache_clear()

    yield use
    get_settings.cache_clear()


def _produce(s: Settings, events: list[dict[str, Any]]) -> None:
    from app.admin import producer

    p = producer(s, linger_ms=20)
    try:
        for e in events:
            p.send(s.topic(TRANSACTIONS), key=e["account_id"].encode(), value=json.dumps(e).encode())
        p.flush(60)
    finally:
        p.close()


def _wait(what: str, check: Callable[[], bool], worker: WorkerProcess, timeout: float = 120.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}\n{worker.tail()}")
        time.sleep(0.5)


def _scored(worker: WorkerProcess, s: Settings, n: int) -> None:
    topic = s.topic(TRANSACTIONS)
    _wait(f"{n} transactions scored", lambda: worker.metric("riskwatch_events_scored_total", topic=topic) >= n,
          worker)


def _first_versions(s: Settings, until: Callable[[dict[str, dict[str, Any]]], bool]) -> dict[str, dict[str, Any]]:
    """The first published version of every warning on risk.alerts, read until `until` holds and then 3 s more."""
    from app.admin import consumer

    c = consumer(s, s.topic(ALERTS))
    first: dict[str, dict[str, Any]] = {}
    quiet_since = None
    deadline = time.monotonic() + 120
    try:
        while time.monotonic() < deadline:
            got = [json.loads(r.value) for rs in c.poll(timeout_ms=500).values() for r in rs]
            for a in got:
                first.setdefault(a["alert_id"], a)
            if got:
                quiet_since = None
            elif until(first):
                quiet_since = quiet_since or time.monotonic()
                if time.monotonic() - quiet_since > 3:
                    return first
    finally:
        c.close()
    raise AssertionError(f"risk.alerts did not settle: {len(first)} warnings")


def _lead(a: dict[str, Any]) -> str | None:
    return a["reasons"][0]["code"] if a["detector"] == MODEL_DETECTOR and a["reasons"] else None


def _in(a: dict[str, Any], events: list[dict[str, Any]]) -> bool:
    lo, hi = events[0]["ts"], events[-1]["ts"]
    t = datetime.fromisoformat(a["created_at"]).timestamp()
    return datetime.fromisoformat(lo).timestamp() <= t <= datetime.fromisoformat(hi).timestamp()


def _run(s: Settings, days: list[list[dict[str, Any]]], verdict: str, start_worker: Callable[..., WorkerProcess],
         cli_env: Callable[[Settings], None]) -> dict[str, Any]:
    """Days 1-4, verdicts on day 4's most frequent kind of model warning, then day 5; the counts per day."""
    from app.cli_disposal import publish_act

    worker = start_worker(s)
    before = [e for d in days[:4] for e in d]
    _produce(s, before)
    _scored(worker, s, len(before))
    alerts = _first_versions(s, lambda got: len(got) > 0)
    day4 = [a for a in alerts.values() if _lead(a) is not None and _in(a, days[3])]
    kinds = [_lead(a) for a in day4]
    code = max(set(kinds), key=kinds.count)
    judged = [a for a in day4 if _lead(a) == code]
    assert len(judged) >= 25, f"day 4 gave only {len(judged)} {code}-led model warnings"

    cli_env(s)
    for a in judged:  # as `riskwatch resolve ALERT_ID --verdict ... --by ...` does
        publish_act(a["alert_id"], "resolve", "analyst-e2e", "feedback test", verdict)
    # The disposal agent counts each verdict and publishes it; the follower reads it back as a repeat.
    _wait("every verdict fed back", lambda: worker.metric("riskwatch_feedback_verdicts_total") >= len(judged), worker)
    factor = worker.metric("riskwatch_feedback_factor", detector=MODEL_DETECTOR, code=code)

    _produce(s, days[4])
    _scored(worker, s, len(before) + len(days[4]))
    after = _first_versions(s, lambda got: any(_in(a, days[4]) for a in got.values()))
    day5 = [a for a in after.values() if _lead(a) == code and _in(a, days[4])]
    audit = consume(s, AUDIT, lambda got: any(r.get("kind") == "feedback" for r in got))
    feedback = consume(s, FEEDBACK, lambda got: len(got) >= len(judged))
    parts = [str(p) for p in range(s.topic_partitions)]
    _wait("every partition's operating point published",
          lambda: all(worker.metric("riskwatch_model_operating_per_1000", category="anomaly", partition=p) > 0
                      for p in parts), worker)
    operating = {p: worker.metric("riskwatch_model_operating_per_1000", category="anomaly", partition=p)
                 for p in parts}
    return {"budget": worker.metric("riskwatch_model_budget_per_1000", category="anomaly"), "operating": operating,
            "code": code, "day4": len(judged), "day5": len(day5), "rate4": 1000 * len(judged) / len(days[3]),
            "rate5": 1000 * len(day5) / len(days[4]), "factor": factor, "audit": audit, "feedback": feedback,
            "adapted": worker.metric("riskwatch_feedback_adaptations_total", detector=MODEL_DETECTOR, code=code),
            "judged": {a["alert_id"] for a in judged}}


def test_false_positive_verdicts_lower_that_kinds_warning_rate_and_confirmed_ones_do_not(
        settings: Settings, start_worker: Callable[..., WorkerProcess], days: list[list[dict[str, Any]]],
        cli_env: Callable[[Settings], None], tmp_path: Path) -> None:
    rules = tmp_path / "rules.yaml"
    text = (ROOT / "deploy" / "rules.yaml").read_text()
    assert "budget_per_1000: 2.0" in text
    rules.write_text(text.replace("budget_per_1000: 2.0", "budget_per_1000: 20.0"))
    fp_settings = settings.model_copy(update={"rules_file": rules})
    ns = f"t{uuid.uuid4().hex[:10]}."
    ok_settings = fp_settings.model_copy(update={"topic_prefix": ns, "app_id": f"rw-{ns[:-1]}",
                                                 "metrics_port": free_port(), "web_port": free_port()})

    fp = _run(fp_settings, days, "false_positive", start_worker, cli_env)
    ok = _run(ok_settings, days, "confirmed", start_worker, cli_env)
    print(f"\n{fp['code']}-led model warnings per 1,000 transactions, day 4 -> day 5: after false positives "
          f"{fp['rate4']:.1f} -> {fp['rate5']:.1f} ({fp['day4']} -> {fp['day5']}, factor {fp['factor']}); after "
          f"confirmations {ok['rate4']:.1f} -> {ok['rate5']:.1f} ({ok['day4']} -> {ok['day5']}, factor {ok['factor']})")

    assert fp["code"] == ok["code"] and fp["day4"] == ok["day4"]  # the same stream, the same warnings before
    assert fp["factor"] == 0.25 and ok["factor"] > 1.5
    assert fp["rate5"] < fp["rate4"] / 3, "false-positive verdicts must lower the rate of that kind of warning"
    assert ok["rate5"] >= 0.8 * ok["rate4"], "confirmed verdicts must not lower it"
    assert fp["day5"] < ok["day5"] / 3
    # The budget's operating point is visible per partition, within its bounds (e^-3 to e^3 times the budget).
    for run in (fp, ok):
        assert run["budget"] == 20.0
        assert all(20.0 * math.exp(-3) <= v <= 20.0 * math.exp(3) for v in run["operating"].values()), run["operating"]

    for run, direction in ((fp, "down"), (ok, "up")):
        records = [r for r in run["audit"] if r.get("kind") == "feedback"]
        assert records and all(r["key"] == f"{MODEL_DETECTOR}/{run['code']}" for r in records)
        assert {r["direction"] for r in records} == {direction}
        assert all(r["alert_id"] in run["judged"] and r["by"] == "analyst-e2e" for r in records)
        assert run["adapted"] == len({r["audit_id"] for r in records})
        assert {r["alert_id"] for r in run["feedback"]} == run["judged"]
    last = max((r for r in fp["audit"] if r.get("kind") == "feedback"), key=lambda r: r["false_positive"])
    assert last["new_factor"] == 0.25 and last["confirmed"] == 0 and last["false_positive"] >= 12
