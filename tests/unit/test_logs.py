"""Floods of one error: a client's become one line per 10 s with a count (issue 17), a retrying loop's one a minute."""

from __future__ import annotations

import logging
from collections.abc import Callable, Iterator

import pytest

from app.logs import RepeatSummary, Retries


class Clock:
    """A clock the test moves by hand."""

    def __init__(self) -> None:
        self.now = 1000.0

    def __call__(self) -> float:
        return self.now


class Lines(logging.Handler):
    """Keeps each formatted line it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.lines: list[str] = []

    def emit(self, record: logging.LogRecord) -> None:
        self.lines.append(f"{record.name} {record.levelname} {record.getMessage()}")


@pytest.fixture
def clock() -> Clock:
    return Clock()


@pytest.fixture
def out() -> Lines:
    return Lines()


@pytest.fixture
def emit(clock: Clock, out: Lines) -> Iterator[Callable[..., None]]:
    """emit(logger, msg, *args, level=...) through a RepeatSummary over `out`."""
    summary = RepeatSummary(out, clock=clock)

    def emit(name: str, msg: str, *args: object, level: int = logging.ERROR) -> None:
        summary.handle(logging.LogRecord(name, level, __file__, 1, msg, args, None))

    emit.summary = summary  # type: ignore[attr-defined]
    yield emit
    summary.close()


def flood(emit: Callable[..., None], clock: Clock, seconds: float, per_second: int = 128) -> None:
    """What a worker whose broker is gone logged: one connection error per retry, about 120 a second.

    128 a second keeps the clock's steps exact in binary floating point.
    """
    for _ in range(int(seconds * per_second)):
        emit("aiokafka", "Unable connect to node with id %s: %s", 1, "[Errno 111] Connect call failed")
        clock.now += 1 / per_second


def test_a_flood_is_one_line_per_window_with_a_count(emit, clock, out):
    flood(emit, clock, 30.0)
    emit("riskwatch.worker", "still here", level=logging.INFO)  # any record notices the window ended
    assert out.lines[0] == "aiokafka ERROR Unable connect to node with id 1: [Errno 111] Connect call failed"
    summaries = [line for line in out.lines if "repeated" in line]
    assert len(out.lines) == 1 + len(summaries) + 1, out.lines
    assert len(summaries) == 3
    assert summaries[0].endswith("(repeated 1279 times in the last 10 s)"), summaries[0]
    # Every record is accounted for: the first written, the rest counted.
    counted = sum(int(line.split("(repeated ")[1].split()[0]) for line in summaries)
    assert 1 + counted == 30 * 128


def test_kinds_are_counted_apart_by_logger_and_template(emit, clock, out):
    for i in range(5):
        emit("aiokafka", "Unable connect to node with id %s: %s", i, "refused")
        emit("aiokafka.consumer.group_coordinator", "Heartbeat failed: %r", i)
        emit("aiokafka", "Unable to update metadata from %s", [i])
    assert out.lines == ["aiokafka ERROR Unable connect to node with id 0: refused",
                         "aiokafka.consumer.group_coordinator ERROR Heartbeat failed: 0",
                         "aiokafka ERROR Unable to update metadata from [0]"]
    clock.now += 10.0
    emit.summary.flush()  # type: ignore[attr-defined]
    assert sorted(out.lines[3:]) == [
        "aiokafka ERROR Unable connect to node with id 4: refused (repeated 4 times in the last 10 s)",
        "aiokafka ERROR Unable to update metadata from [4] (repeated 4 times in the last 10 s)",
        "aiokafka.consumer.group_coordinator ERROR Heartbeat failed: 4 (repeated 4 times in the last 10 s)",
    ]


def test_own_records_info_and_other_libraries_pass_unchanged(emit, out):
    for _ in range(3):
        emit("riskwatch.agents.transactions", "transaction batch failed (%d in a row)", 1)
        emit("faust.worker", "[^Worker]: Stopping...", level=logging.INFO)
        emit("urllib3", "Retrying %s", "x")
        emit("faustian", "not faust's logger %s", 1)
    assert len(out.lines) == 12


def test_a_kind_that_stops_is_forgotten_and_a_lone_record_has_no_summary(emit, clock, out):
    emit("faust.transport.drivers.aiokafka", "Heartbeat failed: %r", "x", level=logging.WARNING)
    clock.now += 11.0
    emit("faust.transport.drivers.aiokafka", "Heartbeat failed: %r", "y", level=logging.WARNING)
    clock.now += 11.0
    emit.summary.flush()  # type: ignore[attr-defined]
    assert out.lines == ["faust.transport.drivers.aiokafka WARNING Heartbeat failed: 'x'",
                         "faust.transport.drivers.aiokafka WARNING Heartbeat failed: 'y'"]


def test_flush_writes_the_last_windows_count(emit, clock, out):
    flood(emit, clock, 4.0, per_second=8)
    emit.summary.flush()  # type: ignore[attr-defined]
    assert out.lines[-1].endswith("(repeated 31 times in the last 4 s)"), out.lines
    emit.summary.flush()  # type: ignore[attr-defined]
    assert len(out.lines) == 2


def test_setup_logging_installs_it(monkeypatch):
    from app import logs

    root = logging.getLogger()
    saved, level = root.handlers[:], root.level
    try:
        logs.setup_logging()
        (handler,) = root.handlers
        assert isinstance(handler, RepeatSummary)
        assert isinstance(handler.target, logging.StreamHandler)
    finally:
        root.handlers[:] = saved
        root.setLevel(level)


def test_a_retrying_loop_tells_a_failure_once_then_a_line_a_minute_then_its_recovery(clock, out):
    """Measured: the transaction engine wrote a traceback every 5 s for as long as a codec was missing."""
    log = logging.getLogger("riskwatch.test.retries")
    log.addHandler(out)
    log.propagate = False
    log.setLevel(logging.INFO)
    tracebacks = []
    out.emit = lambda record: (out.lines.append(f"{record.levelname} {record.getMessage()}"),  # type: ignore[method-assign]
                               tracebacks.append(record.exc_info is not None))
    try:
        retries = Retries(log, "transaction batch", clock=clock)
        retries.ok()  # nothing failed: nothing to say
        for i in range(30):  # five minutes of a retry every 10 s
            assert retries.failed(ValueError(f"codec missing ({i})"), "resuming") == i + 1
            clock.now += 10.0
        retries.failed(OSError("broker gone"), "resuming")  # another kind takes over: told in full
        retries.ok()
        assert out.lines == [
            "ERROR transaction batch failed: codec missing (0); resuming",
            "ERROR transaction batch still failing (7 times in a row in 60 s): codec missing (6); resuming",
            "ERROR transaction batch still failing (13 times in a row in 120 s): codec missing (12); resuming",
            "ERROR transaction batch still failing (19 times in a row in 180 s): codec missing (18); resuming",
            "ERROR transaction batch still failing (25 times in a row in 240 s): codec missing (24); resuming",
            "ERROR transaction batch failed: broker gone; resuming",
            "INFO transaction batch works again after 31 failures in 300 s",
        ]
        assert tracebacks == [True, False, False, False, False, True, False], "a traceback when a failure starts"
        out.lines.clear()
        clock.now += 600.0
        retries.failed(ValueError("again"), "resuming")  # after a healthy spell: a new failure, in full
        clock.now += 120.0
        retries.failed(ValueError("later"), "resuming")  # two minutes apart: not one failure going on
        assert out.lines == ["ERROR transaction batch failed: again; resuming",
                             "ERROR transaction batch failed: later; resuming"]
    finally:
        log.removeHandler(out)


def test_a_flood_of_dead_letters_or_scoring_faults_is_one_line_per_kind_then_a_count(emit, clock, out):
    """Each such record is on risk.deadletter with its reason: the log need not carry thousands a second.

    Per kind (the reason's field, as the metric labels it): a flood of one kind hides no other kind's first.
    """
    for i in range(500):
        emit("riskwatch.deadletter", "dead-lettered input (invalid_json) from %s[%s]@%s: %s", "risk.transactions", 0,
             i, "not valid JSON", level=logging.WARNING)
        emit("riskwatch.deadletter.transactions", "scoring failed (KeyError)")
    emit("riskwatch.deadletter.transactions", "scoring failed (ZeroDivisionError)")  # another kind: told
    clock.now += 10.0
    emit.summary.flush()  # type: ignore[attr-defined]
    assert out.lines == [
        "riskwatch.deadletter WARNING dead-lettered input (invalid_json) from risk.transactions[0]@0: not valid JSON",
        "riskwatch.deadletter.transactions ERROR scoring failed (KeyError)",
        "riskwatch.deadletter.transactions ERROR scoring failed (ZeroDivisionError)",
        "riskwatch.deadletter WARNING dead-lettered input (invalid_json) from risk.transactions[0]@499: not valid "
        "JSON (repeated 499 times in the last 10 s)",
        "riskwatch.deadletter.transactions ERROR scoring failed (KeyError) (repeated 499 times in the last 10 s)",
    ]
