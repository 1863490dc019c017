"""Offline replay: read event files, order them by event time, run the worker's scoring, write the results."""

from __future__ import annotations

import base64
import gc
import json
import logging
import os
import sys
import time
from array import array
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from dataclasses import dataclass, field
from datetime import datetime
from pathlib import Path
from typing import IO, Any

import numpy as np
from pydantic import TypeAdapter

from app.eventfiles import READ_ERRORS, records
from models.errors import EventError, RiskwatchError
from models.feedback import Adaptation, FeedbackBook, note_for
from models.pipeline import Pipeline
from models.rules import Catalogue
from models.schemas import (
    DEADLETTER_PAYLOAD_BYTES,
    MAX_PAYLOAD_BYTES,
    Alert,
    MarketTick,
    Transaction,
    decode_event,
    decode_object,
    event_id_of,
    unframe,
)
from models.schemas import Event as AnyEvent

log = logging.getLogger("riskwatch.replay")

Event = Transaction | MarketTick
# The contract's event union, validated straight from JSON bytes on the hot path of reading a file.
_EVENTS: TypeAdapter[Event] = TypeAdapter(AnyEvent)
# Platform-wide risks are one incident across many entities: they are judged by detection delay per
# instance, not by how each event of the incident scores.
PLATFORM_SCENARIOS = frozenset({"liquidity_run", "market_crash"})
_PROGRESS_EVERY = 4096
_CHUNK = 4096  # events replayed between progress updates and score-file writes


class ReplayError(RiskwatchError):
    """A replay that cannot run as asked: bad options or time range, unwritable outputs, missing topics."""


@dataclass(slots=True)
class Loaded:
    """Valid events, decoded once, in event-time order, and what the evaluation needs of the labelled.

    Each event is kept as the model validation built, so it is parsed once. To keep a million of
    them well inside the 2 GiB budget, events that name the same fields share one field-name set
    (pydantic's `model_fields_set`, about 0.7 KiB each otherwise): about 0.9 KiB per event remains.
    """

    events: list[Event]
    labelled: list[dict[str, Any]]  # label == 1 events: id, ts, entity and scenario fields
    times: list[float] = field(default_factory=list)  # epoch seconds of `events`, same order
    records: int = 0  # non-blank lines (rows, messages) read
    invalid: int = 0
    invalid_reasons: Counter[str] = field(default_factory=Counter)
    seconds: float = 0.0
    source: str = ""
    partitions: int | None = None  # of the input topics, when read from Kafka


class DeadLetters:
    """Invalid inputs as JSON lines (where, why, the payload), in input order; counts them too."""

    def __init__(self, path: Path | None) -> None:
        self.path = path
        self._out: IO[str] | None = None
        if path is not None:
            # The file exists only when something was invalid; a stale one from an earlier run would mislead.
            try:
                path.unlink(missing_ok=True)
            except OSError as exc:
                raise ReplayError(f"cannot replace {path}: {exc.strerror}; choose another --deadletter") from None
        self.count = 0
        self.reasons: Counter[str] = Counter()
        self.example: dict[str, str] = {}  # per field of self.reasons, the first input refused for it

    def add(self, where: dict[str, Any], exc: EventError, payload: bytes | str, event_id: str | None = None) -> None:
        """Record one invalid input; `where` says where it came from (line, or topic/partition/offset)."""
        self.count += 1
        field = exc.field.split(".")[0] if exc.field else "invalid_json"
        self.reasons[field] += 1
        if field not in self.example:
            self.example[field] = f"{_where(where)}: {exc.reason}"
        if self.path is None:
            return
        if self._out is None:
            self.path.parent.mkdir(parents=True, exist_ok=True)
            self._out = open(self.path, "w", encoding="utf-8", newline="\n")
        raw = payload.encode("utf-8", "surrogateescape") if isinstance(payload, str) else payload
        raw = raw.rstrip(b"\r\n")
        if event_id is None:
            event_id = event_id_of(raw)
        body = raw[:DEADLETTER_PAYLOAD_BYTES]
        try:
            text = body.decode("utf-8")
        except UnicodeDecodeError:  # as on risk.deadletter: bytes that are not text travel as base64
            text = "base64:" + base64.b64encode(body).decode()
        rec = {
            **where,
            "reason": exc.reason,
            "field": exc.field,
            "event_id": event_id,
            "payload": text,
            "payload_size": len(raw),
            "payload_truncated": len(raw) > DEADLETTER_PAYLOAD_BYTES,
        }
        self._out.write(json.dumps(rec, ensure_ascii=False) + "\n")

    def summary(self) -> list[str]:
        """Why inputs were refused, once per field, most common first, each with the first one refused."""
        # A file whose times lack an offset loses every event to the same reason: say it once.
        return [f"{n:,} invalid in {field}, the first at {self.example[field]}"
                for field, n in self.reasons.most_common()]

    def close(self) -> None:
        """Flush and close the file."""
        if self._out is not None:
            self._out.close()
            self._out = None


