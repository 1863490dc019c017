"""Every topic and group name a worker uses takes RISKWATCH_TOPIC_PREFIX; with none, the names of earlier versions."""

from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
from kafka import TopicPartition
from kafka.errors import GroupAuthorizationFailedError
from kafka.structs import OffsetAndMetadata
from prometheus_client import CollectorRegistry

from app.faust_app import Runtime
from app.metrics import Metrics
from app.migration import TABLES, current_names, legacy_names, unmigrated
from app.settings import Settings
from app.worker import build


def _worker(tmp_path: Path, **over: Any) -> Runtime:
    return build(Settings(data_dir=tmp_path, **over), Metrics(CollectorRegistry()))


def _names(rt: Runtime) -> set[str]:
    """Every topic the built worker reads or writes, and its consumer groups."""
    engine = rt.extras["transactions"]
    names = {rt.app.conf.id, rt.settings.transactions_group, rt.app._leader_assignor._leader_topic_name}
    names |= {name for t in rt.topics.values() for name in t.topics}
    names |= {name for agent in rt.app.agents.values() for name in agent.channel.topics}
    names |= {t.changelog_topic_name for t in rt.app.tables.values()}
    names |= {store.topic for store in engine.stores}
    return names


def test_without_a_prefix_every_name_is_that_of_earlier_versions(tmp_path: Path) -> None:
    rt = _worker(tmp_path, app_id="riskwatch")
    s = rt.settings
    assert rt.app.conf.id == "riskwatch" and s.transactions_group == "riskwatch-transactions"
    assert {t.changelog_topic_name for t in rt.app.tables.values()} | {st.topic for st in rt.extras[
        "transactions"].stores} == {f"riskwatch-{t}-changelog" for t in TABLES}
    assert rt.app._leader_assignor._leader_topic_name == "riskwatch-__assignor-__leader"
    assert current_names(s) == legacy_names(s)
    assert unmigrated(s, _Admin({})) is None


def test_with_a_prefix_every_topic_and_group_takes_it(tmp_path: Path) -> None:
    rt = _worker(tmp_path, topic_prefix="staging.", app_id="riskwatch")
    names = _names(rt)
    assert len(names) > 20
    assert {n for n in names if not n.startswith("staging.")} == set()
    assert {"staging.riskwatch", "staging.riskwatch-transactions", "staging.riskwatch-accounts-changelog",
            "staging.riskwatch-lifecycle-changelog", "staging.riskwatch-__assignor-__leader"} <= names


def test_topics_named_otherwise_are_used_as_named_and_the_rest_keep_the_prefix(tmp_path: Path) -> None:
    named = {"risk.transactions": "payments.txn.v1", "risk.market": "md.ticks", "risk.alerts": "ops.warnings"}
    rt = _worker(tmp_path, topic_prefix="staging.", app_id="riskwatch", topic_names=named)
    names = _names(rt)
    assert {"payments.txn.v1", "md.ticks"} <= names, "the engine and the market agent read the named inputs"
    assert rt.extras["transactions"].topic == "payments.txn.v1"
    assert {n for n in names if not n.startswith("staging.")} == {"payments.txn.v1", "md.ticks", "ops.warnings"} & names
    assert not {"staging.risk.transactions", "staging.risk.market"} & names
    # Frozen settings were hashable; the mapping among them must not change that.
    assert hash(rt.settings) == hash(Settings(topic_prefix="staging.", app_id="riskwatch", topic_names=dict(named),
                                              data_dir=tmp_path))
    assert len({Settings(), Settings(), rt.settings}) == 2


def test_the_migration_covers_every_table_the_worker_keeps(tmp_path: Path) -> None:
    rt = _worker(tmp_path, topic_prefix="p.", app_id="a")
    kept = set(rt.app.tables) | {store.name for store in rt.extras["transactions"].stores}
    assert kept == set(TABLES)
    old, new = legacy_names(rt.settings), current_names(rt.settings)
    assert old.changelogs["accounts"] == "a-accounts-changelog" and old.groups == ("a", "a-transactions")
    assert new.changelogs["accounts"] == "p.a-accounts-changelog" and new.groups == ("p.a", "p.a-transactions")


