"""Console sign-in: local accounts with roles, signed sessions with CSRF tokens, read-only API tokens.

The web layer (the warnings page and its API) asks this module three questions: who is this
(a session cookie, an API token, or a user header from a trusted reverse proxy), may they do
this (viewer < operator < admin), and is this write really from our page (the CSRF token bound
to the session). Security primitives come from well-kept libraries: Argon2id password hashes
(argon2-cffi, OWASP's first choice), signed, timed session values (itsdangerous); tokens are
compared in constant time. Nothing here stores a password or a token in plain text.

Users live in a JSON file (0600) managed with `riskwatch users ...`; with a reverse proxy in front
the file only maps the proxy's user names to roles.
"""

from __future__ import annotations

import functools
import hashlib
import hmac
import ipaddress
import json
import os
import secrets
import tempfile
from collections.abc import Iterable
from dataclasses import dataclass
from pathlib import Path
from typing import Any, Literal, cast

from argon2 import PasswordHasher
from argon2.exceptions import InvalidHashError, VerificationError, VerifyMismatchError
from itsdangerous import BadSignature, URLSafeTimedSerializer

from models.errors import RiskwatchError

Role = Literal["viewer", "operator", "admin"]
ROLES: tuple[Role, ...] = ("viewer", "operator", "admin")  # each may do what the ones before it may
SESSION_SECONDS = 12 * 3600  # a shift; then sign in again
TOKEN_PREFIX = "rwt_"  # API tokens are recognisable in logs and secret scanners
_HASHER = PasswordHasher()  # argon2-cffi's defaults: Argon2id, RFC 9106 low-memory profile (64 MiB a hash)


@functools.cache
def _dummy_hash() -> str:
    """Verified against when a user name is unknown, so a wrong name costs what a wrong password does.

    Made on first use, not at import: a hash takes 64 MiB, and every `riskwatch` command imports this
    module (a worker's peak RSS rose by 25 MiB before it had seen an event).
    """
    return _HASHER.hash(secrets.token_hex(16))


class AuthError(RiskwatchError):
    """A user, token or users-file operation was refused; the message says why and what to do."""


def allows(role: str, needed: Role) -> bool:
    """True when `role` may do what `needed` may (viewer < operator < admin); unknown roles may nothing."""
    return role in ROLES and ROLES.index(cast(Role, role)) >= ROLES.index(needed)


@dataclass(frozen=True)
class Principal:
    """Who a request acts as: the signed-in (or proxy-named, or token) user and their role.

    `via` "open" is the anonymous reader of a console opened read-only for a local demo.
    """

    name: str
    role: Role
    via: Literal["session", "proxy", "token", "open"]


def _token_digest(token: str) -> str:
    # API tokens are 256 random bits: a plain SHA-256 is enough (nothing to brute-force).
    return hashlib.sha256(token.encode()).hexdigest()


class Users:
    """The users file: user name -> Argon2 hash and role, token id -> token digest (read-only tokens)."""

    def __init__(self, path: Path) -> None:
        self.path = Path(path)
        self.users: dict[str, dict[str, str]] = {}
        self.tokens: dict[str, dict[str, str]] = {}
        if self.path.exists():
            self._load()

    def _load(self) -> None:
        try:
            data = json.loads(self.path.read_text())
            self.users = {str(k): dict(v) for k, v in data.get("users", {}).items()}
            self.tokens = {str(k): dict(v) for k, v in data.get("tokens", {}).items()}
        except (OSError, ValueError, AttributeError, TypeError) as exc:
            raise AuthError(f"cannot read the users file {self.path}: {exc}; fix it or move it away and add the "
                            "users again with 'riskwatch users add'") from None

    def save(self) -> None:
        """Write the file atomically, readable by its owner only."""
        self.path.parent.mkdir(parents=True, exist_ok=True)
        fd, tmp = tempfile.mkstemp(dir=self.path.parent, prefix=".users-")
        try:
            with os.fdopen(fd, "w") as f:
                json.dump({"users": self.users, "tokens": self.tokens}, f, indent=1, sort_keys=True)
            os.chmod(tmp, 0o600)
            os.replace(tmp, self.path)
        except BaseException:
            Path(tmp).unlink(missing_ok=True)
            raise

    # ------------------------------------------------------------ users
    def add(self, name: str, role: str, password: str | None) -> None:
        """Add or update a user; `password` None for a user who signs in through the reverse proxy only."""
        if role not in ROLES:
            raise AuthError(f"unknown role {role!r}; choose one of {', '.join(ROLES)}")
        if not name or len(name) > 128 or not name.isprintable() or name != name.strip():
            raise AuthError("a user name is 1-128 printable characters with no surrounding spaces")
        if password is not None and len(password) < 12:
            raise AuthError("a password needs at least 12 characters")
        entry: dict[str, str] = {"role": role}
        if password is not None:
            entry["hash"] = _HASHER.hash(password)
        self.users[name] = entry

    def remove(self, name: str) -> None:
        """Remove a user and every token issued to them."""
        if self.users.pop(name, None) is None:
            raise AuthError(f"no user {name!r}; 'riskwatch users list' shows who there is")
        self.tokens = {k: v for k, v in self.tokens.items() if v.get("user") != name}

    def role_of(self, name: str) -> Role | None:
        """The user's role, or None for an unknown user."""
        entry = self.users.get(name)
        role = entry.get("role") if entry else None
        return cast(Role, role) if role in ROLES else None

    def verify(self, name: str, password: str) -> Principal | None:
        """The user if the password is theirs, else None (the same work either way)."""
        entry = self.users.get(name)
        stored = entry.get("hash") if entry else None
        try:
            _HASHER.verify(stored or _dummy_hash(), password)
        except (VerifyMismatchError, VerificationError, InvalidHashError):
            return None
        if stored is None or entry is None:
            return None
        if _HASHER.check_needs_rehash(stored):
            entry["hash"] = _HASHER.hash(password)
        role = self.role_of(name)
        return Principal(name, role, "session") if role else None

    # ------------------------------------------------------------ tokens
    def issue_token(self, user: str, label: str = "") -> str:
        """A new read-only (viewer) API token for dashboards; shown once, stored as a digest."""
        if user not in self.users:
            raise AuthError(f"no user {user!r}: tokens are issued to a user, add them first")
        token = TOKEN_PREFIX + secrets.token_urlsafe(32)
        token_id = secrets.token_hex(4)
        self.tokens[token_id] = {"user": user, "digest": _token_digest(token), "label": label}
        return token

    def revoke_token(self, token_id: str) -> None:
        """Revoke one token by its id ('riskwatch users list' shows them)."""
        if self.tokens.pop(token_id, None) is None:
            raise AuthError(f"no token {token_id!r}")

    def check_token(self, token: str) -> Principal | None:
        """The token's user as a viewer, or None; compared in constant time."""
        digest = _token_digest(token)
        found = None
        for entry in self.tokens.values():
            if hmac.compare_digest(entry.get("digest", ""), digest):
                found = entry
        if found is None or found.get("user") not in self.users:
            return None
        return Principal(found["user"], "viewer", "token")