def _where(where: dict[str, Any]) -> str:
    if "line" in where:
        return f"line {where['line']}"
    return ", ".join(f"{k} {v}" for k, v in where.items())


def _labelled(ev: Event, extra: dict[str, Any]) -> dict[str, Any]:
    entity = {"account_id": ev.account_id} if isinstance(ev, Transaction) else {"instrument": ev.instrument}
    return {
        "event_id": ev.event_id,
        "ts": ev.ts,
        "label": 1,
        "kind": ev.event_type,
        **entity,
        "scenario": extra.get("scenario"),
        "scenario_instance": extra.get("scenario_instance"),
    }


class _GcFreeze:
    """Hides what survived so far from the cyclic garbage collector, chunk by chunk, until close().

    Reading and replaying create millions of long-lived objects (events, account states) and no
    reference cycles (a full collection after a 200,000-event replay found none), yet the
    collector rescanned all of them ever more often: 10-15% of the CPU of a replay. Young objects
    are still collected as usual; close() hands everything back to the collector. Skipped when the
    collector is off or someone else has frozen objects (unfreezing would release theirs too).
    """

    def __init__(self) -> None:
        self.on = gc.isenabled() and gc.get_freeze_count() == 0

    def step(self) -> None:
        """Freeze every object tracked now (cheap: the collector's lists are moved, not walked)."""
        if self.on:
            gc.freeze()

    def close(self) -> None:
        """Give the frozen objects back to the collector's oldest generation."""
        if self.on:
            gc.unfreeze()
            self.on = False


class Collector:
    """Validates inputs one by one, keeping valid events and sending the rest to the dead letters."""

    def __init__(self, dead: DeadLetters, source: str) -> None:
        self.loaded = Loaded([], [], source=source)
        self.dead = dead
        self._ts = array("d")
        self._fields: list[set[str]] = []  # the distinct field-name sets seen, shared by the events
        self._t0 = time.perf_counter()

    def add(self, where: dict[str, Any], raw: bytes | dict[str, Any]) -> Event | None:
        """Decode one input; return the event, or None after dead-lettering it."""
        self.loaded.records += 1
        try:
            ev = decode_event(raw) if isinstance(raw, bytes) else decode_object(raw)
        except EventError as exc:
            payload = raw if isinstance(raw, bytes) else json.dumps(raw, default=str)
            self.dead.add(where, exc, payload)
            return None
        # A table row is replayed as its JSON form, exactly as the JSON line of the same event would be.
        kept = ev if isinstance(raw, bytes) else decode_event(ev.model_dump_json())
        self._keep(kept, ev.ts.timestamp())
        if ev.label == 1:
            extra = raw if isinstance(raw, dict) else json.loads(unframe(raw))
            self.loaded.labelled.append(_labelled(ev, extra))
        return ev

    def add_lines(self, lines: Iterable[tuple[int, bytes | dict[str, Any]]], bar: Any = None) -> None:
        """add() for every (line, raw) record of a file: valid JSON lines take a shorter path."""
        validate = _EVENTS.validator.validate_json
        keep, ld = self._keep, self.loaded
        freeze = _GcFreeze()
        try:
            for n, raw in lines:
                if not isinstance(raw, bytes) or len(raw) > MAX_PAYLOAD_BYTES:
                    self.add({"line": n}, raw)
                else:
                    try:
                        ev = validate(raw)
                    except (ValueError, RecursionError):  # add() says why, as decode_event does
                        self.add({"line": n}, raw)
                    else:
                        ld.records += 1
                        keep(ev, ev.ts.timestamp())
                        if ev.label == 1:
                            ld.labelled.append(_labelled(ev, json.loads(raw)))
                if ld.records % _PROGRESS_EVERY == 0:
                    freeze.step()
                    if bar is not None:
                        bar.update(_PROGRESS_EVERY)
        finally:
            freeze.close()

    def _keep(self, ev: Event, ts: float) -> None:
        self.loaded.events.append(ev)
        self._ts.append(ts)
        fields = ev.__pydantic_fields_set__
        for shared in self._fields:
            if shared == fields:
                object.__setattr__(ev, "__pydantic_fields_set__", shared)  # frozen model: bypass its guard
                break
        else:
            self._fields.append(fields)

    def done(self) -> Loaded:
        """Put the events in event-time order and return them with the counts."""
        ld = self.loaded
        keys = np.frombuffer(self._ts, dtype=np.float64) if self._ts else np.zeros(0)
        # Stable: events with equal timestamps keep their input order (line, or topic/partition/offset).
        order = np.argsort(keys, kind="stable")
        if not (order[1:] > order[:-1]).all():
            ld.events = [ld.events[i] for i in order.tolist()]
        ld.times = keys[order].tolist()
        ld.invalid, ld.invalid_reasons = self.dead.count, Counter(self.dead.reasons)
        ld.seconds = time.perf_counter() - self._t0
        return ld


