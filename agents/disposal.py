"""Disposal: contingency triggers, the alert lifecycle driven by risk.acks, escalation and the audit trail.

Ownership. Warnings arrive on risk.alerts keyed by entity; acknowledgements name only an
alert_id. So the `disposal-rekey` agent forwards every warning to risk.alerts.by-id keyed by
alert_id, and the `disposal` agent reads risk.alerts.by-id together with risk.acks (both keyed by
alert_id, same partition count, so Faust assigns partition p of both to the same worker). The
lifecycle table is keyed by alert_id and written with the key's own partitioner, so an alert's
state, its warnings and its acts all live in one partition, owned by exactly one worker. The
deadline timer acts only on alerts of partitions this worker owns as active (never standbys,
never while a rebalance or table recovery is in progress), so two workers never escalate the
same alert; the escalation is written to the table (its changelog) and survives a restart.

At-least-once, with deterministic ids: a trigger's id hashes (alert_id, plan_id[, escalation]),
an audit record's id hashes (alert_id, action, sequence). A redelivered warning or act finds its
effect already in the table and produces nothing new; a crash between publishing and writing the
table can repeat a message with the same id, never a different one.

Verdicts. A resolve with a verdict on a kind of warning verdicts may move (models.feedback) is
published to risk.feedback, one record per alert; every worker's feedback follower
(agents/feedback.py) counts it into the book its scorer asks. A verdict that moves its key's
factor a band is first audited on risk.audit (kind `feedback`).
"""

from __future__ import annotations

import asyncio
import logging
import time
from collections import Counter
from collections.abc import Iterator
from typing import Any

from pydantic import ValidationError

from agents.feedback import FeedbackFollower
from agents.sink import Sink
from app.faust_app import ACKS, ALERTS, ALERTS_BY_ID, AUDIT, CONTINGENCY, FEEDBACK, Runtime
from models.disclosure import AlertSnapshot
from models.errors import EventError
from models.feedback import FeedbackAudit, VerdictNote, key_name
from models.lifecycle import ACTIVE, Lifecycle, Outcome, decode_act, next_due, on_act, on_alert, team_of, tick
from models.pages import sync_pages
from models.pipeline import partition_of
from models.plans import PlanCatalogue
from models.schemas import LEVELS, Alert

log = logging.getLogger("riskwatch.agents.disposal")


