"""State under the names of earlier versions: changelogs and consumer groups from before they took the prefix.

Until this version a deployment's changelog topics (`<app id>-<table>-changelog`) and consumer
groups (`<app id>`, `<app id>-transactions`) ignored RISKWATCH_TOPIC_PREFIX, so two deployments
sharing a cluster and an app id wrote each other's state. Now every one of these names starts with
`<prefix><app id>` (`Settings.deployment_id`); with an empty prefix the names are unchanged.

A deployment with a prefix whose state is still under the old names is refused at start
(`refuse_if_unmigrated`) until `riskwatch migrate-state` has copied it, run once with every worker
stopped. Not copied automatically at start, as the Faust-era offsets are adopted
(agents/transactions.py): in a rolling upgrade the workers of the previous version still write the
old changelogs while the first new one would copy them (updates after the copy lost), and the old
names may be shared with another deployment, whose accounts a copy would bring along unasked.
The evidence that the old names hold *this* deployment's state: an old group committed offsets
of this deployment's own (prefixed) input topics, and the new groups none yet.
"""

from __future__ import annotations

import logging
import time
from collections.abc import Callable
from dataclasses import dataclass
from typing import Any

from kafka import TopicPartition
from kafka.admin import KafkaAdminClient, NewTopic
from kafka.errors import GroupAuthorizationFailedError, KafkaError, TopicAlreadyExistsError
from kafka.structs import OffsetAndMetadata

from app.admin import admin, consumer, producer
from app.faust_app import ALL_TOPICS
from app.settings import Settings
from models.errors import StateMigrationError

log = logging.getLogger("riskwatch.migration")

# Every table with a changelog: the transaction engine's own (app/changelog.py: accounts, models,
# disclosure-flows) and Faust's (instruments, lifecycle, disclosure-book, market-stress, platform). A
# test checks that the worker declares exactly these. Tables newer than the old names (market-stress,
# platform) have no old changelog: the copy skips them.
TABLES = ("accounts", "models", "disclosure-flows", "instruments", "lifecycle", "disclosure-book", "market-stress",
          "platform")


@dataclass(frozen=True)
class Names:
    """Where a deployment keeps its state: one changelog topic per table, and its consumer groups."""

    changelogs: dict[str, str]
    groups: tuple[str, ...]  # Faust's group, then the transaction engine's


def current_names(s: Settings) -> Names:
    """The names this version uses (`<prefix><app id>...`)."""
    return Names({t: s.changelog(t) for t in TABLES}, (s.deployment_id, s.transactions_group))


def legacy_names(s: Settings) -> Names:
    """The names earlier versions used (`<app id>...`, whatever the prefix)."""
    return Names({t: f"{s.app_id}-{t}-changelog" for t in TABLES}, (s.app_id, f"{s.app_id}-transactions"))


def own_topics(s: Settings) -> set[str]:
    """This deployment's topics, the only ones whose offsets say anything about its state."""
    return {s.topic(name) for name in ALL_TOPICS}


def group_offsets(client: KafkaAdminClient, group: str, topics: set[str],
                  timeout: float = 30.0) -> dict[TopicPartition, int]:
    """Offsets `group` committed on `topics` (empty for a group that never committed)."""
    deadline = time.monotonic() + timeout
    while True:
        try:
            got = client.list_group_offsets(group).get(group, {})
            break
        except KafkaError as exc:
            # A new cluster has no coordinator until __consumer_offsets exists (the first lookup creates it).
            if not exc.retriable or time.monotonic() > deadline:
                raise
            time.sleep(0.5)
    return {tp: om.offset for tp, om in got.items() if tp.topic in topics and om.offset >= 0}


