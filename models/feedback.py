"""Analysts' verdicts fed back into scoring: per (detector, reason code) precision moves the operating point.

A verdict (`confirmed` or `false_positive` on a resolved warning) counts against one key: for a
model warning its *lead* reason code (the first of `models.detector.explain`, the surprise that
carried most of the evidence), for a rule warning the rule id. Counting a verdict against every
code of a warning would let one noisy code drag its companions down: `new_device` comes with most
takeover warnings, and would be punished for every false `amount` warning it merely accompanied.

`FeedbackBook.factor` is the `models.scoring.Feedback` the scorer asks: the multiplier of the
share of events a finding may warn at. It is the key's smoothed precision over a reference:

    factor = clamp(((confirmed + A) / (confirmed + false_positive + A + B)) / REFERENCE, 0.25, 2.0)

with a Beta(A=2, B=2) prior (mean REFERENCE = 0.5) and neutral (1.0) until the key holds 5
verdicts (old ones weigh less in the precision, but count here: a key once judged stays judged).
All false positives: 5 give 0.44, 12 reach the floor 0.25; all confirmed: 5 give 1.56, 20 give
1.83 (2.0 is never quite reached). The absolute level matters less than it seems: each partition's
budget controller (models.detector.SurpriseDetector.spend) keeps model warnings at the budget, so a
factor below 1 on one code hands that code's share of the budget to the others, and confirmed codes
take more of it. The floor of 0.25 keeps a noisy code audible: its strongest cases (calibrated
scores in the top quarter of the share) still warn.

Verdicts fade with a half-life of HALF_LIFE_DAYS = 14 days, measured from the key's newest
verdict (not the wall clock): the factor is a function of the set of verdicts alone, so every
worker and an offline replay rebuild the same numbers whatever order the verdicts arrive in. A
verdict a quarter old weighs 1/90. Each key keeps its newest MAX_VERDICTS = 512 verdicts (about
25 kB as JSON): at 512 the precision's standard error is ~0.02, older ones would add nothing.

Each alert counts once: the book holds a verdict per alert_id, so a redelivered resolve changes
nothing and a changed verdict (resolve, reopen, resolve again) replaces the old one.

The rules a regulator requires (`REQUIRED_RULES`) are never keys: their verdicts are counted in
`riskwatch_verdicts_total` only and nothing here can make them harder to raise. Only the rules
whose operating point scoring lets verdicts move (`ADAPTIVE_RULES`) are keys; verdicts on other
rules would move a number nothing reads, and an audit record saying so would mislead.

An `Adaptation` is written for the audit whenever a verdict moves a key's factor into another
band of BANDS_PER_OCTAVE = 8 per doubling (a 9% step): deterministic from the state before and
after, so a redelivered verdict cannot audit twice, and many small moves cannot drift unaudited.

>>> book = FeedbackBook()
>>> moves = [book.record(note_for(f"a{i}", "surprise", ["hour", "amount"], "false_positive", 1e9 + i))
...          for i in range(12)]
>>> [round(book.factor("surprise", ["hour"]), 3), book.factor("surprise", ["amount"])]
[0.25, 1.0]
>>> [m.new_factor for m in moves if m is not None][0]  # neutral until 5 verdicts, then 4/9 / 0.5
0.4444
>>> note_for("b1", "rule:structuring", ["structuring"], "false_positive", 1e9) is None  # required: never a key
True
>>> FeedbackBook.from_json(book.to_json()).factor("surprise", ["hour"]) == book.factor("surprise", ["hour"])
True
"""

from __future__ import annotations

import hashlib
import json
import math
from collections.abc import Iterator, Sequence
from dataclasses import dataclass
from datetime import UTC, datetime
from typing import Any, Literal

from pydantic import AwareDatetime, BaseModel, ConfigDict, Field

from models.rules import ADAPTIVE_RULES, REQUIRED_RULES
from models.scoring import MODEL_DETECTOR

