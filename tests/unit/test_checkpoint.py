"""The transaction engine's Checkpoint (outputs, then state, then offsets) and its phases."""

from __future__ import annotations

import asyncio
from typing import Any

import pytest
from aiokafka import TopicPartition

from agents.transactions import Checkpoint

TP0 = TopicPartition("risk.transactions", 0)


class _Batch:
    def __init__(self) -> None:
        self.records: list[tuple[Any, Any]] = []

    def append(self, key: Any, value: Any, timestamp: Any) -> object:
        self.records.append((key, value))
        return object()

    def record_count(self) -> int:
        return len(self.records)


class _Producer:
    """Stands in for the state producer: each record batch's acknowledgement is a future the test settles."""

    def __init__(self, log: list[str]) -> None:
        self.log = log
        self.acks: list[asyncio.Future[Any]] = []

    def create_batch(self) -> _Batch:
        return _Batch()

    async def send_batch(self, batch: _Batch, topic: str, partition: int) -> asyncio.Future[Any]:
        self.log.append(f"state sent {topic}[{partition}] {batch.records}")
        ack = asyncio.get_running_loop().create_future()
        self.acks.append(ack)
        return ack


def _checkpoint(outputs: list[asyncio.Future[Any]]) -> Checkpoint:
    return Checkpoint(outputs, [("accounts-changelog", {(0, b"a"): b"state-a", (0, b"b"): None})], {TP0: 42})


async def _step(times: int = 5) -> None:
    for _ in range(times):
        await asyncio.sleep(0)


def test_each_step_starts_only_once_the_one_before_is_acknowledged() -> None:
    log: list[str] = []

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        log.append(f"committed {offsets[TP0]}")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        warning = loop.create_future()
        producer = _Producer(log)
        written: list[float] = []
        task = asyncio.create_task(_checkpoint([warning]).commit(producer, commit, written.append))  # type: ignore[arg-type]
        await _step()
        assert log == [], "step 1: nothing of the state goes out before the warnings are acknowledged"
        warning.set_result(None)
        await _step()
        assert log == ["state sent accounts-changelog[0] [(b'a', b'state-a'), (b'b', None)]"]
        assert not task.done() and written == [], "step 3 waits for the state's acknowledgement"
        producer.acks[0].set_result(None)
        await task
        assert log[-1] == "committed 42" and len(written) == 1

    asyncio.run(run())


@pytest.mark.parametrize("failing", ["outputs", "state"])
def test_a_failed_step_commits_nothing(failing: str) -> None:
    log: list[str] = []

    async def commit(offsets: dict[TopicPartition, int]) -> None:
        log.append("committed")

    async def run() -> None:
        loop = asyncio.get_running_loop()
        warning = loop.create_future()
        producer = _Producer(log)
        task = asyncio.create_task(_checkpoint([warning]).commit(producer, commit))  # type: ignore[arg-type]
        if failing == "outputs":
            warning.set_exception(OSError("warning not delivered"))
        else:
            warning.set_result(None)
            await _step()
            producer.acks[0].set_exception(OSError("changelog write not acknowledged"))
        with pytest.raises(OSError):
            await task
        assert "committed" not in log
        if failing == "outputs":
            assert log == [], "no state is written for warnings Kafka has not got"

    asyncio.run(run())


def test_take_encodes_the_states_then_takes_every_tables_changes_and_the_offsets_read() -> None:
    calls: list[str] = []

    class Processor:
        def write_state(self) -> None:
            calls.append("write_state")

    class Store:
        def __init__(self, topic: str) -> None:
            self.topic = topic

        def take_pending(self) -> dict[tuple[int, bytes], bytes | None]:
            calls.append(f"take {self.topic}")
            return {(0, b"k"): self.topic.encode()}

    read = {TP0: 7}
    cp = Checkpoint.take([], Processor(), [Store("a"), Store("b")], read)  # type: ignore[arg-type, list-item]
    assert calls == ["write_state", "take a", "take b"], "states encoded into the tables before their changes are taken"
    assert cp.changes == [("a", {(0, b"k"): b"a"}), ("b", {(0, b"k"): b"b"})]
    read[TP0] = 9
    assert cp.offsets == {TP0: 7}, "a snapshot: reading on does not move the checkpoint's offsets"


def test_the_engine_phase_allows_only_its_moves_and_shows_on_the_gauge() -> None:
    from prometheus_client import CollectorRegistry

    from agents.transactions import Phase, Phases
    from app.metrics import Metrics

    m = Metrics(CollectorRegistry())
    phases = Phases(m.engine_phase)

    def shown() -> list[str]:
        return [p.value for p in Phase
                if m.registry.get_sample_value("riskwatch_engine_phase", {"phase": p.value}) == 1.0]

    assert phases.now is Phase.IDLE and shown() == ["idle"] and not phases.serving
    # Scoring only once the first assignment's tables are read back.
    assert phases.go(Phase.RUNNING) and phases.serving and shown() == ["running"]
    phases.fail()
    assert phases.now is Phase.BROKEN and not phases.serving
    assert not phases.go(Phase.STOPPING), "a broken engine has nothing safe to write when it stops"
    assert not phases.go(Phase.REBALANCING) and phases.now is Phase.BROKEN, "it stays broken until read back"
    assert phases.go(Phase.RUNNING) and phases.go(Phase.REBALANCING) and not phases.serving
    assert not phases.go(Phase.STOPPING), "mid-rebalance there is no last write either"
    assert phases.go(Phase.RUNNING) and phases.go(Phase.STOPPING) and phases.serving, "the batch in hand ends"
    phases.fail()
    assert phases.now is Phase.STOPPED and shown() == ["stopped"], "a failure while stopping writes nothing more"
    for phase in Phase:
        assert phases.go(phase) is (phase is Phase.STOPPED), f"nothing leaves STOPPED, not even to {phase}"
    assert set(Phases.MOVES) == set(Phase)
