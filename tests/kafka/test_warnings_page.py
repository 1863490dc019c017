"""The worker's live warnings page: its feed without a broker, then the real page in headless Chromium.

The browser test runs a worker on the real broker, opens its page in Debian's Chromium (driven
by Playwright, which uses the system browser and downloads nothing), signs in as a viewer, produces risky transactions
and checks that each warning appears on the open page within two seconds of its publication on
risk.alerts, with level colour, reason, plan and owner, open counts and working filters. It
saves a screenshot (warnings-page.png in the test's tmp dir) for a person to look at.
"""

from __future__ import annotations

import json
import shutil
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from agents.web import AlertFeed, plan_lookup
from app.admin import consumer
from app.faust_app import ACKS, ALERTS, TRANSACTIONS
from app.settings import Settings
from models.plans import load_plans
from tests.conftest import ROOT, produce

CHROMIUM = "/usr/bin/chromium"
PLANS = ROOT / "deploy" / "plans.yaml"


def _alert(alert_id: str, level: str = "medium", category: str = "large_transaction", **over: Any) -> dict[str, Any]:
    alert = {"alert_id": alert_id, "created_at": "2026-11-02T01:14:03Z", "event_ts": "2026-11-02T01:14:03Z",
             "entity_type": "account", "entity_id": "acct-1", "category": category, "level": level, "score": 0.9,
             "reasons": [{"code": category, "message": "a reason"}], "event_ids": ["e1"],
             "detector": f"rule:{category}"}
    alert.update(over)
    return alert


# --------------------------------------------------------------------------- the feed, without a broker
def test_feed_keeps_the_latest_version_of_each_warning_and_serves_changes_since_a_poll() -> None:
    feed = AlertFeed(keep=3)
    feed.add(_alert("a1"), 1.0)
    feed.add(_alert("a2", level="high", category="velocity"), 2.0)
    seen = feed.seq
    feed.add(_alert("a1", level="high", event_ids=["e1", "e2"]), 3.0)  # an update: same alert_id

    assert [a["alert_id"] for a in feed.since(0)] == ["a1", "a2"]
    changed = feed.since(seen)
    assert [(a["alert_id"], a["level"], a["versions"]) for a in changed] == [("a1", "high", 2)]
    assert feed.counts() == {"low": 0, "medium": 0, "high": 2, "critical": 0}
    assert [a["alert_id"] for a in feed.since(0, category="velocity")] == ["a2"]
    assert feed.since(0, level="medium") == []

    for i in range(3):
        feed.add(_alert(f"b{i}"), 10.0 + i)
    assert [a["alert_id"] for a in feed.since(0)] == ["b2", "b1", "b0"]  # keep=3: the oldest went
    feed.add({"alert_id": "x", "level": "severe"}, 20.0)  # not a warning this page can show
    assert "x" not in feed.items


def test_triggers_and_audit_records_set_plan_owner_and_status_even_when_they_come_first() -> None:
    feed = AlertFeed()
    feed.on_trigger({"alert_id": "a1", "kind": "plan", "plan_id": "p1", "title": "Freeze", "owner_team": "fraud-ops"})
    feed.add(_alert("a1", level="critical", category="fund_isolation"), 1.0)
    feed.add(_alert("a2"), 2.0)
    before = feed.seq
    feed.on_audit({"alert_id": "a1", "to_status": "acknowledged", "by": "lin", "outcome": "applied"})
    feed.on_trigger({"alert_id": "a1", "kind": "escalation", "owner_team": "risk-duty"})
    feed.on_audit({"alert_id": "a2", "to_status": "resolved", "by": "wu", "outcome": "applied"})
    feed.on_audit({"alert_id": "a2", "to_status": "open", "by": "x", "outcome": "rejected"})

    a1, a2 = feed.items["a1"], feed.items["a2"]
    assert (a1["plan"], a1["owner"], a1["plan_source"]) == ("Freeze (p1)", "fraud-ops", "triggered")
    assert (a1["status"], a1["status_by"], a1["escalated_to"]) == ("acknowledged", "lin", "risk-duty")
    assert a2["status"] == "resolved"
    assert {a["alert_id"] for a in feed.since(before)} == {"a1", "a2"}
    assert feed.counts() == {"low": 0, "medium": 0, "high": 0, "critical": 1}  # resolved is not open
    feed.add(_alert("a1", level="critical", category="fund_isolation"), 3.0)  # an update keeps what is known
    assert feed.items["a1"]["status"] == "acknowledged" and feed.items["a1"]["plan"] == "Freeze (p1)"


