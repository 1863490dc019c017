"""The risk-ops console on the worker's web server: the page, the feed's API, case views and case acts.

The feed (agents/feed.py) follows what every worker publishes; sign-in, roles and CSRF are
agents/console.py's; the events behind a case are read back on demand (agents/case.py). An act
from the console is built by the same function as the CLI's (models.lifecycle.make_act) and goes
the same way: risk.acks, the disposal agent's lifecycle, risk.audit, and back into the feed of
every open console.
"""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from importlib.resources import files
from typing import Any

from aiohttp import web as aioweb
from aiokafka.errors import KafkaError

from agents.case import EventLookup
from agents.console import PRINCIPAL, Console, page_csp
from agents.feed import AlertFeed, AlertFollower, plan_lookup
from app.faust_app import ACKS, Runtime
from app.logs import Retries
from models.errors import RiskwatchError
from models.lifecycle import AckEvent, make_act
from models.schemas import LEVELS

log = logging.getLogger("riskwatch.agents.web")

PAGE = files("app").joinpath("static/warnings.html")  # package data of app, in a checkout and a wheel alike


def _one_of(value: str | None, allowed: Any) -> str | None:
    return value if value and value in allowed else None


class ConsoleRoutes:
    """The console's HTTP handlers (plain aiohttp) over a feed, a Console for sign-in and a way to publish acts."""

    def __init__(self, feed: AlertFeed, console: Console, send_act: Callable[[AckEvent], Awaitable[None]],
                 lookup: EventLookup | None = None, html: str | None = None) -> None:
        self.feed, self.console, self.send_act, self.lookup = feed, console, send_act, lookup
        self.html = html if html is not None else PAGE.read_text(encoding="utf-8")
        console.csp = page_csp(self.html)

    def install(self, app: aioweb.Application) -> None:
        """Add the middleware and routes to an aiohttp application (Faust's, or a test's)."""
        app.middlewares.append(self.console.middleware)
        r = app.router
        r.add_get("/", self.page)
        r.add_get("/api/me", self.me)
        r.add_post("/api/login", self.console.login)
        r.add_post("/api/logout", self.logout)
        r.add_get("/api/alerts", self.alerts)
        r.add_get("/api/case/{alert_id}", self.case)
        r.add_post("/api/act", self.act)
        r.add_get("/api/admin/users", self.users)

    async def page(self, request: aioweb.Request) -> aioweb.Response:
        """The page shell: sign-in form and console, no data (that comes from /api/*)."""
        return aioweb.Response(text=self.html, content_type="text/html", headers={"Cache-Control": "no-store"})

    async def me(self, request: aioweb.Request) -> aioweb.Response:
        """Who is signed in (and the session's CSRF token), or 401 with the sign-in form's token."""
        return self.console.me(request)

    async def logout(self, request: aioweb.Request) -> aioweb.Response:
        """Sign out of this browser."""
        return self.console.logout(request)

    async def alerts(self, request: aioweb.Request) -> aioweb.Response:
        """Warnings changed since ?since=SEQ (newest first), with counts per level; ?level= and ?category= filter."""
        q = request.query
        try:
            since = max(int(q.get("since", "0")), 0)
        except ValueError:
            return _json({"error": "since must be a whole number (the seq of the last poll)"}, 400)
        return _json(self.feed.snapshot(since, _one_of(q.get("level"), LEVELS), q.get("category") or None))

    async def case(self, request: aioweb.Request) -> aioweb.Response:
        """One warning's case view: the warning, its events, plan, audit trail and the entity's other warnings."""
        case = self.feed.case(request.match_info["alert_id"])
        if case is None:
            return _json({"error": "no such warning among the newest this console holds"}, 404)
        events: dict[str, Any] = {"events": [], "note": "events are not looked up on this console"}
        if self.lookup is not None:
            try:
                events = await asyncio.wait_for(self.lookup.events(case["alert"]), timeout=10.0)
            except (TimeoutError, KafkaError, OSError) as exc:
                log.warning("case view of %s: events not read: %r", case["alert"]["alert_id"], exc)
                events = {"events": [], "note": f"events could not be read from Kafka just now ({type(exc).__name__})"}
        return _json({**case, "events": events})

    async def act(self, request: aioweb.Request) -> aioweb.Response:
        """Publish the signed-in operator's act on a case to risk.acks, as `riskwatch ack|resolve|...` does."""
        who: Any = request[PRINCIPAL]
        body = await json_object(request)
        if body is None:
            return _json({"error": "send a JSON object: alert_id, action and its fields"}, 400)
        action = body.get("action")
        if action == "resolve" and body.get("verdict") not in ("confirmed", "false_positive"):
            return _json({"error": "a resolution needs a verdict: confirmed or false_positive"}, 400)
        try:
            act = make_act(str(body.get("alert_id", "")), str(action), who.name, note=_text(body.get("note")),
                           verdict=_text(body.get("verdict")), assignee=_text(body.get("assignee")), via="console")
        except RiskwatchError as exc:
            return _json({"error": str(exc)}, 400)
        await self.send_act(act)
        log.info("console: %s (%s) %s %s", who.name, who.role, act.action, act.alert_id)
        return _json({"sent": act.model_dump(mode="json")}, 202)


    async def users(self, request: aioweb.Request) -> aioweb.Response:
        """Admins only (the middleware checks): who may sign in, with which role, and the API tokens (never hashes).

        Read-only here: accounts change with `riskwatch users` on the users file every worker reads,
        so no worker holds a copy another would not see.
        """
        users = self.console.users()
        if users is None:
            return _json({"users": [], "tokens": []})
        return _json({
            "file": str(self.console.users_path),
            "users": [{"name": n, "role": users.role_of(n), "sign_in": "password" if "hash" in e else "proxy only"}
                      for n, e in sorted(users.users.items())],
            "tokens": [{"id": t, "user": e.get("user"), "label": e.get("label", "")}
                       for t, e in sorted(users.tokens.items())]})


