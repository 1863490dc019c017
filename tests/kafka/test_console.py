"""The console's sign-in, roles, CSRF, Host and proxy checks and its act and case routes, with aiohttp's test client.

No worker and no broker: the same handlers and middleware the worker installs on Faust's aiohttp
application (agents.web.ConsoleRoutes), on a bare aiohttp application, with acts captured instead
of sent to risk.acks. The browser and the real worker are tests/kafka/test_console_browser.py's.
"""

from __future__ import annotations

import asyncio
import json
from collections.abc import Awaitable, Callable
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import pytest
from aiohttp import web
from aiohttp.test_utils import TestClient, TestServer
from prometheus_client import CollectorRegistry

from agents.console import CSRF_HEADER, Console
from agents.web import AlertFeed, ConsoleRoutes
from app.auth import Users
from app.metrics import Metrics
from app.settings import Settings
from models.lifecycle import AckEvent

AID = "a1b2c3d4e5f60718293a4b5c"
PASSWORDS = {"vera": "viewer-password-1", "otto": "operator-password-1", "ada": "admin-password-1"}


def _alert(**over: Any) -> dict[str, Any]:
    alert = {"alert_id": AID, "created_at": "2026-11-02T01:14:03Z", "event_ts": "2026-11-02T01:14:03Z",
             "entity_type": "account", "entity_id": "acct-1", "category": "velocity", "level": "high", "score": 0.9,
             "reasons": [{"code": "velocity", "message": "9 debits in 10 minutes"}], "event_ids": ["e1"],
             "detector": "rule:velocity"}
    alert.update(over)
    return alert


@pytest.fixture
def users_file(tmp_path: Path) -> Path:
    u = Users(tmp_path / "users.json")
    for name, role in (("vera", "viewer"), ("otto", "operator"), ("ada", "admin")):
        u.add(name, role, PASSWORDS[name])
    u.add("pam", "operator", None)
    u.save()
    return u.path


Run = Callable[[TestClient, list[AckEvent], Metrics], Awaitable[None]]


def _serve(settings: Settings, test: Run) -> None:
    async def main() -> None:
        sent: list[AckEvent] = []

        async def send_act(act: AckEvent) -> None:
            sent.append(act)

        metrics = Metrics(CollectorRegistry())
        feed = AlertFeed()
        feed.add(_alert(), 1_800_000_000.0)
        feed.add(_alert(alert_id="b" * 24, created_at="2026-10-30T01:00:00Z"), 1_800_000_001.0)
        feed.on_audit({"alert_id": AID, "action": "raise", "to_status": "open", "by": "riskwatch", "seq": 1,
                       "outcome": "applied", "ts": "2026-11-02T01:14:04Z"})
        app = web.Application()
        ConsoleRoutes(feed, Console(settings, metrics.console_signins), send_act).install(app)

        async def faust_internal(request: web.Request) -> web.Response:
            return web.json_response({"tables": "internal"})

        app.router.add_get("/table/", faust_internal)  # stands for any route Faust might add
        async with TestClient(TestServer(app)) as client:
            await test(client, sent, metrics)

    asyncio.run(main())


def _settings(tmp_path: Path, **over: Any) -> Settings:
    return Settings(data_dir=tmp_path / "data", session_secret="k" * 40, **over)


async def _sign_in(client: TestClient, name: str, password: str | None = None) -> tuple[int, dict[str, Any]]:
    client.session.cookie_jar.clear()  # whoever was signed in before
    me = await client.get("/api/me")
    token = (await me.json())["login_csrf"]
    r = await client.post("/api/login", json={"name": name, "password": password or PASSWORDS[name]},
                          headers={CSRF_HEADER: token})
    return r.status, await r.json()


