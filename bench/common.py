"""What every benchmark shares: the generated data, the figures it reports, machine facts and the result files."""

from __future__ import annotations

import json
import os
import platform
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import asdict, dataclass, field
from datetime import UTC, datetime, timedelta
from importlib import metadata
from pathlib import Path
from typing import Any

ROOT = Path(__file__).resolve().parent.parent
RESULTS = ROOT / "bench" / "results"
EVENTS_PER_ACCOUNT = 35  # synth gives ~11.7 transactions per account and day; 3 days of history each


@dataclass
class Figure:
    """One measured number, with the ceiling it is compared to and the target the issue sets."""

    group: str
    name: str
    label: str
    value: float
    unit: str
    ceiling: str | None = None  # name of the figure this one is divided by
    ratio: float | None = None
    target: str | None = None  # as a person reads it, e.g. ">= 30,000/s"
    met: bool | None = None
    per_cpu: float | None = None  # the same rate per CPU-second used: what one dedicated core would do
    load_before: list[float] = field(default_factory=list)  # 1, 5, 15 min load average before measuring
    detail: dict[str, Any] = field(default_factory=dict)


@dataclass
class Data:
    """Pre-serialised contract transactions: Kafka keys (account ids) and JSON values, in event-time order."""

    keys: list[bytes]
    values: list[bytes]
    accounts: int
    generate_seconds: float

    def __len__(self) -> int:
        return len(self.values)