def read_file(path: Path, dead: DeadLetters, *, progress: bool = False) -> Loaded:
    """Read and validate every record of a file; valid events come back in event-time order."""
    col = Collector(dead, str(path))
    bar = _bar(progress, "reading", None)
    try:
        col.add_lines(records(path), bar)
    except READ_ERRORS as exc:
        raise ReplayError(
            f"cannot read {path} after {col.loaded.records} records: {exc}; "
            "the file is damaged or not in a supported format"
        ) from None
    finally:
        if bar is not None:
            bar.close()
    return col.done()


def _bar(enabled: bool, desc: str, total: int | None) -> Any:
    if not enabled:
        return None
    from tqdm import tqdm

    try:
        cols, rows = os.get_terminal_size(sys.stderr.fileno())
    except OSError:
        cols, rows = 0, 0
    # A terminal that reports no size (some CI runners, fresh ptys) still gets a readable bar.
    return tqdm(
        total=total,
        desc=desc,
        unit="ev",
        unit_scale=True,
        mininterval=0.5,
        file=sys.stderr,
        ncols=min(cols, 120) or 100,
        nrows=rows or 24,
    )


@dataclass(frozen=True, slots=True)
class ReplayVerdict:
    """An analyst's verdict on a warning, as `riskwatch replay --verdicts` reads it."""

    alert_id: str
    verdict: str
    ts: float  # epoch seconds: applied once the replay's event time reaches it
    by: str | None = None


def _verdict_time(value: Any) -> float:
    if isinstance(value, bool):
        raise ValueError("ts must be an RFC 3339 time or epoch seconds")
    if isinstance(value, int | float):
        return float(value)
    when = datetime.fromisoformat(str(value))
    if when.tzinfo is None:
        raise ValueError(f"ts {value!r} has no UTC offset")
    return when.timestamp()


def read_verdicts(path: Path) -> list[ReplayVerdict]:
    """Verdicts from JSON lines, in time order: {"alert_id", "verdict", "ts"} or risk.audit's records.

    From risk.audit only applied resolves with a verdict count (acks, escalations, refused acts and
    feedback records are skipped), so an exported audit topic can be given as it is.
    """
    out: list[ReplayVerdict] = []
    try:
        lines = path.read_text(encoding="utf-8").splitlines()
    except OSError as exc:
        raise ReplayError(f"cannot read verdicts from {path}: {exc.strerror}") from None
    for n, line in enumerate(lines, 1):
        if not line.strip():
            continue
        try:
            rec = json.loads(line)
            if not isinstance(rec, dict):
                raise ValueError("not a JSON object")
            if "action" in rec and (rec.get("action") != "resolve" or rec.get("outcome", "applied") != "applied"):
                continue
            if "action" not in rec and rec.get("kind") == "feedback":
                continue
            verdict = rec.get("verdict")
            if verdict is None and "action" in rec:
                continue  # resolved without a verdict
            if verdict not in ("confirmed", "false_positive"):
                raise ValueError(f"verdict must be confirmed or false_positive, not {verdict!r}")
            alert_id = rec.get("alert_id")
            if not isinstance(alert_id, str) or not alert_id:
                raise ValueError("alert_id is missing")
            by = rec.get("by")
            out.append(ReplayVerdict(alert_id, verdict, _verdict_time(rec.get("ts")),
                                     by if isinstance(by, str) else None))
        except ValueError as exc:
            raise ReplayError(f"{path}, line {n}: {exc}; each line needs alert_id, verdict "
                              "(confirmed or false_positive) and ts") from None
    out.sort(key=lambda v: v.ts)
    return out


