"""Verdict feedback without a broker: the book (bounds, decay, dedupe, required rules, JSON), the lifecycle's
verdict records, and the offline replay that reproduces the adaptation."""

from __future__ import annotations

import itertools
import json
import random
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from models import feedback as fb
from models.feedback import FeedbackAudit, FeedbackBook, VerdictNote, key_of, note_for
from models.lifecycle import AckEvent, Lifecycle, on_act, on_alert
from models.plans import parse_plans
from models.scoring import MODEL_DETECTOR, REQUIRED_RULES

ROOT = Path(__file__).resolve().parents[2]
T0 = 1_790_000_000.0
DAY = 86_400.0


def note(alert_id: str, verdict: str = "false_positive", code: str = "amount", ts: float = T0,
         detector: str = MODEL_DETECTOR) -> VerdictNote:
    n = note_for(alert_id, detector, [code], verdict, ts)
    assert n is not None
    return n


def test_neutral_until_five_verdicts_then_false_positives_lower_it_to_the_floor() -> None:
    book = FeedbackBook()
    factors = []
    for i in range(20):
        book.record(note(f"a{i}"))
        factors.append(book.factor(MODEL_DETECTOR, ["amount", "hour"]))
    assert factors[:4] == [1.0] * 4
    assert factors[4] == pytest.approx(2 / 9 / 0.5, abs=1e-4)
    assert all(b <= a for a, b in itertools.pairwise(factors))
    assert min(factors) == fb.MIN_FACTOR and factors[11] == fb.MIN_FACTOR
    # Only the lead code is a key: the other codes of the same warnings are untouched.
    assert book.factor(MODEL_DETECTOR, ["hour", "amount"]) == 1.0
    assert book.max_factor == 1.0


def test_confirmed_verdicts_raise_it_but_never_past_the_ceiling() -> None:
    book = FeedbackBook()
    for i in range(2000):
        book.record(note(f"a{i}", "confirmed", ts=T0 + i))
    f = book.factor(MODEL_DETECTOR, ["amount"])
    assert 1.9 < f <= fb.MAX_FACTOR
    assert book.max_factor == f
    assert book.counts(MODEL_DETECTOR, "amount").held == fb.MAX_VERDICTS


def test_mixed_verdicts_at_the_reference_precision_stay_neutral() -> None:
    book = FeedbackBook()
    for i in range(40):
        book.record(note(f"a{i}", "confirmed" if i % 2 else "false_positive"))
    assert book.factor(MODEL_DETECTOR, ["amount"]) == 1.0


def test_verdicts_fade_with_a_fourteen_day_half_life() -> None:
    book = FeedbackBook()
    for i in range(12):
        book.record(note(f"old{i}", ts=T0))
    assert book.factor(MODEL_DETECTOR, ["amount"]) == fb.MIN_FACTOR
    # 12 confirmed verdicts 14 days later: the old false positives count half.
    for i in range(12):
        book.record(note(f"new{i}", "confirmed", ts=T0 + 14 * DAY))
    c = book.counts(MODEL_DETECTOR, "amount")
    assert c.false_positive == pytest.approx(6.0) and c.confirmed == pytest.approx(12.0)
    assert book.factor(MODEL_DETECTOR, ["amount"]) == pytest.approx((12 + 2) / (18 + 4) / 0.5, abs=1e-4)


def test_each_alert_counts_once_and_a_changed_verdict_replaces_the_old() -> None:
    book = FeedbackBook()
    for i in range(6):
        book.record(note(f"a{i}"))
    before = book.counts(MODEL_DETECTOR, "amount")
    assert book.record(note("a0")) is None  # a redelivery
    assert book.counts(MODEL_DETECTOR, "amount") == before
    book.record(note("a0", "confirmed", ts=T0 + 60))  # reopened and resolved the other way
    after = book.counts(MODEL_DETECTOR, "amount")
    assert after.held == 6 and after.false_positive == pytest.approx(5.0, abs=1e-3)
    assert after.confirmed == pytest.approx(1.0)


def test_the_book_does_not_depend_on_the_order_verdicts_arrive_in() -> None:
    notes = [note(f"a{i}", random.Random(i).choice(["confirmed", "false_positive"]), ts=T0 + i * 3600.0,
                  code=random.Random(i).choice(["amount", "hour"])) for i in range(700)]
    one, two = FeedbackBook(), FeedbackBook()
    for n in notes:
        one.record(n)
    shuffled = list(notes)
    random.Random(7).shuffle(shuffled)
    for n in shuffled:
        two.record(n)
    assert one.to_json() == two.to_json()
    assert list(one.factors()) == list(two.factors())


