"""The alert lifecycle state machine: triggers, acts, escalation, overdue, expiry, pages; no broker, no sleeping."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from models.errors import EventError, RiskwatchError
from models.features import AccountState
from models.lifecycle import (
    AckEvent,
    Lifecycle,
    decode_act,
    make_act,
    next_due,
    on_act,
    on_alert,
    tick,
)
from models.pages import pending_pages, sync_pages
from models.plans import parse_plans, trigger_id

PLANS = parse_plans("""
version: 2
plans:
  vel:
    title: Velocity
    category: velocity
    actions: [hold_withdrawals]
    owner_team: fraud-ops
    escalation_team: risk-duty
    ack_within: 60
    resolve_within: 600
    runbook: docs/disposal.md#velocity-check
  vel-critical:
    title: Velocity, critical
    category: velocity
    min_level: critical
    actions: [freeze_account, page_oncall]
    owner_team: compliance
    ack_within: 30
    resolve_within: 300
    runbook: docs/disposal.md#velocity-check
""")
AID = "a1b2c3d4e5f60718293a4b5c"
T0 = 1_800_000_000.0


def alert(level: str = "high", **over: Any) -> dict[str, Any]:
    a = {"alert_id": AID, "category": "velocity", "level": level, "entity_type": "account", "entity_id": "acct-1",
         "created_at": T0 - 5, "detector": "rule:velocity", "summary": "12 debits in ten minutes"}
    a.update(over)
    return a


def act(action: str, at: float, by: str = "alice", **over: Any) -> AckEvent:
    return AckEvent(alert_id=AID, action=action, by=by, ts=datetime.fromtimestamp(at, tz=UTC), **over)


def opened() -> Lifecycle:
    out = on_alert(None, alert(), PLANS, T0)
    assert out.state is not None
    return out.state


def test_a_new_warning_opens_its_plan_once() -> None:
    out = on_alert(None, alert(), PLANS, T0)
    s = out.state
    assert s.status == "open" and s.plan.plan_id == "vel" and s.plans_version == 2
    assert (s.ack_deadline, s.resolve_deadline) == (T0 + 60, T0 + 600)
    [trig] = out.triggers
    assert trig.trigger_id == trigger_id(AID, "vel") and trig.entity_id == "acct-1" and trig.level == "high"
    assert [(r.action, r.from_status, r.to_status, r.by) for r in out.audit] == [("raise", None, "open", "riskwatch")]
    again = on_alert(s, alert(), PLANS, T0 + 1)
    assert not again.triggers and not again.audit and not again.changed, "a redelivered warning changes nothing"


def test_a_level_rise_that_selects_another_plan_is_a_new_trigger_needing_its_own_ack() -> None:
    s = on_act(opened(), act("ack", T0 + 10), T0 + 10).state
    assert s.status == "acknowledged"
    out = on_alert(s, alert("critical"), PLANS, T0 + 20)
    [trig] = out.triggers
    assert trig.plan_id == "vel-critical" and trig.owner_team == "compliance" and trig.level == "critical"
    assert out.state.status == "open" and out.state.ack_deadline == T0 + 50 and out.state.round == 1
    assert [r.action for r in out.audit] == ["plan"]
    assert out.state.triggered == ["vel", "vel-critical"]
    assert not on_alert(out.state, alert("critical"), PLANS, T0 + 21).triggers
    assert not on_alert(out.state, alert("high"), PLANS, T0 + 22).triggers, "a level never falls back"


def test_an_ack_before_the_deadline_stops_escalation() -> None:
    out = on_act(opened(), act("ack", T0 + 42, note="looking"), T0 + 43)
    s = out.state
    assert s.status == "acknowledged" and s.acked_by == "alice" and out.ack_seconds == [42.0]
    assert out.audit[0].note == "looking" and out.audit[0].seq == 2
    later = tick(s, T0 + 3600)
    assert not later.triggers and later.state.status == "acknowledged"
    assert not on_act(s, act("ack", T0 + 50, by="bob"), T0 + 50).audit, "a second ack is not a transition"


def test_without_an_ack_escalation_fires_once_after_the_deadline() -> None:
    s = opened()
    assert next_due(s) == T0 + 60
    assert not tick(s, T0 + 59.9).changed
    out = tick(s, T0 + 60)
    [esc] = out.triggers
    assert esc.kind == "escalation" and esc.owner_team == "risk-duty" and esc.level == "critical"
    assert esc.escalation_of == trigger_id(AID, "vel") and esc.trigger_id == trigger_id(AID, "vel", "escalation")
    assert out.state.status == "escalated" and [r.action for r in out.audit] == ["escalate"]
    for later in (T0 + 61, T0 + 120, T0 + 599):
        assert not tick(out.state, later).triggers
    acked = on_act(out.state, act("ack", T0 + 70), T0 + 70)
    assert acked.state.status == "acknowledged"


def test_resolution_with_a_verdict_is_feedback_for_the_detector() -> None:
    out = on_act(opened(), act("resolve", T0 + 30, verdict="false_positive"), T0 + 30)
    s = out.state
    assert s.status == "resolved" and s.verdict == "false_positive" and out.verdicts == [("rule:velocity",
                                                                                        "false_positive")]
    assert out.ack_seconds == [30.0], "resolving unacknowledged counts as the first response"
    assert not on_act(s, act("resolve", T0 + 31, verdict="false_positive"), T0 + 31).changed
    refused = on_act(s, act("resolve", T0 + 32, by="bob", verdict="confirmed"), T0 + 32)
    assert refused.audit[0].outcome == "rejected" and "already resolved by alice" in refused.audit[0].reason
    assert refused.state.verdict == "false_positive" and not refused.verdicts
    ack_late = on_act(s, act("ack", T0 + 33), T0 + 33)
    assert ack_late.audit[0].outcome == "rejected" and "reopen it" in ack_late.audit[0].reason
    assert not tick(s, T0 + 3600).triggers


def test_reopening_restarts_the_deadlines_and_may_escalate_again_under_a_new_id() -> None:
    s = tick(opened(), T0 + 60).state
    s = on_act(s, act("resolve", T0 + 100, verdict="confirmed"), T0 + 100).state
    refused = on_act(opened(), act("reopen", T0 + 5), T0 + 5)
    assert refused.audit[0].outcome == "rejected"
    out = on_act(s, act("reopen", T0 + 200, by="carol"), T0 + 200)
    r = out.state
    assert r.status == "open" and r.ack_deadline == T0 + 260 and r.verdict is None and not r.escalated
    [esc] = tick(r, T0 + 260).triggers
    assert esc.trigger_id == trigger_id(AID, "vel", "escalation-1")


def test_acts_that_arrive_before_their_warning_are_held_then_applied() -> None:
    held = on_act(None, act("ack", T0 - 1), T0 - 1)
    assert held.state.known is False and not held.audit and held.changed
    assert next_due(held.state) == T0 - 1 + 86_400
    out = on_alert(held.state, alert(), PLANS, T0)
    assert [r.action for r in out.audit] == ["raise", "ack"] and out.state.status == "acknowledged"
    assert len(out.triggers) == 1
    orphan = tick(held.state, T0 + 86_400)
    assert orphan.state is None and [a.action for a in orphan.given_up] == ["ack"]


def test_overdue_once_then_expired_then_forgotten() -> None:
    s = on_act(opened(), act("ack", T0 + 1), T0 + 1).state
    out = tick(s, T0 + 600)
    assert out.state.overdue and [r.action for r in out.audit] == ["overdue"]
    assert not tick(out.state, T0 + 700).audit
    expired = tick(out.state, T0 + 600 + 1000, expire_after=1000)
    assert expired.state.status == "expired" and [r.action for r in expired.audit] == ["expire"]
    assert tick(expired.state, T0 + 1600 + 999, expire_after=1000).state is not None
    assert tick(expired.state, T0 + 1600 + 1000, expire_after=1000).state is None


def test_pages_follow_the_state() -> None:
    s = opened()
    assert not sync_pages(s, None, T0), "paging off: no pages"
    assert not sync_pages(s, "critical", T0), "below the paging level"
    assert sync_pages(s, "high", T0)
    [page] = s.pages
    assert page.labels["team"] == "fraud-ops" and page.labels["level"] == "high" and page.labels["stage"] == "plan"
    assert page.labels["plan"] == "vel" and pending_pages(s)
    page.sent = True
    assert not sync_pages(s, "high", T0 + 1) and not pending_pages(s)
    s = tick(s, T0 + 60).state
    assert sync_pages(s, "high", T0 + 60)
    esc = [p for p in s.pages if p.stage == "escalation"]
    assert esc[0].labels["team"] == "risk-duty" and esc[0].labels["level"] == "critical"
    s = on_act(s, act("resolve", T0 + 70, verdict="confirmed"), T0 + 70).state
    assert sync_pages(s, "high", T0 + 70)
    # The sent plan page must be ended in Alertmanager; the never-sent escalation page is simply dropped.
    assert [(p.stage, p.active, p.sent) for p in s.pages] == [("plan", False, True)] and pending_pages(s)
    s.pages[0].end_sent = True
    assert sync_pages(s, "high", T0 + 71) and s.pages == [] and not pending_pages(s)


def test_an_account_page_names_the_transaction_type_that_raised_it() -> None:
    # What deploy/alertmanager inhibits on during a liquidity run (withdrawals and redemptions).
    s = on_alert(None, alert(txn_type="withdrawal"), PLANS, T0).state
    assert s is not None and sync_pages(s, "high", T0)
    assert s.pages[0].labels["txn_type"] == "withdrawal"
    # A later version raised by a payment does not move the page to new labels.
    s = on_alert(s, alert(txn_type="payment"), PLANS, T0 + 1).state
    assert not sync_pages(s, "high", T0 + 1) and s.pages[0].labels["txn_type"] == "withdrawal"
    # A record written before the type was kept pages with the labels it had: no txn_type at all.
    old = Lifecycle.model_validate_json(opened().model_dump_json(exclude={"txn_type"}))
    assert sync_pages(old, "high", T0) and "txn_type" not in old.pages[0].labels


def test_an_account_warning_carries_its_transaction_type() -> None:
    from models.rules import load_catalogue
    from models.schemas import Transaction
    from models.scoring import TransactionScorer

    scorer = TransactionScorer(load_catalogue("deploy/rules.yaml"))
    state = AccountState()
    txn = Transaction.model_validate({
        "event_id": "w1", "ts": "2026-11-01T10:00:00Z", "account_id": "acct-1", "counterparty_id": "BANK-1",
        "amount": 80_000.0, "currency": "CNY", "direction": "debit", "txn_type": "withdrawal", "channel": "app"})
    out = scorer.process(txn, state)
    assert out.alerts and {a.txn_type for a in out.alerts} == {"withdrawal"}
    assert '"txn_type":"withdrawal"' in out.alerts[0].model_dump_json()


def test_a_level_rise_replaces_the_page_labels() -> None:
    s = opened()
    sync_pages(s, "high", T0)
    s.pages[0].sent = True
    s = on_alert(s, alert("critical"), PLANS, T0 + 5).state
    assert sync_pages(s, "high", T0 + 5)
    assert [(p.labels["level"], p.labels["team"], p.active) for p in s.pages] == [
        ("high", "fraud-ops", False), ("critical", "compliance", True)]


def test_assign_and_note_keep_the_status_are_audited_and_recognised_when_redelivered() -> None:
    s = opened()
    out = on_act(s, act("assign", T0 + 10, assignee="fraud-ops", via="console"), T0 + 10)
    assert out.state.assignee == "fraud-ops" and out.state.status == "open"
    [rec] = out.audit
    assert (rec.action, rec.assignee, rec.by, rec.via, rec.to_status) == ("assign", "fraud-ops", "alice", "console",
                                                                         "open")
    again = on_act(out.state, act("assign", T0 + 10, assignee="fraud-ops", via="console"), T0 + 11)
    assert not again.audit and not again.changed
    noted = on_act(out.state, act("note", T0 + 20, note="called the customer"), T0 + 20)
    [rec] = noted.audit
    assert (rec.action, rec.note, rec.via, rec.to_status) == ("note", "called the customer", "cli", "open")
    repeat = on_act(noted.state, act("note", T0 + 20, note="called the customer"), T0 + 21)
    assert not repeat.audit and not repeat.changed, "a redelivered note is not written twice"
    other = on_act(noted.state, act("note", T0 + 30, note="called the customer"), T0 + 30)
    assert [r.action for r in other.audit] == ["note"], "the same words later are a new note"
    # A closed case is reopened before it is assigned again; notes may still be added.
    closed = on_act(other.state, act("resolve", T0 + 40, verdict="confirmed"), T0 + 40).state
    refused = on_act(closed, act("assign", T0 + 50, assignee="bob"), T0 + 50)
    assert refused.audit[0].outcome == "rejected" and refused.state.assignee == "fraud-ops"
    assert on_act(closed, act("note", T0 + 50, note="post mortem"), T0 + 50).audit[0].outcome == "applied"


def test_reopen_after_resolution_opens_the_case_again_and_audits_who_did_it() -> None:
    closed = on_act(opened(), act("resolve", T0 + 5, verdict="false_positive"), T0 + 5).state
    out = on_act(closed, act("reopen", T0 + 9, by="bob", via="console"), T0 + 9)
    assert out.state.status == "open" and out.state.verdict is None
    assert [(r.action, r.from_status, r.to_status, r.by, r.via) for r in out.audit] == [
        ("reopen", "resolved", "open", "bob", "console")]
    assert on_act(out.state, act("reopen", T0 + 10), T0 + 10).audit[0].outcome == "rejected"


def test_times_to_acknowledge_and_resolve_are_measured_for_the_team_answerable_then() -> None:
    acked = on_act(opened(), act("ack", T0 + 30), T0 + 30)
    assert acked.case_times == [("ack", "fraud-ops", 30.0)]
    assert on_act(acked.state, act("resolve", T0 + 90, verdict="confirmed"), T0 + 90).case_times == [
        ("resolve", "fraud-ops", 90.0)]
    escalated = tick(opened(), T0 + 61).state  # missed the 60 s deadline: risk-duty answers for it now
    assert on_act(escalated, act("resolve", T0 + 100, verdict="confirmed"), T0 + 100).case_times == [
        ("ack", "risk-duty", 100.0), ("resolve", "risk-duty", 100.0)]


def test_make_act_is_the_one_validation_of_cli_and_console_acts() -> None:
    a = make_act(AID.upper(), "assign", " lin ", assignee=" fraud-ops ", via="console")
    assert (a.alert_id, a.by, a.assignee, a.via) == (AID, "lin", "fraud-ops", "console")
    assert make_act(AID, "ack", "lin").via == "cli"
    with pytest.raises(RiskwatchError, match="assign needs an assignee"):
        make_act(AID, "assign", "lin")
    with pytest.raises(RiskwatchError, match="a note needs its text"):
        make_act(AID, "note", "lin", note="  ")
    with pytest.raises(RiskwatchError, match="alert ids are 16-64"):
        make_act("nope", "ack", "lin")


@pytest.mark.parametrize(("raw", "field", "message"), [
    (b'{"alert_id": ', None, "not valid JSON"),
    (b'{"alert_id": "a1b2c3d4e5f60718293a4b5c", "action": "ack", "ts": "2026-11-02T09:00:00+08:00"}', "by",
     "by: Field required"),
    (b'{"alert_id": "XYZ", "action": "ack", "by": "a", "ts": "2026-11-02T09:00:00+08:00"}', "alert_id",
     "alert_id: String should match pattern"),
    (b'{"alert_id": "a1b2c3d4e5f60718293a4b5c", "action": "close", "by": "a", "ts": "2026-11-02T09:00:00Z"}',
     "action", "action: Input should be 'ack', 'assign', 'note', 'resolve' or 'reopen'"),
    (b'{"alert_id": "a1b2c3d4e5f60718293a4b5c", "action": "ack", "by": "a", "ts": "2026-11-02T09:00:00"}', "ts",
     "ts: Input should have timezone info"),
    (b'{"alert_id": "a1b2c3d4e5f60718293a4b5c", "action": "ack", "by": "a", "verdict": "confirmed",'
     b' "ts": "2026-11-02T09:00:00Z"}', "acknowledgement", "verdict is only given with action 'resolve'"),
])
def test_invalid_acts_name_the_field_and_problem(raw: bytes, field: str | None, message: str) -> None:
    with pytest.raises(EventError) as exc:
        decode_act(raw)
    assert message in exc.value.reason
    assert exc.value.field == (None if field in (None, "acknowledgement") else field)


_steps = st.lists(st.one_of(
    st.tuples(st.just("alert"), st.sampled_from(["medium", "high", "critical"])),
    st.tuples(st.just("act"), st.sampled_from(["ack", "assign", "note", "resolve", "reopen"])),
    st.tuples(st.just("tick"), st.floats(0, 700)),
), max_size=25)


@settings(max_examples=300, deadline=None)
@given(_steps)
def test_any_history_keeps_ids_unique_and_escalates_at_most_once_per_round(steps: list[tuple[str, Any]]) -> None:
    state: Lifecycle | None = None
    now = T0
    triggers: list[str] = []
    seqs: list[int] = []
    for kind, arg in steps:
        now += 1
        if kind == "alert":
            out = on_alert(state, alert(arg), PLANS, now)
        elif kind == "act":
            extra = {"resolve": {"verdict": "confirmed"}, "assign": {"assignee": "fraud-ops"},
                     "note": {"note": "seen"}}.get(arg, {})
            out = on_act(state, act(arg, now, **extra), now)
        else:
            if state is None:
                continue
            now += arg
            out = tick(state, now)
        # Applying the very same input twice (a redelivery) adds nothing.
        if kind != "tick" and out.state is not None and out.state.known:
            again = (on_alert(out.state, alert(arg), PLANS, now) if kind == "alert"
                     else on_act(out.state, act(arg, now, **extra), now))
            assert not again.triggers and not [r for r in again.audit if r.outcome == "applied"]
        triggers += [t.trigger_id for t in out.triggers]
        seqs += [r.seq for r in out.audit if r.outcome == "applied"]
        state = out.state
        if state is None:
            break
        assert state.status in ("open", "acknowledged", "resolved", "escalated", "expired")
        due = next_due(state)
        assert due is None or due > now or tick(state, now).changed or pending_pages(state)
    assert len(triggers) == len(set(triggers)), "every trigger id is published once"
    assert seqs == sorted(seqs) and len(seqs) == len(set(seqs)), "audit sequence numbers only grow"


def test_an_act_framed_by_confluents_json_schema_serializer_is_read_as_its_json() -> None:
    """A case tool on Confluent's stack writes risk.acks through the JSON Schema serializer (5-byte header)."""
    body = b'{"alert_id": "a1b2c3d4e5f60718293a4b5c", "action": "ack", "by": "a", "ts": "2026-11-02T09:00:00Z"}'
    assert decode_act(b"\x00\x00\x00\x00\x03" + body) == decode_act(body)
    with pytest.raises(EventError, match=r"schema id 3\) around a value that is not JSON"):
        decode_act(b"\x00\x00\x00\x00\x03\x02\x30a1b2")
