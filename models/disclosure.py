"""Disclosure summaries: money in and out, custody movements, warnings and plans per hour and per day.

Built in two stages like the platform monitors. Stage 1 (one per input partition) keeps
cumulative `FlowTotals` per event-time hour, remembering the last Kafka offset it applied so a
redelivered transaction is not counted twice. Stage 2 (`DisclosureBook`, one for the platform)
keeps the latest `FlowTotals` per (source, hour), REPLACING earlier ones, and the latest
`AlertSnapshot` per alert, and sums them into `DisclosureSummary` windows. Hours and days are
aligned to a fixed UTC offset (a platform reports in its own time zone).

>>> t = FlowTotals(source="t0", hour=0)
>>> t.add(ts=10.0, txn_type="deposit", direction="credit", amount=100.0, currency="CNY",
...       account_kind="custody", counterparty_kind="customer", offset=7)
True
>>> t.add(ts=11.0, txn_type="deposit", direction="credit", amount=100.0, currency="CNY",
...       account_kind="custody", counterparty_kind="customer", offset=7)  # the same message again
False
>>> book = DisclosureBook()
>>> book.apply(t)
[('hour', 0), ('day', 0)]
>>> s = book.summary("day", 0, now=100.0)
>>> s.money["CNY"]["deposit"].inflow, s.custody["CNY"].inflow, s.transactions
(100.0, 100.0, 1)
"""

from __future__ import annotations

from collections import defaultdict
from collections.abc import Iterable
from datetime import UTC, datetime, timedelta, timezone
from typing import Annotated, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field, TypeAdapter

HOUR = 3600
DAY = 86_400
Period = Literal["hour", "day"]
PERIOD_SECONDS: dict[str, int] = {"hour": HOUR, "day": DAY}