class _Admin:
    """The two calls `unmigrated` makes of kafka-python's admin client, answered from a dict."""

    def __init__(self, offsets: dict[str, dict[str, int]], topics: tuple[str, ...] = ()) -> None:
        self.offsets = offsets
        self.topics = list(topics)

    def list_group_offsets(self, group: str) -> dict[str, dict[TopicPartition, OffsetAndMetadata]]:
        if group in self.offsets.get("forbidden", {}):
            raise GroupAuthorizationFailedError(group)
        got = self.offsets.get(group, {})
        return {group: {TopicPartition(t, 0): OffsetAndMetadata(o, "", -1) for t, o in got.items()}}

    def list_topics(self) -> list[str]:
        return self.topics


S = Settings(topic_prefix="staging.", app_id="rw")


@pytest.mark.parametrize(("offsets", "refused"), [
    ({}, False),  # a new deployment
    ({"rw-transactions": {"staging.risk.transactions": 40}}, True),  # its engine ran under the old group
    ({"rw": {"staging.risk.acks": 3}}, True),  # ... or its Faust agents did
    ({"rw-transactions": {"prod.risk.transactions": 40}}, False),  # the old names hold another deployment's state
    ({"forbidden": {"rw": 0, "rw-transactions": 0}}, False),  # ACLs that cover only the prefix: never ran there
    ({"rw-transactions": {"staging.risk.transactions": 40},
      "staging.rw-transactions": {"staging.risk.transactions": 52}}, False),  # already runs under the new names
])
def test_a_deployment_whose_state_is_under_the_old_names_is_refused(offsets: dict[str, dict[str, int]],
                                                                    refused: bool) -> None:
    reason = unmigrated(S, _Admin(offsets, ("rw-accounts-changelog", "rw-models-changelog")))
    assert (reason is not None) == refused
    if reason is not None:
        assert "riskwatch migrate-state" in reason and "rw-accounts-changelog" in reason
        assert "staging.rw-accounts-changelog" in reason


def test_the_worker_command_refuses_before_anything_joins_a_group(monkeypatch: pytest.MonkeyPatch,
                                                                   capsys: pytest.CaptureFixture[str]) -> None:
    import app.migration
    import app.worker
    from app.cli import main
    from models.errors import StateMigrationError

    def refuse(s: Settings) -> None:
        raise StateMigrationError("state under the old names; run 'riskwatch migrate-state'")

    def run() -> None:
        raise AssertionError("the worker ran")

    monkeypatch.setattr(app.migration, "refuse_if_unmigrated", refuse)
    monkeypatch.setattr(app.worker, "run", run)
    assert main(["worker"]) == 2
    assert "riskwatch worker: state under the old names; run 'riskwatch migrate-state'" in capsys.readouterr().err


def test_topic_names_that_cannot_work_are_refused_with_what_to_fix(monkeypatch: pytest.MonkeyPatch) -> None:
    from app.settings import get_settings
    from app.worker import refuse_if_topic_names_clash
    from models.errors import ConfigError

    with pytest.raises(ConfigError, match=r"names risk\.foo, which riskwatch does not use; its topics are "
                                          r"risk\.transactions, risk\.market"):
        refuse_if_topic_names_clash(Settings(topic_names={"risk.foo": "x"}))
    with pytest.raises(ConfigError, match=r"risk\.transactions and risk\.alerts would both be the topic "
                                          r"risk\.transactions"):
        refuse_if_topic_names_clash(Settings(topic_names={"risk.alerts": "risk.transactions"}))
    refuse_if_topic_names_clash(Settings(topic_names={"risk.alerts": "ops.warnings"}))
    # Not JSON at all: pydantic-settings' own error, said as one line naming the variable.
    monkeypatch.setenv("RISKWATCH_TOPIC_NAMES", "payments.txn.v1")
    get_settings.cache_clear()
    try:
        with pytest.raises(ConfigError, match=r"^RISKWATCH_TOPIC_NAMES is not valid JSON"):
            get_settings()
    finally:
        get_settings.cache_clear()
