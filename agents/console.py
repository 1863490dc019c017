"""Sign-in for the worker's console: who a request is, what their role lets them do, and the sign-in routes.

Every request to the worker's web server passes `Console.middleware` (aiohttp), which
1. refuses a Host header that does not name this console (DNS rebinding);
2. serves the page shell (`/`, no data in it) to anyone, with a strict Content-Security-Policy;
3. on `/api/*` finds the user: a trusted reverse proxy's user header, else the signed session
   cookie, else a read-only API token (`Authorization: Bearer`); none is 401, no users file 503;
4. refuses every POST without the session's CSRF token (403), and writes below the role they need;
5. answers any other path (Faust's own routes, should one be on) to admins only, else 404.

The security primitives are app/auth.py's (Argon2id, itsdangerous, constant-time compares).
Password hashing (64 MiB, ~50 ms) runs in a thread, at most two at once: the event loop also
runs the stream agents. Repeated wrong passwords pause sign-in for that name or address (429).
"""

from __future__ import annotations

import asyncio
import base64
import hashlib
import logging
import re
import secrets
import time
from collections import OrderedDict
from collections.abc import Awaitable, Callable
from pathlib import Path
from typing import Any

from aiohttp import web as aioweb
from itsdangerous import BadSignature, URLSafeTimedSerializer

from app.auth import Role
from app.settings import Settings

log = logging.getLogger("riskwatch.agents.console")

SESSION_COOKIE = "rw_session"
LOGIN_COOKIE = "rw_login"  # double-submit token for the sign-in form, which has no session yet
CSRF_HEADER = "X-CSRF-Token"
PUBLIC = frozenset({"/", "/api/me", "/api/login"})  # the page shell and what it needs to sign in
ADMIN_PREFIX = "/api/admin/"
WRITE_ROLES: dict[str, Role] = {"/api/logout": "viewer"}  # writes any signed-in user may make; others: operator
LOGIN_TTL = 3600
# Wrong passwords allowed per name and per address within the window before sign-in pauses for
# them (429): Argon2 makes each guess cost ~50 ms, this caps guesses at a few per minute.
FAILURE_WINDOW = 300.0
FAILURE_LIMITS = {"name": 10, "address": 30}
RELOAD_SECONDS = 1.0  # how often the users file's mtime is checked: `riskwatch users add` takes effect in ~1 s
Handler = Callable[[aioweb.Request], Awaitable[aioweb.StreamResponse]]
PRINCIPAL = aioweb.RequestKey("principal", object)  # the app.auth.Principal a request acts as
CSRF = aioweb.RequestKey("csrf", object)  # its session's CSRF token, or None


def page_csp(html: str) -> str:
    """A Content-Security-Policy allowing exactly the page's own inline script and style (by hash), nothing else."""
    hashes = []
    for tag in ("script", "style"):
        for body in re.findall(rf"<{tag}>(.*?)</{tag}>", html, flags=re.S):
            digest = base64.b64encode(hashlib.sha256(body.encode()).digest()).decode()
            hashes.append((tag, f"'sha256-{digest}'"))
    scripts = " ".join(h for t, h in hashes if t == "script")
    styles = " ".join(h for t, h in hashes if t == "style")
    return (f"default-src 'none'; script-src {scripts}; style-src {styles}; connect-src 'self'; img-src 'self'; "
            "form-action 'self'; frame-ancestors 'none'; base-uri 'none'")


