"""kill -9 a worker mid-stream and restart it: nothing lost, nothing learned twice, no warning changes meaning."""

from __future__ import annotations

import time

import pytest

from app.faust_app import TRANSACTIONS
from tests.faults.conftest import (
    Feed,
    assert_counter_identity,
    check_accounting,
    committed_offsets,
    counters,
    wait_drained,
)

pytestmark = [pytest.mark.kafka, pytest.mark.slow]


def test_kill9_mid_stream_then_restart(fault_settings, start_worker, feed_producer):
    s = fault_settings
    topic = s.topic(TRANSACTIONS)
    items = Feed(accounts=400, seed=1).make(16_000)
    first = start_worker(s)
    feed = feed_producer()
    feed.start(items, rate=3000)

    deadline = time.monotonic() + 120
    consumed = 0.0
    # Killed after at least one commit: the restart must then skip what the state already holds
    # (the transaction engine reaches 5,000 events within its first second, before any commit).
    while consumed < 5000 or not sum(committed_offsets(s).values()):
        assert time.monotonic() < deadline, f"worker consumed only {consumed} events:\n{first.tail()}"
        consumed = first.metric("riskwatch_events_consumed_total", topic=topic)
        time.sleep(0.2)
    first.kill()
    at_kill = committed_offsets(s)
    committed = sum(at_kill.values())
    assert committed < len(items), "the worker must die with work left"

    second = start_worker(s)
    feed.join()
    wait_drained(s, alive=lambda: second.proc.poll() is None or pytest.fail(second.tail()))
    assert second.proc.poll() is None

    c = counters(second, topic)
    assert_counter_identity(c)
    # Sent duplicates after the committed offsets are the restarted worker's own; any more
    # duplicates it counted were events the killed worker had already scored: redeliveries.
    fresh_dups = sum(1 for x in feed.sent if x.kind == "duplicate" and x.offset >= at_kill.get(x.partition, 0))
    # At least from the committed offsets on; more when its own start-up rebalances (the dead member
    # leaves the group only after the session timeout) hand it a few events twice.
    assert c["events_consumed"] >= len(items) - committed, "the restarted worker starts at the committed offsets"
    # Measured, not derived: records the restarted worker recognised by offset as applied by the killed one.
    redelivered = second.metric("riskwatch_redelivered_total", topic=topic)
    # A sent duplicate the killed worker applied and wrote to state but did not commit comes back as
    # a redelivery, counted once (as redelivered); so each such one is one fewer than the sum.
    applied_dups = sum(1 for x in feed.sent if x.kind == "duplicate"
                       and at_kill.get(x.partition, 0) <= x.offset < at_kill.get(x.partition, 0) + redelivered)
    counted_twice = fresh_dups + redelivered - c["duplicates"]
    assert 0 <= counted_twice <= applied_dups, \
        f"every duplicate is a sent one or a redelivery: {c['duplicates']} vs {fresh_dups} + {redelivered}"
    check_accounting(s, feed.sent, "kill -9", consumed_before_kill=int(consumed), committed_at_kill=committed,
                     redelivered_suppressed=int(redelivered))


def test_a_lost_commit_redelivers_everything_and_nothing_is_learned_twice(fault_settings, start_worker,
                                                                            feed_producer):
    """The group's offsets rewound to 0 after a worker applied everything: every record comes again, none counts twice.

    What a crash between writing state and committing does to a few records, done to all of them so
    the redelivery is certain and its size known: each decodable record must be recognised by the
    offset its account's state holds (riskwatch_redelivered_total), each invalid one dead-lettered
    under the same key as before, and every account's state must hold each event exactly once.
    """
    from kafka import TopicPartition
    from kafka.structs import OffsetAndMetadata

    from app.admin import admin

    s = fault_settings
    topic = s.topic(TRANSACTIONS)
    items = Feed(accounts=200, seed=3).make(6_000)
    first = start_worker(s)
    feed = feed_producer()
    feed.start(items, rate=6000)
    feed.join()
    wait_drained(s, alive=lambda: first.proc.poll() is None or pytest.fail(first.tail()))
    first.stop()  # leaves the group: its offsets can be rewound now
    ends = committed_offsets(s)
    assert sum(ends.values()) == len(items)
    client = admin(s)
    try:
        errors = client.alter_group_offsets(s.transactions_group,
                                            {TopicPartition(topic, p): OffsetAndMetadata(0, "", -1) for p in ends})
    finally:
        client.close()
    assert all(e.__name__ == "NoError" for e in errors.values()), errors

    second = start_worker(s)
    wait_drained(s, alive=lambda: second.proc.poll() is None or pytest.fail(second.tail()))
    c = counters(second, topic)
    assert_counter_identity(c)
    decodable = sum(1 for x in feed.sent if x.kind != "invalid")
    redelivered = second.metric("riskwatch_redelivered_total", topic=topic)
    assert c["events_consumed"] == len(items) and c["events_scored"] == 0, c
    assert redelivered == decodable == c["duplicates"], (redelivered, decodable, c)
    check_accounting(s, feed.sent, "lost commit", rewound=len(items), redelivered_suppressed=int(redelivered))
