"""Disposal end to end: real broker, real worker processes, a real Alertmanager paging a webhook sink.

One scenario, in the order a duty desk lives it: two fund-isolation breaches raise warnings and
fund-isolation triggers, and Alertmanager, once it comes up (pushes are retried until then), pages
both; one is acknowledged, then the worker is
killed with SIGKILL before the acknowledgement deadline; after a restart the unacknowledged one
escalates exactly once and the acknowledged one never does; a third breach, raised while the
worker runs, escalates once too; resolving removes the pages in Alertmanager.
"""

from __future__ import annotations

import json
import shutil
import subprocess
import sys
import threading
import time
import urllib.request
from collections.abc import Callable, Iterator
from datetime import UTC, datetime
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path
from typing import Any

import pytest
import yaml

from agents.disposal import partition_of
from app.faust_app import ACKS, ALERTS, AUDIT, CONTINGENCY, DEADLETTER, TRANSACTIONS
from app.settings import Settings
from models.plans import Trigger, load_plans
from tests.conftest import ROOT, consume, free_port, produce, settings_env

pytestmark = [pytest.mark.kafka, pytest.mark.slow]

ACK_WITHIN = 12.0  # seconds: short, so the test waits seconds, not minutes
CHECK_EVERY = 0.5


class WebhookSink:
    """A tiny HTTP server that records every Alertmanager webhook notification it receives."""

    def __init__(self) -> None:
        self.notifications: list[dict[str, Any]] = []
        self.lock = threading.Lock()
        sink = self

        class Handler(BaseHTTPRequestHandler):
            def do_POST(self) -> None:
                body = self.rfile.read(int(self.headers.get("Content-Length", 0)))
                with sink.lock:
                    sink.notifications.append(json.loads(body))
                self.send_response(200)
                self.end_headers()

            def log_message(self, *args: Any) -> None:
                pass

        self.server = ThreadingHTTPServer(("127.0.0.1", 0), Handler)
        self.url = f"http://127.0.0.1:{self.server.server_address[1]}/hook"
        self.thread = threading.Thread(target=self.server.serve_forever, daemon=True)
        self.thread.start()

    def received(self, status: str | None = None, **labels: str) -> list[dict[str, Any]]:
        """Notifications (optionally of one status) carrying an alert with these labels."""
        with self.lock:
            got = list(self.notifications)
        return [n for n in got if (status is None or n["status"] == status)
                and any(all(a["labels"].get(k) == v for k, v in labels.items()) for a in n["alerts"])]

    def close(self) -> None:
        self.server.shutdown()
        self.server.server_close()
        self.thread.join(5)


@pytest.fixture
def sink() -> Iterator[WebhookSink]:
    s = WebhookSink()
    yield s
    s.close()


class Alertmanager:
    """Debian's prometheus-alertmanager on a fixed free port, every warning routed to the sink; start() it."""

    def __init__(self, tmp_path: Path, sink: WebhookSink) -> None:
        binary = shutil.which("prometheus-alertmanager") or shutil.which("alertmanager")
        if binary is None:
            pytest.fail("prometheus-alertmanager not found: run `apt-get install prometheus-alertmanager`")
        config = {
            "route": {"receiver": "sink", "group_by": ["alertname", "alert_id", "stage"], "group_wait": "0s",
                      "group_interval": "1s", "repeat_interval": "1h"},
            "receivers": [{"name": "sink", "webhook_configs": [{"url": sink.url, "send_resolved": True}]}],
        }
        cfg = tmp_path / "alertmanager.yml"
        cfg.write_text(yaml.safe_dump(config))
        self.port = free_port()
        self.url = f"http://127.0.0.1:{self.port}"
        self.log_path = tmp_path / "alertmanager.log"
        self.args = [binary, f"--config.file={cfg}", f"--storage.path={tmp_path / 'am'}",
                     f"--web.listen-address=127.0.0.1:{self.port}", "--cluster.listen-address="]
        self.proc: subprocess.Popen[bytes] | None = None

    def start(self) -> None:
        with self.log_path.open("ab") as log:
            self.proc = subprocess.Popen(self.args, stdout=log, stderr=subprocess.STDOUT)
        deadline = time.monotonic() + 20
        while True:
            try:
                urllib.request.urlopen(f"{self.url}/-/ready", timeout=1).close()
                return
            except OSError:
                if self.proc.poll() is not None or time.monotonic() > deadline:
                    pytest.fail(f"Alertmanager did not start:\n{self.log_path.read_text()}")
                time.sleep(0.1)

    def stop(self) -> None:
        if self.proc is not None and self.proc.poll() is None:
            self.proc.terminate()
            try:
                self.proc.wait(10)
            except subprocess.TimeoutExpired:
                self.proc.kill()
                self.proc.wait()