class Disposal:
    """The lifecycle table and everything that changes it: warnings, acts and the deadline clock."""

    def __init__(self, rt: Runtime, sink: Sink, plans: PlanCatalogue, disclosure: Any = None,
                 feedback: FeedbackFollower | None = None) -> None:
        s = rt.settings
        self.rt, self.sink, self.plans, self.disclosure = rt, sink, plans, disclosure
        self.feedback = feedback  # agents.feedback.FeedbackFollower: verdicts move operating points
        self.m = rt.metrics
        self.partitions = s.topic_partitions
        self.page_min = s.page_min_level if s.alertmanager_url else None
        self.retention = s.alert_retention_seconds
        self.by_id_topic = rt.topics[ALERTS_BY_ID]
        self.by_id_name = self.by_id_topic.get_topic_name()
        self.acks_name = rt.topics[ACKS].get_topic_name()
        # Values are JSON we write ourselves; use_partitioner lets the deadline timer write too, and puts
        # each alert's changelog record in the partition of its key, where its warnings and acts are.
        # A changelog value that is not a Lifecycle is set aside on recovery (StateTable), its alert absent.
        self.table = rt.app.Table("lifecycle", default=None, key_type=bytes, value_type=bytes,
                                  use_partitioner=True, partitions=s.topic_partitions,
                                  options=rt.checked(Lifecycle.model_validate_json))
        # The same partition, computed here: Faust's partitioner asks the producer's metadata for the
        # changelog topic, which a just-started worker may not have yet ("'NoneType' object is not
        # iterable" from aiokafka, the alert dead-lettered instead of getting its plan).
        self.table.partition_for_key = self.partition  # type: ignore[method-assign]
        # The agent and the timers await between reading and writing a state: one at a time.
        self.lock = asyncio.Lock()
        self.pages_waiting = asyncio.Event()
        self._parsed: dict[bytes, tuple[bytes, Lifecycle]] = {}
        self._partition: dict[bytes, int] = {}
        self._case_labels: set[tuple[str, str]] = set()

    # ---------------------------------------------------------------- state access
    def owned(self) -> set[int] | None:
        """Partitions of risk.alerts.by-id this worker owns as active; None while rebalancing or recovering."""
        app = self.rt.app
        if app.rebalancing or getattr(app, "in_recovery", False):
            return None
        return {tp.partition for tp in app.assignor.assigned_actives() if tp.topic == self.by_id_name}

    def partition(self, key: bytes) -> int:
        """The partition an alert's state lives in (murmur2 is slow in Python: remembered)."""
        p = self._partition.get(key)
        if p is None:
            p = self._partition[key] = partition_of(key, self.partitions)
        return p

    def get(self, key: bytes) -> Lifecycle | None:
        """The state of one alert (parsed once per table value)."""
        blob = self.table.get(key)
        if blob is None:
            self._parsed.pop(key, None)
            return None
        hit = self._parsed.get(key)
        if hit is not None and hit[0] is blob:
            return hit[1]
        try:
            state = Lifecycle.model_validate_json(blob)
        except ValidationError as exc:  # checked on recovery already: only a value that got past it
            topic = self.table.changelog_topic.get_topic_name()
            self.rt.quarantine.set_aside(self.table.name, topic, self.partition(key), key, blob, exc)
            return None
        self._parsed[key] = (blob, state)
        return state

    def put(self, key: bytes, state: Lifecycle | None) -> None:
        """Write (or, for None, delete) one alert's state; the changelog carries it to a restarted worker."""
        if state is None:
            self._parsed.pop(key, None)
            self._partition.pop(key, None)
            if self.table.get(key) is not None:
                del self.table[key]
            return
        blob = state.model_dump_json().encode()
        self.table[key] = blob
        self._parsed[key] = (blob, state)

    def owned_states(self, owned: set[int]) -> Iterator[tuple[bytes, Lifecycle]]:
        """Every state in partitions this worker owns (the table may also hold standby or stale copies)."""
        for key in list(self.table.keys()):
            if self.partition(key) not in owned:
                continue
            state = self.get(key)
            if state is not None:
                yield key, state

    # ---------------------------------------------------------------- applying outcomes
    async def commit(self, key: bytes, out: Outcome, now: float) -> None:
        """Publish an outcome's triggers, audit records and disclosure snapshot, then store its state.

        Publishing first: after a crash in between, the step runs again and repeats the same ids.
        """
        m = self.m
        state = out.state
        for trig in out.triggers:
            await self.rt.topics[CONTINGENCY].send(key=trig.entity_id.encode(), value=trig.model_dump_json().encode())
            self._published(CONTINGENCY)
            if trig.kind == "escalation":
                m.escalations.labels(trig.plan_id).inc()
                log.warning("escalated alert %s (plan %s) to %s", trig.alert_id, trig.plan_id, trig.owner_team)
            else:
                m.triggers.labels(trig.plan_id).inc()
        for rec in out.audit:
            await self.rt.topics[AUDIT].send(key=rec.alert_id.encode(), value=rec.model_dump_json().encode())
            self._published(AUDIT)
            if rec.action in ("ack", "assign", "note", "resolve", "reopen"):
                m.acks.labels(rec.action, rec.outcome).inc()
        for detector, verdict in out.verdicts:
            m.verdicts.labels(detector, verdict).inc()
        for note in out.feedback:
            await self.feed_back(note, now)
        for seconds in out.ack_seconds:
            m.time_to_ack.observe(seconds)
        for kind, team, seconds in out.case_times:
            (m.case_time_to_ack if kind == "ack" else m.case_time_to_resolve).labels(team).observe(seconds)
        for act in out.given_up:
            m.acks.labels(act.action, "rejected").inc()
            await self.sink.dead_letter(act.model_dump_json().encode(), self.acks_name, None, None,
                                        f"alert_id: no warning {act.alert_id} arrived within a day of this "
                                        f"{act.action}; check the id", "alert_id")
        if state is not None:
            if sync_pages(state, self.page_min, now):
                out.changed = True
                self.pages_waiting.set()
            if state.known and out.changed and self.disclosure is not None:
                await self.disclosure.note_alert(AlertSnapshot(
                    alert_id=state.alert_id, created_at=state.created_at, category=state.category,
                    level=state.level, plans_opened=len(state.triggered), resolved=state.status == "resolved",
                    overdue=state.overdue))
        if out.changed:
            self.put(key, state)

    async def feed_back(self, note: VerdictNote, now: float) -> None:
        """Publish a verdict to risk.feedback, and its adaptation (if it moves a factor a band) to risk.audit.

        The audit record goes first, judged against the book before the verdict: after a crash
        before the verdict is published the step runs again and repeats the same audit id; after one
        between publishing and counting it, the restarted book holds it and nothing is audited twice.
        """
        fb = self.feedback
        if fb is None:
            return
        await fb.wait_ready()
        a = fb.book.preview(note)
        if a is not None:
            rec = FeedbackAudit.of(a, note.by or "unknown", now)
            await self.rt.topics[AUDIT].send(key=rec.key.encode(), value=rec.model_dump_json().encode())
            self._published(AUDIT)
            self.m.feedback_adaptations.labels(a.detector, a.code, a.direction).inc()
            log.info("feedback adapted %s: factor %.4g -> %.4g after %s on %s (audit %s)",
                     key_name(a.detector, a.code), a.old_factor, a.new_factor, a.verdict, a.alert_id, rec.audit_id)
        await self.rt.topics[FEEDBACK].send(key=note.alert_id.encode(), value=note.model_dump_json().encode(),
                                            partition=0)
        self._published(FEEDBACK)
        fb.apply(note)

    def _published(self, logical: str) -> None:
        self.m.events_published.labels(self.rt.topics[logical].get_topic_name()).inc()

    # ---------------------------------------------------------------- inputs
    async def handle_alert(self, raw: bytes, partition: int, offset: int) -> None:
        """Apply one warning from risk.alerts.by-id."""
        try:
            alert = Alert.model_validate_json(raw)
        except ValidationError as exc:
            err = exc.errors(include_url=False)[0]
            field = ".".join(str(p) for p in err["loc"]) or None
            await self.sink.dead_letter(raw, self.by_id_name, partition, offset,
                                        f"{field or 'alert'}: {err['msg']}", field)
            return
        key = alert.alert_id.encode()
        now = time.time()
        async with self.lock:
            before = self.get(key)
            out = on_alert(before, alert, self.plans, now)
            paged = before is not None and any(p.active and p.sent for p in before.pages)
            n_pages = len(before.pages) if before is not None else 0
            await self.commit(key, out, now)
            if paged and out.state is not None and len(out.state.pages) == n_pages:
                self.m.pages.labels("duplicate").inc()

    async def handle_act(self, raw: bytes, partition: int, offset: int) -> None:
        """Apply one acknowledgement event from risk.acks; invalid ones are dead-lettered."""
        try:
            act = decode_act(raw)
        except EventError as exc:
            await self.sink.dead_letter(raw, self.acks_name, partition, offset, exc.reason, exc.field)
            return
        key = act.alert_id.encode()
        right = partition_of(key, self.partitions)
        if right != partition:
            # A producer keyed it otherwise; the alert's state lives in the partition of its id.
            await self.rt.topics[ACKS].send(key=key, value=raw, partition=right)
            log.info("re-routed act on %s from partition %s to %s", act.alert_id, partition, right)
            return
        now = time.time()
        async with self.lock:
            before = self.get(key)
            out = on_act(before, act, now)
            if before is None or not before.known:
                self.m.acks.labels(act.action, "held").inc()
                log.info("held %s on %s: its warning has not arrived yet", act.action, act.alert_id)
            await self.commit(key, out, now)

    # ---------------------------------------------------------------- the clock
    async def supervise(self, now: float) -> None:
        """Check deadlines of owned alerts (escalate, flag overdue, expire, forget) and set the gauges."""
        owned = self.owned()
        if owned is None:
            return
        open_by_level: Counter[str] = Counter()
        cases: Counter[tuple[str, str]] = Counter()
        overdue = 0
        for key, state in list(self.owned_states(owned)):
            due = next_due(state, self.retention)
            if due is not None and now >= due:
                async with self.lock:
                    # Ownership again, with no await before acting: a rebalance may have begun meanwhile.
                    still = self.owned()
                    if still is None:
                        return
                    current = self.get(key) if self.partition(key) in still else None
                    if current is None:
                        continue
                    out = tick(current, now, self.retention)
                    await self.commit(key, out, now)
                    state = out.state  # type: ignore[assignment]
                if state is None:
                    continue
            if state.known:
                cases[(state.status, team_of(state))] += 1
            if state.active:
                open_by_level[state.level] += 1
                overdue += int(state.overdue)
        if len(self._partition) > len(self.table):
            # Faust drops revoked partitions' keys from the store itself; forget what we cached for them.
            live = set(self.table.keys())
            for cache in (self._parsed, self._partition):
                for gone in [k for k in cache if k not in live]:
                    del cache[gone]
        for level in LEVELS:
            self.m.open_alerts.labels(level).set(open_by_level[level])
        self.m.overdue_plans.set(overdue)
        # A (status, team) pair seen before and now empty reads 0, not its last count.
        for pair in self._case_labels - cases.keys():
            self.m.cases.labels(*pair).set(0)
        for pair, n in cases.items():
            self.m.cases.labels(*pair).set(n)
        self._case_labels |= cases.keys()


