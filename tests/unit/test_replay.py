"""File replay end to end: formats, event-time order and clock, determinism, dead letters, champion/challenger."""

from __future__ import annotations

import csv
import gzip
import json
import os
import pty
import random
import subprocess
import sys
from collections.abc import Callable
from datetime import datetime
from pathlib import Path
from typing import Any

import pyarrow as pa
import pyarrow.parquet as pq
import pytest

from app.cli import main
from models.schemas import Alert
from models.synth import generate, write_jsonl

ROOT = Path(__file__).resolve().parents[2]
SAMPLE = ROOT / "tests" / "data" / "sample.jsonl.gz"
CLI = [sys.executable, "-c", "import sys; from app.cli import main; sys.exit(main())"]


def lines(path: Path) -> list[str]:
    """The lines of a text file."""
    return path.read_text(encoding="utf-8").splitlines()


def replay(capsys: pytest.CaptureFixture[str], *args: str | Path) -> tuple[int, str, str]:
    """Run `riskwatch replay ...` in this process; return (exit code, stdout, stderr)."""
    code = main(["replay", *map(str, args)])
    out = capsys.readouterr()
    return code, out.out, out.err


@pytest.fixture(scope="module")
def stream() -> list[dict[str, Any]]:
    """A small labelled stream (both event types, every scenario) without ties in event time."""
    events = generate(seed=3, accounts=60, days=1.0, instruments=2)
    seen: set[str] = set()
    unique = []
    for e in events:  # equal timestamps would make a shuffled file's order ambiguous
        if e["ts"] not in seen:
            seen.add(e["ts"])
            unique.append(e)
    return unique