def transactions(n: int, seed: int = 7) -> Data:
    """Generate n synthetic transactions (models.synth, labelled scenarios included) and serialise them once."""
    from models import synth

    t0 = time.perf_counter()
    accounts = max(20, n // EVENTS_PER_ACCOUNT + 1)
    days = 3.0
    while True:
        # Start in the past whatever today's date is: the worker rejects events from the future.
        start = min(synth.DEFAULT_START, datetime.now(UTC) - timedelta(days=days + 1))
        events = [e for e in synth.generate(seed=seed, accounts=accounts, days=days, instruments=0, start=start)
                  if e["event_type"] == "transaction"]
        if len(events) >= n:
            break
        days *= 1.5 * n / max(len(events), 1)
    events = events[:n]
    keys = [e["account_id"].encode() for e in events]
    values = [json.dumps(e, separators=(",", ":")).encode() for e in events]
    return Data(keys, values, len(set(keys)), time.perf_counter() - t0)


def loadavg() -> list[float]:
    """The 1, 5 and 15 minute load averages: the machine is shared, so every figure records them."""
    return [round(x, 2) for x in os.getloadavg()]


@dataclass
class Clock:
    """Wall and process-CPU seconds of a measured block."""

    wall: float = 0.0
    cpu: float = 0.0


@contextmanager
def clocked() -> Iterator[Clock]:
    """Measure the wall and CPU time of a block (CPU time shows how much of the wall time was waiting)."""
    c = Clock()
    w0, c0 = time.perf_counter(), time.process_time()
    try:
        yield c
    finally:
        c.wall = time.perf_counter() - w0
        c.cpu = time.process_time() - c0


def machine() -> dict[str, Any]:
    """What the numbers were measured on: CPUs, memory, Python and the versions of the parts under test."""
    model = ""
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
        mem_kib = int(Path("/proc/meminfo").read_text().split()[1])
    except (OSError, ValueError, IndexError):
        mem_kib = 0
    versions: dict[str, str | None] = {}
    for pkg in ("faust-streaming", "aiokafka", "kafka-python", "river", "pydantic", "pydantic-core", "msgspec"):
        try:
            versions[pkg] = metadata.version(pkg)
        except metadata.PackageNotFoundError:
            versions[pkg] = None
    return {
        "nproc": len(os.sched_getaffinity(0)),
        "cpu_count": os.cpu_count(),
        "cpu_model": model,
        "memory_gib": round(mem_kib / 2**20, 1),
        "python": platform.python_version(),
        "platform": platform.platform(),
        "versions": versions,
    }


class Report:
    """Collects the figures of one run, relates each to its ceiling, prints the table and writes the JSON."""

    def __init__(self, command: str, options: dict[str, Any]) -> None:
        self.command = command
        self.options = options
        self.started = datetime.now(UTC).isoformat(timespec="seconds")
        self.machine = machine()
        self.load_at_start = loadavg()
        self.figures: list[Figure] = []
        self.notes: dict[str, list[str]] = {}

    def add(self, fig: Figure) -> Figure:
        """Record a figure, computing its ratio to its ceiling when that ceiling was measured in this run."""
        if fig.per_cpu is None:
            cpu_rate = fig.detail.get("events_per_cpu_second") or fig.detail.get("events_per_worker_cpu_second")
            fig.per_cpu = float(cpu_rate) if cpu_rate else None
        if fig.ceiling is not None:
            base = self.get(fig.ceiling)
            if base is not None and base.value > 0:
                fig.ratio = fig.value / base.value
        self.figures.append(fig)
        return fig

    def note(self, group: str, text: str) -> None:
        """Attach a remark (a skipped figure, a caveat) to a group; it is printed and saved."""
        self.notes.setdefault(group, []).append(text)

    def get(self, name: str) -> Figure | None:
        """The figure recorded under `name`, if any."""
        return next((f for f in self.figures if f.name == name), None)

    def table(self) -> str:
        """The figures as a fixed-width table a person can read in a terminal or paste into Markdown."""
        head = ("figure", "value", "unit", "per CPU-second", "ratio to ceiling", "target", "met", "load1")
        rows = [head]
        for f in self.figures:
            ratio = ""
            if f.ratio is not None and f.ceiling is not None:
                ratio = f"{f.ratio:.1%} of {f.ceiling}" if f.ratio < 10 else f"{f.ratio:.1f}x {f.ceiling}"
            met = "" if f.met is None else ("yes" if f.met else "NO")
            rows.append((f.label, _num(f.value), f.unit, _num(f.per_cpu) if f.per_cpu else "", ratio, f.target or "",
                         met, f"{f.load_before[0]:.1f}" if f.load_before else ""))
        widths = [max(len(r[i]) for r in rows) for i in range(len(head))]
        lines = []
        for k, r in enumerate(rows):
            cells = [c.rjust(w) if i in (1, 3, 7) else c.ljust(w)
                     for i, (c, w) in enumerate(zip(r, widths, strict=True))]
            lines.append("| " + " | ".join(cells) + " |")
            if k == 0:
                lines.append("|" + "|".join("-" * (w + 2) for w in widths) + "|")
        for group, notes in self.notes.items():
            for text in notes:
                lines.append(f"note ({group}): {text}")
        return "\n".join(lines)

    def write(self, out_dir: Path, groups: list[str]) -> list[Path]:
        """Write bench/results/<group>.json for every group run, each with the machine and load facts."""
        out_dir.mkdir(parents=True, exist_ok=True)
        written = []
        for group in groups:
            figs = [f for f in self.figures if f.group == group]
            # A ratio's denominator lives in another group's file; copy it so each file stands alone.
            ceilings = {f.ceiling for f in figs if f.ceiling}
            doc = {
                "group": group,
                "command": self.command,
                "options": self.options,
                "started": self.started,
                "finished": datetime.now(UTC).isoformat(timespec="seconds"),
                "machine": self.machine,
                "load_at_start": self.load_at_start,
                "load_at_end": loadavg(),
                "figures": [asdict(f) for f in figs],
                "ceilings": {c: asdict(f) for c in sorted(ceilings) if (f := self.get(c)) is not None},
                "notes": self.notes.get(group, []),
            }
            path = out_dir / f"{group}.json"
            path.write_text(json.dumps(doc, indent=1, default=str) + "\n")
            written.append(path)
        return written


def _num(x: float) -> str:
    if abs(x) >= 100:
        return f"{x:,.0f}"
    if abs(x) >= 1:
        return f"{x:,.1f}"
    return f"{x:.3g}"


__all__ = ["RESULTS", "ROOT", "Clock", "Data", "Figure", "Report", "clocked", "loadavg", "machine", "transactions"]