class Console:
    """The console's view of its users file, sessions, proxies and allowed hosts, and its middleware."""

    def __init__(self, settings: Settings, signins: Any = None) -> None:
        from app.auth import Sessions, TrustedProxies  # argon2 is imported with the web agent, never hashing

        secret = settings.session_secret.get_secret_value()
        if not secret:
            # Per process: sessions end with the worker, and each worker behind one address signs its own.
            secret = secrets.token_hex(32)
            self.ephemeral_secret = True
        else:
            self.ephemeral_secret = False
        self.sessions = Sessions(secret)
        self.login_signer = URLSafeTimedSerializer(secret, salt="riskwatch-login")
        self.proxies = TrustedProxies(settings.trusted_proxies.split(","))
        self.proxy_header = settings.proxy_user_header
        self.open_read_only = settings.console_open_read_only
        self.users_path: Path = settings.users_path
        hosts = {"localhost", "127.0.0.1", "::1"}
        if settings.web_host not in ("0.0.0.0", "::", ""):
            hosts.add(settings.web_host)
        hosts |= {h.strip().lower() for h in settings.console_hosts.split(",") if h.strip()}
        self.hosts = frozenset(hosts)
        self.signins = signins  # Counter labelled by result (ok / refused), or None
        self._users: Any = None
        self._stamp: tuple[float, int] | None = None
        self._checked = 0.0
        self._hashing = asyncio.Semaphore(2)
        self._failures: OrderedDict[tuple[str, str], list[float]] = OrderedDict()
        self.clock = time.monotonic
        self.csp = ""

    # ------------------------------------------------------------------ users file
    def users(self) -> Any:
        """The users file (app.auth.Users), re-read when it changes; None while there is none or it has no user."""
        from app.auth import AuthError, Users

        now = time.monotonic()
        if now - self._checked >= RELOAD_SECONDS:
            self._checked = now
            try:
                st = self.users_path.stat()
                stamp: tuple[float, int] | None = (st.st_mtime, st.st_size)
            except OSError:
                stamp = None
            if stamp != self._stamp:
                self._stamp = stamp
                try:
                    self._users = Users(self.users_path) if stamp is not None else None
                except AuthError as exc:  # keep serving the previous accounts; say why the new ones are ignored
                    log.error("console: %s", exc)
        return self._users if self._users is not None and self._users.users else None

    def no_users_message(self) -> str:
        """What to do when no account exists (the page shows it; the log says it at start)."""
        return (f"no console accounts in {self.users_path}: create one with `riskwatch users add NAME --role "
                "operator` (RISKWATCH_USERS_FILE names another file); for a local demo only, "
                "RISKWATCH_CONSOLE_OPEN_READ_ONLY=true lets anyone read without signing in")

    # ------------------------------------------------------------------ who is asking
    def identify(self, request: aioweb.Request) -> tuple[Any, str | None]:
        """The request's Principal (or None) and the CSRF token of its session (None without one)."""
        from app.auth import Principal

        users = self.users()
        if users is None:
            return (Principal("anonymous", "viewer", "open"), None) if self.open_read_only else (None, None)
        cookie = request.cookies.get(SESSION_COOKIE)
        session = self.sessions.read(cookie, users) if cookie else None
        peer = request.remote
        if self.proxies.trusts(peer):
            named = request.headers.get(self.proxy_header)
            if named:
                who = self.proxies.principal(peer, named, users)
                if who is None:
                    return None, None
                return who, session[1] if session is not None and session[0].name == who.name else None
        if session is not None:
            return session
        auth = request.headers.get("Authorization", "")
        if auth[:7].lower() == "bearer ":
            return users.check_token(auth[7:].strip()), None
        if self.open_read_only:
            return Principal("anonymous", "viewer", "open"), None
        return None, None

    # ------------------------------------------------------------------ the middleware
    @aioweb.middleware
    async def middleware(self, request: aioweb.Request, handler: Handler) -> aioweb.StreamResponse:
        """Host check, authentication, CSRF and roles for every route (see the module docstring)."""
        from app.auth import allows, csrf_ok, host_allowed

        if not host_allowed(request.host, self.hosts):
            log.warning("console: refused Host %r from %s (RISKWATCH_CONSOLE_HOSTS lists the names it answers to)",
                        request.host, request.remote)
            return _error(421, "this console does not answer to that host name")
        path = request.path
        if path == "/":
            response = await handler(request)
            return _secure(response, self.csp)
        if not path.startswith("/api/"):
            who, _ = self.identify(request)
            if who is None or not allows(who.role, "admin") or who.via == "open":
                return _error(404, "not found")
            return _secure(await handler(request), self.csp)
        if self.users() is None and not self.open_read_only:
            return _error(503, self.no_users_message())
        if path in PUBLIC:
            return _secure(await handler(request), self.csp)
        who, csrf = self.identify(request)
        if who is None:
            return _error(401, "sign in first (or send a read-only API token: Authorization: Bearer ...)")
        request[PRINCIPAL], request[CSRF] = who, csrf
        if request.method not in ("GET", "HEAD", "OPTIONS"):
            if not csrf_ok(csrf or "", request.headers.get(CSRF_HEADER)):
                log.warning("console: refused %s %s by %s: no valid CSRF token", request.method, path, who.name)
                return _error(403, "refused: this write carries no valid CSRF token; reload the page")
            needed: Role = "admin" if path.startswith(ADMIN_PREFIX) else WRITE_ROLES.get(path, "operator")
            if not allows(who.role, needed) or who.via in ("token", "open"):
                return _error(403, f"refused: {who.name} is a {who.role}; this needs an {needed}")
        elif path.startswith(ADMIN_PREFIX) and not allows(who.role, "admin"):
            return _error(403, f"refused: {who.name} is a {who.role}; this needs an admin")
        return _secure(await handler(request), self.csp)

    # ------------------------------------------------------------------ sign-in routes
    def me(self, request: aioweb.Request) -> aioweb.Response:
        """Who is signed in, with the session's CSRF token; 401 with a sign-in token when nobody is."""
        who, csrf = self.identify(request)
        if who is None:
            token = secrets.token_urlsafe(24)
            response = aioweb.json_response({"error": "sign in first", "login_csrf": token,
                                             "proxy": bool(self.proxies.networks)}, status=401)
            self._cookie(response, request, LOGIN_COOKIE, self.login_signer.dumps(token), LOGIN_TTL)
            return response
        body: dict[str, Any] = {"name": who.name, "role": who.role, "via": who.via, "csrf": csrf}
        response = aioweb.json_response(body)
        if who.via == "proxy" and csrf is None:
            # The proxy vouches for the user on every request; the session only carries the CSRF token.
            cookie, body["csrf"] = self.sessions.issue(who)
            response = aioweb.json_response(body)
            self._cookie(response, request, SESSION_COOKIE, cookie, self.sessions.max_age)
        return response

    async def login(self, request: aioweb.Request) -> aioweb.Response:
        """Check a name and password from the sign-in form; set the session cookie on success."""
        from app.auth import Principal

        try:
            expected = self.login_signer.loads(request.cookies.get(LOGIN_COOKIE, ""), max_age=LOGIN_TTL)
        except BadSignature:
            expected = ""
        given = request.headers.get(CSRF_HEADER)
        if not expected or given is None or not secrets.compare_digest(str(expected), given):
            return _error(403, "refused: the sign-in form's token is missing or stale; reload the page")
        try:
            body = await request.json()
            name, password = str(body["name"]), str(body["password"])
        except (ValueError, KeyError, TypeError):
            return _error(400, "send JSON with name and password")
        users = self.users()
        if users is None:
            return _error(503, self.no_users_message())
        client = self.client_address(request)
        keys = [("name", name[:128].lower()), ("address", client)]
        wait = max(self._paused(k) for k in keys)
        if wait > 0:
            self._count("refused")
            log.warning("console: sign-in for %r from %s paused after repeated wrong passwords", name[:128], client)
            return aioweb.json_response({"error": f"too many wrong passwords; try again in {wait:.0f} s"},
                                        status=429, headers={"Retry-After": str(int(wait) + 1)})
        async with self._hashing:
            who: Principal | None = await asyncio.get_running_loop().run_in_executor(
                None, users.verify, name[:128], password[:1024])
        if who is None:
            self._count("refused")
            for k in keys:
                self._failures.setdefault(k, []).append(self.clock())
                self._failures.move_to_end(k)
            while len(self._failures) > 10_000:  # bounded whatever names an attacker tries
                self._failures.popitem(last=False)
            log.warning("console: sign-in refused for %r from %s", name[:128], client)
            return _error(401, "wrong name or password")
        self._count("ok")
        self._failures.pop(keys[0], None)
        log.info("console: %s (%s) signed in from %s", who.name, who.role, client)
        cookie, csrf = self.sessions.issue(who)
        response = aioweb.json_response({"name": who.name, "role": who.role, "via": who.via, "csrf": csrf})
        self._cookie(response, request, SESSION_COOKIE, cookie, self.sessions.max_age)
        response.del_cookie(LOGIN_COOKIE, path="/")
        return response

    def client_address(self, request: aioweb.Request) -> str:
        """The browser's address: the peer, or behind a trusted proxy the address the proxy appended last."""
        forwarded = request.headers.get("X-Forwarded-For", "")
        if forwarded and self.proxies.trusts(request.remote):
            return forwarded.rsplit(",", 1)[-1].strip()
        return str(request.remote)

    def _paused(self, key: tuple[str, str]) -> float:
        """Seconds until sign-in resumes for this name or address (0: it may try now)."""
        now = self.clock()
        recent = [t for t in self._failures.get(key, ()) if now - t < FAILURE_WINDOW]
        if recent:
            self._failures[key] = recent
        else:
            self._failures.pop(key, None)
        if len(recent) < FAILURE_LIMITS[key[0]]:
            return 0.0
        return FAILURE_WINDOW - (now - recent[-FAILURE_LIMITS[key[0]]])

    def logout(self, request: aioweb.Request) -> aioweb.Response:
        """End the session in this browser (the middleware checked its CSRF token)."""
        response = aioweb.json_response({"signed_out": True})
        response.del_cookie(SESSION_COOKIE, path="/")
        return response

    def _count(self, result: str) -> None:
        if self.signins is not None:
            self.signins.labels(result).inc()

    def _cookie(self, response: aioweb.StreamResponse, request: aioweb.Request, name: str, value: str,
                max_age: int) -> None:
        # Secure when the browser came over TLS: directly, or through a trusted proxy that says so.
        https = request.secure or (self.proxies.trusts(request.remote)
                                   and request.headers.get("X-Forwarded-Proto", "").lower() == "https")
        response.set_cookie(name, value, max_age=max_age, path="/", httponly=True, samesite="Strict", secure=https)


def _error(status: int, message: str) -> aioweb.Response:
    return aioweb.json_response({"error": message}, status=status, headers={"Cache-Control": "no-store"})


def _secure(response: aioweb.StreamResponse, csp: str) -> aioweb.StreamResponse:
    h = response.headers
    h.setdefault("Cache-Control", "no-store")
    h["X-Content-Type-Options"] = "nosniff"
    h["X-Frame-Options"] = "DENY"
    h["Referrer-Policy"] = "no-referrer"
    if csp and response.content_type == "text/html":
        h["Content-Security-Policy"] = csp
    return response


__all__ = ["CSRF_HEADER", "LOGIN_COOKIE", "PRINCIPAL", "SESSION_COOKIE", "Console", "page_csp"]