@pytest.fixture
def alertmanager(tmp_path: Path, sink: WebhookSink) -> Iterator[Alertmanager]:
    """An Alertmanager, not yet started: the test decides when it comes up."""
    am = Alertmanager(tmp_path, sink)
    yield am
    am.stop()


@pytest.fixture
def disposal_settings(settings: Settings, alertmanager: Alertmanager, tmp_path: Path) -> Settings:
    """Settings with the shipped plans, the fund-isolation acknowledgement deadline cut to seconds."""
    plans = yaml.safe_load((ROOT / "deploy" / "plans.yaml").read_text())
    plans["plans"]["fund-isolation-breach"]["ack_within"] = ACK_WITHIN
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump(plans))
    load_plans(path)  # the edited catalogue must still be valid
    return settings.model_copy(update={
        "plans_file": path, "alertmanager_url": alertmanager.url, "page_min_level": "high",
        "escalation_check_seconds": CHECK_EVERY, "page_refresh_seconds": 15.0,
        # The killed worker's partitions move on once its session times out: keep that short.
        "kafka_session_timeout": 6.0})


def riskwatch(s: Settings, *args: str) -> str:
    """Run a riskwatch command as a user would, with the test's settings; return its output."""
    done = subprocess.run([sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())", *args],
                          cwd=ROOT, env=settings_env(s), capture_output=True, text=True, timeout=60, check=False)
    assert done.returncode == 0, f"riskwatch {' '.join(args)} failed:\n{done.stdout}\n{done.stderr}"
    return done.stdout


def breach(make_txn: Callable[..., dict[str, Any]], account: str) -> dict[str, Any]:
    """A transfer from a custody account to a platform-owned account: a fund-isolation breach."""
    return make_txn(account_id=account, counterparty_id="platform-treasury", amount=20_000.0, txn_type="transfer",
                    account_kind="custody", counterparty_kind="platform_own")


def triggers_for(s: Settings, alert_ids: set[str], kind: str, timeout: float = 60.0) -> list[Trigger]:
    """Read risk.contingency until each alert has a trigger of `kind`; return every trigger seen."""
    msgs = consume(s, CONTINGENCY, lambda got: alert_ids <= {m["alert_id"] for m in got if m["kind"] == kind},
                   timeout=timeout)
    return [Trigger.model_validate(m) for m in msgs]


def wait_for(what: str, check: Callable[[], bool], timeout: float = 60.0) -> None:
    deadline = time.monotonic() + timeout
    while not check():
        if time.monotonic() > deadline:
            raise AssertionError(f"timed out waiting for {what}")
        time.sleep(0.3)