def test_plan_lookup_uses_the_shipped_plan_catalogue(tmp_path: Path) -> None:
    lookup = plan_lookup(PLANS)
    assert lookup is not None
    plan = load_plans(PLANS).select("fund_isolation", "critical")
    assert plan is not None
    assert lookup(_alert("a1", level="critical", category="fund_isolation")) == (
        f"{plan.title} ({plan.plan_id})", plan.owner_team)
    assert plan_lookup(tmp_path / "missing.yaml") is None
    (tmp_path / "bad.yaml").write_text("version: 0\n")
    assert plan_lookup(tmp_path / "bad.yaml") is None  # logged; the page then shows category and level only


# --------------------------------------------------------------------------- the page in Chromium
def _chromium() -> str:
    if shutil.which(CHROMIUM) is None:
        pytest.fail(f"{CHROMIUM} not found: run `apt-get install chromium`", pytrace=False)
    return CHROMIUM


def add_users(s: Settings, users: dict[str, tuple[str, str]]) -> str:
    """Write the users file the worker reads (name -> (role, password)); return a read-only token of the first."""
    from app.auth import Users

    u = Users(s.users_path)
    for name, (role, password) in users.items():
        u.add(name, role, password)
    token = u.issue_token(next(iter(users)), "test")
    u.save()
    return token


def sign_in(page: Any, base: str, name: str, password: str) -> None:
    """Sign in through the page's form and wait for the live feed."""
    page.goto(base + "/")
    page.fill("#signin-name", name)
    page.fill("#signin-password", password)
    page.click("#signin button[type=submit]")
    page.wait_for_function("() => document.getElementById('status').textContent.startsWith('live')",
                           timeout=30_000)


BROWSER_ARGS = ["--no-sandbox", "--disable-gpu", "--disable-dev-shm-usage", "--disable-background-networking",
                "--disable-component-update", "--disable-sync", "--no-first-run"]


def _published_at(s: Settings, entity_ids: set[str], timeout: float = 60.0) -> dict[str, tuple[float, dict[str, Any]]]:
    """Publication time (the record's timestamp, seconds) and content of the first warning per entity."""
    c = consumer(s, s.topic(ALERTS))
    found: dict[str, tuple[float, dict[str, Any]]] = {}
    deadline = time.monotonic() + timeout
    try:
        while time.monotonic() < deadline and found.keys() != entity_ids:
            for records in c.poll(timeout_ms=500).values():
                for r in records:
                    alert = json.loads(r.value)
                    if alert["entity_id"] in entity_ids and alert["entity_id"] not in found:
                        found[alert["entity_id"]] = (r.timestamp / 1000.0, alert)
    finally:
        c.close()
    assert found.keys() == entity_ids, f"warnings missing on risk.alerts: {entity_ids - found.keys()}"
    return found


# Records, in the page, the first moment each entity's row is in the table.
_WATCH_ROWS = """() => {
  window.__seen = {};
  const note = () => document.querySelectorAll("#rows tr").forEach(tr => {
    const id = tr.querySelector(".entity").textContent;
    if (!(id in window.__seen)) window.__seen[id] = Date.now();
  });
  new MutationObserver(note).observe(document.getElementById("rows"), {childList: true});
  note();
}"""