def test_required_rules_are_never_keys_whatever_their_verdicts() -> None:
    book = FeedbackBook()
    for rule in REQUIRED_RULES:
        assert note_for("x", f"rule:{rule}", [rule], "false_positive", T0) is None
        # Even a hand-made record naming one is ignored.
        for i in range(30):
            assert book.record(VerdictNote(alert_id=f"{rule}{i}", detector=f"rule:{rule}", code=rule,
                                           verdict="false_positive", ts=datetime.fromtimestamp(T0, UTC))) is None
        assert book.factor(f"rule:{rule}", [rule]) == 1.0
    assert book.keys == {}
    assert key_of("rule:market_crash", ["market_crash"]) is None  # not a rule scoring lets verdicts move
    assert key_of(MODEL_DETECTOR, []) is None  # a lifecycle record from before reason codes were kept


def test_the_velocity_rule_is_a_key_of_its_own() -> None:
    book = FeedbackBook()
    for i in range(12):
        book.record(note(f"v{i}", detector="rule:velocity", code="velocity"))
    assert book.factor("rule:velocity", ("velocity",)) == fb.MIN_FACTOR
    assert book.factor(MODEL_DETECTOR, ["velocity"]) == 1.0


def test_adaptations_are_reported_once_per_band_with_the_verdict_that_caused_them() -> None:
    book = FeedbackBook()
    moves = [book.record(note(f"a{i}", ts=T0 + i)) for i in range(30)]
    got = [m for m in moves if m is not None]
    assert got and all(m.direction == "down" for m in got)
    assert got[0].old_factor == 1.0 and got[0].alert_id == "a4"
    assert got[0].counts.false_positive == pytest.approx(5, abs=1e-3)
    assert got[-1].new_factor == fb.MIN_FACTOR and len(got) == 7  # 8 verdicts, 5 to 12, cross 7 bands
    assert all(fb.band(m.new_factor) != fb.band(m.old_factor) for m in got)
    # preview() predicts record() without changing the book.
    book2 = FeedbackBook()
    for i in range(4):
        book2.record(note(f"a{i}", ts=T0 + i))
    p = book2.preview(note("a4", ts=T0 + 4))
    assert book2.counts(MODEL_DETECTOR, "amount").held == 4
    assert p == book2.record(note("a4", ts=T0 + 4)) == got[0]
    rec = FeedbackAudit.of(got[0], "alice", T0 + 10)
    assert rec.kind == "feedback" and rec.key == "surprise/amount" and rec.direction == "down"
    assert rec.audit_id == got[0].audit_id and len(rec.audit_id) == 24


def test_json_round_trip_and_version() -> None:
    book = FeedbackBook()
    for i in range(9):
        book.record(note(f"a{i}", ts=T0 + i * 1000.123456))
        book.record(note(f"v{i}", "confirmed", detector="rule:velocity", code="velocity", ts=T0 + i))
    text = book.to_json()
    again = FeedbackBook.from_json(text)
    assert again.to_json() == text and list(again.factors()) == list(book.factors())
    assert again.max_factor == book.max_factor > 1.0
    data = json.loads(text)
    assert data["version"] == fb.FORMAT_VERSION
    data["version"] = 99
    with pytest.raises(ValueError, match="version 99"):
        FeedbackBook.from_json(json.dumps(data))


# ---------------------------------------------------------------- the lifecycle's verdict records
PLANS = parse_plans("version: 1\nplans: {p: {title: t, category: '*', actions: [triage_warning],"
                    " owner_team: fraud-ops, ack_within: 60, resolve_within: 600, runbook: r}}")


def _alert(detector: str = MODEL_DETECTOR, codes: tuple[str, ...] = ("hour", "amount")) -> dict[str, Any]:
    return {"alert_id": "a1b2c3d4e5f60718293a4b5c", "category": "anomaly", "level": "medium",
            "entity_type": "account", "entity_id": "acct-1", "created_at": T0, "detector": detector,
            "reasons": [{"code": c, "message": c} for c in codes]}


def _act(action: str, verdict: str | None = None, by: str = "alice", ts: float = T0 + 60) -> AckEvent:
    return AckEvent(alert_id="a1b2c3d4e5f60718293a4b5c", action=action, by=by, verdict=verdict,  # type: ignore[arg-type]
                    ts=datetime.fromtimestamp(ts, UTC))


