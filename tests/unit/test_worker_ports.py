"""A worker that could not run (a port taken, a codec missing) says what to change, once, before contacting Kafka."""

from __future__ import annotations

import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[2]


@pytest.mark.parametrize("variable", ["RISKWATCH_METRICS_PORT", "RISKWATCH_WEB_PORT"])
def test_a_taken_port_is_refused_with_the_setting_to_change(variable: str, tmp_path: Path) -> None:
    with socket.socket() as taken, socket.socket() as free:
        taken.bind(("127.0.0.1", 0))
        taken.listen()
        free.bind(("127.0.0.1", 0))
        spare = str(free.getsockname()[1])
        ports = {"RISKWATCH_METRICS_PORT": spare, "RISKWATCH_WEB_PORT": spare}
        ports[variable] = str(taken.getsockname()[1])
        free.close()  # the other port is free to bind
        env = {k: v for k, v in os.environ.items() if not k.startswith("RISKWATCH_")}
        # Nothing listens on port 9: a worker that reached Kafka before the check would hang, not refuse.
        env.update(ports, RISKWATCH_KAFKA_BOOTSTRAP="127.0.0.1:9", RISKWATCH_DATA_DIR=str(tmp_path))
        done = subprocess.run([sys.executable, "-m", "app.cli", "worker"], cwd=ROOT, env=env, capture_output=True,
                              text=True, timeout=60)
    assert done.returncode == 2, done.stderr[-2000:]
    said = done.stderr.strip().splitlines()
    where = f"127.0.0.1:{ports[variable]}"
    assert len(said) == 1 and said[0].startswith(f"riskwatch worker: cannot listen on {where}"), said
    assert said[0].endswith(f"set {variable} to a free port"), said


def test_a_worker_that_could_not_read_a_kafka_codec_does_not_start(monkeypatch: pytest.MonkeyPatch) -> None:
    """Measured: the first snappy batch stopped the engine in a retry loop; now the install is named at start."""
    import aiokafka.codec

    from app.worker import refuse_if_codecs_missing
    from models.errors import ConfigError

    refuse_if_codecs_missing()  # the dependencies read them all
    monkeypatch.setattr(aiokafka.codec, "cramjam", None)
    with pytest.raises(ConfigError, match=r"cannot read records compressed with snappy, lz4, zstd.*install riskwatch"):
        refuse_if_codecs_missing()