@pytest.mark.kafka
def test_page_shows_a_pipeline_warning_within_two_seconds_with_colour_reason_plan_and_filters(
        settings: Settings, start_worker: Callable[..., Any], make_txn: Callable[..., dict[str, Any]],
        tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    browser_path = _chromium()
    token = add_users(settings, {"vera": ("viewer", "viewer-password-1")})
    worker = start_worker(settings)
    base = f"http://127.0.0.1:{settings.web_port}"
    # The entity id is input data: markup in it must show as text, never run.
    large = f"acct-<b>{uuid.uuid4().hex[:6]}</b>"
    custody = f"custody-{uuid.uuid4().hex[:6]}"

    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=BROWSER_ARGS)
        try:
            page = browser.new_page(viewport={"width": 1400, "height": 800})
            sign_in(page, base, "vera", "viewer-password-1")
            page.evaluate(_WATCH_ROWS)

            now = datetime.now(UTC).isoformat()
            produce(settings, TRANSACTIONS, [
                (large.encode(), json.dumps(make_txn(ts=now, account_id=large, amount=60000)).encode()),
                (custody.encode(), json.dumps(make_txn(
                    ts=now, account_id=custody, amount=1200, account_kind="custody",
                    counterparty_kind="platform_own", counterparty_id="platform-ops")).encode()),
            ])
            published = _published_at(settings, {large, custody})
            page.wait_for_function(
                f"() => window.__seen[{json.dumps(large)}] && window.__seen[{json.dumps(custody)}]", timeout=30_000)
            seen = page.evaluate("() => window.__seen")
            delays = {e: seen[e] / 1000.0 - published[e][0] for e in (large, custody)}
            page.wait_for_timeout(300)
            page.screenshot(path=str(tmp_path / "warnings-page.png"), full_page=True)

            # Within two seconds of publication on risk.alerts (both clocks are this machine's).
            assert all(d <= 2.0 for d in delays.values()), f"seconds from publication to the page: {delays}"

            rows = page.locator("#rows tr")
            by_entity = {rows.nth(i).locator(".entity").inner_text(): rows.nth(i) for i in range(rows.count())}
            critical, medium = by_entity[custody], by_entity[large]
            assert page.locator("#rows b").count() == 0, "markup from the input was rendered"
            assert critical.locator(".level").inner_text().lower() == "critical"
            assert critical.locator(".level").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(179, 0, 27)"
            assert medium.locator(".level").evaluate("e => getComputedStyle(e).backgroundColor") == "rgb(201, 138, 0)"
            assert published[large][1]["reasons"][0]["message"] in medium.inner_text()
            assert "platform_own account platform-ops" in critical.inner_text()
            for row, (category, level) in ((critical, ("fund_isolation", "critical")),
                                           (medium, ("large_transaction", "medium"))):
                plan = load_plans(settings.plans_file).select(category, level)
                assert plan is not None
                assert plan.title in row.inner_text() and f"owner: {plan.owner_team}" in row.inner_text()
            assert page.locator("#count-critical").inner_text() == "1"
            assert page.locator("#count-medium").inner_text() == "1"

            page.select_option("#level", "critical")
            assert [r.inner_text() for r in page.locator("#rows .entity").all()] == [custody]
            page.select_option("#level", "")
            page.select_option("#category", "large_transaction")
            assert [r.inner_text() for r in page.locator("#rows .entity").all()] == [large]

            # A person resolves the medium warning on risk.acks: the disposal agent records it, the page follows.
            act = {"alert_id": published[large][1]["alert_id"], "action": "resolve", "by": "lin",
                   "ts": datetime.now(UTC).isoformat()}
            produce(settings, ACKS, [(act["alert_id"].encode(), json.dumps(act).encode())])
            page.wait_for_function("() => document.getElementById('count-medium').textContent === '0'",
                                   timeout=30_000)
            assert "by lin" in page.locator("#rows tr").first.inner_text()
            assert page.locator("#count-critical").inner_text() == "1"
            page.select_option("#category", "")
            page.wait_for_timeout(2600)  # let the highlight of fresh rows fade
            page.screenshot(path=str(tmp_path / "warnings-page-resolved.png"), full_page=True)
        finally:
            browser.close()

    for headers, status in (({}, 401), ({"Authorization": f"Bearer {token}"}, 400)):
        with pytest.raises(urllib.error.HTTPError) as bad:
            urllib.request.urlopen(urllib.request.Request(f"{base}/api/alerts?since=yesterday", headers=headers),
                                   timeout=5)
        assert bad.value.code == status, headers
    assert worker.proc.poll() is None
    print(f"\nscreenshot: {tmp_path / 'warnings-page.png'}; seconds from publication to page: {delays}")