def unmigrated(s: Settings, client: KafkaAdminClient) -> str | None:
    """Why this deployment may not start yet (its state is under the old names), or None if it may."""
    if not s.topic_prefix:
        return None  # an empty prefix: the old names are this version's
    old, new, mine = legacy_names(s), current_names(s), own_topics(s)
    if any(group_offsets(client, g, mine) for g in new.groups):
        return None  # it already ran under the new names
    evidence = {g: sorted({tp.topic for tp in _old_group_offsets(client, g, mine)}) for g in old.groups}
    evidence = {g: topics for g, topics in evidence.items() if topics}
    if not evidence:
        return None  # nothing of this deployment was ever processed under the old names
    held = sorted(set(old.changelogs.values()) & set(client.list_topics()))
    said = "; ".join(f"group {g} committed offsets of {', '.join(t)}" for g, t in evidence.items())
    return (f"this deployment's state is under the names used before changelogs and consumer groups took "
            f"RISKWATCH_TOPIC_PREFIX ({said}; changelogs {', '.join(held) or 'none'}), and nothing under the new "
            f"ones ({new.changelogs['accounts']}, group {new.groups[1]}, ...). Stop every worker of this "
            f"deployment, old version included, then run 'riskwatch migrate-state' once: it copies the changelogs "
            f"and the committed offsets to the new names. 'riskwatch migrate-state --fresh' copies only the "
            f"offsets (every account and model starts afresh)")


def _old_group_offsets(client: KafkaAdminClient, group: str, topics: set[str]) -> dict[TopicPartition, int]:
    # A deployment whose ACLs cover only its prefix may not describe the unprefixed groups: then
    # none of its state can be under them either (it could never have committed there).
    try:
        return group_offsets(client, group, topics)
    except GroupAuthorizationFailedError:
        log.info("not allowed to read group %s: taking it as holding none of this deployment's offsets", group)
        return {}


def refuse_if_unmigrated(s: Settings) -> None:
    """Raise StateMigrationError, saying what to run, when this deployment's state is still under the old names."""
    if not s.topic_prefix:
        return
    client = admin(s)
    try:
        reason = unmigrated(s, client)
    finally:
        client.close()
    if reason is not None:
        raise StateMigrationError(reason)


def migrate(s: Settings, fresh: bool = False, say: Callable[[str], None] = log.info,
            src: Names | None = None, dst: Names | None = None) -> int:
    """Copy this deployment's changelogs (unless `fresh`) and committed offsets from the old names to the new.

    Refused while any worker is in either set of groups, or once the new groups hold offsets. The
    changelogs go first and the offsets last: an interrupted run is simply run again (a changelog
    copied twice holds the old log twice over, and compaction keeps each key's last value, the
    same). Returns the changelog records copied. `src` and `dst` default to the old and new names.
    """
    src = src or legacy_names(s)
    dst = dst or current_names(s)
    if src == dst:
        raise StateMigrationError("nothing to migrate: with an empty RISKWATCH_TOPIC_PREFIX the names are those "
                                  "of earlier versions")
    mine = own_topics(s)
    client = admin(s)
    try:
        _refuse_if_running(client, (*src.groups, *dst.groups))
        if any(group_offsets(client, g, mine) for g in dst.groups):
            raise StateMigrationError(f"the groups {', '.join(dst.groups)} already hold offsets: this deployment "
                                      "has run under its new names, and copying now would roll its state back")
        offsets = {new: group_offsets(client, old, mine) for old, new in zip(src.groups, dst.groups, strict=True)}
        if not any(offsets.values()):
            raise StateMigrationError(f"the groups {', '.join(src.groups)} committed no offsets of this deployment's "
                                      f"topics ({s.topic_prefix}risk.*): there is nothing of it to migrate")
        copied = 0
        if fresh:
            say("--fresh: changelogs not copied; every account and model starts afresh")
        else:
            _say_shared(client, src, mine, say)
            existing = set(client.list_topics())
            for table in TABLES:
                old, new = src.changelogs[table], dst.changelogs[table]
                if old not in existing:
                    continue
                n = _copy_topic(s, client, old, new)
                say(f"copied {n} records of {old} to {new}")
                copied += n
        for group, got in offsets.items():
            if got:
                failed = {tp: err for tp, err in client.alter_group_offsets(
                    group, {tp: OffsetAndMetadata(off, "", -1) for tp, off in got.items()}).items()
                    if err.errno != 0}
                if failed:
                    raise StateMigrationError(f"committing offsets for group {group} failed: {failed}")
                say(f"group {group} starts where the old one stopped: {_offsets_text(got)}")
        return copied
    finally:
        client.close()


