"""The console end to end: a real worker on the real broker, two people in headless Chromium.

A viewer and an operator sign in (a wrong password is refused first). A risky transaction
raises a warning; the viewer opens its case and cannot act (no controls; a write with their own
CSRF token is refused). The operator opens the case (the event behind it is read back from
Kafka), then acknowledges, notes, assigns and resolves it with a verdict; each change reaches
the viewer's open console, and risk.audit names the operator, via the console. A write without
the CSRF token is refused, and the API answers 401 to a request without a session; Faust's own
routes answer 404. The operator finally reopens the case. Screenshots
(case-operator.png, case-viewer.png) are saved in the test's tmp dir for a person to look at.
"""

from __future__ import annotations

import json
import time
import urllib.error
import urllib.request
import uuid
from collections.abc import Callable
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from app.faust_app import AUDIT, TRANSACTIONS
from app.settings import Settings
from tests.conftest import consume, produce
from tests.kafka.test_warnings_page import BROWSER_ARGS, _chromium, _published_at, add_users, sign_in

VIEWER, OPERATOR = ("vera", "viewer-password-1"), ("otto", "operator-password-1")

_FETCH = """async ([path, body, csrf]) => {
  const headers = {"Content-Type": "application/json"};
  if (csrf) headers["X-CSRF-Token"] = csrf;
  const r = await fetch(path, {method: "POST", headers, body: JSON.stringify(body)});
  return r.status;
}"""


def _row(alert_id: str) -> str:
    return f'#rows tr[data-alert-id="{alert_id}"]'


def _wait_row_text(page: Any, alert_id: str, text: str) -> float:
    """Wait until the warning's row on `page` shows `text`; return the moment (monotonic seconds)."""
    page.wait_for_function(
        "([sel, text]) => { const r = document.querySelector(sel); return r && r.innerText.includes(text); }",
        arg=[_row(alert_id), text], timeout=15_000, polling=50)
    return time.monotonic()


