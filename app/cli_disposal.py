"""Disposal commands: acknowledge, resolve and reopen alerts, check plan catalogues, print disclosure summaries."""

from __future__ import annotations

import argparse
import json
import re
import time
from collections.abc import Sequence
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.cli import command
from models.errors import RiskwatchError

_RELATIVE = re.compile(r"^\s*(\d+(?:\.\d+)?)\s*(m|h|d)\s*$")
_UNIT = {"m": 60, "h": 3600, "d": 86400}
_NUMBER = re.compile(r"^-?[\d,]+(\.\d+)?$")


def _act_args(p: argparse.ArgumentParser, resolve: bool = False) -> None:
    p.add_argument("alert_id", help="the alert_id of the warning (24 hexadecimal characters)")
    p.add_argument("--by", required=True, help="who is acting (name or user id), recorded in the audit trail")
    p.add_argument("--note", help="free text kept with the audit record")
    if resolve:
        p.add_argument("--verdict", required=True, choices=["confirmed", "false_positive"],
                       help="was the warning a real risk (confirmed) or not (false_positive)")


def publish_act(alert_id: str, action: str, by: str, note: str | None = None, verdict: str | None = None,
                assignee: str | None = None) -> str:
    """Validate an act (models.lifecycle.make_act, as the console does) and publish it to risk.acks; return the topic.

    The name comes from --by, which nobody checked: the act is marked `via: cli` in the audit trail.
    """
    from app.admin import ensure_topics, producer
    from app.faust_app import ACKS
    from app.settings import get_settings
    from models.lifecycle import make_act

    act = make_act(alert_id, action, by, note=note, verdict=verdict, assignee=assignee, via="cli")
    s = get_settings()
    ensure_topics(s)
    prod = producer(s)
    try:
        prod.send(s.topic(ACKS), key=act.alert_id.encode(), value=act.model_dump_json().encode()).get(timeout=30)
    finally:
        prod.close()
    return s.topic(ACKS)


@command("ack", "Acknowledge an alert: stops its escalation (publishes to risk.acks).")(_act_args)
def cmd_ack(args: argparse.Namespace) -> int:
    """Publish an acknowledgement."""
    topic = publish_act(args.alert_id, "ack", args.by, args.note)
    print(f"acknowledgement of {args.alert_id} by {args.by} sent to {topic}")
    return 0


@command("resolve", "Resolve an alert with a verdict (confirmed or false_positive).")(
    lambda p: _act_args(p, resolve=True))
def cmd_resolve(args: argparse.Namespace) -> int:
    """Publish a resolution with its verdict."""
    topic = publish_act(args.alert_id, "resolve", args.by, args.note, args.verdict)
    print(f"resolution of {args.alert_id} ({args.verdict}) by {args.by} sent to {topic}")
    return 0


def _assign_args(p: argparse.ArgumentParser) -> None:
    _act_args(p)
    p.add_argument("--to", required=True, dest="assignee", help="the person or team who takes the case")


@command("assign", "Assign an alert to a person or team (publishes to risk.acks).")(_assign_args)
def cmd_assign(args: argparse.Namespace) -> int:
    """Publish an assignment."""
    topic = publish_act(args.alert_id, "assign", args.by, args.note, assignee=args.assignee)
    print(f"assignment of {args.alert_id} to {args.assignee} by {args.by} sent to {topic}")
    return 0


def _note_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("alert_id", help="the alert_id of the warning (24 hexadecimal characters)")
    p.add_argument("--by", required=True, help="who is writing (name or user id), recorded in the audit trail")
    p.add_argument("--note", required=True, help="the note's text")


@command("note", "Add a note to an alert's audit trail (publishes to risk.acks).")(_note_args)
def cmd_note(args: argparse.Namespace) -> int:
    """Publish a note."""
    topic = publish_act(args.alert_id, "note", args.by, args.note)
    print(f"note on {args.alert_id} by {args.by} sent to {topic}")
    return 0


@command("reopen", "Reopen a resolved or expired alert: its deadlines start again.")(_act_args)
def cmd_reopen(args: argparse.Namespace) -> int:
    """Publish a reopening."""
    topic = publish_act(args.alert_id, "reopen", args.by, args.note)
    print(f"reopening of {args.alert_id} by {args.by} sent to {topic}")
    return 0


def _plans_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["check"])
    p.add_argument("file", type=Path, nargs="?", help="plan catalogue (default: RISKWATCH_PLANS_FILE)")


@command("plans", "Validate a contingency-plan catalogue and show which plan answers each category.")(_plans_args)
def cmd_plans(args: argparse.Namespace) -> int:
    """Check a plan catalogue: it loads, and every category of the rule catalogue has a plan."""
    from app.settings import get_settings
    from models.plans import load_plans
    from models.rules import load_catalogue

    s = get_settings()
    path = args.file or s.plans_file
    plans = load_plans(path)
    rules = load_catalogue(s.rules_file)
    lowest = rules.raised_categories()
    # Market and platform monitors raise below their rule's level too; check the whole range.
    rows = []
    for category in sorted(lowest):
        for level in ("low", "medium", "high", "critical"):
            plan = plans.select(category, level)
            rows.append([category, level, plan.plan_id if plan else "-", plan.owner_team if plan else "-"])
    print(_table(["CATEGORY", "LEVEL", "PLAN", "TEAM"], rows))
    missing = plans.uncovered(dict.fromkeys(lowest, "low"))
    if missing:
        raise RiskwatchError(f"{path}: no plan answers {', '.join(missing)}; add a plan or a '*' fallback")
    print(f"{path}: version {plans.version}, {len(plans.plans)} plans: OK")
    return 0


