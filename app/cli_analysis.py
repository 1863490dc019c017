"""Analyst commands: `riskwatch replay` (files or Kafka history, with a report) and `riskwatch evaluate`."""

from __future__ import annotations

import argparse
import contextlib
import json
import sys
from datetime import datetime
from pathlib import Path
from typing import Any

from app.cli import command
from app.replay import (
    Config,
    DeadLetters,
    Loaded,
    ReplayError,
    Result,
    deadletter_path,
    open_text,
    read_file,
    read_verdicts,
    replay,
)
from app.settings import Settings, get_settings
from models.schemas import LEVELS


def _when(text: str) -> datetime:
    try:
        when = datetime.fromisoformat(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r} is not an RFC 3339 time such as 2026-11-01T00:00:00Z") from None
    if when.tzinfo is None:
        raise argparse.ArgumentTypeError(f"{text!r} has no UTC offset; add Z or +08:00")
    return when


def _common(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "--rules", type=Path, metavar="FILE", help="rule catalogue to replay with (default: RISKWATCH_RULES_FILE)"
    )
    p.add_argument(
        "--partitions",
        type=int,
        metavar="N",
        help="input partitions the worker runs with (default: "
        "RISKWATCH_TOPIC_PARTITIONS, or the topic's own count with --from-kafka); detectors are "
        "kept per partition as the worker keeps them",
    )


def _replay_args(p: argparse.ArgumentParser) -> None:
    p.add_argument(
        "input", nargs="?", type=Path, help="events: JSONL, .jsonl.gz, CSV or Parquet with the contract's fields"
    )
    p.add_argument(
        "--alerts", type=Path, metavar="FILE", help="write every published warning version here, one JSON per line"
    )
    p.add_argument(
        "--scores", type=Path, metavar="FILE", help='write {"event_id", "score"} here for every scored event'
    )
    p.add_argument("--report", type=Path, metavar="DIR", help="write report.json and report.html into DIR")
    _common(p)
    p.add_argument(
        "--against",
        type=Path,
        metavar="FILE",
        help="a challenger catalogue: replay both and report warnings only under A, only under B, both",
    )
    p.add_argument("--against-alerts", type=Path, metavar="FILE", help="write the challenger's warnings here")
    p.add_argument(
        "--deadletter", type=Path, metavar="FILE", help="invalid inputs (default: deadletter.jsonl beside the outputs)"
    )
    p.add_argument(
        "--verdicts",
        type=Path,
        metavar="FILE",
        help='analysts\' verdicts to feed back, JSON lines of {"alert_id", "verdict", "ts"} (or risk.audit records): '
        "each moves the operating point as the worker's would once event time reaches its ts",
    )
    k = p.add_argument_group("replay from Kafka")
    k.add_argument("--from-kafka", action="store_true", help="re-read the input topics instead of a file")
    k.add_argument(
        "--since", type=_when, metavar="TIME", help="start of the range (record time), e.g. 2026-11-01T00:00:00Z"
    )
    k.add_argument("--until", type=_when, metavar="TIME", help="end of the range (default: the end offsets at start)")
    k.add_argument(
        "--run-id", metavar="ID", help="names the replay's consumer group and output topics (default: time + random)"
    )


def _configs(s: Settings, rules: Path | None, against: Path | None) -> list[Config]:
    from models.rules import load_catalogue

    a = rules or s.rules_file
    out = [Config("A", str(a), load_catalogue(a))]
    if against is not None:
        out.append(Config("B", str(against), load_catalogue(against)))
    return out


def _check(args: argparse.Namespace) -> None:
    if args.from_kafka:
        if args.input is not None:
            raise ReplayError("give either an INPUT file or --from-kafka, not both")
        if args.since is None:
            raise ReplayError("--from-kafka needs --since, e.g. --since 2026-11-01T00:00:00Z")
    elif args.input is None:
        raise ReplayError("give an INPUT file of events, or --from-kafka --since TIME")
    elif args.since or args.until or args.run_id:
        raise ReplayError("--since, --until and --run-id apply to --from-kafka only")
    if args.against_alerts and not args.against:
        raise ReplayError("--against-alerts needs --against FILE")
    if args.partitions is not None and args.partitions < 1:
        raise ReplayError(f"--partitions must be at least 1, got {args.partitions}")