def attach(rt: Runtime, sink: Sink, plans: PlanCatalogue, disclosure: Any = None,
           feedback: FeedbackFollower | None = None) -> Disposal:
    """Register the re-keying agent, the lifecycle agent and the deadline timer; return the Disposal."""
    s = rt.settings
    d = Disposal(rt, sink, plans, disclosure, feedback)
    alerts_topic = rt.topics[ALERTS]
    alerts_name = alerts_topic.get_topic_name()
    both = rt.app.topic(s.topic(ALERTS_BY_ID), s.topic(ACKS), key_type=bytes, value_type=bytes,
                        key_serializer="raw", value_serializer="raw")
    for level in LEVELS:
        rt.metrics.open_alerts.labels(level)
    for result in ("sent", "resolved", "retry", "failed", "duplicate"):
        rt.metrics.pages.labels(result)

    @rt.app.agent(alerts_topic, name="disposal-rekey", concurrency=1)
    async def rekey(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            try:
                alert_id = Alert.model_validate_json(event.value).alert_id
            except ValidationError as exc:
                err = exc.errors(include_url=False)[0]
                field = ".".join(str(p) for p in err["loc"]) or None
                await sink.dead_letter(event.value, alerts_name, msg.partition, msg.offset,
                                       f"{field or 'alert'}: {err['msg']}", field)
                continue
            await d.by_id_topic.send(key=alert_id.encode(), value=event.value)
            d._published(ALERTS_BY_ID)

    @rt.app.agent(both, name="disposal", concurrency=1)
    async def dispose(stream: Any) -> None:
        async for event in stream.events():
            msg = event.message
            rt.metrics.events_consumed.labels(msg.topic).inc()
            try:
                if msg.topic == d.acks_name:
                    await d.handle_act(event.value, msg.partition, msg.offset)
                else:
                    await d.handle_alert(event.value, msg.partition, msg.offset)
            except Exception as exc:
                log.exception("disposal failed", extra={"topic": msg.topic, "partition": msg.partition,
                                                        "offset": msg.offset})
                await sink.dead_letter(event.value, msg.topic, msg.partition, msg.offset,
                                       f"disposal failed: {type(exc).__name__}: {exc}")

    @rt.app.timer(interval=s.escalation_check_seconds)
    async def check_deadlines() -> None:
        await d.supervise(time.time())

    return d


__all__ = ["ACTIVE", "Disposal", "attach", "partition_of"]
