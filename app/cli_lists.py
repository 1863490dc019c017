"""`riskwatch lists`: add, remove, import and export entries of the run-time block, watch and allow lists."""

from __future__ import annotations

import argparse
import csv
import hashlib
import io
import sys
from collections.abc import Iterable, Iterator
from pathlib import Path
from typing import Any

from pydantic import ValidationError

from app.cli import command
from app.list_changes import Action, Via, audit_of, make_change
from models.errors import RiskwatchError
from models.lists import KINDS, ListChange, as_row, parse_key


def _entry_args(p: argparse.ArgumentParser, value: bool = True) -> None:
    p.add_argument("list", help="the list's name, as the catalogue's `lists` rule defines it")
    p.add_argument("kind", choices=KINDS, help="what the entries are")
    if value:
        p.add_argument("value", help="the id (for kind pair: the account)")
        p.add_argument("counterparty", nargs="?", help="kind pair only: the counterparty")


def _lists_args(p: argparse.ArgumentParser) -> None:
    sub = p.add_subparsers(dest="action", required=True)
    add = sub.add_parser("add", help="add an entry (or change its note)")
    _entry_args(add)
    add.add_argument("--note", help="why it is listed: shown in every warning it causes")
    rm = sub.add_parser("remove", help="remove an entry")
    _entry_args(rm)
    imp = sub.add_parser("import", help="add every entry of a CSV file: value[,counterparty][,note] per line")
    _entry_args(imp, value=False)
    imp.add_argument("file", help="the CSV file, or - for standard input; lines starting with # are skipped")
    for q in (add, rm, imp):
        q.add_argument("--by", required=True, help="who makes the change, recorded in the audit trail")
    exp = sub.add_parser("export", help="write a list's entries as CSV (what `import` reads)")
    exp.add_argument("list")
    exp.add_argument("kind", nargs="?", choices=KINDS, help="only entries of this kind")
    exp.add_argument("file", nargs="?", default="-", help="the output file (default: standard output)")


@command("lists", "Change or export the run-time block, watch and allow lists (risk.lists) that workers apply.")(
    _lists_args)
def cmd_lists(args: argparse.Namespace) -> int:
    """Publish list changes to risk.lists and their audit to risk.audit, or export a list."""
    if args.action == "export":
        out = sys.stdout if args.file == "-" else open(args.file, "w", newline="")
        try:
            n = export(args.list, args.kind, out)
        finally:
            if out is not sys.stdout:
                out.close()
        print(f"{n} entries of list {args.list} exported", file=sys.stderr)
        return 0
    _check_defined(args.list, args.kind)
    if args.action == "import":
        text = sys.stdin.read() if args.file == "-" else _read(Path(args.file))
        digest = hashlib.sha256(text.encode()).hexdigest()
        changes = list(parse_rows(args.list, args.kind, text, args.by))
        n = publish(changes, "import", args.by, source=f"{args.file} sha256:{digest}")
        print(f"{n} entries imported into list {args.list}")
        return 0
    change = make_change(args.list, args.kind, args.value, args.counterparty, getattr(args, "note", None), args.by)
    publish([change], args.action, args.by)
    print(f"{args.action} {args.kind} {change.value} {'to' if args.action == 'add' else 'from'} list {args.list}: "
          "sent; every worker applies it within seconds")
    return 0


def _read(path: Path) -> str:
    try:
        return path.read_text(encoding="utf-8-sig")
    except OSError as exc:
        raise RiskwatchError(f"cannot read {path}: {exc.strerror}") from None


def parse_rows(name: str, kind: str, text: str, by: str, via: Via = "cli") -> Iterator[ListChange]:
    """The entries of an import file; a bad line stops the import naming its line number (nothing is sent)."""
    width = 2 if kind == "pair" else 1
    for lineno, row in enumerate(csv.reader(io.StringIO(text)), 1):
        if not row or not "".join(row).strip() or row[0].lstrip().startswith("#"):
            continue
        if len(row) < width:
            raise RiskwatchError(f"line {lineno}: kind pair needs account,counterparty[,note]")
        note = ",".join(row[width:]).strip() or None
        try:
            yield make_change(name, kind, row[0].strip(), row[1].strip() if width == 2 else None, note, by, via)
        except RiskwatchError as exc:
            raise RiskwatchError(f"line {lineno}: {exc}; nothing was imported") from None