@command(
    "replay",
    "Replay events (files or Kafka history) through the live scoring code; write warnings, scores and a report.",
)(_replay_args)
def cmd_replay(args: argparse.Namespace) -> int:
    """Replay a file or a Kafka time range and summarise what the rules and models would have raised."""
    from app import report as rp

    _check(args)
    s = get_settings()
    configs = _configs(s, args.rules, args.against)
    verdicts = read_verdicts(args.verdicts) if args.verdicts is not None else None
    progress = sys.stderr.isatty()
    dead = DeadLetters(args.deadletter or deadletter_path(args.alerts, args.scores, args.report))
    wrote: list[Path] = []
    with contextlib.ExitStack() as stack:
        stack.callback(dead.close)
        outs = []  # opened first: an unwritable path should fail before an hour of reading
        for path in (args.alerts, args.against_alerts, args.scores):
            f = open_text(path)
            if f is not None:
                stack.callback(f.close)
                wrote.append(path)
            outs.append(f)
        loaded, source, publisher = _load(args, s, dead, progress)
        if publisher is not None:
            stack.callback(publisher.close)
        partitions = args.partitions or loaded.partitions or s.topic_partitions
        traffic = rp.traffic(loaded)  # the replay consumes the events
        on_alert = None if publisher is None else (lambda i, a: publisher.send(a) if i == 0 else None)
        result = replay(
            loaded,
            configs,
            partitions=partitions,
            storm_cap=s.storm_cap_per_minute,
            ttl=s.state_ttl_seconds,
            alerts_out=outs[:2],
            scores_out=outs[2],
            progress=progress,
            on_alert=on_alert,
            verdicts=verdicts,
        )
    rep = rp.build(result, input_name=source, traffic=traffic, page_min_level=s.page_min_level)
    if args.report:
        wrote.extend(rp.write(args.report, result, rep))
    if dead.path is not None and dead.count:
        wrote.append(dead.path)
    _summary(rep, result, loaded, dead)
    if publisher is not None:
        print(f"  published {publisher.sent:,} warning versions to {publisher.topic} (live topics untouched)")
    if wrote:
        print("  wrote " + ", ".join(str(p) for p in wrote))
    if args.report and not rp.plots_available():
        print("  " + rp.PLOTS_HINT)
    return 0


def _load(args: argparse.Namespace, s: Settings, dead: DeadLetters, progress: bool) -> tuple[Loaded, str, Any]:
    """The events to replay, a name for them, and (for --from-kafka) the publisher of the replay's warnings."""
    if not args.from_kafka:
        return read_file(args.input, dead, progress=progress), str(args.input), None
    from app.faust_app import MARKET, TRANSACTIONS
    from app.kafka_replay import AlertPublisher, new_run_id, read_topics

    run_id = args.run_id or new_run_id()
    loaded = read_topics(s, args.since, args.until, run_id, dead)
    source = f"{s.topic(TRANSACTIONS)} and {s.topic(MARKET)} from {args.since.isoformat()}" + (
        f" to {args.until.isoformat()}" if args.until else ""
    )
    return loaded, source, AlertPublisher(s, run_id)


def _fmt(x: float | None, spec: str = ".3f") -> str:
    return "n/a" if x is None else format(x, spec)


def _summary(rep: dict[str, Any], res: Result, loaded: Loaded, dead: DeadLetters) -> None:
    ev, w, t = rep["events"], rep["warnings"], rep["throughput"]
    print(
        f"replayed {ev['scored']:,} events from {rep['input']} ({ev['transactions']:,} transactions, "
        f"{ev['market']:,} market ticks) in {res.seconds:.1f} s: {_fmt(t['events_per_second'], ',.0f')} events/s "
        f"(scoring alone {_fmt(t['scoring_events_per_second'], ',.0f')} events/s)"
    )
    print(f"  invalid {ev['invalid']:,} (dead-lettered)   duplicates {ev['duplicates']:,} (not scored again)")
    for line in dead.summary():
        print(f"    {line}")
    levels = ", ".join(f"{lv} {w['by_level'][lv]:,}" for lv in reversed(LEVELS))
    print(f"  warnings: {w['total']:,} ({levels}); {w['versions_published']:,} versions published")
    print(f"  {_pages(rep['alert_rate'])}")
    cats = {c: sum(v.values()) for c, v in w["by_category"].items()}
    if cats:
        print("  by category: " + ", ".join(f"{c} {n:,}" for c, n in cats.items()))
    ev_ = rep["evaluation"]
    if ev_ is not None:
        for key, name in (("transactions", "all transactions"), ("account_scenarios", "account-level scenarios")):
            m = ev_[key]
            print(
                f"  labels, {name}: ROC AUC {_fmt(m['roc_auc'])}, AP {_fmt(m['average_precision'])}, "
                f"recall {_fmt(m['recall_at_threshold'])} and precision {_fmt(m['precision_at_threshold'])} "
                f"at {ev_['threshold']:g}"
            )
        print(f"  median detection delay {_fmt(ev_['detection']['median_delay_seconds'], ',.0f')} s")
        ep, prec = ev_["episodes"]["overall"], ev_["warnings"]["overall"]
        print(
            f"  episodes warned {ep['warned']:,} of {ep['episodes']:,} (recall {_fmt(ep['recall'])}; paged "
            f"{ep['paged']:,}), median delay {_fmt(ep['median_delay_events'], 'g')} risky events; warning "
            f"precision {_fmt(prec['precision'])}"
        )
    _feedback_summary(res)
    comp = rep["comparison"]
    if comp is not None:
        print(
            f"  champion/challenger: only A {comp['only_a']['total']:,}, both {comp['both']['total']:,}, "
            f"only B {comp['only_b']['total']:,}; pages A {comp['pages']['a']:,}, B {comp['pages']['b']:,}"
        )
        for name in ("only_a", "only_b"):
            if comp[name]["by_category"]:
                print(
                    f"    {name.replace('_', ' ')}: "
                    + ", ".join(f"{c} {n:,}" for c, n in comp[name]["by_category"].items())
                )