def test_fund_isolation_is_paged_acknowledged_escalated_once_across_a_kill_and_resolved(
        disposal_settings: Settings, start_worker: Callable[..., Any], make_txn: Callable[..., dict[str, Any]],
        sink: WebhookSink, alertmanager: Alertmanager) -> None:
    s = disposal_settings
    worker = start_worker(s)  # Alertmanager is not up yet: pages must wait for it, not get lost
    acked_txn, silent_txn = breach(make_txn, "custody-A"), breach(make_txn, "custody-B")
    produce(s, TRANSACTIONS, [(b"custody-A", json.dumps(acked_txn).encode()),
                              (b"custody-B", json.dumps(silent_txn).encode())])

    alerts = consume(s, ALERTS, lambda got: {a["entity_id"] for a in got} >= {"custody-A", "custody-B"})
    alert_of = {a["entity_id"]: a for a in alerts}
    assert {a["category"] for a in alerts} == {"fund_isolation"} and alert_of["custody-A"]["level"] == "critical"
    acked, silent = alert_of["custody-A"]["alert_id"], alert_of["custody-B"]["alert_id"]

    # The warning yields the trigger of the fund-isolation plan: freeze, notify compliance, page at once.
    plan_triggers = {t.alert_id: t for t in triggers_for(s, {acked, silent}, "plan") if t.kind == "plan"}
    trig = plan_triggers[acked]
    assert trig.plan_id == "fund-isolation-breach" and trig.owner_team == "compliance"
    assert {"freeze_account", "notify_compliance", "page_oncall"} <= set(trig.actions)
    assert trig.entity_id == "custody-A" and trig.level == "critical"
    assert (trig.ack_deadline - trig.opened_at).total_seconds() == ACK_WITHIN

    # Alertmanager pages both once it is up, with the labels its routing tree needs.
    wait_for("push retries", lambda: worker.metric("riskwatch_pages_total", result="retry") >= 2)
    assert worker.metric("riskwatch_pages_total", result="sent") == 0
    alertmanager.start()
    wait_for("both pages", lambda: all(sink.received("firing", alert_id=a, stage="plan") for a in (acked, silent)))
    page = next(a for n in sink.received("firing", alert_id=acked) for a in n["alerts"])
    assert {k: page["labels"][k] for k in ("category", "level", "entity_id", "plan", "team")} == {
        "category": "fund_isolation", "level": "critical", "entity_id": "custody-A",
        "plan": "fund-isolation-breach", "team": "compliance"}
    # The transaction type travels from the warning to the page (what a liquidity run's inhibition matches).
    assert alert_of["custody-A"]["txn_type"] == page["labels"]["txn_type"] == "transfer"
    assert page["annotations"]["reasons"] == "; ".join(r["message"] for r in alert_of["custody-A"]["reasons"])
    assert page["annotations"]["runbook"] == "docs/disposal.md#fund-isolation-breach"

    # Acknowledge one (through the CLI, as a person would), then kill the worker before the deadline.
    riskwatch(s, "ack", acked, "--by", "alice", "--note", "freezing the account")
    consume(s, AUDIT, lambda got: any(r["alert_id"] == acked and r["action"] == "ack" for r in got))
    assert time.time() < plan_triggers[silent].ack_deadline.timestamp(), "too slow: the deadline passed already"
    worker.kill()

    worker = start_worker(s)
    triggers_for(s, {silent}, "escalation", timeout=90)
    # A third breach while the worker runs: it escalates once too, a deadline after its trigger.
    third_txn = breach(make_txn, "custody-C")
    produce(s, TRANSACTIONS, [(b"custody-C", json.dumps(third_txn).encode())])
    third = consume(s, ALERTS, lambda got: any(a["entity_id"] == "custody-C" for a in got))
    third_id = next(a["alert_id"] for a in third if a["entity_id"] == "custody-C")
    triggers_for(s, {silent, third_id}, "escalation", timeout=90)
    time.sleep(6 * CHECK_EVERY)  # several more deadline checks: none may fire again
    every = triggers_for(s, {silent, third_id}, "escalation")

    escalated = [t for t in every if t.kind == "escalation"]
    assert sorted(t.alert_id for t in escalated) == sorted([silent, third_id]), "exactly one escalation each"
    esc = next(t for t in escalated if t.alert_id == third_id)
    third_plan = next(t for t in every if t.alert_id == third_id and t.kind == "plan")
    assert esc.opened_at >= third_plan.ack_deadline, "escalated before the deadline"
    assert esc.owner_team == "risk-duty" and esc.escalation_of == third_plan.trigger_id
    # At-least-once with deterministic ids (agents/disposal.py): a kill between publishing a trigger and
    # the lifecycle's changelog write may repeat it after the restart, under the same id (consumers key on it).
    acked_plan = [t for t in every if t.alert_id == acked and t.kind == "plan"]
    assert {(t.trigger_id, t.plan_id, t.owner_team) for t in acked_plan} == {
        (trig.trigger_id, trig.plan_id, trig.owner_team)}, "one trigger per alert and plan"
    assert worker.metric("riskwatch_escalations_total", plan="fund-isolation-breach") >= 1

    # No page twice after the restart; the escalation pages the escalation team.
    wait_for("escalation page", lambda: bool(sink.received("firing", alert_id=silent, stage="escalation")))
    assert len(sink.received("firing", alert_id=acked, stage="plan")) == 1
    assert len(sink.received("firing", alert_id=silent, stage="plan")) == 1

    # Resolving ends the pages in Alertmanager.
    riskwatch(s, "resolve", silent, "--verdict", "confirmed", "--by", "bob")
    # A producer that keys acts otherwise still reaches the alert (the act is re-routed to the
    # alert's partition); a malformed act is dead-lettered and the worker carries on.
    alert_partition = partition_of(acked.encode(), s.topic_partitions)
    wrong = next(k for k in (f"k{i}".encode() for i in range(100))
                 if partition_of(k, s.topic_partitions) != alert_partition)
    act = {"alert_id": acked, "action": "resolve", "by": "alice", "verdict": "false_positive",
           "ts": datetime.now(UTC).isoformat()}
    produce(s, ACKS, [(wrong, json.dumps(act).encode()), (b"junk", b'{"alert_id": "zz", "action": "ack"}')])
    dead = consume(s, DEADLETTER, lambda got: any(d["source_topic"] == s.topic(ACKS) for d in got))
    letter = next(d for d in dead if d["source_topic"] == s.topic(ACKS))
    assert letter["field"] == "alert_id" and "should match pattern" in letter["reason"]
    wait_for("resolved notifications", lambda: all(
        sink.received("resolved", alert_id=a, stage=st) for a, st in ((silent, "plan"), (silent, "escalation"),
                                                                      (acked, "plan"))))
    with urllib.request.urlopen(f"{alertmanager.url}/api/v2/alerts?active=true", timeout=5) as r:
        active = {a["labels"]["alert_id"] for a in json.load(r)}
    assert silent not in active and acked not in active and third_id in active

    audit = consume(s, AUDIT, lambda got: sum(r["alert_id"] in (acked, silent) for r in got) >= 6)
    trail = {aid: [(r["action"], r["to_status"], r["by"]) for r in audit if r["alert_id"] == aid]
             for aid in (acked, silent)}
    assert trail[acked] == [("raise", "open", "riskwatch"), ("ack", "acknowledged", "alice"),
                            ("resolve", "resolved", "alice")]
    assert trail[silent] == [("raise", "open", "riskwatch"), ("escalate", "escalated", "riskwatch"),
                             ("resolve", "resolved", "bob")]
    wait_for("verdict metrics", lambda: worker.metric("riskwatch_verdicts_total", detector="rule:fund_isolation",
                                                     verdict="confirmed") == 1)
    assert worker.metric("riskwatch_verdicts_total", detector="rule:fund_isolation", verdict="false_positive") == 1
    assert worker.metric("riskwatch_pages_total", result="resolved") >= 3
    assert worker.metric("riskwatch_time_to_ack_seconds_count") >= 1
    wait_for("gauges", lambda: worker.metric("riskwatch_open_alerts", level="critical") == 1)
    assert worker.metric("riskwatch_deadletters_total", topic=s.topic(ACKS)) == 1
    assert "re-routed act on" in worker.log_path.read_text()
    assert worker.proc.poll() is None


