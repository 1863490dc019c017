"""The `riskwatch` command line: worker, local Kafka, schemas, rules, tailing and evaluation."""

from __future__ import annotations

import argparse
import json
import logging
import sys
from collections.abc import Callable, Sequence
from pathlib import Path

from models.errors import RiskwatchError

log = logging.getLogger("riskwatch.cli")
Command = Callable[[argparse.Namespace], int]
_COMMANDS: dict[str, tuple[Command, Callable[[argparse.ArgumentParser], None], str]] = {}


ArgAdder = Callable[[argparse.ArgumentParser], None]


def command(name: str, help_text: str) -> Callable[[ArgAdder], Callable[[Command], Command]]:
    """Register a subcommand: decorate an argument adder, then the function it configures."""

    def with_args(add: Callable[[argparse.ArgumentParser], None]) -> Callable[[Command], Command]:
        def register(fn: Command) -> Command:
            _COMMANDS[name] = (fn, add, help_text)
            return fn

        return register

    return with_args


def _no_args(p: argparse.ArgumentParser) -> None:
    pass


@command("worker", "Run the stream-processing worker (consumes risk.transactions and risk.market).")(_no_args)
def cmd_worker(args: argparse.Namespace) -> int:
    """Run the Faust worker until interrupted; refuse while this deployment's state is under pre-prefix names."""
    from app.migration import refuse_if_unmigrated
    from app.settings import get_settings
    from app.worker import run

    # Before anything joins a group: a worker that started empty would commit under the new names
    # and leave the old state behind for good (app/migration.py).
    refuse_if_unmigrated(get_settings())
    run()
    return 0


@command("check", "Check what a worker needs (codecs, ports, Kafka, topics, rules, plans, console, Alertmanager) "
                  "without starting one.")(_no_args)
def cmd_check(args: argparse.Namespace) -> int:
    """Print one line per check; exit 2 if any failed, so a deploy pipeline can stop before the rollout."""
    from app.preflight import FAIL, check
    from app.settings import get_settings

    found = check(get_settings())
    for f in found:
        print(f.line())
    return 2 if any(f.outcome == FAIL for f in found) else 0


def _migrate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--fresh", action="store_true",
                   help="copy only the committed offsets: every account and model starts afresh")


@command("migrate-state", "Copy this deployment's changelogs and offsets to their prefixed names (once, workers "
                          "stopped).")(_migrate_args)
def cmd_migrate_state(args: argparse.Namespace) -> int:
    """Move state from the names of versions before changelogs and groups took RISKWATCH_TOPIC_PREFIX."""
    from app.migration import migrate
    from app.settings import get_settings

    n = migrate(get_settings(), fresh=args.fresh, say=print)
    print(f"migrated ({n} changelog records copied); the old topics and groups are left as they were: delete them "
          "once the workers run well under the new names")
    return 0


def _kafka_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["start", "stop", "status"])
    p.add_argument("--port", type=int, default=9092, help="broker port (default 9092)")
    p.add_argument("--fresh", action="store_true", help="wipe the data directory before starting")
    p.add_argument("--timeout", type=float, default=60.0,
                   help="seconds to wait for the broker to serve metadata (default 60); a data directory holding "
                        "many topics after an unclean shutdown can take longer to recover")


@command("kafka", "Start, stop or check a local single-node Kafka broker from Maven Central jars.")(_kafka_args)
def cmd_kafka(args: argparse.Namespace) -> int:
    """Manage the local broker used by the demo and tests."""
    from app import kafka_local

    if args.action == "start":
        if args.fresh:
            kafka_local.stop(args.port)
            kafka_local.wipe(args.port)
        info = kafka_local.start(args.port, timeout=args.timeout)
        print(f"Kafka running at {info.bootstrap} (pid {info.pid}, log {info.log_file})")
    elif args.action == "stop":
        print("stopped" if kafka_local.stop(args.port) else f"no local broker was running on port {args.port}")
    else:
        st = kafka_local.status(args.port)
        print(f"running at {st.bootstrap} (pid {st.pid})" if st else f"not running on port {args.port}")
        return 0 if st else 1
    return 0


def _schema_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--out", type=Path, help="write one <name>.schema.json per model into this folder")