Verdict = Literal["confirmed", "false_positive"]
FORMAT_VERSION = 1
PRIOR_CONFIRMED = 2.0  # Beta prior: as if 2 confirmed and 2 false positives had been seen
PRIOR_FALSE = 2.0
REFERENCE = PRIOR_CONFIRMED / (PRIOR_CONFIRMED + PRIOR_FALSE)  # precision at which a key is neutral
MIN_FACTOR = 0.25
MAX_FACTOR = 2.0
MIN_VERDICTS = 5  # verdicts a key must hold before it moves at all (counted, not weighed)
HALF_LIFE_DAYS = 14.0
MAX_VERDICTS = 512
BANDS_PER_OCTAVE = 8

_HALF_LIFE = HALF_LIFE_DAYS * 86_400.0


def key_of(detector: str, codes: Sequence[str]) -> tuple[str, str] | None:
    """The (detector, code) a verdict on a warning counts against; None when verdicts must not move it.

    A rule's code is its type (models/rules/): a second instance of a rule type, under another
    id, is a key of its own and is as adaptive, or as required, as its type.

    >>> key_of("surprise", ["amount", "hour"]), key_of("rule:velocity", []), key_of("rule:large_transaction", [])
    (('surprise', 'amount'), ('rule:velocity', 'velocity'), None)
    >>> key_of("rule:velocity_cards", ["velocity"]), key_of("rule:large_wire", ["large_transaction"])
    (('rule:velocity_cards', 'velocity'), None)
    """
    if detector == MODEL_DETECTOR:
        return (detector, codes[0]) if codes else None
    if detector.startswith("rule:"):
        kind = codes[0] if codes else detector[5:]
        if kind in REQUIRED_RULES or detector[5:] in REQUIRED_RULES or kind not in ADAPTIVE_RULES:
            return None
        return detector, kind
    return None


def key_name(detector: str, code: str) -> str:
    """The key as one string: `surprise/amount`, `rule:velocity/velocity` (risk.audit, logs)."""
    return f"{detector}/{code}"


class VerdictNote(BaseModel):
    """One alert's verdict as it counts for feedback (topic risk.feedback, key alert_id, compacted).

    One record per alert: compaction keeps the newest, which is exactly the book's rule (a changed
    verdict replaces the old one), and every worker rebuilds the same book from the topic.
    """

    model_config = ConfigDict(extra="ignore", frozen=True)

    version: int = FORMAT_VERSION
    alert_id: str = Field(min_length=1, max_length=128)
    detector: str = Field(min_length=1, max_length=128)
    code: str = Field(min_length=1, max_length=128)
    verdict: Verdict
    ts: AwareDatetime
    by: str | None = None


def note_for(alert_id: str, detector: str, codes: Sequence[str], verdict: str, ts: float,
             by: str | None = None) -> VerdictNote | None:
    """The feedback record of a verdict on a warning, or None if its key is not adaptive."""
    key = key_of(detector, codes)
    if key is None or verdict not in ("confirmed", "false_positive"):
        return None
    return VerdictNote(alert_id=alert_id, detector=key[0], code=key[1], verdict=verdict,  # type: ignore[arg-type]
                       ts=datetime.fromtimestamp(ts, tz=UTC), by=by)


@dataclass(frozen=True, slots=True)
class Counts:
    """A key's verdicts, decayed to its newest: confirmed, false positives, and how many are held."""

    confirmed: float
    false_positive: float
    held: int


@dataclass(frozen=True, slots=True)
class Adaptation:
    """A verdict that moved a key's factor into another band: what the audit records."""

    detector: str
    code: str
    old_factor: float
    new_factor: float
    counts: Counts
    alert_id: str
    verdict: str
    ts: float  # the verdict's time, epoch seconds

    @property
    def direction(self) -> str:
        """`down` (more evidence needed) or `up` (less)."""
        return "down" if self.new_factor < self.old_factor else "up"

    @property
    def audit_id(self) -> str:
        """Deterministic: a redelivered verdict produces the same id."""
        raw = f"feedback|{self.detector}|{self.code}|{self.alert_id}|{self.verdict}|{self.new_factor}"
        return hashlib.sha256(raw.encode()).hexdigest()[:24]


