"""Logging setup: readable lines by default, JSON lines (with event id, topic, partition, offset) on request.

Client libraries log every failed retry: with the broker gone a worker's dozen Kafka clients wrote
about 120 lines a second, 11,000 before it exited (issue 17). `RepeatSummary` lets the first record
of each kind through and then one line per window with the count.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from datetime import UTC, datetime

from app.settings import get_settings

_CONTEXT = ("event_id", "topic", "partition", "offset", "reason")
# Loggers whose repeated warnings and errors are summarised: the Kafka clients and Faust (with mode,
# its service library), and riskwatch's dead letters (each is on risk.deadletter with its reason).
# riskwatch's other records always pass: each names its event or partition.
SUMMARISED = ("aiokafka", "kafka", "faust", "mode", "riskwatch.deadletter")
SUMMARY_WINDOW = 10.0


class JsonFormatter(logging.Formatter):
    """One JSON object per record, carrying the processing context riskwatch attaches to errors."""

    def format(self, record: logging.LogRecord) -> str:
        out = {
            "ts": datetime.fromtimestamp(record.created, tz=UTC).isoformat(),
            "level": record.levelname,
            "logger": record.name,
            "message": record.getMessage(),
        }
        for key in _CONTEXT:
            if hasattr(record, key):
                out[key] = getattr(record, key)
        if record.exc_info:
            out["exc"] = self.formatException(record.exc_info)
        return json.dumps(out, default=str)


@dataclass
class _Window:
    opened: float
    suppressed: int = 0
    last: logging.LogRecord | None = None


class RepeatSummary(logging.Handler):
    """Pass records to `target`, collapsing repeats of one kind (logger + message template) into a count.

    The first record of a kind goes through and opens a window of `window` seconds; further records
    of that kind are counted, not written. When a window ends (noticed at the next record of any
    kind, or at flush()) its count is written as one line, the last message with "(repeated N times
    in the last 10 s)", and the kind keeps being counted until a whole window passes without it.
    A flood is then one line per kind per window. Only warnings and worse from loggers under
    `prefixes` are summarised; `clock` is injectable so tests need not sleep.
    """

    def __init__(self, target: logging.Handler, prefixes: tuple[str, ...] = SUMMARISED,
                 window: float = SUMMARY_WINDOW, level: int = logging.WARNING,
                 clock: Callable[[], float] = time.monotonic) -> None:
        super().__init__()
        self.target, self.prefixes, self.window, self.min_level, self.clock = target, prefixes, window, level, clock
        self.windows: dict[tuple[str, object], _Window] = {}

    def _summarised(self, record: logging.LogRecord) -> bool:
        name = record.name
        return record.levelno >= self.min_level and any(
            name == p or name.startswith(p + ".") for p in self.prefixes)

    def emit(self, record: logging.LogRecord) -> None:
        now = self.clock()
        self._write_due(now)
        if self._summarised(record):
            key = (record.name, record.msg)
            win = self.windows.get(key)
            if win is not None:
                win.suppressed += 1
                win.last = record
                return
            self.windows[key] = _Window(now)
        self.target.handle(record)

    def _write_due(self, now: float, everything: bool = False) -> None:
        # A window that ended with repeats writes their count and opens the next one (the kind is
        # still repeating: it gets one line per window); one that ended quiet is forgotten.
        for key, win in list(self.windows.items()):
            if everything or now - win.opened >= self.window:
                del self.windows[key]
                if win.last is not None:
                    self.target.handle(self._summary(win, now))
                    if not everything:
                        self.windows[key] = _Window(now)

    def _summary(self, win: _Window, now: float) -> logging.LogRecord:
        last = win.last
        assert last is not None
        text = f"{last.getMessage()} (repeated {win.suppressed} times in the last {now - win.opened:.0f} s)"
        out = logging.LogRecord(last.name, last.levelno, last.pathname, last.lineno, text, None, None,
                                last.funcName)
        out.created = last.created
        return out

    def flush(self) -> None:
        """Write every pending count now (at exit, so the last window's repeats are not lost)."""
        self.acquire()
        try:
            self._write_due(self.clock(), everything=True)
        finally:
            self.release()
        self.target.flush()

    def close(self) -> None:
        self.flush()
        self.target.close()
        super().close()


class Retries:
    """The log of one retrying loop: a failure with its traceback once, a line a minute while it lasts, the recovery.

    A loop that retries every few seconds wrote a traceback each time: a broker refusal or a record
    no client could read was hundreds of identical tracebacks an hour. Now a failure is told in full
    when it starts (or when another kind of exception takes over); while it goes on, one line every
    `every` seconds with the count and the latest message; and one line when the loop works again.
    A failure more than `every` seconds after the last one is a new one (loops that never say they
    work again, such as followers, are told afresh after a healthy spell).
    """

    def __init__(self, log: logging.Logger, what: str, every: float = 60.0,
                 clock: Callable[[], float] = time.monotonic) -> None:
        self.log, self.what, self.every, self.clock = log, what, every, clock
        self.count = 0
        self.kind: type[BaseException] | None = None
        self.since = self.told = self.last = 0.0

    def failed(self, exc: BaseException, then: str) -> int:
        """Count a failure (`then`: what the loop does next); tell it if it is new or due. Return the count in a row."""
        now = self.clock()
        if self.count and now - self.last > self.every:
            self.count, self.kind = 0, None
        self.count += 1
        self.last = now
        if self.count == 1:
            self.since = now
        if type(exc) is not self.kind:
            self.kind, self.told = type(exc), now
            self.log.error("%s failed: %s; %s", self.what, exc, then, exc_info=exc)
        elif now - self.told >= self.every:
            self.told = now
            self.log.error("%s still failing (%d times in a row in %.0f s): %s; %s", self.what, self.count,
                           now - self.since, exc, then)
        return self.count

    def ok(self) -> None:
        """The loop worked: tell the recovery of a failure, and forget it."""
        if self.count:
            self.log.info("%s works again after %d failure%s in %.0f s", self.what, self.count,
                          "" if self.count == 1 else "s", self.clock() - self.since)
            self.count, self.kind = 0, None


def setup_logging() -> None:
    """Configure the root logger from RISKWATCH_LOG_LEVEL and RISKWATCH_LOG_JSON."""
    s = get_settings()
    handler = logging.StreamHandler()
    if s.log_json:
        handler.setFormatter(JsonFormatter())
    else:
        handler.setFormatter(logging.Formatter("%(asctime)s %(levelname)s %(name)s: %(message)s"))
    root = logging.getLogger()
    root.handlers[:] = [RepeatSummary(handler)]
    root.setLevel(s.log_level.upper())
    # Client libraries log every refused reconnect as an error; riskwatch reports unreachable brokers itself.
    logging.getLogger("kafka").setLevel(logging.CRITICAL)
    logging.getLogger("aiokafka").setLevel(logging.WARNING)


def flush_logging() -> None:
    """Write pending repeat counts and flush every root handler (before an abrupt exit)."""
    for h in logging.getLogger().handlers:
        try:
            h.flush()
        except Exception:  # noqa: BLE001 - flushing is best effort on the way out
            pass


__all__ = ["SUMMARISED", "SUMMARY_WINDOW", "JsonFormatter", "RepeatSummary", "Retries", "flush_logging",
           "setup_logging"]