async def json_object(request: aioweb.Request) -> dict[str, Any] | None:
    """A request's JSON body if it is an object, else None (the caller answers 400 saying what to send)."""
    try:
        body = await request.json()
    except ValueError:
        return None
    return body if isinstance(body, dict) else None


def reply(body: dict[str, Any], status: int = 200) -> aioweb.Response:
    """A JSON answer that no cache keeps."""
    return aioweb.json_response(body, status=status, headers={"Cache-Control": "no-store"})


def text_or_none(value: Any) -> str | None:
    """A form field as text, None when absent or empty."""
    return str(value) if value is not None and value != "" else None


_json, _text = reply, text_or_none


def attach(rt: Runtime) -> AlertFeed:
    """Serve the console (page, feed, case views, acts, sign-in) and follow the topics that feed it."""
    s = rt.settings
    feed = AlertFeed(plan_of=plan_lookup(s.plans_file))
    follower = AlertFollower(rt, feed)
    console = Console(s, rt.metrics.console_signins)
    acks = rt.topics[ACKS]
    acks_name = acks.get_topic_name()

    async def send_act(act: AckEvent) -> None:
        await acks.send(key=act.alert_id.encode(), value=act.model_dump_json().encode())
        rt.metrics.events_published.labels(acks_name).inc()

    routes = ConsoleRoutes(feed, console, send_act, EventLookup(s))
    # Faust's aiohttp driver exposes its Application; the routes and middleware are plain aiohttp so
    # that tests drive the same handlers with aiohttp's test client, without a worker.
    routes.install(rt.app.web.web_app)  # type: ignore[attr-defined]

    @rt.app.task
    async def follow_alerts() -> None:
        if console.users() is None:
            if s.console_open_read_only:
                log.warning("console: open read-only to anyone who reaches %s:%s (RISKWATCH_CONSOLE_OPEN_READ_ONLY); "
                            "nobody can act on cases without an account", s.web_host, s.web_port)
            else:
                log.warning("console: %s; the page shows only a sign-in notice until then", console.no_users_message())
        if console.ephemeral_secret:
            log.info("console: sessions signed with a per-process secret (set RISKWATCH_SESSION_SECRET to keep "
                     "them across restarts and share them between workers)")
        retries = Retries(log, "the warnings page's follower")
        while True:
            try:
                await follower.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is told (Retries) and retried
                retries.failed(exc, "retrying in 2 s")
                await asyncio.sleep(2.0)

    rt.extras["alert_feed"] = feed
    rt.extras["console"] = console
    return feed


__all__ = ["AlertFeed", "AlertFollower", "ConsoleRoutes", "attach", "plan_lookup"]
