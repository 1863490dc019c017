"""Console sign-in logic (app/auth.py): hashes, roles, sessions, CSRF, tokens, proxies, Host checks."""

from __future__ import annotations

import json
import stat
import subprocess
import sys
import time

import pytest

from app.auth import AuthError, Principal, Sessions, TrustedProxies, Users, allows, csrf_ok, host_allowed
from tests.conftest import ROOT

SECRET = "s" * 40


def _users(tmp_path) -> Users:
    u = Users(tmp_path / "users.json")
    u.add("vera", "viewer", "viewer-password-1")
    u.add("otto", "operator", "operator-password-1")
    u.add("ada", "admin", "admin-password-1")
    u.add("pam", "operator", None)  # signs in through the proxy only
    u.save()
    return u


def test_passwords_are_argon2id_hashes_in_a_private_file(tmp_path) -> None:
    _users(tmp_path)
    text = (tmp_path / "users.json").read_text()
    assert "operator-password-1" not in text and "$argon2id$" in text
    assert stat.S_IMODE((tmp_path / "users.json").stat().st_mode) == 0o600
    u = Users(tmp_path / "users.json")  # read back
    assert u.verify("otto", "operator-password-1") == Principal("otto", "operator", "session")
    assert u.verify("otto", "wrong-password-11") is None
    assert u.verify("nobody", "operator-password-1") is None
    assert u.verify("pam", "anything-at-all-1") is None, "a proxy-only user has no password to match"


def test_roles_are_ordered_and_unknown_ones_refused(tmp_path) -> None:
    assert allows("admin", "operator") and allows("operator", "operator") and allows("operator", "viewer")
    assert not allows("viewer", "operator") and not allows("operator", "admin") and not allows("root", "viewer")
    u = Users(tmp_path / "u.json")
    with pytest.raises(AuthError, match="unknown role"):
        u.add("x", "root", "long-enough-password")
    with pytest.raises(AuthError, match="at least 12"):
        u.add("x", "viewer", "short")


def test_sessions_are_signed_timed_and_follow_the_users_file(tmp_path) -> None:
    u = _users(tmp_path)
    s = Sessions(SECRET)
    cookie, csrf = s.issue(Principal("otto", "operator", "session"))
    who, token = s.read(cookie, u) or (None, "")
    assert who == Principal("otto", "operator", "session") and token == csrf
    assert s.read(cookie[:-2] + ("A" if cookie[-2] != "A" else "B") + cookie[-1], u) is None, "tampered"
    assert Sessions("t" * 40).read(cookie, u) is None, "signed with another secret"
    u.remove("otto")
    assert s.read(cookie, u) is None, "a removed user's session ends"
    old = Sessions(SECRET, max_age=1)
    cookie, _ = old.issue(Principal("ada", "admin", "session"))
    time.sleep(2.1)
    assert old.read(cookie, u) is None, "expired"
    with pytest.raises(AuthError, match="32 characters"):
        Sessions("short")


def test_csrf_tokens_must_match_the_session() -> None:
    assert csrf_ok("abc123", "abc123")
    assert not csrf_ok("abc123", None) and not csrf_ok("abc123", "abc124") and not csrf_ok("", "")


def test_api_tokens_are_read_only_shown_once_and_revocable(tmp_path) -> None:
    u = _users(tmp_path)
    token = u.issue_token("ada", "grafana")
    u.save()
    assert token not in (tmp_path / "users.json").read_text()
    u = Users(tmp_path / "users.json")
    assert u.check_token(token) == Principal("ada", "viewer", "token"), "an admin's token still only reads"
    assert u.check_token(token + "x") is None
    (tid,) = u.tokens
    u.revoke_token(tid)
    assert u.check_token(token) is None


def test_only_configured_proxies_may_name_a_user(tmp_path) -> None:
    u = _users(tmp_path)
    proxies = TrustedProxies(["10.0.0.5", "192.168.1.0/24"])
    assert proxies.principal("10.0.0.5", "pam", u) == Principal("pam", "operator", "proxy")
    assert proxies.principal("192.168.1.77", "ada", u) == Principal("ada", "admin", "proxy")
    assert proxies.principal("10.0.0.6", "ada", u) is None, "not a configured proxy"
    assert proxies.principal("10.0.0.5", "stranger", u) is None, "unknown to the users file"
    assert TrustedProxies([]).principal("127.0.0.1", "ada", u) is None, "no proxies configured: none trusted"
    with pytest.raises(AuthError, match="bad proxy address"):
        TrustedProxies(["10.0.0.300"])


def test_the_host_header_must_name_the_console() -> None:
    allowed = ["riskwatch.example.com", "localhost", "127.0.0.1", "::1"]
    assert host_allowed("riskwatch.example.com", allowed) and host_allowed("LOCALHOST:6066", allowed)
    assert host_allowed("127.0.0.1:6066", allowed) and host_allowed("[::1]:6066", allowed)
    assert not host_allowed("evil.example", allowed) and not host_allowed(None, allowed)
    assert not host_allowed("riskwatch.example.com.evil.example", allowed)


def test_the_users_command(tmp_path) -> None:
    f = tmp_path / "users.json"

    def run(*args: str, stdin: str = "") -> subprocess.CompletedProcess[str]:
        return subprocess.run([sys.executable, "-m", "app.cli", "users", "--file", str(f), *args], cwd=ROOT,
                              input=stdin, capture_output=True, text=True, timeout=60, check=False)

    assert run("add", "otto", "--role", "operator", "--password-stdin", stdin="operator-password-1\n").returncode == 0
    assert run("add", "pam", "--role", "admin", "--proxy-only").returncode == 0
    tok = run("token", "otto", "--label", "grafana")
    assert tok.returncode == 0 and tok.stdout.startswith("rwt_") and "shown once" in tok.stderr
    listed = run("list").stdout
    assert "otto\toperator\tpassword" in listed and "pam\tadmin\tproxy only" in listed and "grafana" in listed
    assert "argon2" not in listed and tok.stdout.strip() not in listed
    bad = run("add", "eve", "--role", "root", "--password-stdin", stdin="whatever-password\n")
    assert bad.returncode != 0 and "invalid choice" in bad.stderr
    short = run("add", "eve", "--password-stdin", stdin="short\n")
    assert short.returncode != 0 and "at least 12 characters" in short.stderr and "Traceback" not in short.stderr
    assert json.loads(f.read_text())["users"].keys() == {"otto", "pam"}


def test_the_command_line_does_not_load_argon2_until_a_users_command_runs() -> None:
    # A hash takes 64 MiB: loaded by every command (the worker too) it raised a worker's peak RSS by 25 MiB.
    from app.auth import ROLES
    from app.cli_users import ROLES as CLI_ROLES

    assert CLI_ROLES == ROLES
    code = ("import sys; from app.cli import _load_optional_commands; _load_optional_commands(); "
            "assert 'argon2' not in sys.modules and 'app.auth' not in sys.modules, sorted(sys.modules)")
    done = subprocess.run([sys.executable, "-c", code], cwd=ROOT, capture_output=True, text=True, timeout=60,
                          check=False)
    assert done.returncode == 0, done.stderr[-2000:]