class FeedbackAudit(BaseModel):
    """An adaptation on risk.audit (key: the feedback key); `kind` tells it from lifecycle records."""

    kind: Literal["feedback"] = "feedback"
    audit_id: str
    action: Literal["adapt"] = "adapt"
    detector: str
    code: str
    key: str
    direction: Literal["down", "up"]
    old_factor: float
    new_factor: float
    confirmed: float
    false_positive: float
    verdicts_held: int
    alert_id: str = Field(description="the alert whose verdict caused it")
    verdict: Verdict
    by: str
    ts: AwareDatetime
    recorded_at: AwareDatetime

    @classmethod
    def of(cls, a: Adaptation, by: str, now: float) -> FeedbackAudit:
        """The audit record of an adaptation; `by` is the analyst whose verdict caused it."""
        return cls(audit_id=a.audit_id, detector=a.detector, code=a.code, key=key_name(a.detector, a.code),
                   direction=a.direction, old_factor=a.old_factor, new_factor=a.new_factor,  # type: ignore[arg-type]
                   confirmed=round(a.counts.confirmed, 4), false_positive=round(a.counts.false_positive, 4),
                   verdicts_held=a.counts.held, alert_id=a.alert_id, verdict=a.verdict,  # type: ignore[arg-type]
                   by=by, ts=datetime.fromtimestamp(a.ts, tz=UTC), recorded_at=datetime.fromtimestamp(now, tz=UTC))


def band(factor: float) -> int:
    """The 1/8-octave band a factor lies in (0 = neutral)."""
    return round(math.log2(factor) * BANDS_PER_OCTAVE)


class _Key:
    """One key's verdicts: alert_id -> (verdict, ts), newest MAX_VERDICTS kept; its factor cached."""

    __slots__ = ("factor", "verdicts")

    def __init__(self) -> None:
        self.verdicts: dict[str, tuple[str, float]] = {}
        self.factor = 1.0

    def counts(self) -> Counts:
        v = self.verdicts
        if not v:
            return Counts(0.0, 0.0, 0)
        newest = max(ts for _, ts in v.values())
        c = f = 0.0
        for verdict, ts in v.values():
            w = 0.5 ** ((newest - ts) / _HALF_LIFE)
            if verdict == "confirmed":
                c += w
            else:
                f += w
        return Counts(c, f, len(v))

    def put(self, alert_id: str, verdict: str, ts: float) -> bool:
        """Hold one alert's verdict (replacing its earlier one); False when nothing changed."""
        v = self.verdicts
        if v.get(alert_id) == (verdict, ts):
            return False
        v[alert_id] = (verdict, ts)
        if len(v) > MAX_VERDICTS:
            # Oldest first, alert_id breaking ties: the kept set does not depend on arrival order.
            for gone, _ in sorted(v.items(), key=lambda kv: (kv[1][1], kv[0]))[:len(v) - MAX_VERDICTS]:
                del v[gone]
        self.factor = factor_of(self.counts())
        return True


def factor_of(c: Counts) -> float:
    """The factor for a key's decayed counts (4 decimals, so that JSON round trips are exact).

    >>> factor_of(Counts(0.0, 4.0, 4)), factor_of(Counts(0.0, 5.0, 5)), factor_of(Counts(20.0, 0.0, 20))
    (1.0, 0.4444, 1.8333)
    """
    if c.held < MIN_VERDICTS:
        return 1.0
    n = c.confirmed + c.false_positive
    precision = (c.confirmed + PRIOR_CONFIRMED) / (n + PRIOR_CONFIRMED + PRIOR_FALSE)
    return round(min(max(precision / REFERENCE, MIN_FACTOR), MAX_FACTOR), 4)


