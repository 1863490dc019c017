"""Platform-wide aggregates in two stages: per-partition partials, then one monitor that decides.

Stage 1 (an accumulator per source: a Kafka partition, or "replay") sums its own events into
time buckets and emits *partials* carrying cumulative totals for (source, bucket). Stage 2 (one
monitor, all partials re-keyed to one key) keeps the latest partial per (source, bucket),
REPLACING any earlier one, so a redelivered or re-emitted partial never counts twice. A bucket
is judged once the watermark has passed it: the newest bucket that every live source has reached
(a source idle for `idle_source_seconds` does not hold it back), minus `lateness_buckets`. So
partials arriving out of order within that allowance, or from sources progressing at different
speeds, give the same alerts in the same order.
"""

from __future__ import annotations

import heapq
import math
import time
from array import array
from bisect import insort
from collections.abc import Callable, Iterable, Sequence
from functools import reduce
from itertools import chain
from operator import add, itemgetter
from typing import Annotated, Any, Literal

import msgspec
from pydantic import BaseModel, ConfigDict, Field, model_validator

from models.errors import ConfigError
from models.findings import AlertMemory, Finding, Raised, span_text, track
from models.schemas import Reason

# Flows are classified by type from the platform's side, whatever `direction` says: a deposit or
# an investment brings money onto the platform, a withdrawal or a redemption takes it off. Only
# the customer's leg counts, so a movement published as two legs is not counted twice.
OUTFLOW_TYPES = frozenset({"withdrawal", "redemption"})
INFLOW_TYPES = frozenset({"deposit", "investment"})
MAX_SAMPLE_IDS = 20
# Largest outflows a flow bucket keeps: a window's largest are among its buckets' largest, so the
# liquidity monitor can tell a broad run from a handful of big withdrawals (`exclude_largest`).
LARGEST_KEPT = 5
MAX_INSTRUMENTS = 2000  # per partial list: ~40 kB of JSON, well under Kafka's 1 MB message limit
# Per FlowBuckets message: a bucket is at most ~2.7 kB of JSON (20 sample ids of up to 128
# characters), so a message stays under ~550 kB, well within Kafka's default 1 MB limit.
MAX_BUCKETS_PER_MESSAGE = 200
MIN_BASELINE = 3  # hourly samples before "the usual" means anything; until then only the floor applies
_MAD_SIGMA = 1.4826


def _count(tot: list[Any], txn_type: str, amount: float, event_id: str) -> None:
    # One customer transaction into a bucket's [outflow, inflow, count, sample ids, largest outflows] totals.
    if txn_type in OUTFLOW_TYPES:
        tot[0] += amount
        tot[2] += 1
        _sample(tot[3], event_id)
        largest = tot[4]  # a min-heap of the bucket's LARGEST_KEPT largest outflows
        if len(largest) < LARGEST_KEPT:
            heapq.heappush(largest, amount)
        elif amount > largest[0]:
            heapq.heapreplace(largest, amount)
    elif txn_type in INFLOW_TYPES:
        tot[1] += amount
        tot[2] += 1


def _sample(ids: list[str], event_id: str) -> bool:
    # Keep the smallest ids, not the first: the sample then does not depend on how events were
    # spread over partitions or in what order they came. Returns True when the sample changed.
    if event_id in ids or (len(ids) >= MAX_SAMPLE_IDS and event_id >= ids[-1]):
        return False
    insort(ids, event_id)
    del ids[MAX_SAMPLE_IDS:]
    return True


_now = time.monotonic  # the stage-2 clock for idle sources (tests replace it)


def bucket_of(ts: float, bucket_seconds: int) -> int:
    """The start (epoch seconds) of the bucket holding `ts`."""
    return int(ts // bucket_seconds) * bucket_seconds


class _Partial(BaseModel):
    model_config = ConfigDict(frozen=True, extra="ignore")

    source: str = Field(min_length=1, max_length=64)
    bucket: int = Field(ge=0)
    bucket_seconds: int = Field(default=60, gt=0)


class FlowPartial(_Partial):
    """Cumulative customer flows of one source in one bucket (amounts in major units)."""

    kind: Literal["flow"] = "flow"
    outflow: float = Field(default=0.0, ge=0)
    inflow: float = Field(default=0.0, ge=0)
    n: int = Field(default=0, ge=0)
    event_ids: list[str] = Field(default_factory=list, max_length=MAX_SAMPLE_IDS)
    # Came later: a partial of the previous version has none (its bucket's outflow then counts whole).
    largest: list[Annotated[float, Field(ge=0)]] = Field(default_factory=list, max_length=LARGEST_KEPT,
                                                         description="The bucket's largest outflows")


_Bucket5 = tuple[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)],
                 Annotated[int, Field(ge=0)], Annotated[list[str], Field(max_length=MAX_SAMPLE_IDS)]]
# With the bucket's largest outflows; the five-field form is a worker of the previous version's.
_Bucket = tuple[Annotated[int, Field(ge=0)], Annotated[float, Field(ge=0)], Annotated[float, Field(ge=0)],
                Annotated[int, Field(ge=0)], Annotated[list[str], Field(max_length=MAX_SAMPLE_IDS)],
                Annotated[list[Annotated[float, Field(ge=0)]], Field(max_length=LARGEST_KEPT)]] | _Bucket5