@dataclass
class FeedbackReplay:
    """Verdicts fed back into one configuration's replay, as the worker's disposal agent feeds them back.

    A verdict is applied when the replay's event time reaches its ts, if its alert was raised in
    this replay (by the warning's first version: its detector and reason codes, as the lifecycle
    records them); the book and the scorer are the worker's own (models.feedback, set_feedback).
    """

    verdicts: list[ReplayVerdict]
    book: FeedbackBook = field(default_factory=FeedbackBook)
    raised: dict[str, tuple[str, list[str]]] = field(default_factory=dict)
    applied: int = 0
    not_raised: int = 0
    not_adaptive: int = 0  # required rules, other rules: counted, never fed back
    adaptations: list[Adaptation] = field(default_factory=list)
    _next: int = 0

    @property
    def due(self) -> float:
        """Event time at which the next verdict applies (infinity when none is left)."""
        return self.verdicts[self._next].ts if self._next < len(self.verdicts) else float("inf")

    def seen(self, alert: Alert) -> None:
        """Note a published warning (only its first version matters)."""
        if alert.alert_id not in self.raised:
            self.raised[alert.alert_id] = (alert.detector, [r.code for r in alert.reasons])

    def apply_until(self, ts: float, pipe: Pipeline) -> None:
        """Apply every verdict due by event time `ts`; tell the pipeline's scorer if any moved it."""
        book, moved = self.book, False
        while self._next < len(self.verdicts) and self.verdicts[self._next].ts <= ts:
            v = self.verdicts[self._next]
            self._next += 1
            hit = self.raised.get(v.alert_id)
            if hit is None:
                self.not_raised += 1
                continue
            note = note_for(v.alert_id, hit[0], hit[1], v.verdict, v.ts, by=v.by)
            if note is None:
                self.not_adaptive += 1
                continue
            self.applied += 1
            a = book.record(note)
            moved = True
            if a is not None:
                self.adaptations.append(a)
        if moved:
            pipe.set_feedback(book)

    def finish(self) -> None:
        """Verdicts later than the last event: their alerts were raised, but nothing is left to score."""
        self.not_raised += sum(1 for v in self.verdicts[self._next:] if v.alert_id not in self.raised)
        self._next = len(self.verdicts)


@dataclass(slots=True)
class Config:
    """One rule configuration under test: a name, where its catalogue came from, and the catalogue."""

    name: str
    source: str
    catalogue: Catalogue


@dataclass
class Outcome:
    """What one configuration raised: every published warning version, in processing order."""

    config: Config
    published: list[Alert] = field(default_factory=list)
    new: int = 0
    dropped: Counter[str] = field(default_factory=Counter)
    feedback: FeedbackReplay | None = None  # with --verdicts

    def final(self) -> dict[str, Alert]:
        """The last published version of each warning, by alert_id."""
        return {a.alert_id: a for a in self.published}


@dataclass
class Result:
    """A replay's outputs for the report: per-event arrays (processing order) and each configuration's warnings."""

    loaded: Loaded
    outcomes: list[Outcome]
    threshold: float
    scores: array[float] = field(default_factory=lambda: array("d"))
    labels: array[int] = field(default_factory=lambda: array("b"))  # -1 unlabelled, 0, 1
    market: array[int] = field(default_factory=lambda: array("b"))  # 1 for market ticks
    platform: array[int] = field(default_factory=lambda: array("b"))  # 1 for events of platform-level scenarios
    events: int = 0
    transactions: int = 0
    duplicates: int = 0
    first_ts: float | None = None
    last_ts: float | None = None
    score_seconds: float = 0.0
    loop_seconds: float = 0.0

    @property
    def seconds(self) -> float:
        """Wall time of reading, ordering and replaying (not the report)."""
        return self.loaded.seconds + self.loop_seconds