def test_sample_replay_twice_gives_byte_identical_outputs(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    runs = []
    for name in ("one", "two"):
        out = tmp_path / name
        code, stdout, _ = replay(capsys, SAMPLE, "--alerts", out / "alerts.jsonl", "--scores", out / "scores.jsonl")
        assert code == 0, stdout
        runs.append(out)
    a, b = runs
    assert (a / "alerts.jsonl").read_bytes() == (b / "alerts.jsonl").read_bytes()
    assert (a / "scores.jsonl").read_bytes() == (b / "scores.jsonl").read_bytes()
    with gzip.open(SAMPLE, "rt") as f:
        ids = [json.loads(line)["event_id"] for line in f]
    scores = [json.loads(x) for x in lines(a / "scores.jsonl")]
    assert sorted(s["event_id"] for s in scores) == sorted(ids)  # one line per valid event
    assert all(set(s) == {"event_id", "score"} and 0.0 <= s["score"] <= 1.0 for s in scores)
    alerts = lines(a / "alerts.jsonl")
    assert len(alerts) > 20
    for text in alerts:  # exactly the risk.alerts contract, as the worker serialises it
        assert Alert.model_validate_json(text).model_dump_json() == text
    assert not (a / "deadletter.jsonl").exists()  # nothing invalid, no dead-letter file


def _write_csv(events: list[dict[str, Any]], path: Path) -> None:
    cols = sorted({k for e in events for k in e})
    with open(path, "w", newline="", encoding="utf-8") as f:
        w = csv.DictWriter(f, cols)
        w.writeheader()
        for e in events:
            w.writerow({k: e.get(k, "") for k in cols})


def test_every_format_and_any_line_order_give_the_same_results(
    stream: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    shuffled = list(stream)
    random.Random(1).shuffle(shuffled)
    # Market ticks first, then transactions: a file grouped by event_type, as exports often are.
    grouped = sorted(shuffled, key=lambda e: e["event_type"] != "market")
    inputs = {"sorted.jsonl": stream, "shuffled.jsonl.gz": shuffled, "grouped.jsonl": grouped}
    for name, events in inputs.items():
        write_jsonl(events, tmp_path / name)
    _write_csv(shuffled, tmp_path / "events.csv")
    columns = sorted({k for e in grouped for k in e})
    pq.write_table(pa.Table.from_pylist([{k: e.get(k) for k in columns} for e in grouped]), tmp_path / "events.parquet")
    results = {}
    for name in [*inputs, "events.csv", "events.parquet"]:
        out = tmp_path / f"out-{name}"
        code, stdout, _ = replay(capsys, tmp_path / name, "--alerts", out / "a.jsonl", "--scores", out / "s.jsonl")
        assert code == 0 and "invalid 0" in stdout, stdout
        results[name] = ((out / "a.jsonl").read_bytes(), (out / "s.jsonl").read_bytes())
    reference = results["sorted.jsonl"]
    assert reference[0].count(b"\n") >= 5
    for name, got in results.items():
        assert got == reference, f"{name} differs from the sorted JSONL replay"


def test_windows_and_cooldowns_follow_event_time(
    make_txn: Callable[..., dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    big = dict(amount=60_000.0, account_id="acct-big")
    near = dict(amount=46_000.0, account_id="acct-split", txn_type="transfer", counterparty_id="X1")
    events = [
        make_txn(0, **big),
        make_txn(10, **big),
        make_txn(100, **big),  # cooldown is 30 event minutes
        make_txn(0, **near),
        make_txn(60 * 5, **near),
        make_txn(60 * 10, **near),  # within 24 h
        make_txn(0, **{**near, "account_id": "acct-slow"}),
        make_txn(60 * 30, **{**near, "account_id": "acct-slow"}),
        make_txn(60 * 60, **{**near, "account_id": "acct-slow"}),
    ]  # 3 debits, but over 60 h
    write_jsonl(events, tmp_path / "in.jsonl")
    code, _, _ = replay(capsys, tmp_path / "in.jsonl", "--alerts", tmp_path / "alerts.jsonl")
    assert code == 0
    got = [Alert.model_validate_json(x) for x in lines(tmp_path / "alerts.jsonl")]
    large = [a for a in got if a.category == "large_transaction"]
    # The replay takes milliseconds of wall time; only the event clock separates the third from the first two.
    assert len(large) == 3 and len({a.alert_id for a in large}) == 2
    assert large[1].event_ids == [events[0]["event_id"], events[1]["event_id"]]
    # Warning times are event times: the clock of a replay is the events' own.
    assert [a.created_at for a in large] == [datetime.fromisoformat(e["ts"]) for e in events[:3]]
    assert large[2].event_ts.timestamp() - large[0].event_ts.timestamp() == 100 * 60
    structuring = {a.entity_id for a in got if a.category == "structuring"}
    assert structuring == {"acct-split"}


def test_invalid_lines_are_dead_lettered_with_line_numbers(
    make_txn: Callable[..., dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    good = [json.dumps(make_txn(i)).encode() for i in range(5)]
    bad_amount = json.dumps(make_txn(9, amount=-5)).encode()
    naive_ts = json.dumps({**make_txn(9), "ts": "2026-11-02T09:00:00"}).encode()
    body = [
        good[0],
        b"{not json",
        good[1],
        b"",
        bad_amount,
        good[2],
        b"\xff\xfe garbage",
        naive_ts,
        good[3],
        b'{"event_type": "trade", "event_id": "x"}',
        good[4],
    ]
    (tmp_path / "in.jsonl").write_bytes(b"\n".join(body) + b"\n")
    out = tmp_path / "out"
    code, stdout, _ = replay(
        capsys, tmp_path / "in.jsonl", "--alerts", out / "alerts.jsonl", "--scores", out / "scores.jsonl"
    )
    assert code == 0
    assert "invalid 5" in stdout and "line 2" in stdout
    dead = [json.loads(x) for x in lines(out / "deadletter.jsonl")]
    assert [d["line"] for d in dead] == [2, 5, 7, 8, 10]  # line 4 is blank: skipped, not an error
    reasons = {d["line"]: d["reason"] for d in dead}
    assert "not valid JSON" in reasons[2]
    assert reasons[5].startswith("amount:")
    assert reasons[8].startswith("ts:")
    assert "event_type" in reasons[10]
    assert dead[1]["event_id"] == json.loads(bad_amount)["event_id"] and dead[1]["field"] == "amount"
    assert len(lines(out / "scores.jsonl")) == 5


@pytest.mark.parametrize("case", ["missing", "directory", "truncated-gzip", "bad-rules"])
def test_unusable_input_is_a_one_line_error(case: str, tmp_path: Path) -> None:
    target = tmp_path / "in.jsonl.gz"
    extra: list[str] = []
    if case == "directory":
        target = tmp_path
    elif case == "truncated-gzip":
        target.write_bytes(SAMPLE.read_bytes()[:20_000])
    elif case == "bad-rules":
        target = SAMPLE
        (tmp_path / "rules.yaml").write_text("version: 0\nrules: {}\n")
        extra = ["--rules", str(tmp_path / "rules.yaml")]
    proc = subprocess.run([*CLI, "replay", str(target), *extra], cwd=ROOT, capture_output=True, text=True, timeout=120)
    assert proc.returncode == 2
    err = proc.stderr.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("riskwatch replay: "), proc.stderr
    assert "Traceback" not in proc.stderr and proc.stdout == ""


def test_progress_bar_on_a_terminal_and_quiet_otherwise(tmp_path: Path) -> None:
    with gzip.open(SAMPLE, "rb") as f:
        (tmp_path / "in.jsonl").write_bytes(b"".join(f.readlines()[:6000]))
    args = [*CLI, "replay", str(tmp_path / "in.jsonl"), "--scores", str(tmp_path / "s.jsonl")]
    quiet = subprocess.run(args, cwd=ROOT, capture_output=True, text=True, timeout=300)
    assert quiet.returncode == 0 and quiet.stderr == ""
    leader, follower = pty.openpty()
    proc = subprocess.Popen(args, cwd=ROOT, stdout=subprocess.DEVNULL, stderr=follower)
    os.close(follower)
    try:
        seen = b""
        while True:
            try:
                chunk = os.read(leader, 4096)
            except OSError:  # EIO: the process closed its end of the terminal
                break
            if not chunk:
                break
            seen += chunk
        assert proc.wait(timeout=300) == 0
    finally:
        os.close(leader)
        if proc.poll() is None:
            proc.kill()
            proc.wait()
    text = seen.decode(errors="replace")
    assert "replaying" in text and "ev/s" in text and "100%" in text


def test_champion_challenger(stream: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    rules = (ROOT / "deploy" / "rules.yaml").read_text()
    challenger = rules.replace(
        "    category: large_transaction\n", "    category: large_transaction\n    enabled: false\n"
    )
    challenger = challenger.replace("{min_count: 3, window_seconds: 86400", "{min_count: 2, window_seconds: 86400")
    assert challenger.count("enabled: false") == 1 and "min_count: 2" in challenger
    (tmp_path / "b.yaml").write_text(challenger)
    write_jsonl(stream, tmp_path / "in.jsonl")
    code, stdout, _ = replay(
        capsys,
        tmp_path / "in.jsonl",
        "--alerts",
        tmp_path / "a.jsonl",
        "--against",
        tmp_path / "b.yaml",
        "--against-alerts",
        tmp_path / "b.jsonl",
        "--report",
        tmp_path / "report",
    )
    assert code == 0
    a = {x.alert_id: x for x in map(Alert.model_validate_json, lines(tmp_path / "a.jsonl"))}
    b = {x.alert_id: x for x in map(Alert.model_validate_json, lines(tmp_path / "b.jsonl"))}
    comp = json.loads((tmp_path / "report" / "report.json").read_text())["comparison"]
    assert comp["only_a"]["alert_ids"] == sorted(set(a) - set(b))
    assert comp["only_b"]["alert_ids"] == sorted(set(b) - set(a))
    assert comp["both"]["total"] == len(set(a) & set(b)) > 0
    large = sum(1 for x in a.values() if x.category == "large_transaction")
    assert large > 0 and comp["only_a"]["by_category"]["large_transaction"] == large
    assert not any(x.category == "large_transaction" for x in b.values())
    assert f"only A {comp['only_a']['total']:,}, both {comp['both']['total']:,}" in stdout
    # Pages: warnings any version of which reached high; the challenger's rule changes move them.
    paged = [
        {x.alert_id for x in map(Alert.model_validate_json, lines(tmp_path / f)) if x.level in ("high", "critical")}
        for f in ("a.jsonl", "b.jsonl")
    ]
    assert comp["pages"] == {"a": len(paged[0]), "b": len(paged[1])} and paged[0] != paged[1]
    assert f"pages A {len(paged[0]):,}, B {len(paged[1]):,}" in stdout
    html = (tmp_path / "report" / "report.html").read_text()
    assert f"A {len(paged[0]):,}, B {len(paged[1]):,}.</p>" in html


def test_evaluate_prints_metrics_and_needs_labels(
    stream: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    write_jsonl(stream, tmp_path / "in.jsonl")
    assert main(["evaluate", str(tmp_path / "in.jsonl")]) == 0
    out = capsys.readouterr().out
    assert "ROC AUC" in out and "account-level scenarios" in out and "fund_isolation" in out
    assert "liquidity_run" in out and "platform" in out
    # Another generator's longer scenario names keep their own column (they once ran into the level).
    renamed = [{**e, "scenario": "account_takeover_by_phishing"} if e.get("scenario") == "takeover" else e
               for e in stream]
    write_jsonl(renamed, tmp_path / "renamed.jsonl")
    assert main(["evaluate", str(tmp_path / "renamed.jsonl")]) == 0
    rows = [ln for ln in capsys.readouterr().out.splitlines() if ln.startswith("account_takeover_by_phishing")]
    assert len(rows) == 1 and rows[0].split()[:2] == ["account_takeover_by_phishing", "account"]
    write_jsonl([{k: v for k, v in e.items() if k != "label"} for e in stream], tmp_path / "unlabelled.jsonl")
    assert main(["evaluate", str(tmp_path / "unlabelled.jsonl")]) == 2
    assert "no labelled transactions" in capsys.readouterr().err


def test_labels_written_by_other_tools_read_as_0_and_1(
    stream: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    # pandas writes true/false, spreadsheets "1"/"0", Spark 1.0: the same labels, not invalid events.
    forms = [lambda v: bool(v), lambda v: str(v), lambda v: float(v), lambda v: ["false", "TRUE "][v]]
    relabelled = [{**e, "label": forms[i % 4](e["label"])} if "label" in e else e for i, e in enumerate(stream)]
    write_jsonl(stream, tmp_path / "plain.jsonl")
    write_jsonl(relabelled, tmp_path / "relabelled.jsonl")
    reports = []
    for name in ("plain", "relabelled"):
        assert main(["evaluate", "--json", str(tmp_path / f"{name}.jsonl")]) == 0
        reports.append(json.loads(capsys.readouterr().out))
    assert reports[1]["events"]["invalid"] == 0
    assert reports[1]["evaluation"] == reports[0]["evaluation"]
    # Anything else is still not a label: the event is set aside with the reason.
    write_jsonl([{**stream[0], "label": "fraud"}, *stream[1:]], tmp_path / "bad.jsonl")
    assert main(["evaluate", "--json", str(tmp_path / "bad.jsonl")]) == 0
    out = json.loads(capsys.readouterr().out)
    assert out["events"]["invalid"] == 1 and out["events"]["invalid_by_field"] == {"label": 1}


def test_evaluate_says_once_why_lines_were_refused_and_what_to_do(
    stream: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    naive = [{**e, "ts": e["ts"][:19]} if i % 3 == 0 else e for i, e in enumerate(stream)]
    write_jsonl(naive, tmp_path / "naive.jsonl")
    assert main(["evaluate", str(tmp_path / "naive.jsonl")]) == 0
    out = capsys.readouterr().out
    refused = sum(1 for i in range(len(stream)) if i % 3 == 0)
    assert out.count("timezone info") == 1, out
    assert f"{refused:,} invalid in ts, the first at line 1: ts: Input should have timezone info (write the time " \
           "with its offset, e.g. 2026-11-01T08:00:00Z" in out
    assert "--deadletter FILE" in out


def test_partition_of_a_key_matches_kafkas_murmur2() -> None:
    """Replay's own murmur2 (word at a time, and in bulk with numpy) gives Kafka's partitioner's partitions."""
    from kafka.partitioner.default import murmur2 as kafka_murmur2

    from models.pipeline import murmur2, partitions_for

    rng = random.Random(7)
    raw = [bytes(rng.randrange(256) for _ in range(n)) for n in range(300)]
    raw += [k.encode() for k in ("A0000001", "acct-é中文", "x" * 257, "a\x00")]
    assert [murmur2(k) for k in raw] == [kafka_murmur2(k) for k in raw]
    keys = ["".join(chr(rng.choice((rng.randrange(32, 127), rng.randrange(160, 40000), 0))) for _ in range(n))
            for n in rng.choices(range(45), k=2000)] + [f"A{i:07d}" for i in range(500)]
    for partitions in (1, 4, 7):
        expected = [(kafka_murmur2(k.encode()) & 0x7FFFFFFF) % partitions for k in keys]
        assert partitions_for(keys, partitions) == expected


def test_idle_accounts_are_evicted_and_scans_that_cannot_find_any_are_skipped() -> None:
    from models.pipeline import Pipeline
    from models.rules import load_catalogue
    from models.schemas import Transaction

    def txn(i: int, account: str, ts: float) -> Transaction:
        return Transaction.model_validate({
            "event_id": f"e{i}", "ts": datetime.fromtimestamp(ts).astimezone().isoformat(), "account_id": account,
            "counterparty_id": "M1", "amount": 10.0, "currency": "CNY", "direction": "debit",
            "txn_type": "payment", "channel": "app"})

    t0 = 1_790_000_000.0
    pipe = Pipeline(load_catalogue(), ttl=3600.0)
    pipe.process(txn(0, "idle", t0))
    for i in range(1, 50_000):  # the 50,000th event triggers the scan, within the TTL of "idle"
        pipe.process(txn(i, "busy", t0 + i * 0.05))
    assert pipe.evicted == 0 and "idle" in pipe.accounts
    for i in range(50_000, 100_000):  # the next scan comes 2 h later: "idle" goes, "busy" stays
        pipe.process(txn(i, "busy", t0 + 7200 + i * 0.001))
    assert pipe.evicted == 1 and set(pipe.accounts) == {"busy"}


def test_the_page_level_comes_from_the_setting_and_a_misspelt_one_is_said_once(
    stream: list[dict[str, Any]], tmp_path: Path, capsys: pytest.CaptureFixture[str], monkeypatch: pytest.MonkeyPatch
) -> None:
    from app.settings import get_settings

    write_jsonl(stream, tmp_path / "in.jsonl")
    try:
        for level, counted in (("high", ("high", "critical")), ("critical", ("critical",))):
            monkeypatch.setenv("RISKWATCH_PAGE_MIN_LEVEL", level)
            get_settings.cache_clear()
            code, out, _ = replay(capsys, tmp_path / "in.jsonl", "--alerts", tmp_path / f"{level}.jsonl")
            paged = {a.alert_id for a in map(Alert.model_validate_json, lines(tmp_path / f"{level}.jsonl"))
                     if a.level in counted}
            assert code == 0 and paged
            assert f"pages (warnings reaching {level} or above, RISKWATCH_PAGE_MIN_LEVEL): {len(paged):,}," in out
        assert main(["evaluate", str(tmp_path / "in.jsonl")]) == 0
        assert "pages by source, false of all: " in capsys.readouterr().out
        # A level that does not exist would page nothing: it stops the command with one line instead.
        monkeypatch.setenv("RISKWATCH_PAGE_MIN_LEVEL", "urgent")
        get_settings.cache_clear()
        assert main(["evaluate", str(tmp_path / "in.jsonl")]) == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and "RISKWATCH_PAGE_MIN_LEVEL='urgent'" in err and "'critical'" in err
    finally:
        monkeypatch.delenv("RISKWATCH_PAGE_MIN_LEVEL")
        get_settings.cache_clear()


def test_a_bad_secret_setting_is_named_without_its_value() -> None:
    from pydantic import ValidationError

    from app.settings import Settings, _explain

    with pytest.raises(ValidationError) as caught:
        Settings(kafka_sasl_password=["hunter2"])  # type: ignore[arg-type]
    text = _explain(caught.value)
    assert "RISKWATCH_KAFKA_SASL_PASSWORD=(withheld)" in text and "hunter2" not in text


def test_a_kafka_replay_reads_labels_of_schema_registry_framed_events(make_txn) -> None:
    """Kafka replay's evaluation keeps a framed event's labels (its scenario), as a plain one's."""
    from app.replay import Collector, DeadLetters

    col = Collector(DeadLetters(None), "kafka:test")
    body = json.dumps(make_txn(label=1, scenario="takeover", scenario_instance="ato:1")).encode()
    assert col.add({"offset": 0}, b"\x00\x00\x00\x00\x07" + body) is not None
    assert col.dead.count == 0 and [x["scenario"] for x in col.loaded.labelled] == ["takeover"]