def _refuse_if_running(client: KafkaAdminClient, groups: tuple[str, ...]) -> None:
    # A worker still running would write the old changelogs after the copy, or commit under the new group.
    for group, desc in client.describe_groups(list(groups)).items():
        members = desc.get("members") or []
        if members:
            raise StateMigrationError(f"group {group} has {len(members)} member(s): stop every worker of this "
                                      "deployment (old and new version) first")


def _say_shared(client: KafkaAdminClient, src: Names, mine: set[str], say: Callable[[str], None]) -> None:
    # The old names were shared if an old group also read another deployment's riskwatch topics.
    others: set[str] = set()
    for group in src.groups:
        got = client.list_group_offsets(group).get(group, {})
        others |= {tp.topic for tp in got if tp.topic not in mine and tp.topic.endswith(ALL_TOPICS)}
    if others:
        say(f"the old names were shared with another deployment (their groups also read {', '.join(sorted(others))}):"
            " the copied changelogs hold its state too, as they did before; use --fresh to start without it")


def _copy_topic(s: Settings, client: KafkaAdminClient, old: str, new: str, timeout: float = 600.0) -> int:
    """Copy every record of `old` to the same partition of `new` (created compacted if missing); return the count."""
    parts = sorted(client.describe_topics([old])[0]["partitions"], key=lambda p: p["partition_index"])
    try:
        client.create_topics([NewTopic(new, len(parts), s.topic_replication,
                                       topic_configs={"cleanup.policy": "compact"})], timeout_ms=30_000)
    except TopicAlreadyExistsError:
        pass
    tps = [TopicPartition(old, p["partition_index"]) for p in parts]
    reader = consumer(s, group_id=None, enable_auto_commit=False, max_partition_fetch_bytes=16 * 1024 * 1024)
    writer = producer(s, max_request_size=16 * 1024 * 1024, linger_ms=20)
    futures: list[Any] = []
    try:
        reader.assign(tps)
        reader.seek_to_beginning(*tps)
        end = reader.end_offsets(tps)
        todo = {tp for tp in tps if reader.position(tp) < end[tp]}
        deadline = time.monotonic() + timeout
        while todo:
            if time.monotonic() > deadline:
                raise StateMigrationError(f"copying {old} took over {timeout:.0f} s; run the migration again")
            for tp, records in reader.poll(timeout_ms=500, max_records=10_000).items():
                futures.extend(writer.send(new, key=r.key, value=r.value, partition=tp.partition,
                                           timestamp_ms=r.timestamp if r.timestamp >= 0 else None,
                                           headers=list(r.headers or []) or None)
                               for r in records if r.offset < end[tp])
            todo = {tp for tp in todo if reader.position(tp) < end[tp]}
        writer.flush(timeout=120)
        failed = [f.exception for f in futures if f.failed()]
        if failed or not all(f.is_done for f in futures):
            raise StateMigrationError(f"copying {old} to {new}: {len(failed)} records not written ({failed[:1]}); "
                                      "run the migration again")
        return len(futures)
    finally:
        reader.close()
        writer.close()


def _offsets_text(offsets: dict[TopicPartition, int]) -> str:
    return ", ".join(f"{tp.topic}[{tp.partition}]={off}" for tp, off in sorted(offsets.items()))


__all__ = ["TABLES", "Names", "current_names", "group_offsets", "legacy_names", "migrate", "own_topics",
           "refuse_if_unmigrated", "unmigrated"]