@command("schema", "Print or write the JSON Schemas of the wire contract.")(_schema_args)
def cmd_schema(args: argparse.Namespace) -> int:
    """Export JSON Schemas for every message riskwatch reads or writes."""
    from models.disclosure import DisclosureSummary
    from models.lifecycle import AckEvent, AuditRecord
    from models.plans import Trigger
    from models.schemas import Alert, DeadLetter, MarketTick, Transaction

    models = (Transaction, MarketTick, Alert, DeadLetter, Trigger, AckEvent, AuditRecord, DisclosureSummary)
    schemas = {m.__name__.lower(): m.model_json_schema() for m in models}
    if args.out:
        args.out.mkdir(parents=True, exist_ok=True)
        for name, schema in schemas.items():
            (args.out / f"{name}.schema.json").write_text(json.dumps(schema, indent=2) + "\n")
        print(f"wrote {len(schemas)} schemas to {args.out}")
    else:
        print(json.dumps(schemas, indent=2))
    return 0


def _rules_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("action", choices=["check", "publish"])
    p.add_argument("file", type=Path, nargs="?", help="the catalogue (check: RISKWATCH_RULES_FILE by default)")


@command("rules", "Validate a rule catalogue, or publish it to running workers via risk.rules.")(_rules_args)
def cmd_rules(args: argparse.Namespace) -> int:
    """Check or publish a rule catalogue file."""
    from app.settings import get_settings
    from models.rules import load_catalogue

    if args.file is None:
        if args.action == "publish":
            raise SystemExit("riskwatch rules publish: give the catalogue file to publish")
        args.file = get_settings().rules_file  # the shipped default unless the setting names another
    cat = load_catalogue(args.file)
    if args.action == "check":
        enabled = sum(1 for r in cat.rules.values() if r.enabled)
        print(f"{args.file}: version {cat.version}, {enabled} of {len(cat.rules)} rules enabled: OK")
        return 0
    from app.admin import ensure_topics, producer
    from app.faust_app import RULES

    s = get_settings()
    ensure_topics(s)
    prod = producer(s)
    prod.send(s.topic(RULES), key=b"catalogue", value=args.file.read_bytes(), partition=0).get(timeout=30)
    prod.close()
    print(f"published rules version {cat.version} to {s.topic(RULES)}")
    return 0


def _tail_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--from-beginning", action="store_true")
    p.add_argument("--min-level", default="low", choices=["low", "medium", "high", "critical"])


@command("tail", "Print warnings from risk.alerts as they arrive, one readable line each.")(_tail_args)
def cmd_tail(args: argparse.Namespace) -> int:
    """Follow the alerts topic in the terminal."""
    from app.live import tail

    tail(from_beginning=args.from_beginning, min_level=args.min_level)
    return 0


def _demo_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--rate", type=float, default=300.0, help="events per second to feed (default 300)")
    p.add_argument("--produce-only", action="store_true", help="only feed events; a worker runs elsewhere")
    p.add_argument("--accounts", type=int, default=300)


@command("demo", "Start Kafka and a worker, feed a generated risky stream, and show warnings live.")(_demo_args)
def cmd_demo(args: argparse.Namespace) -> int:
    """The one-command tour of riskwatch."""
    from app.demo import run_demo

    return run_demo(rate=args.rate, produce_only=args.produce_only, accounts=args.accounts)


def main(argv: Sequence[str] | None = None) -> int:
    """Entry point of the `riskwatch` console script."""
    _load_optional_commands()
    parser = argparse.ArgumentParser(prog="riskwatch", description="Real-time risk early warning on Kafka.")
    sub = parser.add_subparsers(dest="command", required=True)
    for name, (fn, add, help_text) in sorted(_COMMANDS.items()):
        p = sub.add_parser(name, help=help_text, description=help_text)
        add(p)
        p.set_defaults(func=fn)
    args = parser.parse_args(argv)
    from app.logs import setup_logging

    try:
        setup_logging()  # reads the settings: a bad one is said like any other error
        return int(args.func(args))
    except RiskwatchError as exc:
        print(f"riskwatch {args.command}: {exc}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        return 130


def _load_optional_commands() -> None:
    # Commands defined in their own modules register themselves on import.
    import importlib

    for mod in ("app.cli_analysis", "app.cli_disposal", "app.cli_lists", "app.cli_users"):
        try:
            importlib.import_module(mod)
        except ModuleNotFoundError as exc:
            if exc.name != mod:
                raise


__all__ = ["command", "main"]


if __name__ == "__main__":
    # Under `python -m app.cli` this file runs as __main__; optional command modules register on
    # the importable app.cli, so dispatch through that copy.
    from app.cli import main as _main

    sys.exit(_main())