def window_start(ts: float, seconds: int, utc_offset_minutes: int = 0) -> int:
    """Start (epoch seconds) of the window of `seconds` holding `ts`, aligned to local midnight.

    >>> window_start(3 * 3600 + 5, 86400, 8 * 60) == -8 * 3600  # 03:00 UTC is 11:00 at +08:00
    True
    """
    off = utc_offset_minutes * 60
    return int((ts + off) // seconds) * seconds - off


class Flow(BaseModel):
    """Money of one currency and transaction type: credits (in) and debits (out), as published."""

    inflow: float = 0.0
    outflow: float = 0.0
    n: int = 0


class Custody(BaseModel):
    """Movements of segregated customer (custody) funds in one currency."""

    inflow: float = 0.0
    outflow: float = 0.0
    to_platform_own: float = Field(0.0, description="Debits from custody to platform-owned accounts (breaches)")
    n: int = 0


class FlowTotals(BaseModel):
    """Cumulative money flows of one source (input partition) in one event-time hour; a stage-1 partial."""

    kind: Literal["flow"] = "flow"
    source: str = Field(min_length=1, max_length=64)
    hour: int
    last_offset: int = -1
    max_ts: float = 0.0
    transactions: int = 0
    money: dict[str, dict[str, Flow]] = Field(default_factory=dict)
    custody: dict[str, Custody] = Field(default_factory=dict)

    def add(self, *, ts: float, txn_type: str, direction: str, amount: float, currency: str,
            account_kind: str, counterparty_kind: str, offset: int | None = None) -> bool:
        """Count one transaction; False when `offset` was already applied (a redelivery)."""
        return count_flow(self, ts, txn_type, direction, amount, currency, account_kind, counterparty_kind, offset)


def count_flow(totals: FlowTotals, ts: float, txn_type: str, direction: str, amount: float, currency: str,
               account_kind: str, counterparty_kind: str, offset: int | None) -> bool:
    """FlowTotals.add with positional arguments, for the worker's per-transaction loop."""
    # Fields are updated in __dict__: pydantic's __setattr__ costs about a microsecond each and
    # these plain numbers need no validation (this runs for every transaction).
    d = totals.__dict__
    if offset is not None:
        # One source is one partition: its offsets only grow, so one not above the last is a repeat.
        if offset <= d["last_offset"]:
            return False
        d["last_offset"] = offset
    d["transactions"] += 1
    if ts > d["max_ts"]:
        d["max_ts"] = ts
    by_type = d["money"].get(currency)
    if by_type is None:
        by_type = d["money"][currency] = {}
    flow = by_type.get(txn_type)
    if flow is None:
        flow = by_type[txn_type] = Flow()
    f = flow.__dict__
    debit = direction == "debit"
    f["n"] += 1
    if debit:
        f["outflow"] += amount
    else:
        f["inflow"] += amount
    if account_kind == "custody":
        c = d["custody"].get(currency)
        if c is None:
            c = d["custody"][currency] = Custody()
        cd = c.__dict__
        cd["n"] += 1
        if debit:
            cd["outflow"] += amount
            if counterparty_kind == "platform_own":
                cd["to_platform_own"] += amount
        else:
            cd["inflow"] += amount
    return True


class AlertSnapshot(BaseModel):
    """What disclosure needs of one alert, replaced whenever it changes: its window, level and plans."""

    kind: Literal["alert"] = "alert"
    alert_id: str = Field(min_length=1, max_length=128)
    created_at: float
    category: str
    level: str
    plans_opened: int = 0
    resolved: bool = False
    overdue: bool = False


class WarningCounts(BaseModel):
    """Warnings raised in a window (each counted once, at the highest level it reached)."""

    total: int = 0
    by_level: dict[str, int] = Field(default_factory=dict)
    by_category: dict[str, int] = Field(default_factory=dict)


class PlanCounts(BaseModel):
    """Contingency plans opened for the window's warnings; how many are resolved and how many went overdue."""

    opened: int = 0
    resolved: int = 0
    overdue: int = 0


class DisclosureSummary(BaseModel):
    """One published summary on risk.disclosure (key summary_id); a later one with the same id supersedes it."""

    model_config = ConfigDict(extra="ignore")

    summary_id: str
    period: Period
    start: AwareDatetime
    end: AwareDatetime
    complete: bool = Field(description="Event time has moved past the window's end plus the grace period")
    generated_at: AwareDatetime
    transactions: int = 0
    money: dict[str, dict[str, Flow]] = Field(default_factory=dict)
    totals: dict[str, Flow] = Field(default_factory=dict, description="per currency, over every type")
    custody: dict[str, Custody] = Field(default_factory=dict)
    warnings: WarningCounts = Field(default_factory=WarningCounts)
    plans: PlanCounts = Field(default_factory=PlanCounts)


def _local(ts: float, utc_offset_minutes: int) -> datetime:
    return datetime.fromtimestamp(ts, tz=timezone(timedelta(minutes=utc_offset_minutes)))


class DisclosureBook:
    """Stage 2: the latest partial per (source, hour) and per alert, summed into hour and day windows."""

    def __init__(self, utc_offset_minutes: int = 0, grace_seconds: float = 600.0,
                 retention_seconds: float = 8 * DAY) -> None:
        self.utc_offset_minutes = utc_offset_minutes
        self.grace_seconds = grace_seconds
        self.retention_seconds = retention_seconds
        self.flows: dict[tuple[str, int], FlowTotals] = {}
        self.alerts: dict[str, AlertSnapshot] = {}
        self.hours: dict[int, set[str]] = defaultdict(set)  # hour -> alert ids, for summing a window fast
        self.watermark = 0.0

    def _windows(self, ts: float) -> list[tuple[str, int]]:
        return [(p, window_start(ts, s, self.utc_offset_minutes)) for p, s in PERIOD_SECONDS.items()]

    def apply(self, partial: FlowTotals | AlertSnapshot) -> list[tuple[str, int]]:
        """Take in one partial (replacing its predecessor); return the (period, start) windows it changed."""
        if isinstance(partial, FlowTotals):
            key = (partial.source, partial.hour)
            old = self.flows.get(key)
            if old is not None and old.last_offset > partial.last_offset:
                return []  # an older cumulative total arriving late says less than the one we hold
            self.flows[key] = partial
            self.watermark = max(self.watermark, partial.max_ts)
            return self._windows(partial.hour)
        old_alert = self.alerts.get(partial.alert_id)
        changed = self._windows(partial.created_at)
        if old_alert is not None:
            self.hours[window_start(old_alert.created_at, HOUR, self.utc_offset_minutes)].discard(partial.alert_id)
            changed += [w for w in self._windows(old_alert.created_at) if w not in changed]
        self.alerts[partial.alert_id] = partial
        self.hours[window_start(partial.created_at, HOUR, self.utc_offset_minutes)].add(partial.alert_id)
        return changed

    def forget_before(self, ts: float) -> int:
        """Drop partials of hours before `ts`; return how many."""
        old_flows = [k for k in self.flows if k[1] < ts]
        for k in old_flows:
            del self.flows[k]
        n = len(old_flows)
        for hour in [h for h in self.hours if h < ts]:
            for aid in self.hours.pop(hour):
                self.alerts.pop(aid, None)
                n += 1
        return n

    def summary(self, period: str, start: int, now: float) -> DisclosureSummary:
        """Sum the window [start, start + period) over every source and alert."""
        end = start + PERIOD_SECONDS[period]
        money: dict[str, dict[str, Flow]] = {}
        custody: dict[str, Custody] = {}
        totals: dict[str, Flow] = {}
        n = 0
        for (_, hour), f in self.flows.items():
            if not start <= hour < end:
                continue
            n += f.transactions
            for cur, types in f.money.items():
                tot = totals.setdefault(cur, Flow())
                for txn_type, fl in types.items():
                    acc = money.setdefault(cur, {}).setdefault(txn_type, Flow())
                    for a in (acc, tot):
                        a.inflow += fl.inflow
                        a.outflow += fl.outflow
                        a.n += fl.n
            for cur, c in f.custody.items():
                acc_c = custody.setdefault(cur, Custody())
                acc_c.inflow += c.inflow
                acc_c.outflow += c.outflow
                acc_c.to_platform_own += c.to_platform_own
                acc_c.n += c.n
        warnings, plans = WarningCounts(), PlanCounts()
        for hour in range(start, end, HOUR):
            for aid in self.hours.get(hour, ()):
                snap = self.alerts[aid]
                warnings.total += 1
                warnings.by_level[snap.level] = warnings.by_level.get(snap.level, 0) + 1
                warnings.by_category[snap.category] = warnings.by_category.get(snap.category, 0) + 1
                plans.opened += snap.plans_opened
                plans.resolved += int(snap.resolved and snap.plans_opened > 0)
                plans.overdue += int(snap.overdue)
        start_dt = _local(start, self.utc_offset_minutes)
        return DisclosureSummary(
            summary_id=f"{period}:{start_dt.isoformat()}", period=period,  # type: ignore[arg-type]
            start=start_dt, end=_local(end, self.utc_offset_minutes),
            complete=self.watermark >= end + self.grace_seconds, generated_at=datetime.fromtimestamp(now, tz=UTC),
            transactions=n, money=money, totals=totals, custody=custody, warnings=warnings, plans=plans)


def parse_partial(raw: bytes | str) -> FlowTotals | AlertSnapshot:
    """Validate one stage-2 partial (raises pydantic.ValidationError)."""
    return PARTIAL.validate_json(raw)


def latest(summaries: Iterable[DisclosureSummary]) -> list[DisclosureSummary]:
    """Keep the newest summary per summary_id, ordered by window start, a day before its first hour."""
    best: dict[str, DisclosureSummary] = {}
    for s in summaries:
        prev = best.get(s.summary_id)
        if prev is None or s.generated_at >= prev.generated_at:
            best[s.summary_id] = s
    return sorted(best.values(), key=lambda s: (s.start, s.period != "day"))


PARTIAL: TypeAdapter[FlowTotals | AlertSnapshot] = TypeAdapter(
    Annotated[FlowTotals | AlertSnapshot, Field(discriminator="kind")])


__all__ = [
    "DAY",
    "HOUR",
    "PARTIAL",
    "AlertSnapshot",
    "Custody",
    "DisclosureBook",
    "DisclosureSummary",
    "Flow",
    "FlowTotals",
    "PlanCounts",
    "WarningCounts",
    "count_flow",
    "latest",
    "parse_partial",
    "window_start",
]