class FeedbackBook:
    """Verdict counts per (detector, code) and the factors scoring asks for (models.scoring.Feedback)."""

    def __init__(self) -> None:
        self.keys: dict[tuple[str, str], _Key] = {}
        self.max_factor = 1.0

    def factor(self, detector: str, codes: Sequence[str]) -> float:
        """The multiplier of a finding's warning share: its lead code's factor, 1 for unknown keys."""
        if detector == MODEL_DETECTOR:
            if not codes:
                return 1.0
            k = self.keys.get((detector, codes[0]))
        else:
            k = self.keys.get((detector, detector[5:]))
        return 1.0 if k is None else k.factor

    def counts(self, detector: str, code: str) -> Counts:
        """A key's decayed counts (zeros for an unknown key)."""
        k = self.keys.get((detector, code))
        return Counts(0.0, 0.0, 0) if k is None else k.counts()

    def factors(self) -> Iterator[tuple[str, str, float]]:
        """(detector, code, factor) of every key, sorted."""
        for (d, c), k in sorted(self.keys.items()):
            yield d, c, k.factor

    def preview(self, note: VerdictNote) -> Adaptation | None:
        """The Adaptation record(note) would return, without recording it."""
        key = (note.detector, note.code)
        k = self.keys.get(key)
        trial = _Key()
        if k is not None:
            trial.verdicts = dict(k.verdicts)
            trial.factor = k.factor
        return self._apply(trial, note)

    def record(self, note: VerdictNote) -> Adaptation | None:
        """Count one verdict (once per alert_id); return the Adaptation if it moved the factor a band."""
        key = (note.detector, note.code)
        if key[0].startswith("rule:") and (key[0][5:] in REQUIRED_RULES or key[1] in REQUIRED_RULES):
            return None  # never a key; a record from a hand-made message is ignored, not obeyed
        k = self.keys.get(key)
        if k is None:
            k = self.keys[key] = _Key()
        a = self._apply(k, note)
        self.max_factor = max([1.0, *(x.factor for x in self.keys.values())])
        return a

    @staticmethod
    def _apply(k: _Key, note: VerdictNote) -> Adaptation | None:
        old = k.factor
        ts = note.ts.timestamp()
        if not k.put(note.alert_id, note.verdict, ts) or band(k.factor) == band(old):
            return None
        return Adaptation(note.detector, note.code, old, k.factor, k.counts(), note.alert_id, note.verdict, ts)

    # ---------------------------------------------------------------- serialisation
    def to_json(self) -> str:
        """The whole book as JSON (sorted, so equal books give equal text)."""
        keys = {key_name(d, c): {a: [v, ts] for a, (v, ts) in sorted(k.verdicts.items())}
                for (d, c), k in sorted(self.keys.items())}
        return json.dumps({"version": FORMAT_VERSION, "half_life_days": HALF_LIFE_DAYS, "keys": keys},
                          sort_keys=True)

    @classmethod
    def from_json(cls, text: str | bytes) -> FeedbackBook:
        """Rebuild a book from to_json() output; a newer format version is refused."""
        data: dict[str, Any] = json.loads(text)
        version = data.get("version")
        if version != FORMAT_VERSION:
            raise ValueError(f"feedback book format version {version!r}; this riskwatch reads {FORMAT_VERSION}")
        book = cls()
        for name, verdicts in data["keys"].items():
            detector, _, code = str(name).rpartition("/")
            for alert_id, (verdict, ts) in verdicts.items():
                book.record(VerdictNote(alert_id=alert_id, detector=detector, code=code, verdict=verdict,
                                        ts=datetime.fromtimestamp(ts, tz=UTC)))
        return book


__all__ = [
    "ADAPTIVE_RULES",
    "HALF_LIFE_DAYS",
    "MAX_FACTOR",
    "MIN_FACTOR",
    "MIN_VERDICTS",
    "Adaptation",
    "Counts",
    "FeedbackAudit",
    "FeedbackBook",
    "VerdictNote",
    "band",
    "factor_of",
    "key_name",
    "key_of",
    "note_for",
]
