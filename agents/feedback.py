"""Verdict feedback at run time: every worker follows risk.feedback from its beginning into one FeedbackBook.

risk.feedback holds one record per alert with a verdict (key alert_id, compacted, one partition),
written by the disposal agent of whichever worker owns the alert. Records are per alert, not per
(detector, code), because several workers resolve alerts of the same key at once: a per-key state
written by each would lose the other's verdicts (last writer wins), while per-alert records merge
into the same book on every worker whatever their order (models.feedback: the factor depends on
the set of verdicts only). A redelivered record is counted once; a changed verdict replaces it.

The follower is like agents/control.py's rules follower (no consumer group: every worker reads
all). Each record goes into the book the worker's scorer consults; when the largest factor
changes the scorer is told again (it caches it for its hot-path pre-check). `ready` is set once
the records present at start are read, so the disposal agent judges adaptations against the full
history, not a half-read one.
"""

from __future__ import annotations

import asyncio
import logging

from aiokafka import AIOKafkaConsumer, TopicPartition
from pydantic import ValidationError

from app.admin import aiokafka_config
from app.faust_app import FEEDBACK, Runtime
from app.logs import Retries
from models.feedback import Adaptation, FeedbackBook, VerdictNote
from models.scoring import TransactionScorer

log = logging.getLogger("riskwatch.agents.feedback")
CLOSE_SECONDS = 2.0  # longest the follower's consumer may take to close when the worker stops

READY_TIMEOUT = 30.0  # seconds the disposal agent waits for the history before judging adaptations anyway


class FeedbackFollower:
    """Keeps this worker's FeedbackBook: the history on risk.feedback, then every new verdict."""

    def __init__(self, rt: Runtime, scorer: TransactionScorer | None, book: FeedbackBook | None = None) -> None:
        self.rt = rt
        self.scorer = scorer
        self.book = book if book is not None else FeedbackBook()
        self.ready = asyncio.Event()
        self._max = self.book.max_factor
        if scorer is not None:
            scorer.set_feedback(self.book)

    def apply(self, note: VerdictNote) -> Adaptation | None:
        """Count one verdict in the book, update the gauge and the scorer; return the adaptation if any."""
        book = self.book
        before = book.factor(note.detector, [note.code])
        a = book.record(note)
        after = book.factor(note.detector, [note.code])
        self.rt.metrics.feedback_factor.labels(note.detector, note.code).set(after)
        if after != before:
            log.info("feedback %s/%s: factor %.4g -> %.4g (%s on %s)", note.detector, note.code, before, after,
                     note.verdict, note.alert_id)
        if book.max_factor != self._max:
            self._max = book.max_factor
            if self.scorer is not None:
                self.scorer.set_feedback(book)
        return a

    def handle(self, raw: bytes | None, offset: int) -> None:
        """Apply one record of risk.feedback; a tombstone or an invalid record is skipped and counted."""
        m = self.rt.metrics.feedback_verdicts
        if raw is None:
            return
        try:
            note = VerdictNote.model_validate_json(raw)
        except ValidationError as exc:
            m.labels("invalid").inc()
            log.warning("skipped invalid record at %s@%s: %s", self.rt.settings.topic(FEEDBACK), offset,
                        exc.errors(include_url=False)[0]["msg"])
            return
        before = self.book.counts(note.detector, note.code)
        self.apply(note)
        m.labels("repeated" if self.book.counts(note.detector, note.code) == before else "applied").inc()

    async def wait_ready(self, timeout: float = READY_TIMEOUT) -> None:
        """Wait (at most `timeout`) until the history present at start has been read."""
        if self.ready.is_set():
            return
        try:
            await asyncio.wait_for(self.ready.wait(), timeout)
        except TimeoutError:
            log.warning("risk.feedback history not read within %.0f s; judging adaptations without it", timeout)

    async def run(self) -> None:
        """Follow risk.feedback for the life of the worker, from its beginning."""
        topic = self.rt.settings.topic(FEEDBACK)
        consumer = AIOKafkaConsumer(**aiokafka_config(self.rt.settings), enable_auto_commit=False, group_id=None)
        await consumer.start()
        try:
            tp = TopicPartition(topic, 0)
            consumer.assign([tp])
            await consumer.seek_to_beginning(tp)
            end = (await consumer.end_offsets([tp]))[tp]
            if end == 0:
                self.ready.set()
            while True:
                batch = await consumer.getmany(timeout_ms=500)
                for msgs in batch.values():
                    for msg in msgs:
                        self.handle(msg.value, msg.offset)
                        if msg.offset + 1 >= end:
                            self.ready.set()
                if not self.ready.is_set() and await consumer.position(tp) >= end:
                    self.ready.set()
        except asyncio.CancelledError:
            raise
        finally:
            # Bounded: with the broker gone the close waits for it, and the worker must exit (issue 17).
            try:
                await asyncio.wait_for(consumer.stop(), CLOSE_SECONDS)
            except TimeoutError:
                log.warning("the feedback follower's consumer did not close within %.0f s; left to the process exit",
                            CLOSE_SECONDS)


def attach(rt: Runtime, follower: FeedbackFollower) -> None:
    """Run the follower as a task of the app."""

    @rt.app.task
    async def follow_feedback() -> None:
        retries = Retries(log, "feedback follower")
        while True:
            try:
                await follower.run()
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # noqa: BLE001 - any failure is told (Retries) and retried
                retries.failed(exc, "retrying in 2 s")
                await asyncio.sleep(2.0)


__all__ = ["READY_TIMEOUT", "FeedbackFollower", "attach"]
