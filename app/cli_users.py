"""`riskwatch users`: the console's local accounts, roles and read-only API tokens (app/auth.py)."""

from __future__ import annotations

import argparse
import getpass
import os
import sys
from pathlib import Path

from app.cli import command

# The role names, spelled here so that listing commands does not import app.auth (argon2) at all.
ROLES = ("viewer", "operator", "admin")


def users_file(given: Path | None) -> Path:
    """The users file: --file, else RISKWATCH_USERS_FILE, else users.json in the worker's data directory."""
    if given is not None:
        return given
    if os.environ.get("RISKWATCH_USERS_FILE"):
        return Path(os.environ["RISKWATCH_USERS_FILE"])
    from app.settings import get_settings

    return get_settings().data_dir / "users.json"


def _password(args: argparse.Namespace) -> str | None:
    from app.auth import AuthError

    if args.proxy_only:
        return None
    if args.password_stdin:
        return sys.stdin.readline().rstrip("\n")
    first = getpass.getpass(f"password for {args.name}: ")
    if getpass.getpass("again: ") != first:
        raise AuthError("the two passwords differ; nothing changed")
    return first


def _users_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--file", type=Path, help="users file (default RISKWATCH_USERS_FILE or <data dir>/users.json)")
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add a user, or change their role and password")
    add.add_argument("name")
    add.add_argument("--role", choices=ROLES, default="viewer")
    how = add.add_mutually_exclusive_group()
    how.add_argument("--password-stdin", action="store_true", help="read the password from standard input")
    how.add_argument("--proxy-only", action="store_true",
                     help="no password: the user signs in through the authenticating reverse proxy only")
    rm = sub.add_parser("remove", help="remove a user and their tokens")
    rm.add_argument("name")
    sub.add_parser("list", help="users, roles and token ids (never hashes)")
    tok = sub.add_parser("token", help="issue a read-only API token for a dashboard (printed once)")
    tok.add_argument("name")
    tok.add_argument("--label", default="")
    rev = sub.add_parser("revoke", help="revoke an API token by id")
    rev.add_argument("token_id")


@command("users", "Manage the console's users (viewer, operator, admin) and read-only API tokens.")(_users_args)
def cmd_users(args: argparse.Namespace) -> int:
    """Add, remove or list console users, or issue and revoke read-only API tokens."""
    from app.auth import Users

    users = Users(users_file(args.file))
    if args.action == "list":
        for name in sorted(users.users):
            kind = "password" if "hash" in users.users[name] else "proxy only"
            print(f"{name}\t{users.role_of(name)}\t{kind}")
        for tid, t in sorted(users.tokens.items()):
            print(f"token {tid}\t{t.get('user')}\tviewer\t{t.get('label', '')}")
        return 0
    if args.action == "add":
        users.add(args.name, args.role, _password(args))
        users.save()
        print(f"{args.name}: {args.role} in {users.path}")
    elif args.action == "remove":
        users.remove(args.name)
        users.save()
        print(f"removed {args.name}")
    elif args.action == "token":
        token = users.issue_token(args.name, args.label)
        users.save()
        print(token)
        print("shown once: store it in the dashboard's secret store (Authorization: Bearer <token>)", file=sys.stderr)
    elif args.action == "revoke":
        users.revoke_token(args.token_id)
        users.save()
        print(f"revoked token {args.token_id}")
    return 0


__all__ = ["cmd_users", "users_file"]