def test_a_resolve_with_a_verdict_yields_one_feedback_record_for_the_lead_code() -> None:
    s = on_alert(None, _alert(), PLANS, now=T0).state
    assert s is not None and s.codes == ["hour", "amount"]
    out = on_act(s, _act("resolve", "false_positive"), now=T0 + 61)
    assert out.verdicts == [(MODEL_DETECTOR, "false_positive")]
    [n] = out.feedback
    assert (n.alert_id, n.detector, n.code, n.verdict, n.by) == (s.alert_id, MODEL_DETECTOR, "hour",
                                                                 "false_positive", "alice")
    # Redelivered: nothing new. Reopened and resolved the other way: a record that replaces it.
    assert on_act(out.state, _act("resolve", "false_positive"), now=T0 + 62).feedback == []
    reopened = on_act(out.state, _act("reopen", by="bob", ts=T0 + 120), now=T0 + 120).state
    again = on_act(reopened, _act("resolve", "confirmed", by="bob", ts=T0 + 180), now=T0 + 180)
    assert [(x.alert_id, x.verdict) for x in again.feedback] == [(s.alert_id, "confirmed")]
    book = FeedbackBook()
    for x in [n, *again.feedback]:
        book.record(x)
    assert book.counts(MODEL_DETECTOR, "hour").held == 1


def test_required_rule_verdicts_are_counted_but_never_fed_back() -> None:
    s = on_alert(None, _alert("rule:large_transaction", ("large_transaction",)), PLANS, now=T0).state
    out = on_act(s, _act("resolve", "false_positive"), now=T0 + 61)
    assert out.verdicts == [("rule:large_transaction", "false_positive")] and out.feedback == []


def test_a_lifecycle_record_from_before_reason_codes_still_loads_and_gives_no_record() -> None:
    s = on_alert(None, _alert(), PLANS, now=T0).state
    assert s is not None
    old = json.loads(s.model_dump_json())
    del old["codes"]
    loaded = Lifecycle.model_validate_json(json.dumps(old))
    assert loaded.codes == [] and loaded.detector == MODEL_DETECTOR
    out = on_act(loaded, _act("resolve", "false_positive"), now=T0 + 61)
    assert out.state is not None and out.state.status == "resolved"
    assert out.verdicts == [(MODEL_DETECTOR, "false_positive")] and out.feedback == []


def test_held_acts_give_their_feedback_when_the_warning_arrives() -> None:
    held = on_act(None, _act("resolve", "false_positive"), now=T0).state
    out = on_alert(held, _alert(), PLANS, now=T0 + 5)
    assert [n.code for n in out.feedback] == ["hour"]




# ---------------------------------------------------------------- offline: riskwatch replay --verdicts
@pytest.fixture(scope="module")
def replayed(tmp_path_factory: pytest.TempPathFactory) -> dict[str, Any]:
    """A 3-day stream of 300 accounts replayed at 20 model warnings per 1,000 (about 130 to judge)."""
    from models.synth import generate, write_jsonl

    root = tmp_path_factory.mktemp("feedback-replay")
    stream = root / "stream.jsonl"
    write_jsonl(generate(seed=5, accounts=300, days=3.0, instruments=0), stream)
    rules = root / "rules.yaml"
    text = (ROOT / "deploy" / "rules.yaml").read_text()
    assert "budget_per_1000: 2.0" in text
    rules.write_text(text.replace("budget_per_1000: 2.0", "budget_per_1000: 20.0"))
    base = _replay_cli(root, stream, rules, "base")
    return {"root": root, "stream": stream, "rules": rules, "base": base}



def _replay_cli(root: Any, stream: Any, rules: Any, name: str, *extra: Any) -> dict[str, Any]:
    """Run `riskwatch replay` in this process; the first version of each warning and the printed summary."""
    import contextlib
    import io

    from app.cli import main

    alerts = root / f"{name}.jsonl"
    out = io.StringIO()
    with contextlib.redirect_stdout(out):
        assert main(["replay", str(stream), "--rules", str(rules), "--alerts", str(alerts), *map(str, extra)]) == 0
    first: dict[str, dict[str, Any]] = {}
    for line in alerts.read_text().splitlines():
        a = json.loads(line)
        first.setdefault(a["alert_id"], a)
    return {"alerts": first, "stdout": out.getvalue()}