def replay(
    loaded: Loaded,
    configs: Sequence[Config],
    *,
    partitions: int = 4,
    storm_cap: int = 200,
    ttl: float = 30 * 86400.0,
    alerts_out: Sequence[IO[str] | None] = (),
    scores_out: IO[str] | None = None,
    progress: bool = False,
    on_alert: Callable[[int, Alert], None] | None = None,
    verdicts: Sequence[ReplayVerdict] | None = None,
) -> Result:
    """Run every configuration over the events in event-time order; write alert and score lines as they come.

    The event list is consumed (emptied) as it is replayed, so memory goes to state as events go.
    With `verdicts` (time-ordered), each configuration feeds them back into its own scoring as
    event time reaches them (FeedbackReplay).
    """
    pipes = [Pipeline(c.catalogue, partitions=partitions, storm_cap=storm_cap, ttl=ttl) for c in configs]
    res = Result(loaded, [Outcome(c) for c in configs], pipes[0].txn.threshold)
    feeds = [FeedbackReplay(list(verdicts)) for _ in pipes] if verdicts is not None else []
    for oc, feed in zip(res.outcomes, feeds, strict=False):
        oc.feedback = feed
    emit = _emitter(res, list(alerts_out) + [None] * (len(pipes) - len(alerts_out)), on_alert)
    total = len(loaded.events)
    # The report's per-event columns are known before scoring; duplicates are taken out afterwards.
    columns = _columns(loaded)
    accounts = [ev.account_id for ev in loaded.events if isinstance(ev, Transaction)]
    for p in pipes:
        p.prime(accounts)  # murmur2 of every account in one numpy pass, not one Python call each
    del accounts
    bar = _bar(progress, "replaying", total)
    clock = time.perf_counter
    t_loop = clock()
    freeze = _GcFreeze()
    try:
        duplicates, score_time = _replay_events(loaded, pipes, feeds, res, emit, scores_out, bar, freeze)
    finally:
        freeze.close()
    _tally(res, *columns, duplicates)
    for i, p in enumerate(pipes):
        t0 = clock()
        flushed = p.finish()
        score_time += clock() - t0
        ids_seen = {a.alert_id for a in res.outcomes[i].published}
        emit(i, flushed, len({a.alert_id for a in flushed} - ids_seen), [])
    for feed in feeds:
        feed.finish()
    if bar is not None:
        bar.update(total - bar.n)
        bar.close()
    res.loop_seconds = clock() - t_loop
    res.score_seconds = score_time
    return res


_Emit = Callable[[int, list[Alert], int, list[str]], None]


def _emitter(res: Result, outs: list[IO[str] | None], on_alert: Callable[[int, Alert], None] | None) -> _Emit:
    """What happens to configuration i's warnings: counted, fed back to its verdicts, written, handed on."""

    def emit(i: int, alerts: list[Alert], new: int, dropped: list[str]) -> None:
        oc = res.outcomes[i]
        oc.new += new
        oc.dropped.update(dropped)
        out = outs[i]
        feed = oc.feedback
        for a in alerts:
            oc.published.append(a)
            if feed is not None:
                feed.seen(a)
            if out is not None:
                out.write(a.model_dump_json() + "\n")
            if on_alert is not None:
                on_alert(i, a)

    return emit


def _columns(loaded: Loaded) -> tuple[np.ndarray, np.ndarray, np.ndarray, np.ndarray]:
    """Per-event labels (-1 unlabelled), market flags, platform-scenario flags and times, in replay order."""
    events = loaded.events
    labels = np.array([-1 if ev.label is None else ev.label for ev in events], dtype=np.int8)
    market = np.array([isinstance(ev, MarketTick) for ev in events], dtype=np.int8)
    platform = np.zeros(len(events), dtype=np.int8)
    if loaded.labelled:
        scenario = {e["event_id"]: e["scenario"] for e in loaded.labelled}
        for i in np.flatnonzero(labels == 1).tolist():
            platform[i] = scenario.get(events[i].event_id) in PLATFORM_SCENARIOS
    return labels, market, platform, np.array(loaded.times, dtype=np.float64)