def test_without_accounts_the_api_says_how_to_create_one_and_the_page_shell_still_loads(tmp_path: Path) -> None:
    async def run(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        r = await client.get("/api/alerts")
        assert r.status == 503 and "riskwatch users add" in (await r.json())["error"]
        page = await client.get("/")
        assert page.status == 200 and "<html" in await page.text()
        csp = page.headers["Content-Security-Policy"]
        assert "default-src 'none'" in csp and "script-src 'sha256-" in csp and "unsafe-inline" not in csp

    _serve(_settings(tmp_path), run)


def test_open_read_only_demo_reads_without_sign_in_but_never_acts(tmp_path: Path) -> None:
    async def run(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        assert (await client.get("/api/alerts")).status == 200
        me = await (await client.get("/api/me")).json()
        assert (me["name"], me["role"], me["via"]) == ("anonymous", "viewer", "open")
        r = await client.post("/api/act", json={"alert_id": AID, "action": "ack"})
        assert r.status == 403 and not sent

    _serve(_settings(tmp_path, console_open_read_only=True), run)


def test_sign_in_sets_a_strict_http_only_session_and_wrong_passwords_are_refused(tmp_path: Path,
                                                                                users_file: Path) -> None:
    async def run(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        r = await client.get("/api/alerts")
        assert r.status == 401 and "sign in" in (await r.json())["error"]
        no_token = await client.post("/api/login", json={"name": "otto", "password": PASSWORDS["otto"]})
        assert no_token.status == 403, "the sign-in form's CSRF token is required too"
        status, body = await _sign_in(client, "otto", "not-the-password")
        assert status == 401 and body["error"] == "wrong name or password"
        status, body = await _sign_in(client, "nobody", "not-the-password")
        assert status == 401 and body["error"] == "wrong name or password"
        me = await client.get("/api/me")
        token = (await me.json())["login_csrf"]
        r = await client.post("/api/login", json={"name": "otto", "password": PASSWORDS["otto"]},
                              headers={CSRF_HEADER: token})
        assert r.status == 200
        cookie = r.headers.getall("Set-Cookie")
        session = next(c for c in cookie if c.startswith("rw_session="))
        assert "HttpOnly" in session and "SameSite=Strict" in session and "Path=/" in session
        assert PASSWORDS["otto"] not in session
        assert (await client.get("/api/alerts")).status == 200
        registry = metrics.registry
        assert registry.get_sample_value("riskwatch_console_signins_total", {"result": "ok"}) == 1
        assert registry.get_sample_value("riskwatch_console_signins_total", {"result": "refused"}) == 2
        csrf = (await r.json())["csrf"]
        assert (await client.post("/api/logout", headers={CSRF_HEADER: csrf})).status == 200
        assert (await client.get("/api/alerts")).status == 401, "signed out"

    _serve(_settings(tmp_path, users_file=users_file), run)


def test_repeated_wrong_passwords_pause_sign_in_for_that_name(tmp_path: Path, users_file: Path) -> None:
    async def run(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        for _ in range(10):
            assert (await _sign_in(client, "otto", "guess-guess-guess"))[0] == 401
        status, body = await _sign_in(client, "otto")
        assert status == 429 and "too many wrong passwords" in body["error"], "even the right one, for a while"
        assert (await _sign_in(client, "vera"))[0] == 200, "other names are not held back"

        refused = metrics.registry.get_sample_value("riskwatch_console_signins_total", {"result": "refused"})
        assert refused == 11

    _serve(_settings(tmp_path, users_file=users_file), run)
    console = Console(_settings(tmp_path, users_file=users_file))
    now = [1000.0]
    console.clock = lambda: now[0]
    console._failures[("name", "otto")] = [1000.0 - 290 + i for i in range(10)]
    assert 9 < console._paused(("name", "otto")) <= 10
    now[0] += 11
    assert console._paused(("name", "otto")) == 0.0, "the oldest failure left the window"
    # Behind a trusted proxy, the address counted is the one the proxy appended, not the proxy's own.
    behind = Console(_settings(tmp_path, users_file=users_file, trusted_proxies="10.0.0.2"))
    forwarded = {"X-Forwarded-For": "198.51.100.1, 203.0.113.9"}
    assert behind.client_address(SimpleNamespace(remote="10.0.0.2", headers=forwarded)) == "203.0.113.9"
    assert behind.client_address(SimpleNamespace(remote="10.9.9.9", headers=forwarded)) == "10.9.9.9"


def test_writes_need_the_csrf_token_and_an_operator(tmp_path: Path, users_file: Path) -> None:
    async def run(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        status, viewer = await _sign_in(client, "vera")
        assert status == 200 and viewer["role"] == "viewer"
        r = await client.post("/api/act", json={"alert_id": AID, "action": "ack"},
                              headers={CSRF_HEADER: viewer["csrf"]})
        assert r.status == 403 and "needs an operator" in (await r.json())["error"]
        assert (await client.post("/api/logout", headers={CSRF_HEADER: viewer["csrf"]})).status == 200
        status, op = await _sign_in(client, "otto")
        assert status == 200
        r = await client.post("/api/act", json={"alert_id": AID, "action": "ack"})
        assert r.status == 403 and "CSRF" in (await r.json())["error"]
        r = await client.post("/api/act", json={"alert_id": AID, "action": "ack"}, headers={CSRF_HEADER: "forged"})
        assert r.status == 403 and not sent
        h = {CSRF_HEADER: op["csrf"]}
        r = await client.post("/api/act", json={"alert_id": AID, "action": "resolve"}, headers=h)
        assert r.status == 400 and "verdict" in (await r.json())["error"]
        r = await client.post("/api/act", json={"alert_id": AID, "action": "assign"}, headers=h)
        assert r.status == 400 and "assignee" in (await r.json())["error"]
        for act in ({"action": "ack", "by": "someone-else"}, {"action": "assign", "assignee": "fraud-ops"},
                    {"action": "note", "note": "called the customer"},
                    {"action": "resolve", "verdict": "confirmed"}, {"action": "reopen"}):
            r = await client.post("/api/act", json={"alert_id": AID, **act}, headers=h)
            assert r.status == 202, await r.text()
        assert [(a.action, a.by, a.via) for a in sent] == [
            ("ack", "otto", "console"), ("assign", "otto", "console"), ("note", "otto", "console"),
            ("resolve", "otto", "console"), ("reopen", "otto", "console")], "the signed-in user, never the body's"
        assert sent[1].assignee == "fraud-ops" and sent[3].verdict == "confirmed"

    _serve(_settings(tmp_path, users_file=users_file), run)


def test_host_header_tokens_and_faust_internal_routes(tmp_path: Path, users_file: Path) -> None:
    users = Users(users_file)
    token = users.issue_token("vera", "grafana")
    users.save()

    async def run(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        r = await client.get("/api/alerts", headers={"Host": "evil.example"})
        assert r.status == 421, "a DNS-rebound name is refused"
        assert (await client.get("/", headers={"Host": "evil.example"})).status == 421
        bearer = {"Authorization": f"Bearer {token}"}
        assert (await client.get("/api/alerts", headers=bearer)).status == 200
        assert (await client.get("/api/alerts", headers={"Authorization": "Bearer rwt_wrong"})).status == 401
        r = await client.post("/api/act", json={"alert_id": AID, "action": "ack"}, headers=bearer)
        assert r.status == 403 and not sent, "API tokens are read-only"
        assert (await client.get("/table/")).status == 404
        await _sign_in(client, "otto")
        assert (await client.get("/table/")).status == 404, "Faust's internals are for admins only"
        assert (await client.get("/api/admin/users")).status == 403, "an operator does not see the accounts"
        await _sign_in(client, "ada")
        assert (await client.get("/table/")).status == 200
        listed = await (await client.get("/api/admin/users")).json()
        assert [(u["name"], u["role"], u["sign_in"]) for u in listed["users"]] == [
            ("ada", "admin", "password"), ("otto", "operator", "password"), ("pam", "operator", "proxy only"),
            ("vera", "viewer", "password")]
        assert [(t["user"], t["label"]) for t in listed["tokens"]] == [("vera", "grafana")]
        assert "argon2" not in json.dumps(listed) and token not in json.dumps(listed)

    _serve(_settings(tmp_path, users_file=users_file, console_hosts="risk.example.com"), run)


def test_a_proxy_user_header_counts_only_from_a_trusted_proxy(tmp_path: Path, users_file: Path) -> None:
    async def untrusted(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        assert (await client.get("/api/alerts", headers={"X-Forwarded-User": "ada"})).status == 401

    _serve(_settings(tmp_path, users_file=users_file, trusted_proxies="10.0.0.0/8"), untrusted)

    async def trusted(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        h = {"X-Forwarded-User": "pam"}
        assert (await client.get("/api/alerts", headers={"X-Forwarded-User": "mallory"})).status == 401
        me = await (await client.get("/api/me", headers=h)).json()
        assert (me["name"], me["role"], me["via"]) == ("pam", "operator", "proxy") and me["csrf"]
        r = await client.post("/api/act", json={"alert_id": AID, "action": "ack"}, headers=h)
        assert r.status == 403, "a proxy user's writes need the CSRF token too"
        r = await client.post("/api/act", json={"alert_id": AID, "action": "ack"},
                              headers={**h, CSRF_HEADER: me["csrf"]})
        assert r.status == 202 and sent[0].by == "pam"
        other = {"X-Forwarded-User": "otto", CSRF_HEADER: me["csrf"]}
        assert (await client.post("/api/act", json={"alert_id": AID, "action": "ack"}, headers=other)).status == 403, \
            "pam's CSRF token does not let another proxy user write"

    _serve(_settings(tmp_path, users_file=users_file, trusted_proxies="127.0.0.1"), trusted)


def test_case_view_has_the_warning_its_trail_and_the_entitys_other_warnings(tmp_path: Path, users_file: Path) -> None:
    async def run(client: TestClient, sent: list[AckEvent], metrics: Metrics) -> None:
        await _sign_in(client, "vera")
        assert (await client.get("/api/case/" + "c" * 24)).status == 404
        r = await client.get(f"/api/case/{AID}")
        assert r.status == 200
        case = await r.json()
        assert case["alert"]["alert_id"] == AID and [t["action"] for t in case["trail"]] == ["raise"]
        assert [o["alert_id"] for o in case["others"]] == ["b" * 24]
        assert case["events"]["events"] == [] and "not looked up" in case["events"]["note"]

    _serve(_settings(tmp_path, users_file=users_file), run)


def test_the_feed_carries_assignee_and_notes_from_the_audit_and_keeps_them_across_updates() -> None:
    feed = AlertFeed()
    feed.add(_alert(), 1.0)
    feed.on_audit({"alert_id": AID, "action": "ack", "to_status": "acknowledged", "by": "otto", "outcome": "applied"})
    feed.on_audit({"alert_id": AID, "action": "assign", "to_status": "acknowledged", "by": "otto",
                   "assignee": "fraud-ops", "outcome": "applied"})
    feed.on_audit({"alert_id": AID, "action": "note", "to_status": "acknowledged", "by": "lin", "note": "called",
                   "outcome": "applied"})
    feed.on_audit({"alert_id": AID, "action": "assign", "to_status": "resolved", "by": "x", "outcome": "rejected",
                   "reason": "alert is resolved"})
    a = feed.items[AID]
    assert (a["status"], a["status_by"], a["assignee"], a["notes"]) == ("acknowledged", "otto", "fraud-ops", 1)
    feed.add(_alert(event_ids=["e1", "e2"]), 2.0)
    assert feed.items[AID]["assignee"] == "fraud-ops" and feed.items[AID]["last_note"]["note"] == "called"
    assert [t["outcome"] for t in feed.case(AID)["trail"]] == ["applied", "applied", "applied", "rejected"]


def test_the_demo_creates_an_operator_with_a_random_password(tmp_path: Path) -> None:
    from app.demo import demo_operator

    first = demo_operator(tmp_path / "users.json")
    users = Users(tmp_path / "users.json")
    assert users.verify("demo", first) is not None and users.role_of("demo") == "operator"
    assert demo_operator(tmp_path / "other.json") != first, "random per run, never a well-known password"