class FlowBuckets(BaseModel):
    """FlowPartials of several buckets of one source in one message: (bucket, outflow, inflow, n, ids, largest).

    The worker sends one per partition and batch: a backlog spanning hours of event time closes a
    bucket every few events, and one Kafka message per bucket cost the worker more than a tenth of
    its time (built, sent, then read back one by one by stage 2). Stage 2 stores each bucket exactly
    as it stores a FlowPartial, so both forms can share the topic.
    """

    model_config = ConfigDict(frozen=True, extra="ignore")

    kind: Literal["flows"] = "flows"
    source: str = Field(min_length=1, max_length=64)
    bucket_seconds: int = Field(default=60, gt=0)
    buckets: list[_Bucket] = Field(min_length=1, max_length=MAX_BUCKETS_PER_MESSAGE)


def flow_buckets_json(source: str, bucket_seconds: int, closed: Sequence[FlowTotals]) -> list[bytes]:
    """FlowBuckets JSON messages of totals from FlowAccumulator.add_counted(), in their order, split to fit."""
    # Our own totals need no validation on the way out; msgspec writes tuples as JSON arrays.
    return [msgspec.json.encode({"kind": "flows", "source": source, "bucket_seconds": bucket_seconds,
                                 "buckets": closed[i:i + MAX_BUCKETS_PER_MESSAGE]})
            for i in range(0, len(closed), MAX_BUCKETS_PER_MESSAGE)]


class MarketPartial(_Partial):
    """Instruments of one source that ticked in one bucket, those that moved abnormally, and which way they moved.

    `down`, `up` and `spacing_seconds` came later: they default to empty, so a partial from a
    worker of the previous version still parses during a rolling upgrade (it counts no breadth, and
    its windows are the seconds ones); an older stage 2 ignores them (extra="ignore").
    """

    kind: Literal["market"] = "market"
    active: list[str] = Field(default_factory=list, max_length=MAX_INSTRUMENTS)
    abnormal: list[str] = Field(default_factory=list, max_length=MAX_INSTRUMENTS)
    event_ids: list[str] = Field(default_factory=list, max_length=MAX_SAMPLE_IDS)
    down: list[str] = Field(default_factory=list, max_length=MAX_INSTRUMENTS)
    up: list[str] = Field(default_factory=list, max_length=MAX_INSTRUMENTS)
    spacing_seconds: float = Field(default=0.0, ge=0, description="Median tick spacing of the active instruments "
                                                                  "(0: unknown)")


# A closed flow bucket as FlowAccumulator.add_counted() gives it:
# (bucket, outflow, inflow, n, event_ids, largest outflows).
FlowTotals = tuple[int, float, float, int, tuple[str, ...], tuple[float, ...]]


class _Accumulator:
    """Open buckets of one source; a bucket is re-emitted whenever it changed since its last emission."""

    __slots__ = ("bucket_seconds", "buckets", "changes", "dirty", "keep_buckets", "last_offset", "late_dropped",
                 "max_bucket", "source")

    def __init__(self, source: str, bucket_seconds: int = 60, keep_buckets: int = 5) -> None:
        # Closed buckets are kept `keep_buckets` long so a late event still yields a correct
        # *cumulative* partial; keep it >= the monitor's lateness_buckets.
        self.source, self.bucket_seconds, self.keep_buckets = source, bucket_seconds, keep_buckets
        self.buckets: dict[int, Any] = {}
        self.dirty: set[int] = set()
        self.max_bucket = self.last_offset = -1
        self.late_dropped = 0
        self.changes = 0  # MarketAccumulator: adds that changed a bucket (when its stored copy is stale)

    def _bucket(self, ts: float, offset: int | None) -> int | None:
        if offset is not None:
            # Offsets of one partition only grow: one at or below the last applied is a redelivery.
            if offset <= self.last_offset:
                return None
            self.last_offset = offset
        b = bucket_of(ts, self.bucket_seconds)
        if b < self.max_bucket - self.keep_buckets * self.bucket_seconds:
            # Its earlier totals are forgotten: a partial of this event alone would replace them.
            self.late_dropped += 1
            return None
        self.max_bucket = max(self.max_bucket, b)
        return b

    def _emit(self, closed_only: bool, build: Callable[[int], Any] | None = None) -> list[Any]:
        if closed_only and len(self.dirty) == 1 and self.max_bucket in self.dirty:
            return []  # the common case, an event of the open bucket: nothing closed
        ready = sorted(b for b in self.dirty if not closed_only or b < self.max_bucket)
        self.dirty.difference_update(ready)
        out = [(build or self._partial)(b) for b in ready]
        # Forget only after emitting: a time jump must not swallow a bucket never sent.
        horizon = self.max_bucket - self.keep_buckets * self.bucket_seconds
        for old in [k for k in self.buckets if k < horizon]:
            del self.buckets[old]
        return out

    def _partial(self, b: int) -> Any:
        raise NotImplementedError  # pragma: no cover - each accumulator builds its own

    def flush(self) -> list[Any]:
        """Emit every bucket changed since its last emission, the open one included (for a timer)."""
        return self._emit(closed_only=False)