def publish(changes: list[ListChange], action: Action, by: str,
            via: Via = "cli", source: str | None = None) -> int:
    """Send entries (tombstones for a removal) to risk.lists, then one audit record to risk.audit; return the count."""
    from app.admin import ensure_topics, producer
    from app.faust_app import AUDIT, LISTS
    from app.settings import get_settings

    if not changes:
        return 0
    s = get_settings()
    ensure_topics(s)
    prod = producer(s, linger_ms=20, batch_size=512 * 1024)
    try:
        topic = s.topic(LISTS)
        futures = [prod.send(topic, key=c.key, value=None if action == "remove" else c.model_dump_json().encode(),
                             partition=0) for c in changes]
        prod.flush(timeout=120)
        for f in futures[-1:]:
            f.get(timeout=30)  # raises if the batch failed
        audit = audit_of(changes, action, by, via, source)
        prod.send(s.topic(AUDIT), key=audit.list.encode(), value=audit.model_dump_json().encode()).get(timeout=30)
    finally:
        prod.close()
    return len(changes)


def latest(name: str, kind: str | None = None) -> dict[bytes, bytes]:
    """Every live entry of a list on risk.lists, read to its current end: key -> record (tombstones dropped)."""
    from kafka import TopicPartition

    from app.admin import consumer, ensure_topics
    from app.faust_app import LISTS
    from app.settings import get_settings

    s = get_settings()
    ensure_topics(s)
    c = consumer(s, enable_auto_commit=False, group_id=None)
    try:
        tp = TopicPartition(s.topic(LISTS), 0)
        c.assign([tp])
        c.seek_to_beginning(tp)
        end = c.end_offsets([tp])[tp]
        live: dict[bytes, bytes] = {}
        while c.position(tp) < end:
            for msgs in c.poll(timeout_ms=1000, max_records=50_000).values():
                for msg in msgs:
                    if msg.key is None or not _in(msg.key, name, kind):
                        continue
                    if msg.value is None:
                        live.pop(msg.key, None)
                    else:
                        live[msg.key] = msg.value
        return live
    finally:
        c.close()


def _in(key: bytes, name: str, kind: str | None) -> bool:
    try:
        n, k, _, _ = parse_key(key)
    except ValueError:
        return False  # set aside by the workers too
    return n == name and (kind is None or k == kind)


def export(name: str, kind: str | None, out: Any) -> int:
    """Write a list's entries as CSV rows (value[,counterparty][,note]) under a comment naming the kind."""
    rows = _rows(latest(name, kind).values())
    w = csv.writer(out)
    n = 0
    last = None
    for k, row in sorted(rows, key=lambda r: r[0]):
        if k != last:
            out.write(f"# {name} {k}\n")
            last = k
        w.writerow(row)
        n += 1
    return n


def _rows(records: Iterable[bytes]) -> Iterator[tuple[str, list[str]]]:
    for raw in records:
        try:
            c = ListChange.model_validate_json(raw)
        except ValidationError:
            continue
        yield c.kind, as_row(c)


def _check_defined(name: str, kind: str) -> None:
    """Say plainly when a list is not defined (its entries would match nothing); refuse what cannot work."""
    from app.settings import get_settings
    from models.lists import ALLOW_KINDS, ListsParams
    from models.rules import load_catalogue

    s = get_settings()
    cat = load_catalogue(s.rules_file)
    d = cat.params("lists", ListsParams).lists.get(name)
    if d is None:
        print(f"riskwatch lists: list {name!r} is not defined in {s.rules_file} (rule lists, params.lists): its "
              "entries are stored but match nothing until a published catalogue defines it", file=sys.stderr)
    elif d.type == "allow" and kind not in ALLOW_KINDS:
        raise RiskwatchError(f"list {name!r} is an allow list: it takes accounts, counterparties or pairs, not "
                             f"{kind}s (a shared device or IP is never known-good)")


__all__ = ["cmd_lists", "export", "latest", "parse_rows", "publish"]