def test_two_workers_sharing_the_load_escalate_each_alert_exactly_once(
        settings: Settings, start_worker: Callable[..., Any], make_txn: Callable[..., dict[str, Any]],
        tmp_path: Path) -> None:
    plans = yaml.safe_load((ROOT / "deploy" / "plans.yaml").read_text())
    plans["plans"]["fund-isolation-breach"]["ack_within"] = 8
    path = tmp_path / "plans.yaml"
    path.write_text(yaml.safe_dump(plans))
    s = settings.model_copy(update={"plans_file": path, "escalation_check_seconds": CHECK_EVERY,
                                    "kafka_session_timeout": 6.0})
    first = start_worker(s)
    second = start_worker(s.model_copy(update={"metrics_port": free_port(), "web_port": free_port()}))
    # The second is ready once the group rebalanced: from here on each owns half the partitions.
    accounts = [f"custody-{i}" for i in range(12)]
    produce(s, TRANSACTIONS, [(a.encode(), json.dumps(breach(make_txn, a)).encode()) for a in accounts])
    alerts = consume(s, ALERTS, lambda got: {a["entity_id"] for a in got} >= set(accounts))
    ids = {a["alert_id"] for a in alerts}
    triggers_for(s, ids, "escalation", timeout=90)
    time.sleep(6 * CHECK_EVERY)
    every = triggers_for(s, ids, "escalation")
    escalated = sorted(t.alert_id for t in every if t.kind == "escalation")
    assert escalated == sorted(ids), "one escalation per alert, not two"
    counts = [w.metric("riskwatch_escalations_total") for w in (first, second)]
    assert sum(counts) == len(ids) and min(counts) > 0, f"each worker escalates only its own alerts: {counts}"