class FlowAccumulator(_Accumulator):
    """Stage 1 of the liquidity monitor: customer inflows and outflows of one source per bucket."""

    __slots__ = ()

    def add(self, ts: float, txn_type: str, direction: str, amount: float, event_id: str, *,
            account_kind: str = "customer", offset: int | None = None) -> list[FlowPartial]:
        """Count one transaction; return the partials of earlier buckets it closed or revised.

        `direction` is accepted to mirror the contract but unused (see OUTFLOW_TYPES). Pass the
        Kafka `offset` so a redelivered message is recognised and skipped.
        """
        return self._add(ts, txn_type, amount, event_id, account_kind, offset, self._partial)

    def add_counted(self, ts: float, txn_type: str, amount: float, event_id: str, account_kind: str = "customer",
                    offset: int | None = None) -> list[FlowTotals]:
        """add() returning plain FlowTotals tuples; `partial()` builds the partial of one.

        The processing core (models.core) counts every transaction with it, in the worker and in
        replay: the worker sends only the newest partial of each bucket per batch (one FlowPartial per
        bucket and batch, not per revision), and replay's in-process stage 2 takes the tuples as they
        are (LiquidityMonitor.add_totals()). Pass the Kafka `offset` so a redelivered message is
        recognised and skipped; replay has none.
        """
        bs = self.bucket_seconds
        b = int(ts // bs) * bs  # bucket_of(), inline: this runs for every transaction
        if b != self.max_bucket or (tot := self.buckets.get(b)) is None or (
                offset is not None and offset <= self.last_offset):
            return self._add(ts, txn_type, amount, event_id, account_kind, offset, self._totals)
        # One more event of the open bucket: _add() without a call and without the checks it needs
        # only for other buckets. Keep the counting below the same as there.
        if offset is not None:
            self.last_offset = offset
        dirty = self.dirty
        dirty.add(b)
        if account_kind == "customer":
            _count(tot, txn_type, amount, event_id)
        return [] if len(dirty) == 1 else self._emit(True, self._totals)

    def partial(self, totals: FlowTotals) -> FlowPartial:
        """The FlowPartial of totals from add_counted()."""
        b, out, inn, n, ids, largest = totals
        return FlowPartial(source=self.source, bucket=b, bucket_seconds=self.bucket_seconds,
                           outflow=out, inflow=inn, n=n, event_ids=list(ids), largest=sorted(largest))

    def _add(self, ts: float, txn_type: str, amount: float, event_id: str, account_kind: str,
             offset: int | None, build: Callable[[int], Any]) -> list[Any]:
        bs = self.bucket_seconds
        b = int(ts // bs) * bs  # bucket_of(), inline: this runs for every transaction
        tot = None
        if b == self.max_bucket:
            if offset is None:
                tot = self.buckets.get(b)
            elif offset > self.last_offset:  # _bucket()'s redelivery check, inline
                tot = self.buckets.get(b)
                if tot is not None:
                    self.last_offset = offset
        if tot is None:  # not simply one more event of the open bucket: the full checks
            checked = self._bucket(ts, offset)
            if checked is None:
                return []
            b = checked
            tot = self.buckets.setdefault(b, [0.0, 0.0, 0, [], []])
        # Every event, flow or not, opens its bucket: an empty partial still moves the watermark.
        dirty = self.dirty
        dirty.add(b)
        if account_kind == "customer":  # counted the same way in add_counted()
            _count(tot, txn_type, amount, event_id)
        if len(dirty) == 1 and b == self.max_bucket:
            return []  # the common case, an event of the open bucket: nothing closed
        return self._emit(True, build)

    def _totals(self, b: int) -> FlowTotals:
        out, inn, n, ids, largest = self.buckets[b]
        return b, out, inn, n, tuple(ids), tuple(sorted(largest))

    def _partial(self, b: int) -> FlowPartial:
        out, inn, n, ids, largest = self.buckets[b]
        return FlowPartial(source=self.source, bucket=b, bucket_seconds=self.bucket_seconds,
                           outflow=out, inflow=inn, n=n, event_ids=list(ids), largest=sorted(largest))


class MarketAccumulator(_Accumulator):
    """Stage 1 of the market-stress monitor: which instruments of one source ticked, which moved abnormally."""

    __slots__ = ()

    def add(self, ts: float, instrument: str, abnormal: bool, event_id: str, *,
            offset: int | None = None, move: int = 0, spacing: float = 0.0) -> list[MarketPartial]:
        """Record one scored tick; return the partials of earlier buckets it closed or revised.

        `move` and `spacing` are the tick's MarketOutcome.move and .spacing: the direction of a
        breadth move (0: none) and the instrument's tick spacing in seconds.
        """
        b = self._bucket(ts, offset)
        if b is None:
            return []
        active, bad, ids, down, up, spacings = self.buckets.setdefault(b, (set(), set(), [], set(), set(), {}))
        changed = False
        if instrument not in active and len(active) < MAX_INSTRUMENTS:
            active.add(instrument)
            spacings[instrument] = spacing  # its first tick's in the bucket: later ones cause no chatter
            changed = True
        if abnormal and instrument not in bad and len(bad) < MAX_INSTRUMENTS:
            bad.add(instrument)
            changed = True
        if move:
            moved = down if move < 0 else up
            if instrument not in moved and len(moved) < MAX_INSTRUMENTS:
                moved.add(instrument)
                changed = True
        if abnormal or move:
            changed = _sample(ids, event_id) or changed
        if changed:
            # Ticks that add nothing new leave the bucket clean: no chatter on the partials topic.
            self.dirty.add(b)
            self.changes += 1
        return self._emit(closed_only=True)

    def _partial(self, b: int) -> MarketPartial:
        active, bad, ids, down, up, spacings = self.buckets[b]
        known = [s for s in spacings.values() if s > 0]
        return MarketPartial(source=self.source, bucket=b, bucket_seconds=self.bucket_seconds,
                             active=sorted(active), abnormal=sorted(bad), event_ids=list(ids),
                             down=sorted(down), up=sorted(up), spacing_seconds=_median(known) if known else 0.0)


class _WindowParams(BaseModel):
    model_config = ConfigDict(frozen=True, extra="forbid")

    window_seconds: int = Field(default=3600, gt=0)
    bucket_seconds: int = Field(default=60, gt=0)
    lateness_buckets: int = Field(default=2, ge=0, description="Buckets a partial may trail its source's slowest peer")
    cooldown_seconds: float = Field(default=1800.0, gt=0, description="Quiet time after which a new alert opens")
    idle_source_seconds: float = Field(
        default=60.0, gt=0, description="Wall-clock seconds without a partial after which a source no longer "
                                        "holds the others back (an idle partition)")

    @model_validator(mode="after")
    def _whole_buckets(self) -> _WindowParams:
        if self.window_seconds % self.bucket_seconds:
            raise ValueError(f"window_seconds ({self.window_seconds}) must be a multiple of "
                             f"bucket_seconds ({self.bucket_seconds})")
        return self


class LiquidityParams(_WindowParams):
    """When platform-wide net outflow is a run."""

    # Above zero: before a baseline exists it is the only bar, and zero would call every outflow a run.
    min_net_outflow: float = Field(default=100_000.0, gt=0, description="Net outflow per window never alarming below")
    high_ratio: float = Field(default=3.0, gt=1, description="Multiple of the usual net outflow that is high")
    critical_ratio: float = Field(default=6.0, gt=1, description="Multiple of the usual net outflow that is critical")
    baseline_windows: int = Field(default=24, ge=MIN_BASELINE, description="Past windows the usual level is taken from")
    # A run is many customers leaving. Measured (docs/evaluation.md): on an independent stream with
    # heavy-tailed withdrawals, 1-9 hours a week went past 3x the usual on two or three large
    # withdrawals alone; leaving out the 3 largest kept every generated run, a few minutes later.
    exclude_largest: int = Field(default=3, ge=0, le=LARGEST_KEPT,
                                 description="The window's largest outflows left out before judging (0: none)")
    currency: str = Field(default="CNY", pattern=r"^[A-Z]{3}$", description="Label of the amounts in reasons")
    fx_rates: dict[Annotated[str, Field(pattern=r"^[A-Z]{3}$")], Annotated[float, Field(gt=0, lt=1e9)]] = Field(
        default_factory=dict, description="Units of `currency` per unit of another currency; flows in a currency "
                                          "without a rate are added as they are (logged once)")

    @model_validator(mode="after")
    def _ordered(self) -> LiquidityParams:
        if self.critical_ratio < self.high_ratio:
            raise ValueError(f"critical_ratio ({self.critical_ratio}) must be >= high_ratio ({self.high_ratio})")
        return self


class MarketStressParams(_WindowParams):
    """When many instruments moving abnormally at once, or many moving the same way, is market stress.

    Windows follow the instruments' tick spacing (the partials carry it): the abnormal rule looks
    back the longer of window_seconds and window_bars bars, the breadth rule the longer of one
    bucket and breadth_bars bars. So on ticks or minute bars they are 15 minutes and one minute,
    on daily closes both are one day's closes.
    """

    window_seconds: int = Field(default=900, gt=0)
    min_instruments: int = Field(default=3, ge=1, description="Distinct abnormal (or moving) instruments needed")
    min_share: float = Field(default=0.3, gt=0, le=1, description="Share of active instruments that must be abnormal")
    window_bars: int = Field(default=1, ge=1, description="The abnormal rule's window in bars, when longer than "
                                                          "window_seconds")
    breadth_bars: int = Field(default=1, ge=1, description="The breadth rule's window in bars (at least one bucket)")
    breadth_share: float = Field(default=0.5, gt=0, le=1, description="Share of active instruments that must move "
                                                                      "the same way by a breadth move")
    max_window_seconds: int = Field(default=8 * 86_400, gt=0, description="Longest window bars may make (memory)")


class _Monitor:
    """Stage 2 skeleton: latest partial per (source, bucket), evaluation behind a watermark."""

    __slots__ = ("alerts", "heard", "journal", "late_dropped", "max_bucket", "min_bucket", "next_eval", "params",
                 "parts")
    detector = ""

    def __init__(self, params: _WindowParams) -> None:
        self.params = params
        self.parts: dict[int, dict[str, Any]] = {}  # bucket -> source -> (size, payload), buckets in order
        self.next_eval: int | None = None  # first bucket not yet judged
        self.max_bucket: int | None = None
        self.min_bucket: int | None = None
        self.alerts: AlertMemory = {}
        self.late_dropped = 0
        # source -> (newest bucket it sent, wall-clock time of its last partial): the watermark.
        self.heard: dict[str, tuple[int, float]] = {}
        # (bucket, source) of stored partials changed or forgotten since the caller last took them,
        # when the caller keeps them in a table (models.platform_state); None: not recorded.
        self.journal: set[tuple[int, str]] | None = None

    def _store(self, source: str, bucket: int, payload: Any, size: int) -> list[Raised]:
        p = self.params
        if bucket % p.bucket_seconds:
            raise ConfigError(f"partial bucket {bucket} from {source!r} is not a multiple of "
                              f"bucket_seconds={p.bucket_seconds}: stage 1 and stage 2 disagree on buckets")
        if self.next_eval is not None and bucket < self.next_eval - self._span():
            self.late_dropped += 1
            return []
        parts = self.parts
        by_source = parts.get(bucket)
        if by_source is None:
            late = bool(parts) and bucket < next(reversed(parts))
            by_source = parts[bucket] = {}
            if late:  # rare: keep the buckets in order, so _advance finds the stale ones at the front
                self.parts = dict(sorted(parts.items()))
        old = by_source.get(source)
        # Totals are cumulative, so a partial that knows less than the stored one is a stale redelivery.
        if old is None or size >= old[0]:
            by_source[source] = (size, payload)
            if old is None and len(by_source) > 1:
                # Sources kept in sorted order: float sums over them then do not depend on the order
                # partials arrived in, and need no sorting at every evaluation.
                self.parts[bucket] = dict(sorted(by_source.items()))
            self._stored(bucket, None if old is None else old[1], payload)
            if self.journal is not None:
                self.journal.add((bucket, source))
        if self.max_bucket is None or bucket > self.max_bucket:
            self.max_bucket = bucket
        if self.min_bucket is None or bucket < self.min_bucket:
            self.min_bucket = bucket
        return self._advance(self._watermark(source, bucket) - p.lateness_buckets * p.bucket_seconds)

    def expect(self, sources: Iterable[str]) -> None:
        """Hold judgement until each of `sources` is heard from, or has been silent for idle_source_seconds.

        Without it, the first source heard after a start would decide alone until the others spoke.
        """
        now = _now()
        for source in sources:
            self.heard.setdefault(source, (-1, now))

    def _watermark(self, source: str, bucket: int) -> int:
        """The newest bucket every live source has reached: the slowest one's, not the fastest one's.

        Sources (partitions) progress at their own pace whenever there is a backlog: one worker's
        batch can carry hours of one partition's events before another's, and two workers catch up
        at different speeds. Judging behind the fastest source would close windows before the
        slower sources' partials arrived, and drop them as late. A source silent for
        idle_source_seconds of wall-clock time (an idle partition) stops holding the others back.
        """
        now = _now()
        heard = self.heard
        prev = heard.get(source)
        heard[source] = (bucket if prev is None or bucket > prev[0] else prev[0], now)
        if len(heard) == 1:
            return heard[source][0]
        since = now - self.params.idle_source_seconds
        return min(b for b, t in heard.values() if t >= since)

    def drain(self) -> list[Raised]:
        """Judge every bucket seen, lateness or not: the end of an offline replay."""
        return [] if self.max_bucket is None else self._advance(self.max_bucket)

    def _advance(self, watermark: int) -> list[Raised]:
        bs = self.params.bucket_seconds
        if self.next_eval is None:
            if self.min_bucket is None or watermark < self.min_bucket:
                return []
            self.next_eval = self.min_bucket
        out: list[Raised] = []
        stale_end = bucket_of(watermark - self._horizon(), bs)
        skip_from = stale_end
        if stale_end > self.next_eval:
            # After a long silence (or a clock jump) skip the windows holding no data: judging them
            # changes nothing the horizon remembers. Windows still holding the old data are judged.
            old = [k for k in self.parts if k < stale_end]
            skip_from = max(old) + self._span() if old else self.next_eval
        while self.next_eval <= watermark:
            if skip_from <= self.next_eval < stale_end:
                self.next_eval = stale_end
                continue
            out.extend(self._evaluate(self.next_eval))
            self.next_eval += bs
        horizon, parts = self.next_eval - self._span(), self.parts
        stale = []
        for b in parts:  # in bucket order (see _store): the stale ones come first, usually one
            if b >= horizon:
                break
            stale.append(b)
        for b in stale:
            if self.journal is not None:
                self.journal.update((b, source) for source in parts[b])
            del parts[b]
        return out

    def _stored(self, bucket: int, old: Any, new: Any) -> None:
        """Hook: `new` replaced `old` (None: nothing) as a source's payload for `bucket`."""

    def _window(self, b: int) -> list[dict[str, Any]]:
        bs = self.params.bucket_seconds
        lo = b - self.params.window_seconds + bs
        return [by_source for by_source in map(self.parts.get, range(lo, b + bs, bs)) if by_source is not None]

    def _raise(self, finding: Finding, b: int, ids: list[str]) -> list[Raised]:
        ts = float(b + self.params.bucket_seconds)  # the bucket's end: event time, never the wall clock
        first = ids[0] if ids else f"{finding.category}@{b}"
        return track(self.alerts, [finding], ts, first, self.params.cooldown_seconds, more_ids=ids[1:])

    def _span(self) -> int:
        """Seconds of buckets a window spans: they are kept that long behind the next bucket to judge."""
        return self.params.window_seconds

    def _horizon(self) -> int:
        return self._span()

    def _evaluate(self, b: int) -> list[Raised]:
        raise NotImplementedError  # pragma: no cover - each monitor judges its own way


# Fields of the monitors' stored (size, payload) pairs and of a liquidity payload
# (outflow, inflow, ids, D, T, largest outflows).
_PAYLOAD, _OUT, _IN, _LARGEST = itemgetter(1), itemgetter(0), itemgetter(1), itemgetter(5)
# The float sums of a window's n outflows and inflows each differ from the true sums by at most
# n * 2**-53 of their size; this relative margin covers that (and the rounding of the test itself)
# while a window holds fewer than about 4e9 (bucket, source) partials.
_MARGIN = 2e-6
_UNBOUNDED = 10**400  # the bounds of amounts too large (or not numbers) to round: never skips
_FINITE = 10**300


def _bounds(outflow: float, inflow: float) -> tuple[int, int]:
    # Integers D >= outflow - inflow and T >= |outflow| + |inflow|: their sums over a window are exact,
    # so bounds kept up to date by adding and subtracting them never drift, whatever the order.
    if outflow < 1e300 and inflow < 1e300:
        up, low = math.ceil(outflow), math.floor(inflow)
        return up - low, abs(up) + abs(low)
    return _UNBOUNDED, _UNBOUNDED


def _money(x: float) -> str:
    if abs(x) >= 1e9:
        return f"{x / 1e9:.1f}B"
    if abs(x) >= 1e5:
        return f"{x / 1e6:.1f}M"
    return f"{x:,.0f}"


def _median(values: list[float]) -> float:
    s = sorted(values)
    k = len(s)
    return s[k // 2] if k % 2 else 0.5 * (s[k // 2 - 1] + s[k // 2])


class LiquidityMonitor(_Monitor):
    """Stage 2: net customer outflow over a rolling window against its own usual level.

    The usual scale is robust: max(median, 1.4826 * MAD) of the net outflow of the last
    `baseline_windows` whole windows (one sample per aligned window, e.g. hourly for 24 hours).
    The median is the typical level, the scaled MAD its typical swing, so a platform whose net
    flow is usually an inflow still has a usual scale; a burst of a few bad hours moves neither.
    High needs max(min_net_outflow, high_ratio * usual); critical needs critical_ratio * usual,
    and at least min_net_outflow scaled by critical_ratio / high_ratio while there is no baseline.
    Both are judged on the net outflow without the window's `exclude_largest` largest outflows, so
    a few big withdrawals (a wealthy customer's, covered by the account rules) are not a run.
    """

    __slots__ = ("_run", "_usual", "baseline")
    detector = "aggregates.liquidity"
    params: LiquidityParams

    def __init__(self, params: LiquidityParams | None = None) -> None:
        super().__init__(params or LiquidityParams())
        self.baseline = array("d")  # net outflow of past whole windows, oldest first
        # usual() of the baseline it was computed from: the baseline changes once a window, while
        # usual() is asked at every bucket.
        self._usual: tuple[bytes, tuple[float, float]] = (b"", (0.0, 0.0))
        # (bucket last judged, window_seconds, bucket_seconds, sums of _bounds() over its window): a
        # bound of the window's net outflow, and of its size, kept up to date in exact integers.
        self._run: tuple[int, int, int, int, int] | None = None

    def update(self, partial: FlowPartial) -> list[Raised]:
        """Take one partial (replacing any earlier one of its source and bucket); return raised alerts."""
        return self.add_totals(partial.source, partial.bucket, partial.outflow, partial.inflow, partial.n,
                               partial.event_ids, partial.largest)

    def add_totals(self, source: str, bucket: int, outflow: float, inflow: float, n: int,
                   event_ids: Sequence[str], largest: Sequence[float] = ()) -> list[Raised]:
        """update() from a partial's fields (FlowAccumulator.add_counted() gives them), with no FlowPartial built."""
        return self._store(source, bucket, (outflow, inflow, tuple(event_ids), *_bounds(outflow, inflow),
                                            tuple(largest)), n)

    def _stored(self, bucket: int, old: Any, new: Any) -> None:
        run = self._run
        # A bucket inside the window last judged changed: move its bounds by the difference. Buckets
        # after it are read when the window reaches them; those before it are never judged again.
        if run is not None and run[0] - run[1] < bucket <= run[0]:
            d, t = (new[3], new[4]) if old is None else (new[3] - old[3], new[4] - old[4])
            self._run = (run[0], run[1], run[2], run[3] + d, run[4] + t)

    def _quiet(self, b: int, high: float) -> bool:
        """True when the window ending with bucket b certainly holds a net outflow below `high`.

        Its bounds are those of the previous bucket's window moved on by one bucket, or summed afresh
        when there are none.
        """
        p, parts = self.params, self.parts
        bs, ws = p.bucket_seconds, p.window_seconds
        run = self._run
        if run is not None and run[0] == b - bs and run[1] == ws and run[2] == bs:
            d, t = run[3], run[4]
            if (entering := parts.get(b)) is not None:
                for _, v in entering.values():
                    d, t = d + v[3], t + v[4]
            if (leaving := parts.get(b - ws)) is not None:
                for _, v in leaving.values():
                    d, t = d - v[3], t - v[4]
        else:
            d = t = 0
            for by_source in self._window(b):
                for _, v in by_source.values():
                    d, t = d + v[3], t + v[4]
        self._run = (b, ws, bs, d, t)
        # Sound: the float net outflow is at most d + (n * 2**-53) * t, and d <= t.
        return t < _FINITE and d + t * _MARGIN < high

    def usual(self) -> tuple[float, float]:
        """(median, 1.4826 * MAD) of past windows' net outflow; (0, 0) until MIN_BASELINE windows."""
        seen, found = self._usual
        key = self.baseline.tobytes()
        if seen == key:
            return found
        if len(self.baseline) < MIN_BASELINE:
            found = 0.0, 0.0
        else:
            values = list(self.baseline)
            med = _median(values)
            found = med, _MAD_SIGMA * _median([abs(v - med) for v in values])
        self._usual = key, found
        return found

    def _horizon(self) -> int:
        return self.params.window_seconds * (self.params.baseline_windows + 1)

    def _evaluate(self, b: int) -> list[Raised]:
        p = self.params
        med, spread = self.usual()
        usual = max(med, spread, 0.0)
        high = max(p.min_net_outflow, p.high_ratio * usual)
        critical = max(p.min_net_outflow * p.critical_ratio / p.high_ratio, p.critical_ratio * usual)
        # Learn after judging, and only from windows fully inside the data seen.
        learn = (b + p.bucket_seconds) % p.window_seconds == 0 and self.min_bucket is not None \
            and b - self.min_bucket >= p.window_seconds - p.bucket_seconds
        # Almost every bucket is far from alarming: when even an upper bound of the window's net
        # outflow stays below `high`, the exact sums below could not raise, so they are skipped,
        # unless this bucket ends a window the baseline learns from.
        if not learn and self._quiet(b, high):
            return []
        window = self._window(b)
        # Oldest bucket first, sources in sorted order (as _store keeps them), added one by one from
        # 0.0: the float sums then do not depend on the order partials arrived in. The loops run in
        # C: this is judged at every bucket, whatever the event rate.
        payloads = list(map(_PAYLOAD, chain.from_iterable(map(dict.values, window))))
        out = reduce(add, map(_OUT, payloads), 0.0)
        inn = reduce(add, map(_IN, payloads), 0.0)
        net = out - inn
        raised: list[Raised] = []
        # The window's largest outflows are among its buckets' largest: what is left without them
        # is the outflow of many customers, which a run is.
        big = sum(heapq.nlargest(p.exclude_largest, chain.from_iterable(map(_LARGEST, payloads)))) \
            if p.exclude_largest and net >= high else 0.0
        broad = net - big
        if broad >= high and net > 0:
            ids: list[str] = []
            # Evidence from the newest bucket of the window that has any, in a fixed order.
            for by_source in reversed(window):
                if ids := sorted({e for _, (_, _, sample, *_) in by_source.values() for e in sample})[:10]:
                    break
            cur, minutes = p.currency, p.window_seconds / 60
            if usual <= 0:
                versus = f"no baseline yet (floor {cur} {_money(p.min_net_outflow)})"
            elif usual == med:
                versus = f"{net / usual:.1f}x the usual ({cur} {_money(med)})"
            else:
                # The usual level is small or an inflow: a ratio to it means nothing, so say both.
                usually = f"net {'inflow' if med < 0 else 'outflow'} of {cur} {_money(abs(med))}"
                versus = f"{net / usual:.1f}x the usual swing ({cur} {_money(spread)}; usually a {usually})"
            crit = broad >= critical
            largest = f"; {_money(big)} of it in the {p.exclude_largest} largest outflows" if big else ""
            reason = Reason(code="net_outflow", value=round(net, 2), threshold=round(critical if crit else high, 2),
                            message=f"net outflow {cur} {_money(net)} in the last {minutes:.0f} min "
                                    f"(out {_money(out)}, in {_money(inn)}{largest}), {versus}")
            finding = Finding("liquidity_run", "critical" if crit else "high", min(1.0, 0.5 + 0.5 * net / critical),
                              self.detector, [reason], "platform", "platform")
            raised = self._raise(finding, b, ids)
        if learn:
            self.baseline.append(net)
            if len(self.baseline) > p.baseline_windows:
                del self.baseline[0]
        return raised


class MarketStressMonitor(_Monitor):
    """Stage 2: market stress is many instruments moving abnormally, or many moving the same way, at once.

    Two rules, either raises: (1) at least min_instruments and min_share of the active instruments
    moved abnormally (|z| >= anomaly_z) or crashed within the window; (2) breadth: at least
    min_instruments and breadth_share of the instruments active in the breadth window made a move
    of breadth_z sigmas the same way. Rule 1 alone missed 4 of 5 recorded sell-offs on daily closes
    of ten large US stocks: those days are 3-5 sigma moves in most names, rarely 5 in three.

    A window is judged when a bucket enters it (a bucket holding partials): on daily closes that is
    one judgement a day instead of 1,440 empty ones, and a window only changes when data enters
    (or leaves, which can lift the abnormal share only by shrinking the active set: not judged).
    """

    __slots__ = ("spacing",)
    detector = "aggregates.market_stress"
    params: MarketStressParams

    def __init__(self, params: MarketStressParams | None = None) -> None:
        super().__init__(params or MarketStressParams())
        self.spacing = 0.0  # tick spacing of the newest bucket judged (the slowest source's)

    def update(self, partial: MarketPartial) -> list[Raised]:
        """Take one partial (replacing any earlier one of its source and bucket); return raised alerts."""
        payload = (frozenset(partial.active), frozenset(partial.abnormal), tuple(partial.event_ids),
                   frozenset(partial.down), frozenset(partial.up), partial.spacing_seconds)
        size = len(partial.active) + len(partial.abnormal) + len(partial.down) + len(partial.up)
        return self._store(partial.source, partial.bucket, payload, size)

    def windows(self, spacing: float) -> tuple[int, int]:
        """(abnormal rule's window, breadth window) in seconds for instruments `spacing` seconds apart.

        N bars are this bar and N - 1 before it, so a window reaches back (N - 1/2) bars: a spacing
        estimate off by up to half a bar still holds the right closes (the running median of daily
        gaps sits between 1.00 and 1.05 days).
        """
        p, bs = self.params, self.params.bucket_seconds

        def bars(n: int, floor: int) -> int:
            return max(floor, min(p.max_window_seconds, math.ceil((n - 0.5) * spacing / bs) * bs))

        return bars(p.window_bars, p.window_seconds), bars(p.breadth_bars, bs)

    def _span(self) -> int:
        return max(self.windows(self.spacing))

    def _within(self, window: int, floor: int, bars: int) -> str:
        if window <= floor:
            return span_text(window)
        return f"{'one bar' if bars == 1 else f'{bars} bars'} ({span_text(self.spacing)} apart)"

    def _evaluate(self, b: int) -> list[Raised]:
        p, bs, parts = self.params, self.params.bucket_seconds, self.parts
        here = parts.get(b)
        if here is None:
            return []
        spacing = max(v[5] for _, v in here.values())  # the slowest source's
        if spacing > 0:  # 0: only workers of the previous version spoke; keep the last known
            self.spacing = spacing
        window, breadth_window = self.windows(self.spacing)
        active: set[str] = set()
        bad: set[str] = set()
        samples: set[str] = set()
        near: set[str] = set()  # active within the breadth window
        down: set[str] = set()
        up: set[str] = set()
        for k in range(b - max(window, breadth_window) + bs, b + bs, bs):
            by_source = parts.get(k)
            if by_source is None:
                continue
            for _, (act, abn, ids, dn, upw, _) in by_source.values():
                samples.update(ids)
                if k > b - window:
                    active |= act | abn  # an instrument that moved abnormally certainly ticked
                    bad |= abn
                if k > b - breadth_window:
                    near |= act
                    down |= dn
                    up |= upw
        reasons: list[Reason] = []
        level, score = "high", 0.0
        share = len(bad) / len(active) if active else 0.0
        if len(bad) >= p.min_instruments and share >= p.min_share:
            reasons.append(Reason(code="market_stress", value=round(share, 4), threshold=p.min_share,
                                  message=f"{len(bad)} of {len(active)} instruments moved abnormally within "
                                          f"{self._within(window, p.window_seconds, p.window_bars)} ({_names(bad)})"))
            if share >= 2 * p.min_share:
                level = "critical"
            score = min(1.0, 0.5 + 0.5 * share / min(1.0, 2 * p.min_share))
        for verb, moved in (("fell", down), ("rose", up)):
            wide = len(moved) / len(near) if near else 0.0
            if len(moved) >= p.min_instruments and wide >= p.breadth_share:
                reasons.append(Reason(code="market_breadth", value=round(wide, 4), threshold=p.breadth_share,
                                      message=f"{len(moved)} of {len(near)} instruments {verb} together within "
                                              f"{self._within(breadth_window, bs, p.breadth_bars)}, each by a move "
                                              f"unusual for it ({_names(moved)})"))
                score = max(score, min(1.0, 0.5 + 0.5 * wide))
        if not reasons:
            return []
        finding = Finding("market_stress", level, score, self.detector, reasons, "market", "market")
        return self._raise(finding, b, sorted(samples)[:10])


def _names(instruments: set[str]) -> str:
    return ", ".join(sorted(instruments)[:5]) + (", ..." if len(instruments) > 5 else "")


__all__ = [
    "INFLOW_TYPES",
    "MAX_BUCKETS_PER_MESSAGE",
    "OUTFLOW_TYPES",
    "FlowAccumulator",
    "FlowBuckets",
    "FlowPartial",
    "FlowTotals",
    "LiquidityMonitor",
    "LiquidityParams",
    "MarketAccumulator",
    "MarketPartial",
    "MarketStressMonitor",
    "MarketStressParams",
    "bucket_of",
    "flow_buckets_json",
]