def _replay_events(loaded: Loaded, pipes: list[Pipeline], feeds: list[FeedbackReplay], res: Result, emit: _Emit,
                   scores_out: IO[str] | None, bar: Any, freeze: _GcFreeze) -> tuple[list[int], float]:
    """Every event through every pipeline, consuming the event list; (positions of duplicates, scoring seconds)."""
    events, times = loaded.events, loaded.times
    # Chunks are cut from the end of the reversed lists: each is freed once replayed.
    events.reverse()
    times.reverse()
    first_process, others = pipes[0].process, pipes[1:]
    due = min((f.due for f in feeds), default=float("inf"))
    scores = res.scores
    add_score = scores.append
    duplicates: list[int] = []
    clock = time.perf_counter
    score_time = 0.0
    while events:
        freeze.step()
        k = min(_CHUNK, len(events))
        chunk, stamps = events[-k:], times[-k:]  # the previous chunk is freed here
        del events[-k:], times[-k:]
        chunk.reverse()
        stamps.reverse()
        ids: list[str] = []
        for ev, ts in zip(chunk, stamps, strict=True):
            if ts >= due:  # rare: a verdict's time has come
                for feed, p in zip(feeds, pipes, strict=True):
                    feed.apply_until(ts, p)
                due = min(f.due for f in feeds)
            t0 = clock()
            r = first_process(ev, ts)
            rest = [p.process(ev, ts) for p in others] if others else ()
            score_time += clock() - t0
            if r.duplicate:
                duplicates.append(len(scores) + len(duplicates))  # its position among all events
            else:
                add_score(r.score)
                ids.append(r.event_id)
            if r.alerts or r.dropped:
                emit(0, r.alerts, len(r.new_ids), r.dropped)
            for i, ri in enumerate(rest, 1):
                if ri.alerts or ri.dropped:
                    emit(i, ri.alerts, len(ri.new_ids), ri.dropped)
        if scores_out is not None and ids:
            scores_out.write(_score_lines(ids, scores[len(scores) - len(ids):]))
        if bar is not None:
            bar.update(k)
    return duplicates, score_time


def _tally(res: Result, labels: np.ndarray, market: np.ndarray, platform: np.ndarray, when: np.ndarray,
           duplicates: list[int]) -> None:
    """The result's per-event columns and counts, without the duplicates (which were not scored)."""
    keep = np.ones(labels.size, dtype=bool)
    keep[duplicates] = False
    res.labels = array("b", labels[keep].tobytes())
    res.market = array("b", market[keep].tobytes())
    res.platform = array("b", platform[keep].tobytes())
    res.duplicates = len(duplicates)
    res.events = len(res.scores)
    res.transactions = res.events - int(market[keep].sum())
    kept = when[keep]
    if kept.size:
        res.first_ts, res.last_ts = float(kept[0]), float(kept[-1])


def _score_lines(ids: list[str], scores: Sequence[float]) -> str:
    # One check of all ids together: plain ids (the usual case) need no JSON escaping, and json.dumps
    # would cost more than the rest of the line.
    joined = "".join(ids)
    if joined.isascii() and joined.isprintable() and '"' not in joined and "\\" not in joined:
        return "".join([f'{{"event_id":"{e}","score":{s!r}}}\n' for e, s in zip(ids, scores, strict=True)])
    return "".join([_score_line(e, s) for e, s in zip(ids, scores, strict=True)])


def _score_line(event_id: str, score: float) -> str:
    # json.dumps costs more than the rest of the line; plain ids (the usual case) need no escaping.
    if event_id.isascii() and event_id.isprintable() and '"' not in event_id and "\\" not in event_id:
        return f'{{"event_id":"{event_id}","score":{float(score)!r}}}\n'
    return f'{{"event_id":{json.dumps(event_id)},"score":{float(score)!r}}}\n'


def deadletter_path(alerts: Path | None, scores: Path | None, report: Path | None) -> Path | None:
    """Where invalid inputs go: beside the alerts file, else in the report folder, else beside the scores."""
    if alerts is not None:
        return alerts.parent / "deadletter.jsonl"
    if report is not None:
        return report / "deadletter.jsonl"
    if scores is not None:
        return scores.parent / "deadletter.jsonl"
    return None


def open_text(path: Path | None) -> IO[str] | None:
    """Open an output file for writing (creating its folder), or None when not asked for."""
    if path is None:
        return None
    try:
        path.parent.mkdir(parents=True, exist_ok=True)
        return open(path, "w", encoding="utf-8", newline="\n")
    except OSError as exc:
        raise ReplayError(f"cannot write {path}: {exc.strerror}; choose another output path") from None


__all__ = [
    "PLATFORM_SCENARIOS",
    "Collector",
    "Config",
    "DeadLetters",
    "FeedbackReplay",
    "Loaded",
    "Outcome",
    "ReplayError",
    "ReplayVerdict",
    "Result",
    "deadletter_path",
    "open_text",
    "read_file",
    "read_verdicts",
    "replay",
]