def _model_warnings(alerts: dict[str, dict[str, Any]], code: str) -> list[dict[str, Any]]:
    return [a for a in alerts.values() if a["detector"] == MODEL_DETECTOR and a["reasons"]
            and a["reasons"][0]["code"] == code]


def _verdicts_file(root: Any, alerts: list[dict[str, Any]], verdict: str) -> Any:
    """Every given warning resolved with `verdict` a minute after it was raised."""
    path = root / f"verdicts-{verdict}.jsonl"
    path.write_text("".join(json.dumps({"alert_id": a["alert_id"], "verdict": verdict, "ts": datetime.fromisoformat(
        a["created_at"]).timestamp() + 60}) + "\n" for a in alerts))
    return path


@pytest.mark.parametrize("verdict", ["false_positive", "confirmed"])
def test_replay_with_verdicts_reproduces_the_adaptation(replayed: dict[str, Any], verdict: str) -> None:
    base = replayed["base"]["alerts"]
    lead = [a["reasons"][0]["code"] for a in base.values() if a["detector"] == MODEL_DETECTOR and a["reasons"]]
    code = max(set(lead), key=lead.count)  # the most frequent kind of model warning
    judged = _model_warnings(base, code)
    others = len([a for a in base.values() if a["detector"] == MODEL_DETECTOR]) - len(judged)
    assert len(judged) >= 40 and others >= 10, "the stream must give many warnings of one kind and some of others"
    verdicts = _verdicts_file(replayed["root"], judged, verdict)
    again = _replay_cli(replayed["root"], replayed["stream"], replayed["rules"], verdict, "--verdicts", verdicts)
    after = _model_warnings(again["alerts"], code)
    print(f"{verdict}: {code}-led model warnings {len(judged)} -> {len(after)}")
    assert f"surprise/{code}: factor" in again["stdout"] and "adaptations" in again["stdout"]
    if verdict == "false_positive":
        assert len(after) <= 0.7 * len(judged)
        assert "surprise/" + code + ": factor 0.25" in again["stdout"]
    else:
        assert len(after) >= len(judged)
    # Required rules never move: the same large-transaction, structuring and fund-isolation warnings.
    required = {f"rule:{r}" for r in REQUIRED_RULES}
    assert ({k for k, a in base.items() if a["detector"] in required}
            == {k for k, a in again["alerts"].items() if a["detector"] in required})


def test_replay_reads_audit_records_and_refuses_bad_verdict_lines(tmp_path: Any) -> None:
    from app.replay import ReplayError, read_verdicts

    path = tmp_path / "audit.jsonl"
    path.write_text("\n".join([
        json.dumps({"alert_id": "a1", "action": "ack", "outcome": "applied", "ts": "2026-11-02T09:00:00+08:00"}),
        json.dumps({"alert_id": "a1", "action": "resolve", "outcome": "applied", "verdict": "false_positive",
                    "by": "alice", "ts": "2026-11-02T09:05:00+08:00"}),
        json.dumps({"alert_id": "a2", "action": "resolve", "outcome": "rejected", "verdict": "confirmed",
                    "ts": "2026-11-02T09:06:00+08:00"}),
        json.dumps({"kind": "feedback", "action": "adapt", "alert_id": "a1", "verdict": "false_positive",
                    "ts": "2026-11-02T09:05:00+08:00"}),
        json.dumps({"alert_id": "a3", "verdict": "confirmed", "ts": 1.8e9}),  # epoch seconds, 2027
    ]) + "\n")
    got = read_verdicts(path)
    assert [(v.alert_id, v.verdict, v.by) for v in got] == [("a1", "false_positive", "alice"),
                                                             ("a3", "confirmed", None)]
    path.write_text(json.dumps({"alert_id": "a1", "verdict": "maybe", "ts": 1.79e9}) + "\n")
    with pytest.raises(ReplayError, match="line 1: verdict must be"):
        read_verdicts(path)


def test_the_warnings_page_ignores_feedback_records_on_risk_audit() -> None:
    from agents.web import AlertFeed

    book = FeedbackBook()
    moves = [book.record(note(f"a{i}", ts=T0 + i)) for i in range(5)]
    assert moves[-1] is not None
    record = json.loads(FeedbackAudit.of(moves[-1], "alice", T0 + 10).model_dump_json())
    feed = AlertFeed()
    feed.on_audit(record)
    assert feed.seq == 0 and not feed.early and not feed.disposal_seen