class Sessions:
    """Signed, timed session values carrying the user, role and the session's CSRF token."""

    def __init__(self, secret: str, max_age: int = SESSION_SECONDS) -> None:
        if len(secret) < 32:
            raise AuthError("the session secret needs at least 32 characters (e.g. `openssl rand -hex 32`)")
        self._signer = URLSafeTimedSerializer(secret, salt="riskwatch-session")
        self.max_age = max_age

    def issue(self, who: Principal) -> tuple[str, str]:
        """A session cookie value for `who` and its CSRF token (the page sends it back on every write)."""
        csrf = secrets.token_urlsafe(24)
        return self._signer.dumps({"u": who.name, "r": who.role, "c": csrf}), csrf

    def read(self, cookie: str, users: Users) -> tuple[Principal, str] | None:
        """The session's user (with the role the users file gives them now) and CSRF token, or None."""
        try:
            data: dict[str, Any] = self._signer.loads(cookie, max_age=self.max_age)
        except BadSignature:
            return None
        role = users.role_of(str(data.get("u", "")))
        if role is None:  # removed since signing in
            return None
        return Principal(str(data["u"]), role, "session"), str(data.get("c", ""))


def csrf_ok(expected: str, given: str | None) -> bool:
    """True when the write carries the session's CSRF token (constant-time comparison)."""
    return bool(expected) and given is not None and hmac.compare_digest(expected, given)


class TrustedProxies:
    """Reverse proxies whose user header is believed: only requests from these addresses may name a user."""

    def __init__(self, networks: Iterable[str]) -> None:
        try:
            self.networks = [ipaddress.ip_network(n.strip(), strict=False) for n in networks if n.strip()]
        except ValueError as exc:
            raise AuthError(f"bad proxy address: {exc}; give addresses or CIDR ranges, e.g. 10.0.0.5,10.1.0.0/16")\
                from None

    def trusts(self, peer: str | None) -> bool:
        """True when the connection comes from a configured proxy."""
        if not peer or not self.networks:
            return False
        try:
            addr = ipaddress.ip_address(peer)
        except ValueError:
            return False
        return any(addr in n for n in self.networks)

    def principal(self, peer: str | None, user: str | None, users: Users) -> Principal | None:
        """The proxy-named user with their role from the users file, if the peer is trusted and the user known."""
        if not user or not self.trusts(peer):
            return None
        role = users.role_of(user)
        return Principal(user, role, "proxy") if role else None


def host_allowed(host: str | None, allowed: Iterable[str]) -> bool:
    """True when the Host header names this console (DNS rebinding defence); port ignored."""
    if not host:
        return False
    name = host.rsplit(":", 1)[0] if not host.endswith("]") else host
    name = name.strip("[]").lower()
    return any(name == a.strip().lower() for a in allowed)


__all__ = ["ROLES", "AuthError", "Principal", "Role", "Sessions", "TrustedProxies", "Users", "allows", "csrf_ok",
           "host_allowed"]