def _disclosure_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--since", default="24h",
                   help="windows starting at or after this: a date/time (2026-11-02, 2026-11-02T09:00+08:00) "
                        "or an age (90m, 24h, 7d); default 24h")
    p.add_argument("--period", choices=["hour", "day", "all"], default="all")
    p.add_argument("--json", action="store_true", help="print the summaries as JSON lines instead")


def parse_since(text: str, now: datetime | None = None) -> datetime:
    """A --since value as an aware datetime: an age ('24h') or an ISO date or date-time (UTC if no offset).

    >>> parse_since("2026-11-02").isoformat()
    '2026-11-02T00:00:00+00:00'
    >>> parse_since("2h", datetime(2026, 1, 1, 12, tzinfo=UTC)).hour
    10
    """
    m = _RELATIVE.match(text)
    if m:
        return (now or datetime.now(UTC)) - timedelta(seconds=float(m.group(1)) * _UNIT[m.group(2)])
    try:
        when = datetime.fromisoformat(text.strip())
    except ValueError:
        raise RiskwatchError(f"--since {text!r}: write an age such as 24h or 7d, or a date such as 2026-11-02 "
                             "or 2026-11-02T09:00+08:00") from None
    return when if when.tzinfo else when.replace(tzinfo=UTC)


def read_summaries(timeout: float = 10.0) -> list[Any]:
    """Every summary on risk.disclosure, the latest per window."""
    from kafka import TopicPartition

    from app.admin import consumer
    from app.faust_app import DISCLOSURE
    from app.settings import get_settings
    from models.disclosure import DisclosureSummary, latest

    s = get_settings()
    topic = s.topic(DISCLOSURE)
    c = consumer(s, enable_auto_commit=False, consumer_timeout_ms=1000)
    try:
        parts = c.partitions_for_topic(topic)
        if not parts:
            raise RiskwatchError(f"topic {topic} does not exist yet: is a worker running with this "
                                 "RISKWATCH_TOPIC_PREFIX?")
        tps = [TopicPartition(topic, p) for p in sorted(parts)]
        c.assign(tps)
        c.seek_to_beginning(*tps)
        end = c.end_offsets(tps)
        got: list[DisclosureSummary] = []
        deadline = time.monotonic() + timeout
        while any(c.position(tp) < end[tp] for tp in tps) and time.monotonic() < deadline:
            for records in c.poll(timeout_ms=500).values():
                for r in records:
                    try:
                        got.append(DisclosureSummary.model_validate_json(r.value))
                    except ValidationError:
                        continue  # not ours to judge here; the worker wrote it
        return latest(got)
    finally:
        c.close()


def _money(x: float) -> str:
    return f"{x:,.2f}"


def _table(headers: Sequence[str], rows: Sequence[Sequence[Any]]) -> str:
    cells = [[str(h) for h in headers]] + [[str(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]

    def line(r: Sequence[str]) -> str:
        # Numbers read best right-aligned; words left-aligned.
        return "  ".join(c.rjust(w) if _NUMBER.match(c) else c.ljust(w)
                         for c, w in zip(r, widths, strict=True)).rstrip()

    return "\n".join([line(cells[0]), "  ".join("-" * w for w in widths)] + [line(r) for r in cells[1:]])


def render(summaries: Sequence[Any]) -> str:
    """Summaries as two readable tables: activity per window, then money per window, currency and type."""
    overview, money = [], []
    for s in summaries:
        when = s.start.strftime("%Y-%m-%d %H:%M %z" if s.period == "hour" else "%Y-%m-%d %z")
        w = s.warnings
        overview.append([s.period, when, "final" if s.complete else "so far", f"{s.transactions:,}", w.total,
                         *(w.by_level.get(lv, 0) for lv in ("critical", "high", "medium", "low")),
                         s.plans.opened, s.plans.resolved, s.plans.overdue])
        for cur in sorted(s.money):
            for txn_type in sorted(s.money[cur]):
                f = s.money[cur][txn_type]
                money.append([s.period, when, cur, txn_type, _money(f.inflow), _money(f.outflow), f"{f.n:,}"])
            t = s.totals[cur]
            money.append([s.period, when, cur, "all types", _money(t.inflow), _money(t.outflow), f"{t.n:,}"])
            c = s.custody.get(cur)
            if c is not None:
                money.append([s.period, when, cur, "custody funds", _money(c.inflow), _money(c.outflow),
                              f"{c.n:,}"])
                if c.to_platform_own:
                    money.append([s.period, when, cur, "custody to platform-own", "", _money(c.to_platform_own),
                                  ""])
    out = [_table(["PERIOD", "START", "STATUS", "TXNS", "WARNINGS", "CRIT", "HIGH", "MED", "LOW",
                   "PLANS", "RESOLVED", "OVERDUE"], overview)]
    if money:
        out += ["", _table(["PERIOD", "START", "CURRENCY", "FLOW", "IN", "OUT", "COUNT"], money)]
    return "\n".join(out)


@command("disclosure", "Print the latest hourly and daily disclosure summaries from risk.disclosure.")(
    _disclosure_args)
def cmd_disclosure(args: argparse.Namespace) -> int:
    """Print disclosure summaries as readable tables (or JSON lines)."""
    since = parse_since(args.since)
    rows = [s for s in read_summaries() if s.start >= since and args.period in ("all", s.period)]
    if args.json:
        for s in rows:
            print(json.dumps(s.model_dump(mode="json"), ensure_ascii=False))
        return 0
    if not rows:
        print(f"no disclosure summaries for windows starting since {since.isoformat()}")
        return 0
    print(render(rows))
    return 0


__all__ = ["parse_since", "publish_act", "read_summaries", "render"]