@pytest.mark.kafka
def test_viewer_reads_operator_handles_a_case_and_the_audit_names_them(
        settings: Settings, start_worker: Callable[..., Any], make_txn: Callable[..., dict[str, Any]],
        tmp_path: Path) -> None:
    from playwright.sync_api import sync_playwright

    browser_path = _chromium()
    add_users(settings, dict([(VIEWER[0], ("viewer", VIEWER[1])), (OPERATOR[0], ("operator", OPERATOR[1]))]))
    worker = start_worker(settings)
    base = f"http://127.0.0.1:{settings.web_port}"
    account = f"acct-{uuid.uuid4().hex[:8]}"

    for request in (urllib.request.Request(f"{base}/api/alerts"),
                    urllib.request.Request(f"{base}/api/act", data=b"{}", method="POST")):
        with pytest.raises(urllib.error.HTTPError) as refused:
            urllib.request.urlopen(request, timeout=5)
        assert refused.value.code == 401, request.full_url

    # Faust's own routes (router, tables, statistics, graph, performance) are not served.
    for path in ("/router/", "/table/", "/assignment/", "/graph/", "/performance/"):
        with pytest.raises(urllib.error.HTTPError) as hidden:
            urllib.request.urlopen(base + path, timeout=5)
        assert hidden.value.code == 404, path

    delays: dict[str, float] = {}
    with sync_playwright() as pw:
        browser = pw.chromium.launch(executable_path=browser_path, args=BROWSER_ARGS)
        try:
            viewer = browser.new_context(viewport={"width": 1500, "height": 900}).new_page()
            operator = browser.new_context(viewport={"width": 1500, "height": 900}).new_page()

            operator.goto(base + "/")
            operator.fill("#signin-name", OPERATOR[0])
            operator.fill("#signin-password", "not-the-password")
            operator.click("#signin button[type=submit]")
            operator.wait_for_function("() => document.getElementById('signin-error').textContent.length > 0")
            assert operator.inner_text("#signin-error") == "wrong name or password"
            assert not operator.is_visible("#console")

            sign_in(viewer, base, *VIEWER)
            sign_in(operator, base, *OPERATOR)
            assert viewer.inner_text("#who-name") == "vera · viewer"

            txn = make_txn(ts=datetime.now(UTC).isoformat(), account_id=account, amount=60000,
                           counterparty_id="merchant-77", device_id="dev-9", channel="web")
            produce(settings, TRANSACTIONS, [(account.encode(), json.dumps(txn).encode())])
            alert = _published_at(settings, {account})[account][1]
            alert_id = alert["alert_id"]
            for page in (viewer, operator):
                page.wait_for_selector(_row(alert_id), timeout=30_000)

            # The viewer reads the case but has nothing to act with, and a write is refused.
            viewer.click(_row(alert_id))
            viewer.wait_for_function("() => document.getElementById('case-acts').innerText.length > 0")
            assert "read only" in viewer.inner_text("#case-acts")
            assert viewer.locator("#act-ack").count() == 0
            viewer_csrf = viewer.evaluate("() => csrf")
            assert viewer.evaluate(_FETCH, ["/api/act", {"alert_id": alert_id, "action": "ack"}, viewer_csrf]) == 403

            # The operator opens it from the keyboard: the event behind the warning, read back from Kafka.
            operator.focus(_row(alert_id))
            operator.keyboard.press("Enter")
            operator.wait_for_selector("#case-events table", timeout=15_000)
            events = operator.inner_text("#case-events")
            assert "60000 CNY" in events and "merchant-77" in events and "dev-9" in events and "web" in events
            # The plan's actions, owner and deadlines, from its trigger on risk.contingency.
            operator.wait_for_function(
                "() => document.getElementById('case-plan').innerText.includes('acknowledge by')", timeout=15_000)

            # A write without the CSRF token is refused, whoever sends it.
            assert operator.evaluate(_FETCH, ["/api/act", {"alert_id": alert_id, "action": "ack"}, None]) == 403

            clicked = time.monotonic()
            operator.keyboard.press("a")  # acknowledge
            delays["ack"] = _wait_row_text(viewer, alert_id, "acknowledged") - clicked
            operator.fill("#act-note", "called the customer: not them")
            clicked = time.monotonic()
            operator.click("#act-add-note")
            delays["note"] = _wait_row_text(viewer, alert_id, "1 note") - clicked
            operator.fill("#act-assignee", "fraud-ops")
            clicked = time.monotonic()
            operator.click("#act-assign")
            delays["assign"] = _wait_row_text(viewer, alert_id, "assigned to fraud-ops") - clicked
            operator.select_option("#act-verdict", "confirmed")
            clicked = time.monotonic()
            operator.click("#act-resolve")
            delays["resolve"] = _wait_row_text(viewer, alert_id, "resolved") - clicked

            operator.wait_for_function(
                "() => document.getElementById('case-trail').innerText.includes('confirmed')", timeout=15_000)
            trail = operator.inner_text("#case-trail")
            assert trail.count("otto") >= 4 and "console" in trail and "called the customer" in trail
            viewer.wait_for_function("() => document.getElementById('case-head').innerText.includes('resolved')",
                                     timeout=15_000)
            operator.screenshot(path=str(tmp_path / "case-operator.png"), full_page=True)
            clicked = time.monotonic()
            operator.click("#act-reopen")
            viewer.wait_for_function(
                "(sel) => (document.querySelector(sel + ' .status-badge') || {}).textContent === 'open'",
                arg=_row(alert_id), timeout=15_000, polling=50)
            delays["reopen"] = time.monotonic() - clicked
            viewer.screenshot(path=str(tmp_path / "case-viewer.png"), full_page=True)
        finally:
            browser.close()

    # Changes reach every open console within a second or two.
    assert all(d <= 2.0 for d in delays.values()), f"seconds from the operator's act to the viewer's page: {delays}"

    wanted = {"ack", "note", "assign", "resolve", "reopen"}
    audit = consume(settings, AUDIT, lambda got: wanted <= {r.get("action") for r in got
                                                            if r.get("alert_id") == alert_id and r.get("by") == "otto"})
    acts = {r["action"]: r for r in audit if r.get("alert_id") == alert_id and r.get("by") == "otto"}
    assert all(acts[a]["via"] == "console" and acts[a]["outcome"] == "applied" for a in wanted), acts
    assert acts["resolve"]["verdict"] == "confirmed" and acts["assign"]["assignee"] == "fraud-ops"
    assert acts["note"]["note"] == "called the customer: not them"
    assert not [r for r in audit if r.get("by") == "vera"], "the viewer's refused write never reached the lifecycle"
    assert worker.metric("riskwatch_console_signins_total", result="refused") == 1
    assert worker.metric("riskwatch_console_signins_total", result="ok") == 2
    print(f"\nscreenshots in {tmp_path}; seconds from act to the other console: {delays}")
