"""Every Prometheus metric riskwatch exports, defined once, on an injectable registry."""

from __future__ import annotations

import math
import time
from bisect import bisect_left
from collections.abc import Iterable, Sequence
from typing import Any

from prometheus_client import CollectorRegistry, Counter, Gauge, Histogram

_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1.0, 2.5, 5.0, 10.0, 30.0, 60.0)
_STAGE_BUCKETS = (0.00001, 0.00003, 0.0001, 0.0003, 0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0)
_BATCH_BUCKETS = (0.001, 0.003, 0.01, 0.03, 0.1, 0.3, 1.0, 3.0, 10.0)
_SIZE_BUCKETS = (1, 10, 100, 500, 1000, 2000, 5000, 10000)
_SCORE_BUCKETS = (0.1, 0.25, 0.5, 0.75, 0.9, 0.95, 0.99, 0.995, 0.999, 1.0)
_ACK_BUCKETS = (30, 60, 120, 300, 600, 900, 1800, 3600, 7200, 14400, 43200, 86400)


class Metrics:
    """The riskwatch metric set; tests pass a fresh CollectorRegistry to read samples in isolation."""

    def __init__(self, registry: CollectorRegistry | None = None) -> None:
        self.registry = registry if registry is not None else CollectorRegistry()
        r = self.registry
        self._define_processing(r)
        self._define_state(r)
        self._define_disposal(r)
        self._define_budget(r)
        self._define_console(r)
        self._newest: dict[str, float] = {}

    def _define_processing(self, r: CollectorRegistry) -> None:
        """Input, scoring and output: what every worker reports."""
        self.events_consumed = Counter(
            "riskwatch_events_consumed_total", "Input events read, by topic", ["topic"], registry=r)
        self.events_scored = Counter(
            "riskwatch_events_scored_total", "Input events scored, by topic", ["topic"], registry=r)
        self.events_published = Counter(
            "riskwatch_events_published_total", "Output messages sent, by topic", ["topic"], registry=r)
        self.deadletters = Counter(
            "riskwatch_deadletters_total", "Inputs sent to the dead-letter topic, by source topic and reason",
            ["topic", "reason"], registry=r)
        self.duplicates = Counter(
            "riskwatch_duplicates_total", "Events with an event_id already scored, by topic", ["topic"], registry=r)
        self.redelivered = Counter(
            "riskwatch_redelivered_total", "Of riskwatch_duplicates_total: records read again after a crash or a "
            "partition move that the entity's state had already applied (recognised by offset, not scored again)",
            ["topic"], registry=r)
        self.rekeyed = Counter(
            "riskwatch_rekeyed_total", "Input records not keyed by their entity (no key, or another one) sent on, "
            "keyed by it, to its partition, where its state lives; by topic", ["topic"], registry=r)
        self.unkeyed_in_place = Counter(
            "riskwatch_unkeyed_in_place_total", "Input records not keyed by their entity on a topic named in "
            "RISKWATCH_TOPIC_NAMES: scored where they are (riskwatch does not write to a platform's own topic, "
            "which others read), so their entity's state is split over partitions; by topic", ["topic"], registry=r)
        self.late_events = Counter(
            "riskwatch_late_events_total", "Events older than the allowed lateness for their entity", ["topic"],
            registry=r)
        self.warnings = Counter(
            "riskwatch_warnings_total", "New warnings raised, by category and level", ["category", "level"],
            registry=r)
        self.warning_updates = Counter(
            "riskwatch_warning_updates_total", "Updates of an ongoing warning (same alert_id)", ["category"],
            registry=r)
        self.storm_dropped = Counter(
            "riskwatch_storm_dropped_total", "Warnings dropped by the per-category storm cap", ["category"],
            registry=r)
        self.rule_hits = Counter(
            "riskwatch_rule_hits_total", "Findings per rule or detector, before dedup", ["rule"], registry=r)
        self.processing = Histogram(
            "riskwatch_processing_seconds", "Processing time per event and stage", ["stage"],
            buckets=_STAGE_BUCKETS, registry=r)
        self.batch_phase = Histogram(
            "riskwatch_batch_seconds", "Transaction engine time per batch and phase: process (decode, score, "
            "stage outputs) and write (until Kafka acknowledged the outputs and table changes)", ["phase"],
            buckets=_BATCH_BUCKETS, registry=r)
        for phase in ("process", "write"):
            self.batch_phase.labels(phase)
        self.batch_size = Histogram(
            "riskwatch_batch_records", "Records per transaction engine batch", buckets=_SIZE_BUCKETS, registry=r)
        self.event_to_warning = Histogram(
            "riskwatch_event_to_warning_seconds", "Wall clock at publication minus event time, per warning",
            buckets=_LATENCY_BUCKETS, registry=r)
        self.event_time_lag = Gauge(
            "riskwatch_event_time_lag_seconds", "Wall clock minus the newest event time seen, by topic", ["topic"],
            registry=r)
        self.consumer_lag = Gauge(
            "riskwatch_consumer_lag_messages", "High watermark minus committed offset, by topic and partition",
            ["topic", "partition"], registry=r)
        self.scores = Histogram(
            "riskwatch_score", "Calibrated scores in [0, 1], by detector", ["detector"], buckets=_SCORE_BUCKETS,
            registry=r)

    def _define_state(self, r: CollectorRegistry) -> None:
        """The engine's phase, entities held in state, the rule catalogue and the run-time lists."""
        self.engine_phase = Gauge(
            "riskwatch_engine_phase", "1 for the transaction engine's current phase (idle, running, rebalancing, "
            "broken, stopping, stopped), 0 for the others", ["phase"], registry=r)
        self.entities = Gauge(
            "riskwatch_entities", "Entities held in state on this worker, by table", ["table"], registry=r)
        self.evictions = Counter(
            "riskwatch_evictions_total", "Entities evicted after the idle TTL, by table", ["table"], registry=r)
        self.rules_version = Gauge(
            "riskwatch_rules_version", "Version of the rule catalogue in force", registry=r)
        self.rules_rejected = Counter(
            "riskwatch_rules_rejected_total", "Rule catalogue versions rejected as invalid", registry=r)
        self.list_entries = Gauge(
            "riskwatch_list_entries", "Entries in each run-time list (risk.lists) held by this worker", ["list"],
            registry=r)
        self.list_hits = Counter(
            "riskwatch_list_hits_total", "Transactions that touched an entry of a block or watch list, by list",
            ["list"], registry=r)
        self.list_changes = Counter(
            "riskwatch_list_changes_total", "List entries added or removed (risk.lists records applied)", ["op"],
            registry=r)
        self.list_rejected = Counter(
            "riskwatch_list_rejected_total", "risk.lists records set aside (dead-lettered), by reason", ["reason"],
            registry=r)
        self.list_suppressed = Counter(
            "riskwatch_list_suppressed_total", "Model warnings an allow list kept quiet (rules never ask)",
            registry=r)

    def _define_disposal(self, r: CollectorRegistry) -> None:
        """Open alerts, acknowledgements, contingency triggers, escalations, verdicts."""
        self.open_alerts = Gauge(
            "riskwatch_open_alerts", "Alerts not yet resolved, by level", ["level"], registry=r)
        self.time_to_ack = Histogram(
            "riskwatch_time_to_ack_seconds", "From warning to acknowledgement", buckets=_ACK_BUCKETS, registry=r)
        self.triggers = Counter(
            "riskwatch_contingency_triggers_total", "Contingency triggers emitted, by plan", ["plan"], registry=r)
        self.escalations = Counter(
            "riskwatch_escalations_total", "Escalations after a missed acknowledgement deadline, by plan",
            ["plan"], registry=r)
        self.overdue_plans = Gauge(
            "riskwatch_overdue_plans", "Plans past their resolution deadline and not resolved", registry=r)
        self.verdicts = Counter(
            "riskwatch_verdicts_total", "Analyst verdicts on resolved alerts, by detector and verdict",
            ["detector", "verdict"], registry=r)

    def _define_budget(self, r: CollectorRegistry) -> None:
        """Verdict feedback and the model's alert budget."""
        self.feedback_factor = Gauge(
            "riskwatch_feedback_factor", "Verdict feedback: multiplier of the share of events a finding of this "
            "detector and lead reason code may warn at (1 neutral, below 1 more evidence needed), as this worker "
            "scores with it", ["detector", "code"], registry=r)
        self.model_budget = Gauge(
            "riskwatch_model_budget_per_1000", "Alert budget in force: new model warnings per 1,000 events, by "
            "category (anomaly.params.budget_per_1000 and budgets)", ["category"], registry=r)
        self.model_operating = Gauge(
            "riskwatch_model_operating_per_1000", "Alert budget: the share of events, per 1,000, a model finding "
            "of this category may warn at now in this partition's detector. Starts at the budget, rises while "
            "warnings come slower than the budget (up to 20x), falls as they are spent", ["category", "partition"],
            registry=r)
        self.feedback_adaptations = Counter(
            "riskwatch_feedback_adaptations_total", "Verdicts that moved a key's feedback factor a band (audited on "
            "risk.audit), by detector, code and direction (down, up)", ["detector", "code", "direction"],
            registry=r)
        self.feedback_verdicts = Counter(
            "riskwatch_feedback_verdicts_total", "Verdict records read from risk.feedback, by result: applied "
            "(new or changed), repeated (already counted: redelivery), invalid", ["result"], registry=r)

    def _define_console(self, r: CollectorRegistry) -> None:
        """Paging, acts from the console, top entities, quarantined state, sign-ins and cases."""
        self.pages = Counter(
            "riskwatch_pages_total", "Pages pushed to Alertmanager, by result: sent (a new page accepted), resolved "
            "(its end accepted), retry (Alertmanager unreachable or 5xx: tried again later), failed (refused "
            "with 4xx: not retried), duplicate (an update that changed nothing Alertmanager sees)", ["result"],
            registry=r)
        self.acks = Counter(
            "riskwatch_acks_total", "Acts on alerts read from risk.acks, by action and outcome (applied, rejected, "
            "held: its alert not seen yet)", ["action", "outcome"], registry=r)
        self.top_entities = Gauge(
            "riskwatch_top_entity_warnings", "Warnings raised in the last hour, for this worker's 10 entities "
            "with the most", ["entity_type", "entity_id"], registry=r)
        self.state_quarantined = Counter(
            "riskwatch_state_quarantined_total", "Stored values (changelog or table) that did not decode and were "
            "set aside (dead-lettered; the worker went on with fresh state or without the key), by table",
            ["table"], registry=r)
        self.console_signins = Counter(
            "riskwatch_console_signins_total", "Console sign-ins with a password, by result (ok, refused)",
            ["result"], registry=r)
        for result in ("ok", "refused"):
            self.console_signins.labels(result)
        self.cases = Gauge(
            "riskwatch_cases", "Alerts this worker owns, by status and owner team (the plan's, or the escalation "
            "team's once escalated; 'none' without a plan)", ["status", "team"], registry=r)
        self.case_time_to_ack = Histogram(
            "riskwatch_case_time_to_ack_seconds", "From a plan's trigger to the first acknowledgement (or resolution), "
            "by owner team", ["team"], buckets=_ACK_BUCKETS, registry=r)
        self.case_time_to_resolve = Histogram(
            "riskwatch_case_time_to_resolve_seconds", "From a plan's trigger to its resolution, by owner team",
            ["team"], buckets=_ACK_BUCKETS, registry=r)

    def saw_event_time(self, topic: str, ts: float) -> None:
        """Remember the newest event time seen on a topic; its lag is computed afresh at every scrape."""
        newest = self._newest.get(topic)
        if newest is None:
            # Computed at scrape time so the lag keeps growing while a topic is silent: a stalled
            # input must not look like a fresh one.
            self.event_time_lag.labels(topic).set_function(lambda: time.time() - self._newest[topic])
        if newest is None or ts > newest:
            self._newest[topic] = ts

    def forget_event_time(self, topic: str) -> None:
        """Drop a topic's event-time lag (this worker no longer reads it), so it cannot age into an alert."""
        if self._newest.pop(topic, None) is not None:
            self.event_time_lag.remove(topic)

    def event_time_topics(self) -> set[str]:
        """Topics whose event-time lag this worker reports."""
        return set(self._newest)

    def prime(self, *, inputs: Iterable[str] = (), outputs: Iterable[str] = (), categories: Iterable[str] = (),
              levels: Iterable[str] = (), stages: Iterable[str] = (), detectors: Iterable[str] = (),
              tables: Iterable[str] = ()) -> None:
        """Create the known label combinations at zero, so rate() and increase() see the first event."""
        # A series born at 1 has no earlier sample: increase() over it reads 0 and alerts miss the first event.
        categories, levels = list(categories), list(levels)
        for topic in inputs:
            self.events_consumed.labels(topic)
            self.events_scored.labels(topic)
            self.duplicates.labels(topic)
            self.redelivered.labels(topic)
            self.rekeyed.labels(topic)
            self.unkeyed_in_place.labels(topic)
            self.late_events.labels(topic)
        for topic in outputs:
            self.events_published.labels(topic)
        for category in categories:
            self.warning_updates.labels(category)
            self.storm_dropped.labels(category)
            for level in levels:
                self.warnings.labels(category, level)
        for stage in stages:
            self.processing.labels(stage)
        for detector in detectors:
            self.scores.labels(detector)
        for table in tables:
            self.entities.labels(table)
            self.evictions.labels(table)
            self.state_quarantined.labels(table)


def observe_many(child: Any, values: Sequence[float]) -> None:
    """Observe many values on one histogram child, one increment per bucket instead of per value.

    prometheus_client has no bulk observe; its per-value observe() cost about a microsecond per
    scored transaction. Falls back to observe() if the client's internals ever change.
    """
    if not values:
        return
    bounds = getattr(child, "_upper_bounds", None)
    buckets = getattr(child, "_buckets", None)
    total = getattr(child, "_sum", None)
    if bounds is None or buckets is None or total is None or len(bounds) != len(buckets):
        for v in values:
            child.observe(v)
        return
    counts = [0] * len(bounds)
    for v in values:
        if v == v:  # observe() puts a NaN in no bucket (but in the sum)
            counts[bisect_left(bounds, v)] += 1
    for bucket, n in zip(buckets, counts, strict=True):
        if n:
            bucket.inc(n)
    total.inc(math.fsum(values))


__all__ = ["Metrics", "observe_many"]