def _pages(rate: dict[str, Any]) -> str:
    level = rate["page_min_level"]
    if level not in LEVELS:
        return "pages: none (no page level set)"
    return (
        f"pages (warnings reaching {level} or above, RISKWATCH_PAGE_MIN_LEVEL): {rate['pages']:,}, "
        f"{_fmt(rate['pages_per_day'], ',.1f')} a day over the events' time span"
    )


def _feedback_summary(res: Result) -> None:
    from models.feedback import key_name

    for oc in res.outcomes:
        fb = oc.feedback
        if fb is None:
            continue
        name = f" ({oc.config.name})" if len(res.outcomes) > 1 else ""
        print(
            f"  verdicts{name}: {fb.applied:,} applied of {len(fb.verdicts):,} ({fb.not_raised:,} for warnings not "
            f"raised in this replay, {fb.not_adaptive:,} on rules verdicts never move); "
            f"{len(fb.adaptations):,} adaptations"
        )
        for d, c, f in fb.book.factors():
            n = fb.book.counts(d, c)
            moves = [a for a in fb.adaptations if (a.detector, a.code) == (d, c)]
            print(
                f"    {key_name(d, c)}: factor {f:g} ({n.confirmed:.1f} confirmed, {n.false_positive:.1f} false "
                f"positive; {len(moves)} adaptations)"
            )


def _evaluate_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("input", type=Path, help="labelled events (field `label`): JSONL, .jsonl.gz, CSV or Parquet")
    _common(p)
    p.add_argument("--json", action="store_true", help="print the evaluation as JSON")


@command(
    "evaluate", "Score labelled events with the live scoring code and print ranking, alert and detection metrics."
)(_evaluate_args)
def cmd_evaluate(args: argparse.Namespace) -> int:
    """Replay a labelled file and print how well the rules and models separate risky from normal events."""
    from app import report as rp

    s = get_settings()
    dead = DeadLetters(None)
    loaded = read_file(args.input, dead, progress=sys.stderr.isatty())
    traffic = rp.traffic(loaded)  # the replay consumes the events
    result = replay(
        loaded,
        _configs(s, args.rules, None),
        partitions=args.partitions or s.topic_partitions,
        storm_cap=s.storm_cap_per_minute,
        ttl=s.state_ttl_seconds,
        progress=sys.stderr.isatty(),
    )
    rep = rp.build(result, input_name=str(args.input), traffic=traffic, page_min_level=s.page_min_level)
    ev = rep["evaluation"]
    if ev is None or ev["transactions"]["n"] == 0:
        raise ReplayError(
            f"{args.input} has no labelled transactions; evaluate needs `label` (0 or 1) on events "
            "(use `riskwatch replay` for counts without labels)"
        )
    if args.json:
        print(
            json.dumps(
                {k: rep[k] for k in ("input", "rules", "events", "warnings", "alert_rate", "evaluation")}, indent=1
            )
        )
        return 0
    m = ev["transactions"]
    print(
        f"{args.input}: {m['n']:,} labelled transactions ({m['n_positive']:,} risky), threshold "
        f"{ev['threshold']:g}; {dead.count:,} invalid lines skipped"
    )
    if dead.count:
        for line in dead.summary():
            print(f"  {line}")
        print(f"  (every invalid line with its reason: riskwatch replay {args.input} --deadletter FILE)")
    print(f"{'':26}{'ROC AUC':>9}{'AP':>8}{'recall':>8}{'precision':>11}{'alert rate (normal)':>21}")
    for key, name in (("transactions", "all transactions"), ("account_scenarios", "account-level scenarios")):
        m = ev[key]
        print(
            f"{name:26}{_fmt(m['roc_auc']):>9}{_fmt(m['average_precision']):>8}"
            f"{_fmt(m['recall_at_threshold']):>8}{_fmt(m['precision_at_threshold']):>11}"
            f"{_fmt(m['alert_rate_normal'], '.4%'):>21}"
        )
    print(
        "warnings by category: "
        + ", ".join(f"{c} {sum(v.values()):,}" for c, v in rep["warnings"]["by_category"].items())
    )
    _episode_table(ev["episodes"])
    print("platform-level scenarios (liquidity_run, market_crash) are judged by detection, not event-level metrics")
    _precision_and_load(ev["warnings"], ev["load"])
    if ev["budget_curve"] is not None:
        print(_budget_line(ev["budget_curve"]))
    return 0


def _episode_table(eps: dict[str, Any]) -> None:
    print("episodes (one entity's run of risky events in one scenario) warned by any warning; delay to the first")
    rows = [*eps["per_scenario"].items(), ("all", {**eps["overall"], "level": ""})]
    # Scenario names are the stream's own (another generator's `account_takeover`): the column fits them.
    w = max(16, *(len(scen) + 1 for scen, _ in rows))
    print(f"{'':{w + 28}}{'delay, risky events':>20}{'delay, seconds':>20}")
    print(
        f"{'scenario':{w}}{'level':9}{'warned':>9}{'recall':>7}{'paged':>7}{'median':>10}{'p90':>10}{'median':>10}"
        f"{'p90':>10}"
    )
    for scen, r in rows:
        print(
            f"{scen:{w}}{r['level']:9}{r['warned']:>4} of {r['episodes']:<3}{_fmt(r['recall'], '.2f'):>6}"
            f"{r['paged']:>7}{_fmt(r['median_delay_events'], 'g'):>10}{_fmt(r['p90_delay_events'], '.3g'):>10}"
            f"{_fmt(r['median_delay_seconds'], ',.0f'):>10}{_fmt(r['p90_delay_seconds'], ',.0f'):>10}"
        )


def _precision_and_load(prec: dict[str, Any], load: dict[str, Any]) -> None:
    def share(p: dict[str, Any]) -> str:
        return f"{_fmt(p['precision'])} ({p['true']:,} of {p['warnings']:,})"

    kinds = ", ".join(f"{k} {share(p)}" for k, p in prec["by_detector"].items())
    print(f"warning precision (share naming a risky event): {share(prec['overall'])}; {kinds}")
    if prec.get("by_rule"):
        print("  by rule: " + ", ".join(f"{r} {share(p)}" for r, p in prec["by_rule"].items()))
    groups = (("all warnings", load["all"]), ("model warnings", load["model"]), ("paged warnings", load["paged"]))
    for name, g in groups:
        print(
            f"{name:15} per 1,000 normal transactions {_fmt(g['per_1000_normal'])} "
            f"(false {_fmt(g['false_per_1000_normal'])}), "
            f"per 1,000 active accounts per day {_fmt(g['per_1000_account_days'], '.2f')} "
            f"(false {_fmt(g['false_per_1000_account_days'], '.2f')})"
        )
    by = load["paged"]["by_source"]
    if by:
        print(
            "  pages by source, false of all: "
            + ", ".join(f"{src} {n['false_warnings']:,} of {n['warnings']:,}" for src, n in by.items())
        )
    print(f"normal transactions named by a model warning: {_fmt(load['model_normal_named_share'], '.4%')}")


def _budget_line(c: dict[str, Any]) -> str:
    pts = ", ".join(
        f"{b:g}: {_fmt(r, '.2f')}" for b, r in zip(c["budgets_per_1000"], c["recall"]["overall"], strict=True)
    )
    op = c["operating_point"]
    reached = (
        ""
        if op is None
        else (
            f"; the model reached {_fmt(op['recall'], '.2f')} at {_fmt(op['false_per_1000_normal'])} false "
            f"(threshold's target {c['configured_per_1000']:g})"
        )
    )
    return f"recall of {c['episodes']['overall']:,} account-level episodes at warnings per 1,000 normal: {pts}{reached}"


__all__ = ["cmd_evaluate", "cmd_replay"]
